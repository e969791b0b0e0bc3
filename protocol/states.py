"""Migration states and the one table of legal moves both agents run on.

Theory of operation
-------------------

Everything that decides which migration status may follow which lives in
this file, as data: ``TRANSITIONS`` for the moves, ``COMMAND_STATES`` for
which control command is accepted in which status.  The agents call
:func:`transition` for every change, the control server and the TUI call
:func:`allowed_commands`, and ``python -m protocol.states`` prints the very
same tables (text, or Graphviz with ``--dot``), so the documentation cannot
drift from the code.  Like h11's ``_state.py``, this file does not know
*why* a move happens (a scan result, a lost link, an admin's command); it
only knows whether the move is legal.

The names and moves are QEMU's (``qapi/migration.json``, the
``migrate_set_state`` calls in ``migration/migration.c``, ``savevm.c`` and
``postcopy-ram.c``, and ``docs/devel/migration/postcopy.rst``):

* Precopy, source: ``none → setup → active → [pre-switchover] → device →
  completed``.  ``pre-switchover`` exists only with the
  ``pause-before-switchover`` capability and is left by ``migrate-continue``.
* Postcopy, source: ``active → [pre-switchover] → device → postcopy-device →
  postcopy-active → completed``.  In ``postcopy-device`` (QEMU 10.2) the
  destination is loading device state and has not run the guest yet, so the
  source still holds the whole guest: a failure there is ``failed`` and the
  source simply keeps running.  From ``postcopy-active`` on, neither host
  holds the whole guest, so a broken link *pauses* instead of failing.
* Destination: ``none → setup → active → completed``; postcopy goes
  ``active → postcopy-device`` at LISTEN and ``→ postcopy-active`` at RUN.
* Recovery: ``postcopy-active → postcopy-paused``.  On the source,
  ``migrate-resume`` moves ``postcopy-paused → postcopy-recover-setup``
  (channels being re-established; QEMU 9.1 added this state on the source
  only) ``→ postcopy-recover`` (the handshake) ``→ postcopy-active``.  A
  failure during recovery goes back to ``postcopy-paused``, never to
  ``failed``.  The destination goes ``postcopy-paused → postcopy-recover``
  when the source reconnects.
* ``failed`` is reachable from every state where one host still holds the
  whole guest, and from ``postcopy-active`` for errors that are not I/O
  (QEMU does the same: the guest is then lost, which is why I/O errors pause).
* ``cancelling → cancelled`` from every non-postcopy running state.  QEMU's
  destination has no ``cancelling``; godwit lets an admin cancel an incoming
  precopy migration too, which is safe because the source still has the
  guest.

``none``, ``completed``, ``failed`` and ``cancelled`` are ends: a new
migration starts a new state machine at ``none`` (QEMU's ``migrate_init``
resets the state the same way, outside ``migrate_set_state``).
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from protocol.errors import MigrationStateError

__all__ = [
    "COMMAND_STATES",
    "TRANSITIONS",
    "MigrationStateError",
    "MigrationStatus",
    "Role",
    "StateMachine",
    "allowed_commands",
    "is_active",
    "is_guest_split",
    "is_paused",
    "is_postcopy",
    "is_terminal",
    "transition",
]


class MigrationStatus(enum.StrEnum):
    """QEMU's ``MigrationStatus`` names, exactly, as ``query-migrate`` reports them."""

    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    POSTCOPY_DEVICE = "postcopy-device"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER_SETUP = "postcopy-recover-setup"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


class Role(enum.StrEnum):
    """Which end of a migration an agent plays; the tables differ per role."""

    SOURCE = "source"
    DESTINATION = "destination"


S = MigrationStatus

_SOURCE: frozenset[tuple[MigrationStatus, MigrationStatus]] = frozenset(
    {
        # start
        (S.NONE, S.SETUP),
        (S.SETUP, S.ACTIVE),
        (S.SETUP, S.FAILED),
        (S.SETUP, S.CANCELLING),
        # precopy and switchover
        (S.ACTIVE, S.PRE_SWITCHOVER),
        (S.ACTIVE, S.DEVICE),
        (S.ACTIVE, S.FAILED),
        (S.ACTIVE, S.CANCELLING),
        (S.PRE_SWITCHOVER, S.DEVICE),
        (S.PRE_SWITCHOVER, S.FAILED),
        (S.PRE_SWITCHOVER, S.CANCELLING),
        (S.DEVICE, S.COMPLETED),
        (S.DEVICE, S.FAILED),
        (S.DEVICE, S.CANCELLING),
        # postcopy
        (S.DEVICE, S.POSTCOPY_DEVICE),
        (S.POSTCOPY_DEVICE, S.POSTCOPY_ACTIVE),
        (S.POSTCOPY_DEVICE, S.FAILED),
        (S.POSTCOPY_ACTIVE, S.COMPLETED),
        (S.POSTCOPY_ACTIVE, S.FAILED),
        # recovery
        (S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED),
        (S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER_SETUP),
        (S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_RECOVER),
        (S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_PAUSED),
        (S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE),
        (S.POSTCOPY_RECOVER, S.POSTCOPY_PAUSED),
        # cancel
        (S.CANCELLING, S.CANCELLED),
    }
)

