"""What the TUI knows about one agent, parsed defensively from its control socket.

Theory of operation
-------------------
An agent's answers and events are untrusted input: a field may be absent
(QEMU leaves out figures that mean nothing yet, and so do the agents), of
the wrong type, or the whole reply may be nonsense from a confused peer.
Everything here turns JSON into small frozen records whose fields are
``None`` when unknown, and never raises on bad input; the widgets then draw
a dash for ``None``.  :class:`AgentModel` folds replies and events, in the
order they arrived on the one connection (which is the order the agent made
them), into the state the screen shows.  It has no Textual in it, so its
rules are tested without a terminal.

What an admin may do next is not decided here either: :meth:`GuestState.allowed`
asks protocol/'s state table, the same one the agents obey.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from protocol.control import Event
from protocol.states import MigrationStatus, Role, allowed_commands, is_terminal

MAX_BUCKETS = 40
"""Latency buckets kept: 2^40 µs is twelve days, past any fault worth drawing."""

HISTORY = 120
"""Samples kept for the sparklines: a minute at the agents' two a second."""


def _num(obj: dict[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _int(obj: dict[str, Any], key: str) -> int | None:
    value = _num(obj, key)
    return None if value is None else int(value)


def _str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) else None


def _bool(obj: dict[str, Any], key: str) -> bool | None:
    value = obj.get(key)
    return value if isinstance(value, bool) else None


def _dict(obj: dict[str, Any], key: str) -> dict[str, Any]:
    value = obj.get(key)
    return value if isinstance(value, dict) else {}


def _numbers(obj: dict[str, Any], key: str) -> tuple[float, ...]:
    value = obj.get(key)
    if not isinstance(value, list):
        return ()
    return tuple(
        v for v in value if isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
    )


@dataclass(frozen=True, slots=True)
class Guest:
    """One entry of ``query-guests``."""

    name: str
    memory: int | None = None
    page_size: int | None = None
    workload: str | None = None
    status: str | None = None
    pid: int | None = None
    role: str | None = None
    migration_status: str | None = None


def parse_guests(value: Any) -> tuple[list[Guest], list[str]]:
    """``query-guests``'s answer as Guests, and what was wrong with the rest of it."""
    if not isinstance(value, list):
        return [], [f"query-guests answered {type(value).__name__}, not a list"]
    guests: list[Guest] = []
    problems: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            problems.append(f"query-guests entry {i} has no guest name: {str(item)[:60]}")
            continue
        migration = _dict(item, "migration")
        guests.append(
            Guest(
                name=item["name"],
                memory=_int(item, "memory"),
                page_size=_int(item, "page-size"),
                workload=_str(item, "workload"),
                status=_str(item, "status"),
                pid=_int(item, "pid"),
                role=_str(migration, "role"),
                migration_status=_str(migration, "status"),
            )
        )
    return guests, problems


@dataclass(frozen=True, slots=True)
class Channel:
    """One row of MigrationInfo's ``channels``."""

    name: str
    connected: bool | None = None
    bytes_sent: int | None = None
    bytes_received: int | None = None
    last_frame_age_ms: float | None = None


@dataclass(frozen=True, slots=True)
class Ram:
    """MigrationInfo's ``ram`` (QEMU's MigrationStats)."""

    transferred: int | None = None
    remaining: int | None = None
    total: int | None = None
    duplicate: int | None = None
    normal: int | None = None
    dirty_pages_rate: float | None = None
    mbps: float | None = None
    dirty_sync_count: int | None = None
    precopy_bytes: int | None = None
    downtime_bytes: int | None = None
    postcopy_bytes: int | None = None
    postcopy_requests: int | None = None
    pages_per_second: float | None = None
    page_size: int | None = None
    multifd_bytes: int | None = None

    @property
    def dirty_bytes_rate(self) -> float | None:
        """Dirty rate in bytes/s; QEMU reports pages/s."""
        if self.dirty_pages_rate is None:
            return None
        return self.dirty_pages_rate * (self.page_size or 4096)


@dataclass(frozen=True, slots=True)
class MigrationInfo:
    """``query-migrate``'s answer, QEMU-shaped, every figure optional."""

    guest: str | None = None
    role: str | None = None
    status: str | None = None
    setup_time: float | None = None
    total_time: float | None = None
    expected_downtime: float | None = None
    downtime: float | None = None
    cpu_throttle_percentage: float | None = None
    error_desc: str | None = None
    uri: str | None = None
    pauses: int | None = None
    recoveries: int | None = None
    ram: Ram = field(default_factory=Ram)
    postcopy_blocktime: float | None = None
    postcopy_vcpu_blocktime: tuple[float, ...] = ()
    postcopy_latency_ns: float | None = None
    postcopy_latency_dist: tuple[int, ...] = ()
    channels: tuple[Channel, ...] = ()

    @property
    def has_postcopy(self) -> bool:
        """Whether there is anything postcopy-specific worth a line on screen.

        Agents report the postcopy figures (as zeros) as soon as postcopy-ram
        is on, long before a switch; zeros in precopy are not worth two rows.
        """
        return (
            (self.status or "").startswith("postcopy")
            or bool(self.ram.postcopy_requests)
            or bool(self.ram.postcopy_bytes)
            or bool(self.postcopy_blocktime)
            or any(self.postcopy_latency_dist)
            or bool(self.pauses)
        )


def parse_migration_info(value: Any) -> MigrationInfo | None:
    """``query-migrate``'s answer, or None when it is not an object at all."""
    if not isinstance(value, dict):
        return None
    ram = _dict(value, "ram")
    channels: list[Channel] = []
    raw_channels = value.get("channels")
    if isinstance(raw_channels, list):
        for ch in raw_channels:
            if isinstance(ch, dict) and isinstance(ch.get("name"), str):
                channels.append(
                    Channel(
                        name=ch["name"],
                        connected=_bool(ch, "connected"),
                        bytes_sent=_int(ch, "bytes-sent"),
                        bytes_received=_int(ch, "bytes-received"),
                        last_frame_age_ms=_num(ch, "last-frame-age-ms"),
                    )
                )
    return MigrationInfo(
        guest=_str(value, "guest"),
        role=_str(value, "role"),
        status=_str(value, "status"),
        setup_time=_num(value, "setup-time"),
        total_time=_num(value, "total-time"),
        expected_downtime=_num(value, "expected-downtime"),
        downtime=_num(value, "downtime"),
        cpu_throttle_percentage=_num(value, "cpu-throttle-percentage"),
        error_desc=_str(value, "error-desc"),
        uri=_str(value, "uri"),
        pauses=_int(value, "pauses"),
        recoveries=_int(value, "recoveries"),
        ram=Ram(
            transferred=_int(ram, "transferred"),
            remaining=_int(ram, "remaining"),
            total=_int(ram, "total"),
            duplicate=_int(ram, "duplicate"),
            normal=_int(ram, "normal"),
            dirty_pages_rate=_num(ram, "dirty-pages-rate"),
            mbps=_num(ram, "mbps"),
            dirty_sync_count=_int(ram, "dirty-sync-count"),
            precopy_bytes=_int(ram, "precopy-bytes"),
            downtime_bytes=_int(ram, "downtime-bytes"),
            postcopy_bytes=_int(ram, "postcopy-bytes"),
            postcopy_requests=_int(ram, "postcopy-requests"),
            pages_per_second=_num(ram, "pages-per-second"),
            page_size=_int(ram, "page-size"),
            multifd_bytes=_int(ram, "multifd-bytes"),
        ),
        postcopy_blocktime=_num(value, "postcopy-blocktime"),
        postcopy_vcpu_blocktime=_numbers(value, "postcopy-vcpu-blocktime"),
        postcopy_latency_ns=_num(value, "postcopy-latency"),
        postcopy_latency_dist=tuple(
            int(v) for v in _numbers(value, "postcopy-latency-dist")[:MAX_BUCKETS]
        ),
        channels=tuple(channels),
    )


@dataclass
class GuestState:
    """Everything shown about one guest; updated in arrival order."""

    guest: Guest
    info: MigrationInfo | None = None
    status: str | None = None
    role: str | None = None
    passes: int | None = None
    pass_started: int | None = None
    """The pass the last MIGRATION_PASS announced: it is under way, so it counts.
    (``dirty-sync-count`` counts the passes whose dirty log was taken, one fewer.)"""
    recovering: str | None = None
    """The URI a migrate-recover from this TUI listens on, until the status moves on:
    the destination stays postcopy-paused until the source resumes, and the admin should
    see that its part is done."""
    throughput: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    dirty_rate: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))

    @property
    def name(self) -> str:
        return self.guest.name

    def effective(self) -> tuple[Role, MigrationStatus] | None:
        """The (role, status) pair the state table is asked about, or None if nonsense.

        A guest that never migrated has no migration record; it is a source
        in state ``none``, unless it is waiting for an incoming migration.
        """
        role = self.role or ("destination" if self.guest.status == "incoming" else "source")
        status = self.status or "none"
        try:
            return Role(role), MigrationStatus(status)
        except ValueError:
            return None

    def allowed(self) -> frozenset[str]:
        """Commands protocol/'s state table allows now; empty when the state is unknown.

        A guest that arrived here (its migration over) and runs is this agent's to
        send on, as the agents see it: it is asked about as a source.
        """
        pair = self.effective()
        if pair is None:
            return frozenset()
        role, status = pair
        if role == Role.DESTINATION and is_terminal(status) and self.guest.status == "running":
            role = Role.SOURCE
        return allowed_commands(role, status)

    def set_status(self, status: str) -> None:
        if status != self.status:
            self.recovering = None
        self.status = status

    def apply_info(self, info: MigrationInfo, *, sample: bool) -> None:
        self.info = info
        if info.status is not None:
            self.set_status(info.status)
        if info.role is not None:
            self.role = info.role
        if info.ram.dirty_sync_count is not None:
            self.passes = max(info.ram.dirty_sync_count, self.pass_started or 0)
        if sample:
            if info.ram.mbps is not None:
                self.throughput.append(float(info.ram.mbps))
            dirty = info.ram.dirty_bytes_rate
            if dirty is not None:
                self.dirty_rate.append(float(dirty))


