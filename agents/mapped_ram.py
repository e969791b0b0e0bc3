"""Mapped-ram file migration (agent side): save a guest to a file, restore it eagerly or lazily.

Theory of operation
-------------------
The file format is protocol/mapped_ram.py's: the layout is fixed before the
first byte is written, every page has its own slot, a bitmap per block says
which slots hold a page (zero pages are never written), and the device
sections and VMDESC follow the last pages region.

**Save.**  Page data moves in *jobs* — up to ``CHUNK_BYTES`` of one block —
done by ``multifd_channels`` writer threads, each one thread for the whole
pass owned by a trio task (``_run_jobs``): a writer takes the next job
itself, finds the zero pages with numpy and pwrites the runs of non-zero
pages from the agent's mapping of the guest memfd straight to their slots,
and hands results to trio in batches without waiting.  pwrite releases the
GIL, so N writers really run in parallel and the disk never idles on a trio
round trip; jobs are a few MiB, so a cancelled save stops within one job
per writer and no thread outlives it.  With
``direct_io`` the page writes go through a second, O_DIRECT descriptor: the
guest mapping is page-aligned and every slot is page-aligned, so no bounce
buffer is needed.  Non-live: the guest is stopped first and every page is
written once.  Live: the dirty log is started first, every page is written,
then dirty pages are written again to *their own* slots (so the file cannot
grow) until the rest fits ``downtime-limit`` at the measured bandwidth (or
``max_passes`` is reached), then the guest stops and the rest follows.  The
bitmaps, the device tail and finally the header with ``COMPLETE`` are
written last, each after an fsync of what it vouches for.

**Restore.**  The file is validated whole before a guest exists (header,
offsets against the file size, bitmaps, the device tail's SHA-256, VMDESC
against the sections, the guest config).  The guest process is a spare
started ahead when the caller has a ``SparePool`` (vm/spares.py), so no
interpreter start is on the way.  Eager: reader threads pread runs
of present pages into page-aligned buffers and pwrite them into fresh
memfds while the guest process starts (the two overlap); then devices are
loaded and the vCPUs run.  pread into the buffer + pwrite into the memfd
measured 2.1–2.4 GB/s against 0.3–0.9 GB/s for preadv straight into the
mapping (page faults on shmem) and about the same as sendfile(2).  With
direct-io it is the other way round: the disk DMAs straight into the
agent's mapping of the memfd, one copy fewer (4 GiB from ext4, uncached:
0.68 against 0.55 GB/s with one reader, 1.04 against 0.85 with two).  Lazy:
the guest starts with its RAM registered MISSING, devices are loaded and
the vCPUs run at once; a fault task reads the window of pages around each
fault from the file and places it with UFFDIO_COPY (absent pages as
zeros), while reader threads place every other present page the same way
— UFFDIO_COPY never overwrites a page the guest may already have written
(EEXIST), which a pwrite into the memfd would.  When all present pages are
placed the guest unregisters (pages never saved read as zero from then on).

Nothing half-restored survives an error: the guest is quit and its memfds
closed before the error propagates.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from protocol.bitmap import PageBitmap
from protocol.mapped_ram import (
    BLOCK_ENTRY_SIZE,
    HEADER_FIXED_SIZE,
    FileLayout,
    MappedRamError,
    TailSection,
    check_ram_layout,
    decode_bitmap,
    decode_header,
    decode_tail,
    encode_bitmap,
    encode_header,
    encode_tail,
    header_size_from_prefix,
    plan_layout,
    validate_layout,
)
from protocol.states import MigrationStatus, Role, is_terminal

from . import savevm
from .migration import MigrationState, first_error
from .vm.devices import DeviceSection
from .vm.guest import Guest, GuestSpec
from .vm.postcopy import UffdPlacer
from .vm.ramblock import RamBlock, zero_page_mask
from .vm.spares import SparePool

if TYPE_CHECKING:
    from .daemon import Agent, GuestEntry

log = logging.getLogger("godwit.mapped_ram")
S = MigrationStatus

CHUNK_BYTES = 8 << 20
"""One job: pages of one block in one 8 MiB window (one zero scan, one or a few pwrites)."""
FAULT_WINDOW_BYTES = 64 << 10
"""A fault places the aligned 64 KiB around it: a vCPU walking memory faults 16× less."""
DEFAULT_MAX_PASSES = 30
"""A live save that has not converged after this many passes switches over anyway: a
file has no peer waiting, so a longer stop is better than never finishing."""
PROGRESS_INTERVAL = 0.25
DELIVER_INTERVAL = 0.05
"""Worker threads hand finished jobs to trio (progress, counters) at most this often."""
O_DIRECT = getattr(os, "O_DIRECT", 0o40000)

Job = tuple[int, int, int, "np.ndarray | None"]
"""(block index, first page, page count, the pages to do inside it or None for all)."""


# -- helpers ---------------------------------------------------------------------


class DirectIOUnsupported(OSError):
    """The file system holding the file refuses O_DIRECT."""


def fs_type(path: str) -> str:
    """The file system type of the mount holding ``path`` (from /proc/self/mountinfo)."""
    target = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                mount = parts[4].encode().decode("unicode_escape")
                sep = parts.index("-")
                if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(
                    mount
                ) >= len(best):
                    best, kind = mount, parts[sep + 1]
    except (OSError, ValueError, IndexError):
        pass
    return kind


def open_direct(path: str, flags: int) -> int:
    """open(2) with O_DIRECT, or DirectIOUnsupported naming the path and its file system."""
    try:
        return os.open(path, flags | O_DIRECT | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == 22:  # EINVAL: the file system has no direct I/O
            raise DirectIOUnsupported(
                e.errno,
                f"{path}: the file system ({fs_type(path)}) refuses O_DIRECT; "
                "save without --direct-io, or to a file on a disk file system",
            ) from None
        raise


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _pread_into(fd: int, buf: memoryview, offset: int, *, source: str) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise MappedRamError(
                source,
                offset + done,
                f"file ends while reading {len(buf)} bytes of pages at {offset}",
            )
        done += n


def _runs(pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of consecutive runs in a sorted page index array."""
    if pages.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    cut = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = pages[np.concatenate(([0], cut))]
    ends = pages[np.concatenate((cut - 1, [pages.size - 1]))] + 1
    return starts.astype(np.int64), (ends - starts).astype(np.int64)


