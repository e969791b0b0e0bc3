"""Postcopy page placement (agent side): fault messages in, UFFDIO_COPY/ZEROPAGE/WAKE out.

The guest registered its RAM MISSING on a userfaultfd and handed the fd to
the agent.  The agent's fault task waits for it to be readable
(``trio.lowlevel.wait_readable(placer.fileno())``), calls ``read_faults``
and asks the source for those pages; arriving pages are placed with
``copy``, which also wakes the vCPU threads sleeping on them.

Rules from linux-uffd.md that this module encodes:

- A page already present (pwrite by precopy, or placed earlier) makes COPY
  fail with EEXIST and does *not* wake anyone: we UFFDIO_WAKE it.
- A multi-page COPY that meets a present page returns EAGAIN with ``copy``
  = bytes done (those are woken): continue from there; the present page
  then gives EEXIST, is woken, and skipped.
- EAGAIN with nothing done means the guest's mm is changing: retry.
- hugetlb pages are placed whole, never partially.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import fcntl
import os
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from agents.vm import uffd as U
from agents.vm.errors import GuestGone, PlacementError
from agents.vm.ramblock import HUGE_PAGE_SIZE

if TYPE_CHECKING:
    from agents.vm.dirty import Mapping  # (it imports trio; the fault worker does not)

_FAULT = struct.Struct("<B15xQ8x")
"""A 32-byte uffd_msg as (event, pagefault address), the fields faults need."""
_COPY = struct.Struct("<QQQQq")
_ZERO = struct.Struct("<QQQq")
MAX_EAGAIN_RETRIES = 10_000


def _address_of(view: memoryview) -> int:
    """Where a buffer's bytes are, for UFFDIO_COPY's ``src``: ctypes takes ~0.4 µs,
    numpy's ``.ctypes.data`` ~4 µs (it is on every postcopy request's path)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except TypeError:  # read-only memory: numpy finds it too
        return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


