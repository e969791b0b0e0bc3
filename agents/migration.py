"""One migration's state and statistics, as ``query-migrate`` reports them.

QEMU keeps this in ``MigrationState`` (migration.c) and ``RAMStats``
(ram.c).  Here both sides keep a :class:`MigrationState`: the status moves
only through :func:`protocol.states.transition` (an illegal move raises — it
is a bug), every move is announced as a ``MIGRATION`` event, and
:meth:`MigrationState.info` builds QEMU's MigrationInfo with godwit's
additions (role, channels, pauses and recoveries).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from protocol.states import MigrationStatus, Role, is_terminal, transition

from .events import EventBus

S = MigrationStatus
LATENCY_BUCKETS = 32
LATENCY_SAMPLES = 1 << 16
"""Fault latencies kept for exact percentiles (512 KiB; the most recent ones)."""


def first_error(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups from nurseries."""
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        exc = (inner or list(exc.exceptions))[0]
    return exc


def new_migration_id() -> bytes:
    return os.urandom(16)


def now_ms() -> float:
    return time.monotonic() * 1000.0


@dataclass
class ChannelStats:
    """What the TUI's channel table shows for one connection."""

    name: str
    connected: bool = False
    bytes_sent: int = 0
    bytes_received: int = 0
    last_frame: float = 0.0  # time.monotonic() of the last frame either way

    def info(self) -> dict[str, Any]:
        age = (time.monotonic() - self.last_frame) * 1000 if self.last_frame else None
        out: dict[str, Any] = {
            "name": self.name,
            "connected": self.connected,
            "bytes-sent": self.bytes_sent,
            "bytes-received": self.bytes_received,
        }
        if age is not None:
            out["last-frame-age-ms"] = round(age)
        return out


@dataclass
class RamStats:
    """QEMU's RAMStats, counted in pages and bytes as query-migrate shows them."""

    page_size: int = 4096
    total: int = 0  # bytes of guest RAM
    transferred: int = 0  # bytes on the wire for RAM (headers included)
    remaining: int = 0  # bytes still dirty / not yet sent
    duplicate: int = 0  # zero pages (QEMU's name)
    normal: int = 0  # pages sent with data
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    postcopy_bytes: int = 0
    multifd_bytes: int = 0
    postcopy_requests: int = 0
    dirty_sync_count: int = 0
    dirty_pages_rate: float = 0.0  # pages/s
    mbps: float = 0.0
    pages_per_second: float = 0.0

    def info(self) -> dict[str, Any]:
        return {
            "transferred": self.transferred,
            "remaining": self.remaining,
            "total": self.total,
            "duplicate": self.duplicate,
            "normal": self.normal,
            "normal-bytes": self.normal * self.page_size,
            "dirty-pages-rate": round(self.dirty_pages_rate),
            "mbps": round(self.mbps, 3),
            "dirty-sync-count": self.dirty_sync_count,
            "precopy-bytes": self.precopy_bytes,
            "downtime-bytes": self.downtime_bytes,
            "postcopy-bytes": self.postcopy_bytes,
            "postcopy-requests": self.postcopy_requests,
            "multifd-bytes": self.multifd_bytes,
            "pages-per-second": round(self.pages_per_second),
            "page-size": self.page_size,
        }