def _bool_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of runs of True in a bool array."""
    edges = np.diff(np.concatenate(([0], mask.view(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    return starts.astype(np.int64), (np.flatnonzero(edges == -1) - starts).astype(np.int64)


def _chunk_pages(page_size: int) -> int:
    return max(1, CHUNK_BYTES // page_size)


def _full_jobs(blocks: Sequence[RamBlock]) -> Iterator[Job]:
    for bi, b in enumerate(blocks):
        step = _chunk_pages(b.page_size)
        for first in range(0, b.npages, step):
            yield bi, first, min(step, b.npages - first), None


def _dirty_jobs(blocks: Sequence[RamBlock], dirty: dict[str, np.ndarray]) -> Iterator[Job]:
    """Dirty pages grouped by chunk: one job per chunk that has any (loop per chunk, not page)."""
    for bi, b in enumerate(blocks):
        pages = np.unique(np.asarray(dirty.get(b.name, ()), dtype=np.int64))
        if pages.size == 0:
            continue
        step = _chunk_pages(b.page_size)
        chunk = pages // step
        cuts = np.flatnonzero(np.diff(chunk)) + 1
        for part in np.split(pages, cuts):
            first = int(part[0]) - int(part[0]) % step
            yield bi, first, min(step, b.npages - first), part


class _Progress:
    """Keeps a MigrationState's RAM figures and MIGRATION_PROGRESS events current."""

    def __init__(self, state: MigrationState | None, total: int, page_size: int) -> None:
        self.state = state
        self.t0 = time.monotonic()
        self.bytes = 0
        self._last = 0.0
        if state is not None:
            state.ram.total = total
            state.ram.page_size = page_size
            state.ram.remaining = total

    def add(self, nbytes: int, normal: int, zero: int, remaining: int | None = None) -> None:
        self.bytes += nbytes
        st = self.state
        if st is None:
            return
        st.ram.transferred += nbytes
        st.ram.normal += normal
        st.ram.duplicate += zero
        if remaining is not None:
            st.ram.remaining = max(0, remaining)
        now = time.monotonic()
        if now - self._last >= PROGRESS_INTERVAL:
            self._last = now
            dt = max(now - self.t0, 1e-6)
            st.ram.mbps = self.bytes * 8 / dt / 1e6
            st.ram.pages_per_second = (st.ram.normal + st.ram.duplicate) / dt
            st.events.emit("MIGRATION_PROGRESS", {"guest": st.guest, "info": st.info()})

    def set_status(self, status: MigrationStatus) -> None:
        if self.state is not None:
            self.state.set_status(status)

    def finish(self) -> None:
        st = self.state
        if st is None:
            return
        dt = max(time.monotonic() - self.t0, 1e-6)
        st.ram.mbps = self.bytes * 8 / dt / 1e6
        st.ram.remaining = 0


async def _run_jobs(
    jobs: Iterable[Job],
    workers: int,
    work: Callable[[Job], Any],
    done: Callable[[Job, Any], None],
) -> None:
    """Run ``work`` on each job in ``workers`` threads at once; ``done`` runs in trio per result.

    Each worker is one thread for the whole pass, owned by a trio task
    (``trio.to_thread.run_sync``, never abandoned): it takes the next job
    itself and hands results to trio without waiting for them, in batches
    of ``DELIVER_INTERVAL`` (``run_sync_soon``: in order, all delivered
    before the thread's own return), so the file or disk never idles on a
    trio round trip between jobs and trio wakes ~20 times a second, not once
    per job.  A job-per-hop design lost ~1/3 of a single writer's bandwidth on
    a busy 2-core host.  Cancelling the caller, or an error in any thread,
    stops every thread after the job it is doing (a few MiB), and this
    returns (or raises) only once all of them have.
    """
    stop = threading.Event()
    lock = threading.Lock()
    source = iter(jobs)
    token = trio.lowlevel.current_trio_token()
    failed: list[BaseException] = []

    def next_job() -> Job | None:
        with lock:  # a generator must not run in two threads at once
            return None if stop.is_set() else next(source, None)

    def deliver(batch: list[tuple[Job, Any]]) -> None:  # in trio, where nothing may raise
        try:
            for job, result in batch:
                done(job, result)
        except BaseException as e:
            failed.append(e)
            stop.set()

    def loop() -> None:
        batch: list[tuple[Job, Any]] = []
        sent = time.monotonic()
        try:
            while (job := next_job()) is not None:
                batch.append((job, work(job)))
                if time.monotonic() - sent >= DELIVER_INTERVAL:
                    token.run_sync_soon(deliver, batch)
                    batch, sent = [], time.monotonic()
        except BaseException:
            stop.set()
            raise
        finally:
            if batch:
                token.run_sync_soon(deliver, batch)

    async def stop_when_cancelled() -> None:
        try:
            await trio.sleep_forever()
        finally:
            stop.set()

    async with trio.open_nursery() as outer:
        outer.start_soon(stop_when_cancelled)
        async with trio.open_nursery() as nursery:
            for _ in range(max(1, workers)):
                nursery.start_soon(trio.to_thread.run_sync, loop)
        outer.cancel_scope.cancel()
    if failed:
        raise failed[0]