_DESTINATION: frozenset[tuple[MigrationStatus, MigrationStatus]] = frozenset(
    {
        (S.NONE, S.SETUP),
        (S.SETUP, S.ACTIVE),
        (S.SETUP, S.FAILED),
        (S.SETUP, S.CANCELLING),
        (S.ACTIVE, S.COMPLETED),
        (S.ACTIVE, S.FAILED),
        (S.ACTIVE, S.CANCELLING),
        # postcopy: LISTEN, then RUN
        (S.ACTIVE, S.POSTCOPY_DEVICE),
        (S.POSTCOPY_DEVICE, S.POSTCOPY_ACTIVE),
        (S.POSTCOPY_DEVICE, S.FAILED),
        (S.POSTCOPY_ACTIVE, S.COMPLETED),
        (S.POSTCOPY_ACTIVE, S.FAILED),
        # recovery (no recover-setup on the destination, as in QEMU)
        (S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED),
        (S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER),
        (S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE),
        (S.POSTCOPY_RECOVER, S.POSTCOPY_PAUSED),
        (S.CANCELLING, S.CANCELLED),
    }
)

TRANSITIONS: dict[Role, frozenset[tuple[MigrationStatus, MigrationStatus]]] = {
    Role.SOURCE: _SOURCE,
    Role.DESTINATION: _DESTINATION,
}
"""Every legal ``(from, to)`` move, per role.  Anything else is a bug."""

_TERMINAL = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED})
_POSTCOPY = frozenset(
    {
        S.POSTCOPY_DEVICE,
        S.POSTCOPY_ACTIVE,
        S.POSTCOPY_PAUSED,
        S.POSTCOPY_RECOVER_SETUP,
        S.POSTCOPY_RECOVER,
    }
)
_PAUSED = frozenset({S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER_SETUP})
_IDLE = frozenset({S.NONE}) | _TERMINAL


def transition(role: Role, current: MigrationStatus, new: MigrationStatus) -> MigrationStatus:
    """Check one move against the table; return ``new`` or raise.

    An illegal move means an agent's logic is wrong, not that the peer sent
    something odd (peer input is checked before it gets here), so it raises
    :class:`MigrationStateError` rather than being ignored.
    """
    role = Role(role)
    current = MigrationStatus(current)
    new = MigrationStatus(new)
    if (current, new) not in TRANSITIONS[role]:
        raise MigrationStateError(role.value, current.value, new.value)
    return new


def is_terminal(status: MigrationStatus) -> bool:
    """True for completed, failed and cancelled: nothing follows but a new migration."""
    return status in _TERMINAL


def is_postcopy(status: MigrationStatus) -> bool:
    """QEMU's ``migration_in_postcopy``: switchover to postcopy has started.

    From here on the migration cannot be cancelled.  Except in
    ``postcopy-device`` (see :func:`is_guest_split`), no host holds the whole
    guest.
    """
    return status in _POSTCOPY


def is_guest_split(status: MigrationStatus) -> bool:
    """True when the guest's memory lives partly on each host.

    That is postcopy once the destination has run the guest; losing either
    host then loses the guest, so errors pause rather than fail.
    """
    return status in _POSTCOPY and status is not S.POSTCOPY_DEVICE


def is_paused(status: MigrationStatus) -> bool:
    """QEMU's ``postcopy_is_paused``: waiting for an admin to recover or resume."""
    return status in _PAUSED


def is_active(status: MigrationStatus) -> bool:
    """QEMU's ``migration_is_running``: neither not-started nor finished."""
    return status not in _IDLE


# --- commands -------------------------------------------------------------

_ALL = frozenset(MigrationStatus)
_NOTHING: frozenset[MigrationStatus] = frozenset()

