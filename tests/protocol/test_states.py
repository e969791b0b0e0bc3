"""The migration state tables: every legal move passes, every other move raises."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from protocol.errors import MigrationStateError
from protocol.states import (
    COMMAND_STATES,
    TRANSITIONS,
    MigrationStatus,
    Role,
    StateMachine,
    allowed_commands,
    format_dot,
    format_text,
    is_guest_split,
    is_postcopy,
    is_terminal,
    transition,
)

S = MigrationStatus
ALL_PAIRS = list(itertools.product(MigrationStatus, MigrationStatus))


def test_status_names_are_qemus() -> None:
    assert [s.value for s in MigrationStatus] == [
        "none",
        "setup",
        "active",
        "pre-switchover",
        "device",
        "postcopy-device",
        "postcopy-active",
        "postcopy-paused",
        "postcopy-recover-setup",
        "postcopy-recover",
        "completed",
        "failed",
        "cancelling",
        "cancelled",
    ]


@pytest.mark.parametrize(
    ("role", "pair"),
    [(role, pair) for role in Role for pair in sorted(TRANSITIONS[role])],
)
def test_every_legal_move_passes(role: Role, pair: tuple[MigrationStatus, MigrationStatus]) -> None:
    assert transition(role, pair[0], pair[1]) is pair[1]


@pytest.mark.parametrize("role", list(Role))
def test_every_illegal_move_raises_naming_role_and_states(role: Role) -> None:
    illegal = [p for p in ALL_PAIRS if p not in TRANSITIONS[role]]
    assert len(illegal) > 150
    for a, b in illegal:
        with pytest.raises(MigrationStateError) as info:
            transition(role, a, b)
        assert info.value.role == role.value
        assert (info.value.from_status, info.value.to_status) == (a.value, b.value)
        assert f"{a.value} -> {b.value}" in str(info.value) and role.value in str(info.value)


def test_terminal_states_have_no_way_out() -> None:
    for role in Role:
        assert not [p for p in TRANSITIONS[role] if is_terminal(p[0])]


def test_every_state_used_by_a_role_is_reachable_from_none() -> None:
    for role in Role:
        edges = TRANSITIONS[role]
        seen = {S.NONE}
        frontier = [S.NONE]
        while frontier:
            a = frontier.pop()
            for x, y in edges:
                if x is a and y not in seen:
                    seen.add(y)
                    frontier.append(y)
        assert seen == {s for pair in edges for s in pair}


def test_source_precopy_story() -> None:
    m = StateMachine(Role.SOURCE)
    for s in (S.SETUP, S.ACTIVE, S.PRE_SWITCHOVER, S.DEVICE, S.COMPLETED):
        m.move(s)
    assert m.history == [S.NONE, S.SETUP, S.ACTIVE, S.PRE_SWITCHOVER, S.DEVICE, S.COMPLETED]


def test_source_postcopy_with_two_failed_recoveries() -> None:
    m = StateMachine(Role.SOURCE)
    for s in (S.SETUP, S.ACTIVE, S.DEVICE, S.POSTCOPY_DEVICE, S.POSTCOPY_ACTIVE):
        m.move(s)
    m.move(S.POSTCOPY_PAUSED)
    m.move(S.POSTCOPY_RECOVER_SETUP)
    m.move(S.POSTCOPY_PAUSED)  # could not connect
    m.move(S.POSTCOPY_RECOVER_SETUP)
    m.move(S.POSTCOPY_RECOVER)
    m.move(S.POSTCOPY_PAUSED)  # handshake broke
    m.move(S.POSTCOPY_RECOVER_SETUP)
    m.move(S.POSTCOPY_RECOVER)
    m.move(S.POSTCOPY_ACTIVE)
    m.move(S.COMPLETED)
    assert m.status is S.COMPLETED


def test_destination_has_no_recover_setup_and_no_device() -> None:
    used = {s for pair in TRANSITIONS[Role.DESTINATION] for s in pair}
    assert S.POSTCOPY_RECOVER_SETUP not in used
    assert S.DEVICE not in used and S.PRE_SWITCHOVER not in used
    m = StateMachine(Role.DESTINATION)
    for s in (S.SETUP, S.ACTIVE, S.POSTCOPY_DEVICE, S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED):
        m.move(s)
    with pytest.raises(MigrationStateError):
        m.move(S.POSTCOPY_RECOVER_SETUP)
    assert m.status is S.POSTCOPY_PAUSED  # a refused move changes nothing
    m.move(S.POSTCOPY_RECOVER)
    m.move(S.POSTCOPY_ACTIVE)


def test_a_paused_postcopy_never_fails_or_cancels() -> None:
    for role in Role:
        for src in (S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_RECOVER):
            for dst in (S.FAILED, S.CANCELLING, S.CANCELLED):
                assert (src, dst) not in TRANSITIONS[role]


def test_postcopy_predicates() -> None:
    assert is_postcopy(S.POSTCOPY_DEVICE) and not is_guest_split(S.POSTCOPY_DEVICE)
    assert is_guest_split(S.POSTCOPY_PAUSED) and is_guest_split(S.POSTCOPY_ACTIVE)
    assert not is_postcopy(S.DEVICE) and not is_guest_split(S.ACTIVE)


def test_cancel_is_never_offered_in_postcopy() -> None:
    for role in Role:
        for status in MigrationStatus:
            allowed = allowed_commands(role, status)
            if is_postcopy(status):
                assert "migrate-cancel" not in allowed
            # a command offered must lead somewhere legal from there
            if "migrate-cancel" in allowed:
                assert (status, S.CANCELLING) in TRANSITIONS[role]


def test_commands_per_state() -> None:
    assert "migrate-continue" in allowed_commands(Role.SOURCE, S.PRE_SWITCHOVER)
    assert "migrate-resume" in allowed_commands(Role.SOURCE, S.POSTCOPY_PAUSED)
    assert "migrate-recover" not in allowed_commands(Role.SOURCE, S.POSTCOPY_PAUSED)
    assert "migrate-recover" in allowed_commands(Role.DESTINATION, S.POSTCOPY_PAUSED)
    assert "migrate-start-postcopy" in allowed_commands(Role.SOURCE, S.ACTIVE)
    assert "migrate-pause" in allowed_commands(Role.DESTINATION, S.POSTCOPY_ACTIVE)
    assert "migrate-pause" not in allowed_commands(Role.DESTINATION, S.POSTCOPY_PAUSED)
    assert "migrate" in allowed_commands(Role.SOURCE, S.FAILED)
    assert "migrate" not in allowed_commands(Role.SOURCE, S.ACTIVE)
    for cmd in (
        "migrate",
        "migrate-incoming",
        "migrate-cancel",
        "migrate-start-postcopy",
        "migrate-continue",
        "migrate-pause",
        "migrate-recover",
        "migrate-resume",
    ):
        assert set(COMMAND_STATES[cmd]) == set(Role)


def test_printed_tables_come_from_the_data() -> None:
    text = format_text()
    assert "postcopy-recover-setup   -> postcopy-paused, postcopy-recover" in text
    dot = format_dot()
    for role in Role:
        for a, b in TRANSITIONS[role]:
            assert f'"{role.value}:{a.value}" -> "{role.value}:{b.value}";' in dot
    out = subprocess.run(
        [sys.executable, "-m", "protocol.states", "--dot"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout == dot
