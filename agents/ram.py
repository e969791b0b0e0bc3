"""Guest RAM on the wire, both directions (QEMU's ram.c).

Source: a :class:`RamSender` owns, per RAM block, the bitmap of pages the
destination still lacks (``to_send``; all set at the start, like QEMU's
dirty bitmap after the first sync).  A pass turns the set bits into page
indices once (numpy), cuts them into batches (4 MiB in precopy, 1 MiB in
postcopy's background stream), and
for each batch finds the zero pages over the whole batch at once:
contiguous batches go out as PAGES frames straight from guest RAM (a
memoryview, no copy), scattered ones are gathered into one PAGE_BATCH frame,
so a pass over thousands of random dirty pages costs a few dozen frames, not
a Python iteration per page.  Zero pages go as ZERO / ZERO_BATCH.  A dirty
sync (PAGEMAP_SCAN get-and-clear in the guest) ORs newly written pages back
into ``to_send``; because the scan write-protects a page again before we
read it, any write after the read shows up in the next sync.

Destination: a :class:`RamReceiver` applies pages to the memfds (precopy:
through the agent's own mapping or pwrite; postcopy: the placer's
UFFDIO_COPY, supplied by the caller) and keeps ``received`` bitmaps — the
bitmap postcopy recovery sends back (RECV_BITMAP).  A ZERO for a page never
received needs no write: fresh memfd pages are already zero.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import trio

from protocol.bitmap import PageBitmap
from protocol.messages import Discard, PageBatch, Pages, Zero, ZeroBatch

from .migration import RamStats
from .threads import OwnedThread
from .vm.ramblock import RamBlock, zero_page_mask

BATCH_BYTES = 1 << 20
"""Bytes per frame: 256 pages of 4 KiB — large enough for TLS and syscall
efficiency, small enough that a postcopy request on main waits behind at most
one.  A 2 MiB huge page is always sent whole (it can only be placed whole)."""


def batch_pages(page_size: int, nbytes: int = BATCH_BYTES) -> int:
    """Pages per frame of ``nbytes`` (at least one: a huge page goes whole)."""
    return max(1, nbytes // page_size)


PRECOPY_BATCH_BYTES = 4 << 20
"""Bytes per precopy batch (frame).  Precopy serves no page requests, so
nothing waits behind a batch but a switch to postcopy (a few ms at most), and
what a frame costs whatever its size — the pass's bitmap and zero-page work,
a trio turn and the channel's bookkeeping on both sides, a write into the
destination's writer thread and a pwrite — is paid a quarter as often as
with BATCH_BYTES: on the 2-core development machine the agents' user CPU for
one 1 GiB precopy fell from 0.9-1.1 s to 0.6-0.85 s (source) and from
0.9-0.95 s to 0.65-0.85 s (destination), per-process CPU over several runs."""


PAGE_MESSAGES = (Pages, PageBatch, Zero, ZeroBatch)
"""The frames that carry pages (RamReceiver.apply takes any of them)."""

MAX_RUNS_PER_MIB = 4
"""More zero/data runs than this per MiB of a batch and it is sent gathered instead."""

SendFn = Callable[[Any], Awaitable[int]]

_ZERO_PAGES: dict[int, bytes] = {}


def _zero_page(size: int) -> bytes:
    """A page of zeros to compare one page with (a memcmp: 10x numpy's set-up for one page)."""
    page = _ZERO_PAGES.get(size)
    if page is None:
        page = _ZERO_PAGES[size] = bytes(size)
    return page


async def _send_all(send: SendFn, messages: list[Any]) -> int:
    """Send frames in order; returns the bytes they took on the wire."""
    nbytes = 0
    for message in messages:
        nbytes += await send(message)
    return nbytes


class RateLimiter:
    """A token bucket for ``max-bandwidth`` (bytes/s; 0 means unlimited)."""

    def __init__(self, rate: float = 0) -> None:
        self.rate = float(rate)
        self._allowance = 0.0
        self._last = time.monotonic()

    async def consume(self, nbytes: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        # At most 100 ms of burst, as QEMU's rate limiting windows.
        self._allowance = min(self._allowance + (now - self._last) * self.rate, self.rate * 0.1)
        self._last = now
        self._allowance -= nbytes
        if self._allowance < 0:
            await trio.sleep(-self._allowance / self.rate)


@dataclass
class BandwidthMeter:
    """Bytes per second over the recent past, as QEMU measures it each ~100 ms."""

    window: float = 0.5
    _mark_time: float = 0.0
    _mark_bytes: int = 0
    rate: float = 0.0  # bytes/s

    def update(self, total_bytes: int, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        if self._mark_time == 0.0:
            self._mark_time, self._mark_bytes = now, total_bytes
            return self.rate
        elapsed = now - self._mark_time
        if elapsed >= 0.1:
            sample = (total_bytes - self._mark_bytes) / elapsed
            # Weighted toward the newest sample, but not blind to the last one.
            self.rate = sample if self.rate == 0 else 0.7 * sample + 0.3 * self.rate
            self._mark_time, self._mark_bytes = now, total_bytes
        return self.rate


def _batches(indices: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


def _mask_runs(mask: np.ndarray) -> list[tuple[int, int, bool]]:
    """Split a boolean array into (start, length, value) runs, vectorised."""
    edges = np.flatnonzero(np.diff(mask.view(np.int8))) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [len(mask)]))
    return [(int(s), int(e - s), bool(mask[s])) for s, e in zip(starts, ends, strict=True)]


def _bytes(arr: np.ndarray) -> memoryview:
    """A flat byte view of a contiguous numpy array (no copy)."""
    return memoryview(arr).cast("B")  # type: ignore[arg-type]  # ndarrays are buffers


def index_runs(pages: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of consecutive page numbers in an index array: (first page, length, position)."""
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    positions = np.concatenate(([0], breaks))
    lengths = np.diff(np.concatenate((positions, [len(pages)])))
    return pages[positions], lengths, positions


def write_scattered(block: RamBlock, pages: np.ndarray, data: np.ndarray) -> None:
    """pwrite each run of consecutive pages: a fresh memfd fills ~2x faster through
    pwrite than through page faults on a mapping, and a run is one syscall."""
    ps = block.page_size
    firsts, lengths, positions = index_runs(pages)
    view = _bytes(data) if isinstance(data, np.ndarray) else memoryview(data)
    for first, length, pos in zip(
        firsts.tolist(), lengths.tolist(), positions.tolist(), strict=True
    ):
        block.write_pages(first, view[pos * ps : (pos + length) * ps])


class RamSender:
    """The source's view of what the destination still needs, and how to send it."""

    def __init__(
        self, blocks: Sequence[RamBlock], stats: RamStats, *, detect_zero: bool = True
    ) -> None:
        self.blocks = list(blocks)
        self.stats = stats
        self.detect_zero = detect_zero
        self.to_send = [PageBitmap(b.npages) for b in self.blocks]
        for bitmap in self.to_send:
            bitmap.set_range(0, bitmap.npages)
        self.sent_once = [PageBitmap(b.npages) for b in self.blocks]
        """Pages the destination holds a copy of (maybe stale): postcopy discards among these."""
        self.limiter = RateLimiter()
        stats.page_size = self.blocks[0].page_size if self.blocks else 4096
        stats.total = sum(b.size for b in self.blocks)
        self.update_remaining()

    def pending_pages(self) -> int:
        return sum(b.count() for b in self.to_send)

    def pending_bytes(self) -> int:
        return sum(
            bm.count() * blk.page_size for bm, blk in zip(self.to_send, self.blocks, strict=True)
        )

    def update_remaining(self) -> None:
        self.stats.remaining = self.pending_bytes()

    def add_dirty(self, block_index: int, pages: np.ndarray) -> int:
        """OR pages written by the guest since the last sync into ``to_send``."""
        if len(pages):
            self.to_send[block_index].set_indices(pages)
        return len(pages)

    async def send_pass(
        self,
        send: SendFn,
        *,
        phase: str = "precopy",
        checkpoint: Callable[[], Awaitable[None]] | None = None,
    ) -> int:
        """Send what ``to_send`` holds now; returns pages sent.

        ``checkpoint`` runs between batches (progress, switch requests);
        """
        done = 0
        for index, bitmap in enumerate(self.to_send):
            if not bitmap.any():
                continue
            pages = bitmap.indices().astype(np.uint64)
            for batch in _batches(
                pages, batch_pages(self.blocks[index].page_size, PRECOPY_BATCH_BYTES)
            ):
                # Clear just before sending: a pass left early (postcopy, cancel)
                # must leave every page it did not send in ``to_send``.
                bitmap.clear_indices(batch)
                nbytes = await self.send_batch(send, index, batch, phase)
                await self.limiter.consume(nbytes)
                done += len(batch)
                self.update_remaining()
                if checkpoint is not None:
                    await checkpoint()
        self.update_remaining()
        return done

    async def send_background(
        self, send: SendFn, *, checkpoint: Callable[[], Awaitable[None]] | None = None
    ) -> int:
        """Postcopy: stream every page still in ``to_send``.

        The bitmap is re-read for every batch, so pages a request already
        delivered (cleared by :meth:`send_requested`) are not sent twice.
        """
        done = 0
        for index, bitmap in enumerate(self.to_send):
            size = batch_pages(self.blocks[index].page_size)
            cursor: int | None = bitmap.next_set(0)
            while cursor is not None:
                window = np.arange(cursor, min(cursor + size, bitmap.npages))
                pages = window[bitmap.test_indices(window)].astype(np.uint64)
                bitmap.clear_indices(pages)
                nbytes = await self.send_batch(send, index, pages, "postcopy")
                await self.limiter.consume(nbytes)
                done += len(pages)
                self.update_remaining()
                if checkpoint is not None:
                    await checkpoint()
                end = int(window[-1]) + 1
                cursor = bitmap.next_set(end) if end < bitmap.npages else None
        return done

    def take_request(
        self, block_index: int, first: int, count: int, request_id: int
    ) -> tuple[np.ndarray, list[Any]]:
        """A page request's pages and the frames that answer it (taken off ``to_send``).

        Safe in the source's return-path thread while the trio thread streams
        the background: both only *clear* bits of ``to_send`` and send what
        they cleared, so a race can cost a page sent twice (the destination
        drops the second copy), never a page not sent.
        """
        block = self.blocks[block_index] if 0 <= block_index < len(self.blocks) else None
        if block is None or first < 0 or count <= 0 or first + count > block.npages:
            where = f"RAM block {block.name} ({block.npages} pages)" if block else "any RAM block"
            raise ValueError(f"page request {block_index}:{first}+{count} outside {where}")
        self.to_send[block_index].clear_range(first, count)
        pages = np.arange(first, first + count, dtype=np.uint64)
        return pages, self.batch_messages(block_index, pages, request_id)

    def account_request(
        self, block_index: int, pages: np.ndarray, messages: list[Any], nbytes: int
    ) -> None:
        """Statistics and bitmaps for a request served (on the trio thread)."""
        self.stats.postcopy_requests += 1
        self.account(block_index, pages, messages, nbytes, "postcopy")
        self.update_remaining()

    def account_served(self, served: list[list[int]], nbytes: int) -> None:
        """Requests a preempt worker answered (agents/preempt.py): ``[block, first,
        count, zero]`` each.  Taken off ``to_send`` so the background stream skips
        them — it may already have sent some of them meanwhile: the destination
        keeps the first copy — and counted as a request served here would be."""
        for block_index, first, count, zero in served:
            self.to_send[block_index].clear_range(first, count)
            self.sent_once[block_index].set_range(first, count)
            if zero:
                self.stats.duplicate += count
            else:
                self.stats.normal += count
        self.stats.postcopy_requests += len(served)
        self._count_bytes(nbytes, "postcopy")
        self.update_remaining()

    async def send_requested(
        self, send: SendFn, block_index: int, first: int, count: int, request_id: int
    ) -> int:
        """Serve a page request on the trio thread (main, when there is no preempt)."""
        pages, messages = self.take_request(block_index, first, count, request_id)
        nbytes = await _send_all(send, messages)
        self.account_request(block_index, pages, messages, nbytes)
        return nbytes

    async def send_batch(
        self, send: SendFn, block_index: int, batch: np.ndarray, phase: str, request_id: int = 0
    ) -> int:
        """Send one batch of page indices of one block; returns bytes on the wire."""
        messages = self.batch_messages(block_index, batch, request_id)
        nbytes = await _send_all(send, messages)
        self.account(block_index, batch, messages, nbytes, phase)
        return nbytes

    def batch_messages(self, block_index: int, batch: np.ndarray, request_id: int = 0) -> list[Any]:
        """The frames for one batch of page indices of one block (page data by reference)."""
        block = self.blocks[block_index]
        ps = block.page_size
        first, last = int(batch[0]), int(batch[-1])
        contiguous = last - first + 1 == len(batch)
        out: list[Any] = []
        if len(batch) == 1:  # a page request: no run analysis
            page = block.pages(first, 1)
            if self.detect_zero and page == _zero_page(ps):
                return [Zero(block_index, first, 1)]
            return [Pages(block_index, first, 1, page, request_id)]
        view = block.pages(first, len(batch)) if contiguous else None
        if view is not None:
            mask = (
                zero_page_mask(view, ps) if self.detect_zero else np.zeros(len(batch), dtype=bool)
            )
            runs = _mask_runs(mask)
        max_runs = MAX_RUNS_PER_MIB * max(1, len(batch) * ps >> 20)
        if view is not None and len(runs) <= max_runs:
            # Few runs: send them straight from guest RAM, no copy.
            for start, length, is_zero in runs:
                if is_zero:
                    out.append(Zero(block_index, first + start, length))
                else:
                    data = view[start * ps : (start + length) * ps]
                    out.append(Pages(block_index, first + start, length, data, request_id))
            return out
        # Scattered pages, or zero and data pages interleaved: the data pages go
        # gathered (one numpy take, one copy) in a PAGE_BATCH, the zero ones as
        # a ZERO_BATCH.  When the mask is known from the guest-RAM view, only the
        # data pages are gathered; otherwise everything is gathered to find them,
        # and copied again only if some of them turned out to be zero.
        pages_of = block.array.reshape(-1, ps)
        gathered = None
        if view is None:
            gathered = pages_of[batch.astype(np.intp)]
            mask = (
                zero_page_mask(_bytes(gathered), ps)
                if self.detect_zero
                else np.zeros(len(batch), bool)
            )
        if mask.any():
            out.append(ZeroBatch(block_index, batch[mask]))
        if not mask.all():
            keep = ~mask
            if gathered is None:
                payload = pages_of[batch[keep].astype(np.intp)]
            elif mask.any():
                payload = gathered[keep]
            else:
                payload = gathered
            out.append(PageBatch(block_index, batch[keep], _bytes(payload)))
        return out

    def account(
        self, block_index: int, batch: np.ndarray, messages: list[Any], nbytes: int, phase: str
    ) -> None:
        """Count a sent batch: pages by kind, bytes by phase, and ``sent_once``."""
        for message in messages:
            count = message.count if isinstance(message, (Pages, Zero)) else len(message.pages)
            if isinstance(message, (Zero, ZeroBatch)):
                self.stats.duplicate += count
            else:
                self.stats.normal += count
        self.sent_once[block_index].set_indices(batch)
        self._count_bytes(nbytes, phase)

    def _count_bytes(self, nbytes: int, phase: str) -> None:
        self.stats.transferred += nbytes
        if phase == "precopy":
            self.stats.precopy_bytes += nbytes
        elif phase == "downtime":
            self.stats.downtime_bytes += nbytes
        else:
            self.stats.postcopy_bytes += nbytes


def _place(placer: Any, msg: Any, pages: np.ndarray, page_size: int) -> None:
    """Postcopy: place with UFFDIO_COPY / UFFDIO_ZEROPAGE, a run per ioctl."""
    if isinstance(msg, Pages):
        placer.copy(msg.block, msg.first_page, msg.data)
    elif isinstance(msg, Zero):
        placer.zeropage(msg.block, msg.first_page, msg.count)
    else:
        firsts, lengths, positions = index_runs(pages)
        runs = zip(firsts.tolist(), lengths.tolist(), positions.tolist(), strict=True)
        if isinstance(msg, PageBatch):
            view = memoryview(msg.data)
            for first, length, pos in runs:
                placer.copy(msg.block, first, view[pos * page_size : (pos + length) * page_size])
        else:
            for first, length, _ in runs:
                placer.zeropage(msg.block, first, length)


class PageWriter:
    """Precopy: the destination's page writes, in a thread of their own.

    Receiving a frame (TLS decryption, on the trio thread) and writing it
    into the memfd (pwrite, which on this kind of machine costs as much as
    the decryption: the kernel allocates every fresh page) are independent,
    and both release the GIL.  So one long-lived worker thread, owned by the
    :meth:`run` task (an :class:`~agents.threads.OwnedThread`), writes frame
    *n* while the trio thread decrypts frame *n+1*.  Frames are handed over
    through a queue, not a ``trio.to_thread`` call each: a thread hand-off
    per MiB cost more CPU (lock, wake-up, GIL hand-over, reschedule) than the
    overlap saved on two cores.  The
    thread calls back into trio only when the trio side waits for it (a
    full queue, :meth:`drain`) or when it runs out of work.

    Frames are written in the order they arrived (one writer), so a page
    sent twice — or a page then a ZERO for it — ends as the newer copy.  The
    bitmaps are updated on the trio thread once a frame is written
    (``applied``, called from :meth:`put`, :meth:`drain` and the idle
    callback).  Anything that reads guest RAM or changes how pages are
    placed (device load, DISCARD, POSTCOPY_LISTEN, multifd sync points,
    COMPLETE) first waits for :meth:`drain`.  ``depth`` frames (of at most
    PRECOPY_BATCH_BYTES) may be queued, which bounds the memory this takes.

    Cancelling :meth:`run` stops the thread after the frame it is writing;
    an error in a write ends the thread and is raised by :meth:`run`.
    """

    def __init__(
        self,
        store: Callable[[Any], None],
        applied: Callable[[Any], None],
        depth: int = 4,
    ) -> None:
        self._store = store
        self._applied = applied
        self._depth = depth
        self._thread = OwnedThread("precopy/writer")
        self._lock = threading.Lock()
        self._queued: deque[Any] = deque()  # not yet written (the first may be in progress)
        self._written: deque[Any] = deque()  # written, not yet applied
        self._waiter: trio.Event | None = None  # the trio side waits for the thread
        self._collect_posted = False

    async def run(self) -> None:
        """The writer task: runs until cancelled (the migration's nursery owns it)."""
        await self._thread.run(self._write_frames)

    @property
    def _stopped(self) -> bool:
        return self._thread.aborting or self._thread.done.is_set()

    def _write_frames(self) -> None:
        thread = self._thread
        while not thread.should_stop():  # a cancelled owner makes it raise
            with self._lock:
                msg = self._queued[0] if self._queued else None
            if msg is None:
                thread.wait_any([])  # until put() wakes it
                continue
            self._store(msg)  # an error ends the thread; run() raises it
            with self._lock:
                self._queued.popleft()
                self._written.append(msg)
                wake = self._waiter is not None or not self._queued
                if wake and not self._collect_posted:
                    self._collect_posted = True
                    thread.call_soon(self._collect)

    def _collect(self) -> None:
        """On the trio thread: apply what is written; wake a waiting put/drain."""
        with self._lock:
            self._collect_posted = False
            written, self._written = self._written, deque()
            waiter, self._waiter = self._waiter, None  # it checks again for itself
        for msg in written:
            self._applied(msg)
        if waiter is not None:
            waiter.set()

    async def _wait(self, done: Callable[[], bool]) -> None:
        while True:
            self._collect()
            with self._lock:
                if done() or self._stopped:
                    return
                self._waiter = waiter = trio.Event()
            await waiter.wait()

    async def put(self, msg: Any) -> None:
        """Queue a frame to write (waits while ``depth`` are queued)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        self._collect()
        if len(self._queued) >= self._depth:
            await self._wait(lambda: len(self._queued) < self._depth)
        with self._lock:
            if self._stopped:
                raise trio.ClosedResourceError("the page writer has stopped")
            self._queued.append(msg)
        self._thread.wake()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def drain(self) -> None:
        """Return once every frame put so far is written and applied."""
        await self._wait(lambda: not self._queued)
        self._collect()
        await trio.lowlevel.checkpoint()


class RamReceiver:
    """The destination's RAM: applies pages and remembers which ones arrived."""

    def __init__(self, blocks: Sequence[RamBlock]) -> None:
        self.blocks = list(blocks)
        self.received = [PageBitmap(b.npages) for b in self.blocks]
        self.placer: Any = None
        """Set at POSTCOPY_LISTEN: from then on pages are placed atomically with
        UFFDIO_COPY (which also wakes a vCPU waiting on them), never written."""
        self.on_arrival: Callable[[int, np.ndarray], None] | None = None
        self.sealed = False
        """Set the moment postcopy holds every page.  From then on only the guest
        writes its RAM: a page frame still in flight (a page both requested and
        streamed, sent before the source saw SHUT) is an older copy, and writing
        it — by pwrite once the uffd is gone — would undo the guest's newer
        writes.  Such frames are dropped and counted in ``late_duplicates``."""
        self.late_duplicates = 0

    def _arrived(self, block: int, pages: np.ndarray) -> None:
        if self.on_arrival is not None:
            self.on_arrival(block, pages)

    def apply_discard(self, msg: Discard) -> None:
        """Drop pages re-dirtied after they were sent: they must fault again."""
        block = self.block(msg.block)
        ranges = msg.ranges.astype(np.int64)
        ends = ranges[:, 0] + ranges[:, 1]
        if len(ranges) and (ends.max() > block.npages):
            raise ValueError(f"DISCARD for {block.name}: a range ends past page {block.npages}")
        for first, count in ranges.tolist():
            block.discard(first, count)
        self.received[msg.block].clear_runs(ranges[:, 0], ranges[:, 1])

    def block(self, index: int) -> RamBlock:
        if not 0 <= index < len(self.blocks):
            raise ValueError(f"RAM block index {index} out of range (guest has {len(self.blocks)})")
        return self.blocks[index]

    def _pages_of(self, msg: Any) -> tuple[RamBlock, np.ndarray]:
        """Check a page message against its block; returns the block and the page indices."""
        block = self.block(msg.block)
        name = type(msg).__name__
        if isinstance(msg, (Pages, Zero)):
            first, count = msg.first_page, msg.count
            if first < 0 or count <= 0 or first + count > block.npages:
                raise ValueError(
                    f"pages {first}..{first + count - 1} outside RAM block {block.name} ({block.npages} pages)"
                )
            pages = np.arange(first, first + count, dtype=np.intp)
        else:
            pages = msg.pages.astype(np.intp)
            if len(pages) and (pages.min() < 0 or pages.max() >= block.npages):
                raise ValueError(
                    f"{name} for {block.name}: page index outside 0..{block.npages - 1}"
                )
        if isinstance(msg, (Pages, PageBatch)) and len(msg.data) != len(pages) * block.page_size:
            raise ValueError(
                f"{name} for {block.name}: {len(msg.data)} bytes is not {len(pages)} pages of {block.page_size}"
            )
        return block, pages

    def store(self, msg: Any, placer: Any = None) -> None:
        """Put a page message's data in place, bitmaps untouched: written into the
        memfds (precopy), or placed with ``placer`` (postcopy, atomically).

        Safe in a worker thread (with a placer of its own: a placer's ioctl
        buffers are not shared): it reads ``received`` only for this message's
        own pages, which nothing else changes meanwhile (multifd readers meet
        at a sync point before a page can be sent again; postcopy pages are
        the source's final copy, and a second placement fails EEXIST).
        """
        self._store(msg, *self._pages_of(msg), placer)

    def _store(self, msg: Any, block: RamBlock, pages: np.ndarray, placer: Any) -> None:
        if placer is not None:
            _place(placer, msg, pages, block.page_size)
        elif isinstance(msg, Pages):
            block.write_pages(msg.first_page, msg.data)
        elif isinstance(msg, PageBatch):
            write_scattered(block, pages, np.frombuffer(msg.data, dtype=np.uint8))
        else:
            # A ZERO for a page never received needs no write (fresh memfd pages
            # are zero); one we hold data for became zero and is cleared.
            seen = pages[self.received[msg.block].test_indices(pages)]
            if len(seen):
                block.array.reshape(-1, block.page_size)[seen] = 0

    def apply(self, msg: Any, *, stored: bool = False) -> int:
        """Apply a PAGES / PAGE_BATCH / ZERO / ZERO_BATCH; returns its page count.

        ``stored``: :meth:`store` already put the data in place (in a worker
        thread); only the bitmaps remain, which live on the trio thread.
        Once ``sealed``, nothing is applied: the pages count as late duplicates.
        """
        block, pages = self._pages_of(msg)
        if self.sealed:
            self.late_duplicates += len(pages)
            return 0
        if not stored:
            self._store(msg, block, pages, self.placer)
        if isinstance(msg, (Pages, Zero)):
            self.received[msg.block].set_range(msg.first_page, msg.count)
        else:
            self.received[msg.block].set_indices(pages)
        self._arrived(msg.block, pages)
        return len(pages)

    def missing(self) -> int:
        return sum(r.npages - r.count() for r in self.received)

    def complete(self) -> bool:
        return all(r.count() == r.npages for r in self.received)