class UffdPlacer:
    """Places pages into a postcopy guest through the uffd it handed over."""

    def __init__(self, uffd: int, mappings: Sequence[Mapping], *, batch: int = 512) -> None:
        self.fd = uffd
        self.mappings = list(mappings)
        by_address = sorted(range(len(self.mappings)), key=lambda i: self.mappings[i].addr)
        self._blocks = by_address  # for bisect: blocks in address order
        self._starts = [self.mappings[i].addr for i in by_address]
        self._ends = [self.mappings[i].addr + self.mappings[i].size for i in by_address]
        self._page_sizes = [self.mappings[i].page_size for i in by_address]
        self._raw = memoryview(bytearray(batch * U.UFFD_MSG_SIZE))
        self._arg = bytearray(_COPY.size)
        self._zero_arg = bytearray(_ZERO.size)
        self._zeros: np.ndarray | None = None
        self.placed = 0
        self.woken_existing = 0

    def fileno(self) -> int:
        return self.fd

    def sibling(self) -> UffdPlacer:
        """A placer on the same uffd for another thread (its own ioctl buffers).

        It borrows the fd: close only the original."""
        return UffdPlacer(self.fd, self.mappings)

    def close(self) -> None:
        """Close the agent's copy of the uffd (the guest unregisters its own)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- faults --------------------------------------------------------------

    def read_faults(self) -> np.ndarray:
        """Every pending fault as rows of (block index, page index); empty if none."""
        return np.array(self.read_fault_pages(), dtype=np.int64).reshape(-1, 2)

    def read_fault_pages(self) -> list[tuple[int, int]]:
        """Every pending fault as (block index, page index); empty if none.

        Reads whole batches of 32-byte uffd_msg until the fd would block.  Plain
        ``struct`` and ``bisect``, not numpy: a postcopy fault thread reads one
        or two faults at a time, where numpy's per-call set-up (about fifteen
        calls) was the largest cost of a request's round trip.
        """
        out: list[tuple[int, int]] = []
        raw = self._raw
        cap = len(raw)
        blocks, starts, ends, sizes = self._blocks, self._starts, self._ends, self._page_sizes
        while True:
            try:
                n = os.readv(self.fd, [raw])
            except BlockingIOError:
                break
            except OSError as e:
                raise PlacementError(f"reading userfaultfd {self.fd}: {e.strerror}") from e
            if n <= 0:
                break
            for event, addr in _FAULT.iter_unpack(raw[: n - n % U.UFFD_MSG_SIZE]):
                if event != U.UFFD_EVENT_PAGEFAULT:
                    continue
                i = bisect.bisect_right(starts, addr) - 1
                if i < 0 or addr >= ends[i]:
                    raise PlacementError(
                        f"userfaultfd fault at 0x{addr:x} is outside every RAM block"
                    )
                out.append((blocks[i], (addr - starts[i]) // sizes[i]))
            if n < cap:
                break
        return out

    # -- placement -----------------------------------------------------------

    def _where(self, block: int, first: int, count: int) -> str:
        m = self.mappings[block]
        return f"block {m.name!r} pages [{first}, {first + count})"

    def _range(self, block: int, first: int, count: int) -> tuple[int, int, int]:
        m = self.mappings[block]
        ps = m.page_size
        if first < 0 or count < 0 or (first + count) * ps > m.size:
            raise PlacementError(f"{self._where(block, first, count)} outside {m.size // ps} pages")
        return m.addr + first * ps, count * ps, ps

    def _fail(self, op: str, e: OSError, block: int, page: int, count: int) -> Exception:
        where = self._where(block, page, count)
        if e.errno == errno.ESRCH:
            return GuestGone(f"{op} {where}: the guest process is gone")
        if e.errno == errno.ENOENT:
            return PlacementError(
                f"{op} {where}: range not registered with this userfaultfd (ENOENT)"
            )
        return PlacementError(f"{op} {where}: {e.strerror} (errno {e.errno})")

    def copy(self, block: int, first_page: int, data: object) -> int:
        """Place whole pages from ``data`` at ``first_page``; returns pages placed.

        Pages already present are woken and skipped (not counted).
        """
        view = memoryview(data).cast("B")  # type: ignore[arg-type]
        ps = self.mappings[block].page_size
        if len(view) % ps:
            raise PlacementError(
                f"{self._where(block, first_page, len(view) // ps)}: {len(view)} bytes is not whole pages of {ps}"
            )
        dst, length, ps = self._range(block, first_page, len(view) // ps)
        if not length:
            return 0
        src_addr = _address_of(view)

        def fill(done: int) -> None:
            _COPY.pack_into(self._arg, 0, dst + done, src_addr + done, length - done, 0, 0)

        return self._place(
            "UFFDIO_COPY", U.UFFDIO_COPY, _COPY, self._arg, fill, block, first_page, dst, length, ps
        )

    def _place(
        self,
        name: str,
        request: int,
        fmt: struct.Struct,
        arg: bytearray,
        fill: Callable[[int], None],
        block: int,
        first_page: int,
        dst: int,
        length: int,
        ps: int,
    ) -> int:
        """The placement loop both UFFDIO_COPY and UFFDIO_ZEROPAGE need.

        Partial progress (the struct's last field) is kept; a present page
        (EEXIST) is woken and skipped; EAGAIN with no progress means the guest's
        mm is changing and is retried.  Returns pages placed.
        """
        done = placed = retries = 0
        while done < length:
            fill(done)
            try:
                fcntl.ioctl(self.fd, request, arg, True)
                placed += (length - done) // ps
                break
            except OSError as e:
                c = fmt.unpack_from(arg)[-1]
                if c > 0:
                    placed += c // ps
                    done += c
                if e.errno == errno.EEXIST:
                    self._wake_one(dst + done, ps)
                    done += ps
                elif e.errno == errno.EAGAIN:
                    if c <= 0:
                        retries += 1
                        if retries > MAX_EAGAIN_RETRIES:
                            raise self._fail(name, e, block, first_page + done // ps, 1) from e
                else:
                    raise self._fail(
                        name, e, block, first_page + done // ps, (length - done) // ps
                    ) from e
        self.placed += placed
        return placed

    def _wake_one(self, addr: int, ps: int) -> None:
        try:
            U.wake(self.fd, addr, ps)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise GuestGone(f"UFFDIO_WAKE at 0x{addr:x}: the guest process is gone") from e
            raise
        self.woken_existing += 1

    def zeropage(self, block: int, first: int, count: int) -> int:
        """Place zero pages; returns pages placed (present ones are woken, skipped)."""
        dst, length, ps = self._range(block, first, count)
        if ps == HUGE_PAGE_SIZE:  # hugetlb has no UFFDIO_ZEROPAGE
            if self._zeros is None or len(self._zeros) < length:
                self._zeros = np.zeros(length, dtype=np.uint8)
            return self.copy(block, first, self._zeros[:length])

        def fill(done: int) -> None:
            _ZERO.pack_into(self._zero_arg, 0, dst + done, length - done, 0, 0)

        return self._place(
            "UFFDIO_ZEROPAGE",
            U.UFFDIO_ZEROPAGE,
            _ZERO,
            self._zero_arg,
            fill,
            block,
            first,
            dst,
            length,
            ps,
        )

    def wake(self, block: int, first: int, count: int) -> None:
        """Wake threads waiting on pages made present another way (pwrite + wake)."""
        dst, length, _ps = self._range(block, first, count)
        try:
            U.wake(self.fd, dst, length)
        except OSError as e:
            raise self._fail("UFFDIO_WAKE", e, block, first, count) from e