# -- save ------------------------------------------------------------------------


@dataclass
class SaveResult:
    """What a save did; ``layout`` is the final header's view of the file."""

    path: str
    layout: FileLayout
    live: bool
    writers: int
    direct_io: bool
    passes: int = 0
    bytes_written: int = 0
    pages_written: int = 0
    zero_pages: int = 0
    present_pages: int = 0
    max_page_end: int = 0
    seconds: float = 0.0
    downtime_ms: float | None = None

    def info(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "live": self.live,
            "writers": self.writers,
            "direct-io": self.direct_io,
            "passes": self.passes,
            "bytes-written": self.bytes_written,
            "pages-written": self.pages_written,
            "zero-pages": self.zero_pages,
            "present-pages": self.present_pages,
            "file-size": self.layout.file_size,
            "seconds": round(self.seconds, 3),
            "downtime-ms": None if self.downtime_ms is None else round(self.downtime_ms, 1),
        }


class _SaveFile:
    """The open file of one save: descriptors, the in-memory bitmaps, and the page-writing job."""

    def __init__(
        self, path: str, layout: FileLayout, blocks: Sequence[RamBlock], direct_io: bool
    ) -> None:
        self.path = path
        self.layout = layout
        self.blocks = list(blocks)
        self.present = [np.zeros(b.npages, dtype=bool) for b in blocks]
        self.fd = -1
        self.dfd = -1
        self.direct_io = direct_io
        self.max_end = 0

    def open(self) -> None:
        """Create the file at its RAM layout's size (sparse) with an incomplete header."""
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        self.fd = os.open(self.path, flags, 0o600)
        if self.direct_io:
            self.dfd = open_direct(self.path, os.O_RDWR)
        os.ftruncate(self.fd, self.layout.tail_offset)
        _pwrite_all(self.fd, memoryview(encode_header(self.layout)), 0)

    def close(self) -> None:
        for fd in (self.fd, self.dfd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.dfd = -1

    def write_job(self, job: Job) -> tuple[int, int, int, int]:
        """Runs in a writer thread: (pages written, zero pages found, bytes written, end offset).

        Kept lean: with N writers every bit of Python here is time another
        writer may wait for the GIL instead of having its I/O in flight.
        """
        bi, first, count, sel = job
        blk = self.blocks[bi]
        ps = blk.page_size
        present = self.present[bi]
        if sel is None:
            zero = zero_page_mask(blk.view[first * ps : (first + count) * ps], ps)
            nzero = int(np.count_nonzero(zero))
            if nzero == 0:  # a chunk without zero pages: one run, no index arrays
                runs = [(first, count)]
            else:
                rs, rl = _bool_runs(~zero)
                runs = list(zip((rs + first).tolist(), rl.tolist(), strict=True))
            data_pages = count - nzero
        else:
            rows = blk.array.view(np.uint64).reshape(blk.npages, ps // 8)
            zero = ~np.bitwise_or.reduce(rows[sel], axis=1).astype(bool)
            nzero = int(np.count_nonzero(zero))
            present[sel[zero]] = False
            data = sel[~zero]
            rs, rl = _runs(data)
            runs = list(zip(rs.tolist(), rl.tolist(), strict=True))
            data_pages = int(data.size)
        fd = self.dfd if self.dfd >= 0 else self.fd
        base = self.layout.blocks[bi].pages_offset
        for s, n in runs:
            _pwrite_all(fd, blk.view[s * ps : (s + n) * ps], base + s * ps)
        if sel is None:
            present[first : first + count] = ~zero
        else:
            present[data] = True
        end = base + (runs[-1][0] + runs[-1][1]) * ps if runs else 0
        return data_pages, nzero, data_pages * ps, end

    def finish(self, tail: bytes) -> FileLayout:
        """Bitmaps and tail, fsync, then the header with COMPLETE, fsync: the file is done."""
        counts = []
        for b, mask in zip(self.layout.blocks, self.present, strict=True):
            bm = PageBitmap.from_bool(mask)
            counts.append(bm.count())
            _pwrite_all(self.fd, memoryview(encode_bitmap(bm)), b.bitmap_offset)
        _pwrite_all(self.fd, memoryview(tail), self.layout.tail_offset)
        os.ftruncate(self.fd, self.layout.tail_offset + len(tail))
        os.fsync(self.fd)
        final = self.layout.finished(tail, counts)
        _pwrite_all(self.fd, memoryview(encode_header(final)), 0)
        os.fsync(self.fd)
        return final


def _file_config(guest: Guest, live: bool) -> dict[str, Any]:
    from importlib import metadata

    try:
        version = metadata.version("godwit")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    return {
        "guest": guest.spec.to_json(),
        "saved-by": f"godwit {version}",
        "saved-at": round(time.time(), 3),
        "live": live,
    }


async def save_guest(
    guest: Guest,
    path: str | os.PathLike[str],
    *,
    live: bool,
    multifd_channels: int = 1,
    direct_io: bool = False,
    state: MigrationState | None = None,
    parameters: dict[str, Any] | None = None,
    max_passes: int = DEFAULT_MAX_PASSES,
) -> SaveResult:
    """Save ``guest`` to a mapped-ram file; the guest is left stopped (as QEMU leaves it).

    ``live`` keeps a running guest running until the dirty set fits
    ``downtime-limit`` (from ``parameters``, default 300 ms).  A guest that
    is already stopped is saved non-live either way.  On failure or
    cancellation a guest this call stopped runs again, the dirty log is
    off, and the file is left without its COMPLETE flag (restore refuses
    it); ``state`` (role source) ends ``failed`` on errors — a cancelled
    save's state is its owner's to end.
    """
    path = os.fspath(path)
    params = dict(parameters or {})
    limit_ms = float(params.get("downtime-limit", 300))
    writers = max(1, int(multifd_channels))
    t0 = time.monotonic()
    blocks = guest.blocks
    live_now = live and guest.state == "running"
    layout = plan_layout(
        [(b.name, b.size, b.page_size) for b in blocks], _file_config(guest, live_now)
    )
    progress = _Progress(state, sum(b.size for b in blocks), blocks[0].page_size)
    result = SaveResult(path, layout, live_now, writers, direct_io)
    out = _SaveFile(path, layout, blocks, direct_io)
    stopped_here = False
    dirty_started = False

    total = sum(b.size for b in blocks)
    scanned = [0]

    def done(job: Job, res: tuple[int, int, int, int]) -> None:
        pages, zero, nbytes, end = res
        out.max_end = max(out.max_end, end)
        result.pages_written += pages
        result.zero_pages += zero
        result.bytes_written += nbytes
        remaining = None
        if result.passes == 1:  # the bulk pass: what is left is what it has not scanned
            scanned[0] += job[2] * blocks[job[0]].page_size
            remaining = total - scanned[0]
        progress.add(nbytes, pages, zero, remaining)

    async def write(jobs: Iterable[Job]) -> None:
        await _run_jobs(jobs, writers, out.write_job, done)

    try:
        progress.set_status(S.SETUP)
        await trio.to_thread.run_sync(out.open)
        if guest.state == "running" and not live_now:
            await guest.stop()
            stopped_here = True
        if live_now:
            await guest.start_dirty_log()
            dirty_started = True
        progress.set_status(S.ACTIVE)
        stop_at = time.monotonic()
        result.passes = 1
        pass_t0, pass_bytes0 = time.monotonic(), result.bytes_written
        await write(_full_jobs(blocks))
        if live_now:
            assert guest.dirty_log is not None
            while True:
                elapsed = max(time.monotonic() - pass_t0, 1e-6)
                written = result.bytes_written - pass_bytes0
                dirty = await guest.dirty_log.get_and_clear_async()
                if state is not None:
                    state.ram.dirty_sync_count += 1
                pending = sum(
                    int(np.unique(dirty.get(b.name, np.zeros(0, np.int64))).size) * b.page_size
                    for b in blocks
                )
                bandwidth = written / elapsed if written else 0.0
                if state is not None:
                    state.ram.remaining = pending
                    state.expected_downtime_ms = pending / bandwidth * 1000 if bandwidth else None
                converged = pending == 0 or (
                    bandwidth > 0 and pending / bandwidth * 1000 <= limit_ms
                )
                if converged or result.passes >= max_passes:
                    break
                result.passes += 1
                pass_t0, pass_bytes0 = time.monotonic(), result.bytes_written
                await write(_dirty_jobs(blocks, dirty))
            stop_at = time.monotonic()
            await guest.stop()
            stopped_here = True
            progress.set_status(S.DEVICE)
            # Pages from the last scan plus whatever was written until the stop.
            last = await guest.dirty_log.get_and_clear_async()
            merged = {
                b.name: np.concatenate(
                    (
                        np.asarray(dirty.get(b.name, ()), dtype=np.int64),
                        np.asarray(last.get(b.name, ()), dtype=np.int64),
                    )
                )
                for b in blocks
            }
            if state is not None:
                state.ram.dirty_sync_count += 1
            result.passes += 1
            await write(_dirty_jobs(blocks, merged))
            await guest.stop_dirty_log()
            dirty_started = False
        else:
            progress.set_status(S.DEVICE)
        sections = await guest.save_devices()
        tail = encode_tail(
            [TailSection(s.name, s.instance, s.version, bytes(s.data)) for s in sections],
            savevm.describe(blocks, sections),
        )
        result.layout = await trio.to_thread.run_sync(out.finish, tail)
        result.present_pages = sum(b.present_pages for b in result.layout.blocks)
        result.max_page_end = out.max_end
        result.seconds = time.monotonic() - t0
        result.downtime_ms = (time.monotonic() - stop_at) * 1000
        progress.finish()
        if state is not None:
            state.downtime_ms = result.downtime_ms
            state.expected_downtime_ms = None
        progress.set_status(S.COMPLETED)
        log.info(
            "saved %s to %s: %d pages in %d passes, %.3f s",
            guest.spec.name,
            path,
            result.present_pages,
            result.passes,
            result.seconds,
        )
        return result
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            if dirty_started:
                try:
                    await guest.stop_dirty_log()
                except Exception as e:
                    log.warning("stopping the dirty log of %s failed: %s", guest.spec.name, e)
            if stopped_here:
                try:
                    await guest.cont()
                except Exception as e:
                    log.warning("resuming %s after a failed save failed: %s", guest.spec.name, e)
        leaf = first_error(exc)
        if state is not None and isinstance(leaf, Exception) and not is_terminal(state.status):
            state.fail(str(leaf) or type(leaf).__name__)
        if leaf is not exc and isinstance(leaf, Exception):
            raise leaf from None  # a writer thread's error, not the nursery's group
        raise
    finally:
        out.close()


# -- reading and validating a file ---------------------------------------------------


@dataclass
class SavedFile:
    """A mapped-ram file that passed validation: its layout, bitmaps, devices and guest spec."""

    path: str
    layout: FileLayout
    bitmaps: list[PageBitmap]
    sections: list[DeviceSection]
    vmdesc: dict[str, Any]
    spec: GuestSpec
    file_size: int = 0

    def present(self) -> list[np.ndarray]:
        return [bm.to_bool() for bm in self.bitmaps]


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    parts = []
    got = 0
    while got < n:
        chunk = os.pread(fd, n - got, offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _spec_from(layout: FileLayout, source: str) -> GuestSpec:
    cfg_offset = HEADER_FIXED_SIZE + BLOCK_ENTRY_SIZE * len(layout.blocks)
    raw = layout.config.get("guest")
    if not isinstance(raw, dict):
        raise MappedRamError(source, cfg_offset, "guest config has no 'guest' object")
    try:
        spec = GuestSpec.from_json(raw)
        spec.ram_size = [(b.name, b.size) for b in layout.blocks]
        spec.hugetlb = any(b.page_size > 4096 for b in layout.blocks)
        if spec.hugetlb and not all(b.page_size > 4096 for b in layout.blocks):
            raise ValueError("mixes huge and small pages across blocks")
        spec.validate()
    except (TypeError, ValueError, KeyError) as e:
        raise MappedRamError(source, cfg_offset, f"guest config is not usable: {e}") from None
    return spec


def read_saved_file(
    path: str | os.PathLike[str],
    *,
    expect_layout: Sequence[tuple[str, int]] | Sequence[tuple[str, int, int]] | None = None,
) -> SavedFile:
    """Open and validate a whole mapped-ram file (everything but the page bytes themselves).

    Raises MappedRamError (a ValueError) naming the file, the byte offset and
    what was expected, or OSError if the file cannot be read.
    """
    source = os.fspath(path)
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        prefix = _pread_exact(fd, 4096, 0)
        header_size = header_size_from_prefix(prefix, source=source)
        layout = decode_header(_pread_exact(fd, header_size, 0), source=source)
        validate_layout(layout, size, source=source)
        if not layout.complete:
            raise MappedRamError(
                source,
                12,
                "COMPLETE flag is clear: the save did not finish (interrupted, failed or still running)",
            )
        if expect_layout is not None:
            check_ram_layout(layout, expect_layout, source=source)
        bitmaps = [
            decode_bitmap(_pread_exact(fd, b.bitmap_size, b.bitmap_offset), b, source=source)
            for b in layout.blocks
        ]
        tail = _pread_exact(fd, layout.tail_size, layout.tail_offset)
        raw_sections, vmdesc = decode_tail(tail, layout, source=source)
        sections = [DeviceSection(s.name, s.instance, s.version, s.data) for s in raw_sections]
        try:
            savevm.check_vmdesc(vmdesc, layout.blocks, sections)
        except ValueError as e:
            raise MappedRamError(source, layout.tail_offset, f"device tail: {e}") from None
        spec = _spec_from(layout, source)
    finally:
        os.close(fd)
    return SavedFile(source, layout, bitmaps, sections, vmdesc, spec, size)


def inspect_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Layout, per-block present pages, device sections and the validation verdict, as JSON."""
    source = os.fspath(path)
    out: dict[str, Any] = {"path": source}
    try:
        out["file-size"] = os.stat(source).st_size
        saved = read_saved_file(source)
    except (MappedRamError, OSError) as e:
        out["valid"] = False
        out["error"] = str(e)
        # Show whatever part of the header still decodes.
        try:
            with open(source, "rb") as f:
                data = f.read(1 << 21)
            out["layout"] = decode_header(data, source=source).describe()
        except (MappedRamError, OSError):
            pass
        return out
    out["valid"] = True
    out["layout"] = saved.layout.describe()
    for b, desc in zip(saved.layout.blocks, out["layout"]["blocks"], strict=True):
        desc["present-percent"] = round(100 * b.present_pages / b.npages, 2)
    out["sections"] = [
        {"name": s.name, "instance": s.instance, "version": s.version, "size": len(s.data)}
        for s in saved.sections
    ]
    out["vmdesc"] = saved.vmdesc
    return out


# -- restore -------------------------------------------------------------------


class _Reader:
    """Reads present pages from the file into the restored guest (threads; one buffer each)."""

    def __init__(
        self,
        saved: SavedFile,
        blocks: Sequence[RamBlock],
        direct_io: bool,
    ) -> None:
        self.saved = saved
        self.blocks = list(blocks)
        self.present = saved.present()
        self.placed = [np.zeros(b.npages, dtype=bool) for b in blocks]
        self.fd = os.open(saved.path, os.O_RDONLY | os.O_CLOEXEC)
        self.rfd = open_direct(saved.path, os.O_RDONLY) if direct_io else self.fd
        self.direct_io = direct_io
        self.bufs: dict[int, mmap.mmap] = {}
        self.placers: dict[int, UffdPlacer] = {}

    def close(self) -> None:
        for fd in {self.fd, self.rfd}:
            if fd >= 0:
                os.close(fd)
        self.fd = self.rfd = -1
        for buf in self.bufs.values():
            try:
                buf.close()
            except BufferError:
                pass
        self.bufs.clear()
        self.placers.clear()  # borrowed fd: never closed here

    def _buffer(self, nbytes: int) -> memoryview:
        """This thread's page-aligned buffer (mmap: O_DIRECT-safe)."""
        key = threading.get_ident()
        buf = self.bufs.get(key)
        if buf is None or len(buf) < nbytes:
            if buf is not None:
                buf.close()
            buf = self.bufs[key] = mmap.mmap(-1, max(nbytes, CHUNK_BYTES))
        return memoryview(buf)[:nbytes]

    def jobs(self) -> Iterator[Job]:
        """Chunks holding present pages not placed yet."""
        for bi, b in enumerate(self.blocks):
            step = _chunk_pages(b.page_size)
            want = self.present[bi] & ~self.placed[bi]
            n = b.npages
            pad = (-n) % step
            per_chunk = np.concatenate((want, np.zeros(pad, dtype=bool))).reshape(-1, step).any(1)
            for c in np.flatnonzero(per_chunk).tolist():
                first = c * step
                yield bi, first, min(step, n - first), None

    def _read_span(self, bi: int, first: int, count: int) -> memoryview:
        ps = self.blocks[bi].page_size
        buf = self._buffer(count * ps)
        off = self.saved.layout.blocks[bi].page_offset(first)
        _pread_into(self.rfd, buf, off, source=self.saved.path)
        return buf

    def eager_job(self, job: Job) -> tuple[int, int]:
        """Read the chunk's present runs into the guest's memory: (pages, bytes).

        Buffered: one pread of the span into this thread's buffer, then a pwrite
        per run into the memfd.  O_DIRECT: a pread per run straight into our
        mapping of the memfd (the guest does not run yet), so the disk writes
        into guest memory itself, one copy fewer.
        """
        bi, first, count, _ = job
        blk = self.blocks[bi]
        ps = blk.page_size
        want = self.present[bi][first : first + count] & ~self.placed[bi][first : first + count]
        starts, lengths = _bool_runs(want)
        if starts.size == 0:
            return 0, 0
        lo = int(starts[0])
        hi = int(starts[-1] + lengths[-1])
        if self.direct_io:
            entry = self.saved.layout.blocks[bi]
            for s, n in zip((starts + first).tolist(), lengths.tolist(), strict=True):
                _pread_into(
                    self.rfd,
                    blk.view[s * ps : (s + n) * ps],
                    entry.page_offset(s),
                    source=self.saved.path,
                )
        else:
            buf = self._read_span(bi, first + lo, hi - lo)
            for s, n in zip(starts.tolist(), lengths.tolist(), strict=True):
                blk.write_pages(first + s, buf[(s - lo) * ps : (s - lo + n) * ps])
        self.placed[bi][first + lo : first + hi] |= want[lo:hi]
        pages = int(lengths.sum())
        return pages, pages * ps

    def _placer(self, placer: UffdPlacer) -> UffdPlacer:
        """A per-thread UffdPlacer on the same uffd (each keeps its own ioctl argument buffer)."""
        key = threading.get_ident()
        p = self.placers.get(key)
        if p is None:
            p = self.placers[key] = UffdPlacer(placer.fd, placer.mappings)
        return p

    def lazy_job(self, placer: UffdPlacer, job: Job) -> tuple[int, int]:
        """Like eager_job but placed with UFFDIO_COPY (never over a page the guest has)."""
        bi, first, count, _ = job
        ps = self.blocks[bi].page_size
        want = self.present[bi][first : first + count] & ~self.placed[bi][first : first + count]
        starts, lengths = _bool_runs(want)
        if starts.size == 0:
            return 0, 0
        lo = int(starts[0])
        hi = int(starts[-1] + lengths[-1])
        buf = self._read_span(bi, first + lo, hi - lo)
        mine = self._placer(placer)
        placed = 0
        for s, n in zip(starts.tolist(), lengths.tolist(), strict=True):
            placed += mine.copy(bi, first + s, buf[(s - lo) * ps : (s - lo + n) * ps])
        self.placed[bi][first + lo : first + hi] |= want[lo:hi]
        return placed, placed * ps

    def serve_fault(self, placer: UffdPlacer, bi: int, page: int, buf: memoryview) -> int:
        """Place the aligned window around a faulting page (absent pages as zeros): pages placed."""
        blk = self.blocks[bi]
        ps = blk.page_size
        window = max(1, FAULT_WINDOW_BYTES // ps)
        first = page - page % window
        count = min(window, blk.npages - first)
        todo = ~self.placed[bi][first : first + count]
        if not todo[page - first]:
            placer.wake(bi, page, 1)  # placed meanwhile: the fault message was stale
            return 0
        span = buf[: count * ps]
        present = self.present[bi][first : first + count]
        if present.any():
            _pread_into(
                self.fd,
                span,
                self.saved.layout.blocks[bi].page_offset(first),
                source=self.saved.path,
            )
            absent = np.flatnonzero(~present)
            if absent.size:
                np.frombuffer(span, dtype=np.uint8).reshape(count, ps)[absent] = 0
            placed = placer.copy(bi, first, span)
        else:
            placed = placer.zeropage(bi, first, count)
        self.placed[bi][first : first + count] = True
        return placed


def _prepare(
    path: str | os.PathLike[str],
    expect_layout: Sequence[tuple[str, int]] | Sequence[tuple[str, int, int]] | None,
    direct_io: bool,
    marks: dict[str, float],
    t0: float,
    ram_path: str | os.PathLike[str] | None,
) -> tuple[SavedFile, list[RamBlock], _Reader]:
    """Validate the file, make the guest's memfds and open the reader (one thread hop)."""
    saved = read_saved_file(path, expect_layout=expect_layout)
    marks["validated"] = time.monotonic() - t0
    blocks: list[RamBlock] = []
    try:
        for name, size in saved.spec.layout():
            blocks.append(
                RamBlock.create(name, size, hugetlb=saved.spec.hugetlb, directory=ram_path)
            )
        reader = _Reader(saved, blocks, direct_io)
    except BaseException:
        for b in blocks:
            b.close()
        raise
    marks["memory"] = time.monotonic() - t0
    return saved, blocks, reader


async def restore_guest(
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    lazy: bool = False,
    readers: int = 2,
    direct_io: bool = False,
    autostart: bool = True,
    expect_layout: Sequence[tuple[str, int]] | Sequence[tuple[str, int, int]] | None = None,
    state: MigrationState | None = None,
    timings: dict[str, float] | None = None,
    spares: SparePool | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    ram_path: str | os.PathLike[str] | None = None,
    task_status: trio.TaskStatus[Guest] = trio.TASK_STATUS_IGNORED,
) -> Guest:
    """Bring the guest saved in ``path`` back; returns it when every page is in place.

    Under ``nursery.start`` the Guest is handed back as soon as it runs (eager:
    at the end; lazy: at once, while pages keep arriving in the task).
    ``autostart=False`` loads devices but leaves the vCPUs stopped.
    ``spares``: a ready spare guest process becomes the guest, if the pool
    has one (no interpreter start on the critical path); ``state_dir``: the
    guest outlives the agent, as guests started there do; ``ram_path``: its
    RAM on that tmpfs (RamBlock.create).
    ``timings`` (if given) receives seconds since the call: ``validated``,
    ``memory`` (memfds made), ``guest-ready`` (process up), ``devices``
    (loaded), ``running`` (vCPUs released) and ``complete``.
    On any error the guest is quit and its memory closed before the error
    propagates; ``state`` (role destination) then ends ``failed``.
    """
    t0 = time.monotonic()
    marks = timings if timings is not None else {}
    progress = _Progress(state, 0, 4096)
    progress.set_status(S.SETUP)
    guest: Guest | None = None
    blocks: list[RamBlock] = []
    reader: _Reader | None = None
    try:
        saved, blocks, rd = await trio.to_thread.run_sync(
            _prepare, path, expect_layout, direct_io, marks, t0, ram_path
        )
        reader = rd  # closed in ``finally``; ``rd`` is the same, never None
        spec = saved.spec
        if name:
            spec.name = name
        if state is not None:
            state.guest = spec.name
            state.ram.total = sum(b.size for b in saved.layout.blocks)
            state.ram.page_size = saved.layout.blocks[0].page_size
            state.ram.remaining = sum(b.present_pages * b.page_size for b in saved.layout.blocks)
            state.ram.duplicate = sum(b.npages - b.present_pages for b in saved.layout.blocks)
            state.postcopy_enabled = lazy
        pending = [state.ram.remaining if state is not None else 0]

        def done(job: Job, res: tuple[int, int]) -> None:
            pending[0] -= res[1]
            progress.add(res[1], res[0], 0, pending[0])

        if not lazy:
            progress.set_status(S.ACTIVE)
            guest_box: list[Guest] = []

            async def spawn() -> None:
                guest_box.append(
                    await Guest.start_incoming(spec, blocks, state_dir=state_dir, spares=spares)
                )
                marks["guest-ready"] = time.monotonic() - t0

            # The guest process starts while the readers fill its memory.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(spawn)
                await _run_jobs(rd.jobs(), readers, rd.eager_job, done)
            guest = guest_box[0]
            await guest.load_devices(saved.sections)
            marks["devices"] = time.monotonic() - t0
            if autostart:
                await guest.cont()
            marks["running"] = time.monotonic() - t0
            progress.finish()
            progress.set_status(S.COMPLETED)
            marks["complete"] = time.monotonic() - t0
            task_status.started(guest)
            return guest

        guest = await Guest.start_incoming(
            spec, blocks, postcopy=True, state_dir=state_dir, spares=spares
        )
        marks["guest-ready"] = time.monotonic() - t0
        progress.set_status(S.ACTIVE)
        placer = guest.placer()
        fault_buf = memoryview(mmap.mmap(-1, max(FAULT_WINDOW_BYTES, blocks[0].page_size)))
        progress.set_status(S.POSTCOPY_DEVICE)
        await guest.load_devices(saved.sections)  # vCPUs still parked: no RAM touched yet
        marks["devices"] = time.monotonic() - t0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve_faults, rd, placer, fault_buf, state)
            if autostart:
                await guest.cont()
            marks["running"] = time.monotonic() - t0
            progress.set_status(S.POSTCOPY_ACTIVE)
            task_status.started(guest)
            await _run_jobs(rd.jobs(), readers, partial(rd.lazy_job, placer), done)
            await guest.postcopy_end()
            nursery.cancel_scope.cancel()
        progress.finish()
        progress.set_status(S.COMPLETED)
        marks["complete"] = time.monotonic() - t0
        return guest
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            if guest is not None:
                try:
                    await guest.quit()
                except Exception as e:
                    log.warning("quitting a half-restored guest failed: %s", e)
                    guest.kill()
                    guest.close()
            for b in blocks:
                b.close()
        leaf = first_error(exc)
        if state is not None and isinstance(leaf, Exception) and not is_terminal(state.status):
            state.fail(str(leaf) or type(leaf).__name__)
        if leaf is not exc and isinstance(leaf, Exception):
            raise leaf from None  # the reader/spawn nursery's group hides what went wrong
        raise
    finally:
        if reader is not None:
            reader.close()


async def _serve_faults(
    reader: _Reader, placer: UffdPlacer, buf: memoryview, state: MigrationState | None
) -> None:
    """Serve each fault from the file, in trio's thread: a 64 KiB pread costs less than a thread hop."""
    while True:
        await trio.lowlevel.wait_readable(placer.fileno())
        faults = placer.read_faults()
        if faults.size == 0:
            continue
        if state is not None:
            state.ram.postcopy_requests += len(faults)
        for bi, page in np.unique(faults, axis=0).tolist():
            placed = reader.serve_fault(placer, bi, page, buf)
            if state is not None:
                state.ram.postcopy_bytes += placed * reader.blocks[bi].page_size


# -- daemon glue -------------------------------------------------------------------


@dataclass
class FileMigration:
    """A save to or restore from a file as the daemon tracks it (``entry.migration``).

    Has what the daemon's handlers use of a migration: ``state`` for
    query-migrate, ``cancel()`` for migrate-cancel, ``done`` to wait on.
    """

    state: MigrationState
    path: str
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    cancel_requested: bool = False
    result: SaveResult | None = None

    def cancel(self) -> None:
        if is_terminal(self.state.status):
            return
        if self.state.role == Role.SOURCE and self.state.status in (S.SETUP, S.ACTIVE, S.DEVICE):
            self.state.set_status(S.CANCELLING)
        elif self.state.role == Role.DESTINATION and self.state.status in (S.SETUP, S.ACTIVE):
            pass  # the restore's error path ends it failed ("cancelled")
        else:
            raise ValueError(f"migrate-cancel is not possible in state {self.state.status}")
        self.cancel_requested = True
        self.cancel_scope.cancel()

    def migrate_continue(self) -> None:
        raise ValueError("migrate-continue: file migrations have no pre-switchover pause")


def _qmp_error(text: str) -> Exception:
    from protocol.control import QmpError

    return QmpError(text)


async def qmp_file_migrate(agent: Agent, entry: GuestEntry, path: str) -> dict[str, Any]:
    """``migrate`` with a ``file:`` URI: start saving ``entry``'s guest in the agent's nursery.

    QEMU's rules: capability ``mapped-ram`` (godwit has no sequential file
    format), ``multifd`` + ``multifd-channels`` for parallel writers,
    parameter ``direct-io``.  A running guest is saved live; a guest stopped
    first (``stop``) is saved non-live, the fastest way.  Either way it is
    left stopped afterwards, as QEMU leaves it (``cont`` or ``guest-stop``).
    """
    if not entry.capabilities.get("mapped-ram"):
        raise _qmp_error(
            "file: migration needs capability 'mapped-ram' (migrate-set-capabilities); "
            "godwit does not implement QEMU's sequential file format"
        )
    guest = entry.guest
    if guest is None:
        raise _qmp_error(f"guest '{entry.name}' has no process to save")
    parent = Path(path).parent
    if not parent.is_dir():
        raise _qmp_error(f"file:{path}: directory {parent} does not exist")
    channels = (
        int(entry.parameters.get("multifd-channels", 1)) if entry.capabilities.get("multifd") else 1
    )
    direct_io = bool(entry.parameters.get("direct-io"))
    live = guest.state == "running"
    st = MigrationState(Role.SOURCE, entry.name, agent.events)
    st.uri = f"file:{path}"
    mig = FileMigration(st, path)
    entry.migration = mig  # type: ignore[assignment]

    async def run() -> None:
        try:
            with mig.cancel_scope:
                mig.result = await save_guest(
                    guest,
                    path,
                    live=live,
                    multifd_channels=channels,
                    direct_io=direct_io,
                    state=st,
                    parameters=entry.parameters,
                )
            if mig.result is not None:
                entry.status = "paused"
                agent.events.emit("STOP", {"guest": entry.name})
        except Exception as exc:
            log.warning("saving %s to %s failed: %s", entry.name, path, exc)
        finally:
            if mig.cancel_requested and st.status == S.CANCELLING:
                st.set_status(S.CANCELLED)
            mig.done.set()

    assert agent._nursery is not None
    agent._nursery.start_soon(run)
    return {}


async def qmp_file_restore(agent: Agent, args: dict[str, Any]) -> dict[str, Any]:
    """``migrate-incoming`` with ``{"uri": "file:PATH", "guest": NAME, "lazy": BOOL}``.

    The file is validated before this returns (a bad file is this command's
    error, naming file, offset and expectation); the restore itself runs in
    the agent's nursery and shows in query-migrate (role destination;
    lazy goes through postcopy-active).  The guest runs when its devices are
    loaded unless ``migrate-incoming autostart=false`` was set.
    """
    from protocol.uri import parse_uri

    from .daemon import GuestEntry

    uri = parse_uri(args["uri"])
    if uri.scheme != "file":
        raise _qmp_error(f"qmp_file_restore: {uri} is not a file: URI")
    path = uri.path
    lazy = bool(args.get("lazy", False))
    readers = int(args.get("multifd-channels", 2))
    try:
        saved = await trio.to_thread.run_sync(read_saved_file, path)
    except (MappedRamError, OSError) as e:
        raise _qmp_error(str(e)) from None
    name = args.get("guest") or saved.spec.name
    existing = agent.guests.get(name)
    if existing is not None and existing.status not in ("migrated", "exited"):
        raise _qmp_error(f"a guest named '{name}' already exists on agent {agent.config.name}")
    spec = saved.spec
    spec.name = name
    st = MigrationState(Role.DESTINATION, name, agent.events)
    st.uri = f"file:{path}"
    mig = FileMigration(st, path)
    entry = GuestEntry(name, spec, None, status="incoming")
    entry.migration = mig  # type: ignore[assignment]
    agent.guests[name] = entry
    autostart = agent.incoming_autostart

    async def run() -> None:
        try:
            with mig.cancel_scope:
                async with trio.open_nursery() as nursery:
                    guest = await nursery.start(
                        partial(
                            restore_guest,
                            path,
                            name=name,
                            lazy=lazy,
                            readers=readers,
                            autostart=autostart,
                            state=st,
                            spares=agent.spares,
                            state_dir=agent.config.state_dir,
                            ram_path=agent.config.ram_path,
                        )
                    )
                    entry.guest = guest
                    entry.status = "running" if autostart else "paused"
                    if autostart:
                        agent.events.emit("RESUME", {"guest": name})
            if mig.cancel_requested and not is_terminal(st.status):
                st.fail("restore cancelled")
        except Exception as exc:
            log.warning("restoring %s from %s failed: %s", name, path, exc)
        finally:
            # restore_guest has quit a guest it could not finish: drop the entry too.
            if st.status != S.COMPLETED and agent.guests.get(name) is entry:
                entry.guest = None
                del agent.guests[name]
                agent.events.emit("GUEST_EXITED", {"guest": name, "reason": f"restore {st.status}"})
            mig.done.set()

    assert agent._nursery is not None
    agent._nursery.start_soon(run)
    return {"guest": name, "lazy": lazy}