COMMAND_STATES: dict[str, dict[Role, frozenset[MigrationStatus]]] = {
    # Start an outgoing migration (QEMU: refused while one is running).
    "migrate": {Role.SOURCE: _IDLE, Role.DESTINATION: _NOTHING},
    # Listen for an incoming one.
    "migrate-incoming": {Role.SOURCE: _NOTHING, Role.DESTINATION: _IDLE},
    # Not in postcopy: no host has the whole guest (QEMU refuses it too).
    "migrate-cancel": {
        Role.SOURCE: frozenset({S.SETUP, S.ACTIVE, S.PRE_SWITCHOVER, S.DEVICE}),
        Role.DESTINATION: frozenset({S.SETUP, S.ACTIVE}),
    },
    # QEMU only raises a flag the iteration loop reads, so setup is fine too.
    "migrate-start-postcopy": {
        Role.SOURCE: frozenset({S.SETUP, S.ACTIVE}),
        Role.DESTINATION: _NOTHING,
    },
    # Leave the pause-before-switchover stop.
    "migrate-continue": {
        Role.SOURCE: frozenset({S.PRE_SWITCHOVER}),
        Role.DESTINATION: _NOTHING,
    },
    # Cut the link on purpose (QEMU: postcopy-active or postcopy-recover).
    "migrate-pause": {
        Role.SOURCE: frozenset({S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER}),
        Role.DESTINATION: frozenset({S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER}),
    },
    # Destination: listen again after a pause.
    "migrate-recover": {
        Role.SOURCE: _NOTHING,
        Role.DESTINATION: frozenset({S.POSTCOPY_PAUSED}),
    },
    # Source: ``migrate uri resume=true`` after a pause.
    "migrate-resume": {
        Role.SOURCE: frozenset({S.POSTCOPY_PAUSED}),
        Role.DESTINATION: _NOTHING,
    },
    # QEMU refuses capability changes while a migration runs.
    "migrate-set-capabilities": {Role.SOURCE: _IDLE, Role.DESTINATION: _IDLE},
    # Parameters (bandwidth, downtime limit…) may change at any time.
    "migrate-set-parameters": {Role.SOURCE: _ALL, Role.DESTINATION: _ALL},
    "query-migrate": {Role.SOURCE: _ALL, Role.DESTINATION: _ALL},
}
"""Which QEMU command is accepted in which status, per role."""


def allowed_commands(role: Role, status: MigrationStatus) -> frozenset[str]:
    """The commands a control client may issue now, as the TUI offers them."""
    role = Role(role)
    status = MigrationStatus(status)
    return frozenset(cmd for cmd, per_role in COMMAND_STATES.items() if status in per_role[role])


@dataclass
class StateMachine:
    """One migration's status on one host, moved only through :func:`transition`.

    ``history`` keeps every status reached, in order, which tests and
    ``query-migrate`` both find useful.
    """

    role: Role
    status: MigrationStatus = MigrationStatus.NONE
    history: list[MigrationStatus] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.role = Role(self.role)
        self.status = MigrationStatus(self.status)
        if not self.history:
            self.history.append(self.status)

    def move(self, new: MigrationStatus) -> MigrationStatus:
        """Move to ``new``; return the status left.  Raises on an illegal move."""
        old = self.status
        self.status = transition(self.role, old, new)
        self.history.append(self.status)
        return old

    def allowed(self) -> frozenset[str]:
        return allowed_commands(self.role, self.status)


# --- printing the tables ---------------------------------------------------

_ORDER = list(MigrationStatus)


def _sorted(pairs: Iterable[tuple[MigrationStatus, MigrationStatus]]) -> list[tuple[S, S]]:
    return sorted(pairs, key=lambda p: (_ORDER.index(p[0]), _ORDER.index(p[1])))


def format_text() -> str:
    """The transition and command tables as plain text."""
    lines: list[str] = []
    for role in Role:
        lines.append(f"{role.value}:")
        used = {s for pair in TRANSITIONS[role] for s in pair}
        for state in _ORDER:
            targets = [b.value for a, b in _sorted(TRANSITIONS[role]) if a is state]
            if state in used and (targets or not is_terminal(state)):
                lines.append(f"  {state.value:<24} -> {', '.join(targets) or '-'}")
        lines.append("")
    lines.append("commands:")
    for cmd, per_role in COMMAND_STATES.items():
        for role in Role:
            allowed = per_role[role]
            if not allowed:
                continue
            shown = "any" if allowed == _ALL else ", ".join(s.value for s in _ORDER if s in allowed)
            lines.append(f"  {cmd:<26} {role.value:<12} {shown}")
    return "\n".join(lines) + "\n"


def format_dot() -> str:
    """The transition tables as one Graphviz digraph, a cluster per role."""
    out = ["digraph migration {", "  rankdir=LR;", '  node [shape=box, fontname="monospace"];']
    for role in Role:
        out.append(f"  subgraph cluster_{role.value} {{")
        out.append(f'    label="{role.value}";')
        for a, b in _sorted(TRANSITIONS[role]):
            out.append(f'    "{role.value}:{a.value}" -> "{role.value}:{b.value}";')
        used = {s for pair in TRANSITIONS[role] for s in pair}
        for s in _ORDER:
            if s in used:
                out.append(f'    "{role.value}:{s.value}" [label="{s.value}"];')
        out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print("usage: python -m protocol.states [--dot]")
        return 0
    sys.stdout.write(format_dot() if "--dot" in args else format_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
