"""Dirty-page log (agent side): PAGEMAP_SCAN get-and-clear over the guest's mappings.

The guest registered its RAM with a write-protect-async userfaultfd and
protected it all (``Guest.start_dirty_log``).  A write to a protected page
then un-protects it in the kernel (~1.3 µs, no uffd message) and marks it
PAGE_IS_WRITTEN.  One PAGEMAP_SCAN with WP_MATCHING|CHECK_WPASYNC returns
the written ranges and protects them again atomically, page by page, so a
write racing with the scan lands either in this scan or in the next one:
nothing is lost.

Results are sorted int64 page indices per block name (``as_mask`` turns
them into bool masks).  Decoding regions is numpy; the only Python loop is
over the (rare) early returns of the ioctl.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import trio

from agents.vm import uffd as U
from agents.vm.errors import GuestGone, PagemapScanUnavailable

REGION_DTYPE = np.dtype([("start", "<u8"), ("end", "<u8"), ("categories", "<u8")])
_ARG = struct.Struct("<12Q")


class Mapping(Protocol):
    name: str
    addr: int
    size: int
    page_size: int


def regions_to_pages(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Expand half-open page ranges into one sorted index array (no per-range loop)."""
    lens = (ends - starts).astype(np.int64)
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offs = np.cumsum(lens) - lens
    out: np.ndarray = np.arange(total, dtype=np.int64) + np.repeat(
        starts.astype(np.int64) - offs, lens
    )
    return out


def as_mask(pages: np.ndarray, npages: int) -> np.ndarray:
    mask = np.zeros(npages, dtype=bool)
    mask[pages] = True
    return mask


class DirtyLog:
    """Get-and-clear of the pages a guest wrote, by PAGEMAP_SCAN on /proc/PID/pagemap."""

    def __init__(
        self, pid: int, mappings: Sequence[Mapping], *, max_regions: int = 1 << 16
    ) -> None:
        self.pid = pid
        self.mappings = list(mappings)
        try:
            self.fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise GuestGone(
                f"dirty log: guest pid {pid} is gone (/proc/{pid}/pagemap missing)"
            ) from e
        except PermissionError as e:
            raise PagemapScanUnavailable(
                f"dirty log: cannot open /proc/{pid}/pagemap: permission denied; "
                "the agent needs ptrace access to the guest (same uid, or root/CAP_SYS_PTRACE)"
            ) from e
        self.vec = np.zeros(max_regions, dtype=REGION_DTYPE)
        self._vec_addr = int(self.vec.ctypes.data)
        self._arg = bytearray(_ARG.size)
        self.scans = 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> DirtyLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _scan(self, m: Mapping, flags: int) -> np.ndarray:
        if self.fd < 0:
            raise ValueError("dirty log is closed")
        start, end = m.addr, m.addr + m.size
        arg = self._arg
        pieces: list[np.ndarray] = []
        while True:
            _ARG.pack_into(
                arg, 0, _ARG.size, flags, start, end, 0, self._vec_addr, len(self.vec), 0,
                0, U.PAGE_IS_WRITTEN, 0, U.PAGE_IS_WRITTEN,
            )  # fmt: skip
            try:
                n = fcntl.ioctl(self.fd, U.PAGEMAP_SCAN, arg, True)
            except OSError as e:
                raise self._error(e, m) from e
            walk_end = _ARG.unpack_from(arg)[4]
            if n:
                r = self.vec[:n]
                pieces.append(
                    regions_to_pages(
                        (r["start"] - m.addr) // m.page_size, (r["end"] - m.addr) // m.page_size
                    )
                )
            if walk_end >= end:
                break
            start = walk_end
        self.scans += 1
        if not pieces:
            return np.zeros(0, dtype=np.int64)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _error(self, e: OSError, m: Mapping) -> Exception:
        where = (
            f"PAGEMAP_SCAN on /proc/{self.pid}/pagemap, block {m.name!r} at 0x{m.addr:x}+{m.size}"
        )
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP):
            return PagemapScanUnavailable(
                f"{where}: not supported by kernel {os.uname().release} (needs Linux ≥ 6.7)"
            )
        if e.errno == errno.EPERM:
            return PagemapScanUnavailable(
                f"{where}: EPERM: the range is not registered write-protect async in the guest "
                "(start the dirty log first)"
            )
        if e.errno == errno.ESRCH:
            return GuestGone(f"{where}: guest pid {self.pid} is gone")
        return OSError(e.errno, f"{where}: {e.strerror}")

    def get_and_clear(self) -> dict[str, np.ndarray]:
        """Pages written since the last call (or since protection), re-protected atomically."""
        flags = U.PM_SCAN_WP_MATCHING | U.PM_SCAN_CHECK_WPASYNC
        return {m.name: self._scan(m, flags) for m in self.mappings}

    def peek(self) -> dict[str, np.ndarray]:
        """Pages written since the last clear, without clearing (read-only scan)."""
        return {m.name: self._scan(m, U.PM_SCAN_CHECK_WPASYNC) for m in self.mappings}

    async def get_and_clear_async(self) -> dict[str, np.ndarray]:
        """get_and_clear in a worker thread (ioctls release the GIL; trio keeps running)."""
        return await trio.to_thread.run_sync(self.get_and_clear)

    def describe(self) -> dict[str, Any]:
        return {"pid": self.pid, "scans": self.scans, "blocks": [m.name for m in self.mappings]}
