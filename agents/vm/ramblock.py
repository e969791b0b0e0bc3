"""Guest RAM blocks: named memfds mapped MAP_SHARED, plus zero-page detection.

A RamBlock is the unit migration talks about (CONFIG names it, PAGES address
pages inside it).  The memfd is what makes the guest a separate process:
the agent and the guest map the same pages, the guest's mapping carries the
userfaultfd registration, and the agent reads (source) or writes
(destination) through its own mapping or the fd.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import numpy as np

from agents.vm.errors import HugePagesUnavailable

MFD_CLOEXEC = 0x0001
MFD_HUGETLB = 0x0004
MFD_HUGE_2MB = 21 << 26
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
HUGE_PAGE_SIZE = 2 << 20
SMALL_PAGE_SIZE = mmap.PAGESIZE
HUGEPAGES_2M = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_fallocate.restype = ctypes.c_int


def ram_path_mount(path: str | os.PathLike[str]) -> tuple[str, str]:
    """(mount point, options) of the tmpfs holding ``path``, for ``ram-path``.

    Guest RAM must be shmem: userfaultfd's missing mode (postcopy) and the
    write-protect dirty log work on shmem and hugetlbfs, not on a disk file,
    so anything but a tmpfs directory is refused here, before a guest exists.
    """
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise ValueError(f"ram-path {path}: not a directory")
    best: tuple[str, str, str] | None = None
    with open("/proc/self/mounts") as f:
        for line in f:
            _, point, fstype, options, *_ = line.split()
            point = point.replace("\\040", " ")
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and (best is None or len(point) >= len(best[0])):
                best = (point, fstype, options)
    if best is None or best[1] != "tmpfs":
        kind = best[1] if best else "unknown"
        raise ValueError(
            f"ram-path {path}: on a {kind} file system, not tmpfs; guest RAM must be "
            "shmem for userfaultfd (mount -t tmpfs -o huge=within_size tmpfs DIR)"
        )
    return best[0], best[2]


def ram_file(
    name: str, directory: str | os.PathLike[str] | None = None, *, flags: int = MFD_CLOEXEC
) -> int:
    """A new, empty file for guest RAM: a memfd, or an unnamed file on the ``ram-path``
    tmpfs ``directory`` (QEMU's ``-mem-path``).  ``flags`` are memfd_create's."""
    if directory is not None:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    return os.memfd_create(f"godwit:{name}", flags)


def free_huge_pages() -> int:
    """2 MiB huge pages free for new reservations (free minus already reserved)."""
    try:
        free = int((HUGEPAGES_2M / "free_hugepages").read_text())
        resv = int((HUGEPAGES_2M / "resv_hugepages").read_text())
    except OSError:
        return 0
    return free - resv


class RamBlock:
    """One named RAM block: a memfd of ``size`` bytes mapped shared into this process.

    ``view``/``array`` stay valid until ``close()``; slices from ``pages()``
    are zero-copy windows on the mapping (what the source sends).
    """

    def __init__(self, name: str, size: int, page_size: int, fd: int) -> None:
        if size <= 0 or size % page_size:
            raise ValueError(
                f"ramblock {name!r}: size {size} is not a positive multiple of page size {page_size}"
            )
        self.name = name
        self.size = size
        self.page_size = page_size
        self.npages = size // page_size
        self.fd = fd
        self.hugetlb = page_size == HUGE_PAGE_SIZE
        try:
            self._mm: mmap.mmap | None = mmap.mmap(
                fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except OSError as e:
            if self.hugetlb:
                raise HugePagesUnavailable(
                    f"ramblock {name!r}: cannot map {size >> 21} huge pages of 2 MiB ({e.strerror}); "
                    "reserve them with `echo N > /proc/sys/vm/nr_hugepages` as root"
                ) from e
            raise
        self.view: memoryview = memoryview(self._mm)
        self.array: np.ndarray = np.frombuffer(self._mm, dtype=np.uint8)
        self.closed = False

    @classmethod
    def create(
        cls,
        name: str,
        size: int,
        *,
        hugetlb: bool = False,
        directory: str | os.PathLike[str] | None = None,
    ) -> RamBlock:
        """A fresh zero-filled block; hugetlb needs 2 MiB pages reserved beforehand.

        ``directory`` (the agent's ``ram-path``, QEMU's ``-mem-path``): an
        unnamed file on that tmpfs instead of a memfd.  A tmpfs mounted with
        ``huge=within_size`` backs it with 2 MiB transparent huge pages, which
        memfds get only where the host's shmem_enabled allows: writing fresh
        guest memory then costs a quarter of the CPU (bench/migrate.py).
        Ignored for hugetlb blocks, which are always memfds.
        """
        page_size = HUGE_PAGE_SIZE if hugetlb else SMALL_PAGE_SIZE
        if size <= 0 or size % page_size:
            raise ValueError(
                f"ramblock {name!r}: size {size} is not a positive multiple of page size {page_size}"
            )
        flags = MFD_CLOEXEC
        if hugetlb:
            need = size // HUGE_PAGE_SIZE
            have = free_huge_pages()
            if have < need:
                raise HugePagesUnavailable(
                    f"ramblock {name!r}: needs {need} free 2 MiB huge pages, {have} free: "
                    f"reserve them with `echo N > /proc/sys/vm/nr_hugepages` as root"
                )
            flags |= MFD_HUGETLB | MFD_HUGE_2MB
        fd = ram_file(name, None if hugetlb else directory, flags=flags)
        try:
            os.ftruncate(fd, size)
            return cls(name, size, page_size, fd)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_fd(cls, name: str, size: int, page_size: int, fd: int) -> RamBlock:
        """A block on an existing memfd (one received over SCM_RIGHTS when adopting a guest).

        The block owns ``fd`` from here on (``close`` closes it), also when
        mapping fails.  The memfd must be at least ``size`` bytes: a shorter
        one would map, then SIGBUS on the first access past its end.
        """
        try:
            have = os.fstat(fd).st_size
            if have < size:
                raise ValueError(
                    f"ramblock {name!r}: memfd {fd} holds {have} bytes, the layout says {size}"
                )
            return cls(name, size, page_size, fd)
        except BaseException:
            os.close(fd)
            raise

    def __repr__(self) -> str:
        return (
            f"RamBlock({self.name!r}, size={self.size}, page_size={self.page_size}, "
            f"fd={self.fd}{', closed' if self.closed else ''})"
        )

    def _check_range(self, first: int, count: int) -> None:
        if first < 0 or count < 0 or first + count > self.npages:
            raise IndexError(
                f"ramblock {self.name!r}: pages [{first}, {first + count}) outside 0..{self.npages}"
            )

    def pages(self, first: int, count: int) -> memoryview:
        """Zero-copy window on pages [first, first+count)."""
        self._check_range(first, count)
        ps = self.page_size
        return self.view[first * ps : (first + count) * ps]

    def write_pages(self, first: int, data: object) -> None:
        """Store whole pages at ``first`` into the memfd (never through a uffd-registered mapping).

        In postcopy a vCPU may already sleep on one of these pages: a pwrite
        does not wake it, so follow with ``UffdPlacer.wake`` (or use
        ``UffdPlacer.copy``, which places and wakes in one call).
        """
        src = memoryview(data).cast("B")  # type: ignore[arg-type]
        ps = self.page_size
        if len(src) % ps:
            raise ValueError(
                f"ramblock {self.name!r}: write of {len(src)} bytes at page {first} is not whole pages of {ps}"
            )
        self._check_range(first, len(src) // ps)
        if self.hugetlb:
            # hugetlbfs has no write(2); our own mapping is not registered, so no fault waits.
            off = first * ps
            self.array[off : off + len(src)] = np.frombuffer(src, dtype=np.uint8)
            return
        off = first * ps
        done = 0
        while done < len(src):
            done += os.pwrite(self.fd, src[done:], off + done)

    def discard(self, first: int, count: int) -> None:
        """Punch the pages out of the memfd: they read as zero and fault again (DISCARD)."""
        self._check_range(first, count)
        if count == 0:
            return
        ps = self.page_size
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if _fallocate(self.fd, mode, first * ps, count * ps) != 0:
            err = ctypes.get_errno()
            raise OSError(
                err,
                f"ramblock {self.name!r}: fallocate(PUNCH_HOLE) pages [{first}, {first + count}): "
                f"{os.strerror(err)}",
            )

    def close(self) -> None:
        """Unmap and close the fd; idempotent.

        If a caller still holds a slice of ``view``/``array`` the mapping is
        released when that last slice goes away (the fd is closed now either way).
        """
        if self.closed:
            return
        self.closed = True
        self.view.release()
        self.array = np.empty(0, dtype=np.uint8)
        mm, self._mm = self._mm, None
        try:
            if mm is not None:
                mm.close()
        except BufferError:
            pass  # still exported by a caller's slice: unmapped when that slice is freed
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RamBlock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def zero_page_mask(buf: object, page_size: int) -> np.ndarray:
    """Which pages of a run are entirely zero, as a bool array (one per page).

    Precopy hot path.  Most non-zero pages have a non-zero first word, so only
    pages whose first word is zero get the full check; when over a quarter of
    the run are candidates one OR-reduction over the whole run is cheaper.
    Measured on 256 MiB: random data ~200 GB/s, all-zero ~40 GB/s, half zero
    ~17 GB/s, against `any(axis=1)` at 10-20 GB/s and a memory copy at ~4 GB/s.
    """
    arr = np.frombuffer(buf, dtype=np.uint8)  # type: ignore[call-overload]
    if len(arr) % page_size:
        raise ValueError(f"zero_page_mask: {len(arr)} bytes is not whole pages of {page_size}")
    words = arr.view(np.uint64).reshape(-1, page_size // 8)
    cand = np.flatnonzero(words[:, 0] == 0)
    mask = np.zeros(words.shape[0], dtype=bool)
    if len(cand) == 0:
        return mask
    if len(cand) * 4 > words.shape[0]:
        # Many candidates: one OR-reduction over the whole run beats gathering them.
        mask[:] = ~np.bitwise_or.reduce(words, axis=1).astype(bool)
        return mask
    # Few candidates: gather them in chunks (bounding the temporary copy).
    step = 4096
    for i in range(0, len(cand), step):
        c = cand[i : i + step]
        mask[c] = ~np.bitwise_or.reduce(words[c], axis=1).astype(bool)
    return mask
