"""Postcopy's moving parts shared by both sides (QEMU's postcopy-ram.c).

Source: which pages to DISCARD at the switch (dirty since they were sent),
and how a page request is served.  Destination: the fault service — read
fault messages from the guest's userfaultfd, ask once per page in flight,
place pages with UFFDIO_COPY/ZEROPAGE as they arrive on any channel, and
measure what the guest felt (blocktime, request latency).

A page the destination already "received" as zero during precopy may still
be a hole in the memfd (a fresh memfd page needs no write to be zero), so a
fault on it is resolved locally with UFFDIO_ZEROPAGE, never asked for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import trio

from protocol.bitmap import PageBitmap
from protocol.messages import Discard, Ping, ReqPages

from .migration import PostcopyStats
from .ram import index_runs

log = logging.getLogger("godwit.postcopy")

DISCARD_RANGES_PER_FRAME = 65536


class PausePostcopy(Exception):
    """migrate-pause asked for it, or a keepalive deadline passed."""


class Liveness:
    """Hang detection for postcopy: a hung link sends no error, only silence.

    Each side PINGs on its outgoing channel every ``keepalive-ms``; the peer
    answers PONG on the other direction.  No PONG for three intervals means
    the link hangs, and :meth:`run` raises :class:`PausePostcopy`.
    """

    def __init__(self, keepalive_ms: int, peer: str) -> None:
        self.interval = keepalive_ms / 1000
        self.peer = peer
        self.last_pong = 0.0  # set when run() starts; trio's clock, so tests can drive it

    def pong(self) -> None:
        self.last_pong = trio.current_time()

    async def run(self, send: Callable[[Ping], Awaitable[Any]]) -> None:
        """PING every interval; raise once no PONG came for three intervals.

        Sending runs in its own task: a PING stuck behind a hung link must not
        delay the deadline, and a send is never cancelled half-way through a TLS
        record (that would corrupt the stream); the whole round is cancelled
        when the migration pauses, which closes the channels anyway.
        """
        if self.interval <= 0:
            await trio.sleep_forever()
        self.last_pong = trio.current_time()
        deadline = 3 * self.interval
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pinger, send)
            while trio.current_time() - self.last_pong <= deadline:
                await trio.sleep(self.interval / 4)
            nursery.cancel_scope.cancel()
        raise PausePostcopy(f"no PONG from the {self.peer} for {deadline:.1f} s: link hung")

    async def _pinger(self, send: Callable[[Ping], Awaitable[Any]]) -> None:
        seq = 0
        while True:
            await trio.sleep(self.interval)
            seq += 1
            await send(Ping(seq, time.monotonic_ns()))


async def watch_pause(requested: trio.Event) -> None:
    await requested.wait()
    raise PausePostcopy("paused by migrate-pause")


async def close_channels(*channels: Any) -> None:
    for channel in channels:
        if channel is not None:
            await channel.aclose()


def discard_messages(block_index: int, pages: np.ndarray) -> list[Discard]:
    """DISCARD frames for pages (sorted indices) the destination must drop."""
    if len(pages) == 0:
        return []
    firsts, lengths, _ = index_runs(pages.astype(np.int64))
    ranges = np.stack([firsts, lengths], axis=1).astype(np.uint64)
    return [
        Discard(block_index, ranges[i : i + DISCARD_RANGES_PER_FRAME])
        for i in range(0, len(ranges), DISCARD_RANGES_PER_FRAME)
    ]


class FaultService:
    """The destination's bookkeeping of postcopy page requests.

    Used by the fault thread (faults read, requests made, preempt pages
    placed) and by the trio thread (background pages from main), always
    under the caller's lock: ``received``, ``requested`` and ``pending`` are
    one state.  A request is recorded as pending *before* it is sent, so one
    lost with a broken link is asked again by :meth:`resend_pending` after
    recovery; faults that happen while the link is down wait in the uffd
    until the next fault thread reads them.
    """

    def __init__(self, placer: Any, received: list[PageBitmap], stats: PostcopyStats) -> None:
        self.placer = placer
        self.received = received
        self.stats = stats
        self.requested = [PageBitmap(r.npages) for r in received]
        self.pending: dict[
            tuple[int, int], tuple[int, int]
        ] = {}  # (block, page) → (request id, fault ns)
        self._next_request = 1
        self._blocked_since: int | None = None
        self.faults = 0
        self.local_zero = 0

    # -- faults ----------------------------------------------------------------

    def take_faults(self, faults: list[tuple[int, int]]) -> list[ReqPages]:
        """The requests a batch of faults needs: one per page not already asked for.

        A page received as zero in precopy and never written is a hole in the
        memfd: it is resolved here with UFFDIO_ZEROPAGE, never asked for.
        """
        now = time.monotonic_ns()
        requests = []
        for block, page in dict.fromkeys(faults):  # a page faulted twice is asked once
            self.faults += 1
            if self.received[block].test(page):
                self.placer.zeropage(block, page, 1)
                self.local_zero += 1
                continue
            if (block, page) in self.pending:
                continue
            request_id = self._next_request
            self._next_request += 1
            self.pending[(block, page)] = (request_id, now)
            self.requested[block].set_range(page, 1)
            if self._blocked_since is None:
                self._blocked_since = now
            requests.append(ReqPages(block, page, 1, request_id, now))
        return requests

    async def resend_pending(self, request: Callable[[ReqPages], Awaitable[Any]]) -> int:
        """After recovery: ask again for every page still missing."""
        count = 0
        for (block, page), (request_id, fault_ns) in list(self.pending.items()):
            if self.received[block].test(page):
                continue
            await request(ReqPages(block, page, 1, request_id, fault_ns))
            count += 1
        return count

    # -- arrivals --------------------------------------------------------------

    def arrived(self, block: int, pages: np.ndarray) -> None:
        """Pages of ``block`` are now in place: settle the requests they answer."""
        if not self.pending:
            return
        requested = self.requested[block]
        if len(pages) == 1:  # a requested page: skip numpy's set-up
            page = int(pages[0])
            if not requested.test(page):
                return
            requested.clear_range(page, 1)
            hits = [page]
        else:
            found = pages[requested.test_indices(pages)]
            if len(found) == 0:
                return
            requested.clear_indices(found)
            hits = found.tolist()
        now = time.monotonic_ns()
        for page in hits:
            entry = self.pending.pop((block, page), None)
            if entry is not None:
                self.stats.record_latency(now - entry[1])
        if not self.pending and self._blocked_since is not None:
            blocked_ms = (now - self._blocked_since) / 1e6
            self.stats.blocktime_ms += blocked_ms
            self.stats.vcpu_blocktime_ms[0] += blocked_ms
            self._blocked_since = None