@dataclass
class PostcopyStats:
    """Fault service figures on the destination (QEMU's postcopy-blocktime & latency)."""

    blocktime_ms: float = 0.0
    vcpu_blocktime_ms: list[float] = field(default_factory=lambda: [0.0])
    latency_dist: np.ndarray = field(
        default_factory=lambda: np.zeros(LATENCY_BUCKETS, dtype=np.int64)
    )
    latency_sum_ns: int = 0
    latency_count: int = 0
    latency_max_ns: int = 0
    latency_samples: np.ndarray = field(
        default_factory=lambda: np.zeros(LATENCY_SAMPLES, dtype=np.int64)
    )
    """The last LATENCY_SAMPLES latencies (a ring): exact percentiles, where QEMU's
    histogram only says which power of two they fall in."""

    def record_latency(self, latency_ns: int) -> None:
        """One request's fault-to-placed time (QEMU 10.1's postcopy-latency-dist)."""
        self.latency_samples[self.latency_count % LATENCY_SAMPLES] = latency_ns
        self.latency_sum_ns += latency_ns
        self.latency_count += 1
        if latency_ns > self.latency_max_ns:
            self.latency_max_ns = latency_ns
        bucket = max(latency_ns // 1000, 1).bit_length() - 1  # floor(log2(µs))
        self.latency_dist[min(bucket, LATENCY_BUCKETS - 1)] += 1

    def latency_percentiles(self) -> dict[str, int]:
        """Exact p50/p90/p99 (µs) of the recent window, the all-time max, and the window size."""
        window = self.latency_samples[: min(self.latency_count, LATENCY_SAMPLES)]
        if not len(window):
            return {}
        p50, p90, p99 = np.percentile(window, [50, 90, 99]) / 1000
        return {
            "p50": round(p50),
            "p90": round(p90),
            "p99": round(p99),
            "max": round(self.latency_max_ns / 1000),
            "samples": len(window),
        }

    def info(self) -> dict[str, Any]:
        return {
            "postcopy-blocktime": round(self.blocktime_ms),
            "postcopy-vcpu-blocktime": [round(v) for v in self.vcpu_blocktime_ms],
            "postcopy-latency": self.latency_sum_ns // self.latency_count
            if self.latency_count
            else 0,
            "postcopy-latency-dist": [int(x) for x in self.latency_dist],
            "x-postcopy-latency-percentiles": self.latency_percentiles(),
        }


class MigrationState:
    """Status, timings and counters of one migration, on one side."""

    def __init__(
        self, role: Role, guest: str, events: EventBus, migration_id: bytes | None = None
    ) -> None:
        self.role = role
        self.guest = guest
        self.events = events
        self.id = migration_id or new_migration_id()
        self.status = S.NONE
        self.uri = ""
        self.error_desc: str | None = None
        self.start_ms = now_ms()
        self.setup_ms: float | None = None
        self.end_ms: float | None = None
        self.downtime_ms: float | None = None
        self.expected_downtime_ms: float | None = None
        self.throttle_percent = 0
        self.pauses = 0
        self.switchover_digest: str | None = None
        self.expected_at_switchover_ms: float | None = None
        self.recoveries = 0
        self.ram = RamStats()
        self.postcopy = PostcopyStats()
        self.postcopy_enabled = False
        self.channels: dict[str, ChannelStats] = {}
        self.status_changed: list[Callable[[MigrationStatus], None]] = []

    def set_status(self, new: MigrationStatus) -> None:
        """Move to ``new`` through the protocol's table and announce it."""
        if new == self.status:
            return
        self.status = transition(self.role, self.status, new)
        if new == S.ACTIVE and self.setup_ms is None:
            self.setup_ms = now_ms() - self.start_ms
        if is_terminal(new) and self.end_ms is None:
            self.end_ms = now_ms()
        if new == S.POSTCOPY_PAUSED:
            self.pauses += 1
        self.events.emit("MIGRATION", {"status": str(new), "guest": self.guest})
        for callback in self.status_changed:
            callback(new)

    def fail(self, desc: str) -> None:
        if is_terminal(self.status):
            return
        self.error_desc = self.error_desc or desc
        self.set_status(S.FAILED)

    def channel(self, name: str) -> ChannelStats:
        if name not in self.channels:
            self.channels[name] = ChannelStats(name)
        return self.channels[name]

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": str(self.status),
            "guest": self.guest,
            "role": str(self.role),
        }
        if self.status == S.NONE:
            return out
        end = self.end_ms if self.end_ms is not None else now_ms()
        out["total-time"] = round(end - self.start_ms)
        if self.setup_ms is not None:
            out["setup-time"] = round(self.setup_ms)
        if self.uri:
            out["uri"] = self.uri
        if self.downtime_ms is not None:
            out["downtime"] = round(self.downtime_ms, 3)
        elif self.expected_downtime_ms is not None and not is_terminal(self.status):
            out["expected-downtime"] = round(self.expected_downtime_ms)
        if self.role == Role.SOURCE:
            out["cpu-throttle-percentage"] = self.throttle_percent
        if self.error_desc:
            out["error-desc"] = self.error_desc
        out["ram"] = self.ram.info()
        if self.postcopy_enabled:
            out.update(self.postcopy.info())
            out["pauses"] = self.pauses
            out["recoveries"] = self.recoveries
        if self.expected_at_switchover_ms is not None:
            out["expected-downtime-at-switchover"] = round(self.expected_at_switchover_ms, 1)
        if self.switchover_digest:
            out["switchover-digest"] = self.switchover_digest
        out["channels"] = [c.info() for c in self.channels.values()]
        return out
