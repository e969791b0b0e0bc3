"""query-migrate's clock (agents/migration.py): when total-time stops."""

from __future__ import annotations

import time

from agents.events import EventBus
from agents.migration import MigrationState
from protocol.states import MigrationStatus as S
from protocol.states import Role


def _active_source() -> MigrationState:
    state = MigrationState(Role.SOURCE, "vm1", EventBus())
    state.set_status(S.SETUP)
    state.set_status(S.ACTIVE)
    return state


def test_total_time_stops_when_the_migration_ends_not_when_the_status_is_published() -> None:
    """The source marks the end when the destination runs the guest; releasing its
    own copy comes after and must not count (QEMU's total-time)."""
    state = _active_source()
    state.set_status(S.DEVICE)
    state.end_ms = state.start_ms + 1234.0  # the destination confirmed here
    time.sleep(0.05)  # the release of the source's copy
    state.set_status(S.COMPLETED)
    assert state.end_ms == state.start_ms + 1234.0
    assert state.info()["total-time"] == 1234


def test_a_terminal_status_stops_the_clock_when_nothing_did_before() -> None:
    state = _active_source()
    state.set_status(S.FAILED)
    assert state.end_ms is not None
    frozen = state.info()["total-time"]
    time.sleep(0.02)
    assert state.info()["total-time"] == frozen