@dataclass(frozen=True, slots=True)
class LogLine:
    """An event-log entry: when, which guest, what, and the phase it names if any."""

    when: float
    text: str
    guest: str | None = None
    phase: str | None = None
    severity: str = "info"


class AgentModel:
    """The guests of one agent and what happened to them."""

    def __init__(self) -> None:
        self.guests: dict[str, GuestState] = {}
        self.version: str | None = None

    def apply_guests(self, guests: list[Guest]) -> None:
        """Replace the guest list, keeping each surviving guest's history."""
        fresh: dict[str, GuestState] = {}
        for g in guests:
            state = self.guests.get(g.name) or GuestState(g)
            state.guest = g
            if g.migration_status is not None:
                state.set_status(g.migration_status)
            if g.role is not None:
                state.role = g.role
            fresh[g.name] = state
        self.guests = fresh

    def guest(self, name: Any) -> GuestState | None:
        return self.guests.get(name) if isinstance(name, str) else None

    def apply_event(self, event: Event) -> LogLine | None:
        """Fold an event in; return what the event log should say, if anything."""
        data = event.data
        name = _str(data, "guest")
        state = self.guest(name)
        when = event.timestamp
        if event.name == "MIGRATION_PROGRESS":
            info = parse_migration_info(data.get("info"))
            if state is not None and info is not None:
                state.apply_info(info, sample=True)
            return None
        if event.name == "MIGRATION":
            status = _str(data, "status")
            if state is not None and status is not None:
                state.set_status(status)
                if status == "setup":  # a new migration: its passes start again
                    state.passes = state.pass_started = None
            return LogLine(when, f"migration {status or '?'}", name, status)
        if event.name == "MIGRATION_PASS":
            number = _int(data, "pass")
            if state is not None and number is not None:
                state.pass_started = number
                state.passes = max(number, state.passes or 0)
            return LogLine(when, f"pass {number if number is not None else '?'}", name)
        if event.name == "STOP":
            return LogLine(when, "vCPUs stopped", name)
        if event.name == "RESUME":
            return LogLine(when, "vCPUs running", name)
        if event.name == "GUEST_STARTED":
            return LogLine(when, "guest started", name)
        if event.name == "GUEST_EXITED":
            reason = _str(data, "reason")
            return LogLine(when, f"guest exited{': ' + reason if reason else ''}", name, None)
        shown = {k: v for k, v in data.items() if k != "guest"}
        return LogLine(when, f"{event.name} {shown}"[:120] if shown else event.name, name)
