"""Mapped-ram save/restore throughput and lazy-restore start, each beside a same-run baseline.

    python bench/mapped_ram.py [--size 4G] [--dir /dev/shm] [--disk-dir /var/tmp] [--disk-size 1G]

For each directory: a random-filled idle guest is saved non-live with one
writer, multifd 2 and 4, and multifd 2 + direct-io; each row is printed
beside plain pwrite(2) of the same bytes (from the same mapping, 8 MiB per
call, one thread, then fsync) into a new file in the same directory,
measured just before it (O_DIRECT for the direct-io row).  Restores are
timed from the call to the guest running with all pages in place, beside a
plain pread of the same bytes from the same file — into one reused 8 MiB
buffer (pure read), and into fresh memory of the guest's size (what any
restore pays to materialise RAM).  Lazy restore is timed to the vCPUs'
release, beside the eager restore's, both from the call and from the
moment the guest process exists (QEMU's ``-incoming`` analogue: the
process is up, the restore begins).

The first section runs on tmpfs (memory speed: it shows the engine's own
cost); the second on a disk file system, where the disk is usually the
limit and reads are made uncached with POSIX_FADV_DONTNEED (dropping all
caches needs privileges a bench should not use).  Not a test: nothing is
asserted.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents.mapped_ram import fs_type, open_direct, restore_guest, save_guest
from agents.vm.guest import Guest, GuestSpec
from agents.vm.ramblock import RamBlock
from agents.vm.workloads import parse_size

CHUNK = 8 << 20
GB = 1e9


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def evict(path: Path) -> None:
    """Drop the file's clean pages from the page cache (no-op on tmpfs)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def plain_write(block: RamBlock, path: Path, direct: bool) -> float:
    """Seconds to pwrite the block's bytes to a new file in 8 MiB calls, then fsync."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600)
    if direct:
        os.close(fd)
        fd = open_direct(str(path), os.O_WRONLY)
    try:
        t = time.perf_counter()
        for off in range(0, block.size, CHUNK):
            view = block.view[off : off + CHUNK]
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], off + done)
        os.fsync(fd)
        return time.perf_counter() - t
    finally:
        os.close(fd)
        path.unlink()


def plain_read(path: Path, offset: int, size: int, direct: bool, fresh: bool) -> float:
    """Seconds to pread ``size`` bytes at ``offset``: into one 8 MiB buffer, or into fresh memory."""
    fd = open_direct(str(path), os.O_RDONLY) if direct else os.open(path, os.O_RDONLY)
    target = mmap.mmap(-1, size if fresh else CHUNK)
    try:
        with memoryview(target) as view:
            t = time.perf_counter()
            for off in range(0, size, CHUNK):
                with view[off : off + CHUNK] if fresh else view[: min(CHUNK, size - off)] as dst:
                    done = 0
                    while done < len(dst):
                        done += os.preadv(fd, [dst[done:]], offset + off + done)
            return time.perf_counter() - t
    finally:
        target.close()
        os.close(fd)


def row(kind: str, label: str, ours: float, base: float, base_label: str, extra: str = "") -> None:
    print(
        f"  {kind:<8} {label:<22} {ours:6.2f} GB/s   {base_label} {base:6.2f} GB/s   "
        f"ratio {ours / base * 100:5.0f}%{extra}",
        flush=True,
    )


async def section(directory: Path, size: int) -> None:
    await trio.Path(directory).mkdir(parents=True, exist_ok=True)
    fs = fs_type(str(directory))
    disk = fs not in ("tmpfs", "ramfs")
    print(
        f"\n{directory} ({fs}), guest {size >> 20} MiB random, idle: "
        + (
            "reads uncached (POSIX_FADV_DONTNEED after each write; direct-io bypasses the cache)"
            if disk
            else "reads from memory (tmpfs is the page cache), fsync is a no-op"
        ),
        flush=True,
    )
    path = directory / "godwit-bench.img"
    plain = directory / "godwit-bench.plain"
    try:
        direct_ok = True
        try:
            os.close(open_direct(str(directory / "probe"), os.O_WRONLY | os.O_CREAT))
            (directory / "probe").unlink()
        except OSError as e:
            direct_ok = False
            print(f"  direct-io rows skipped: {e}")
        guest = await Guest.start(
            GuestSpec("bench", ram_size=size, workload="idle", fill="random", seed=3)
        )
        try:
            await guest.stop()
            block = guest.blocks[0]
            rows = [(1, False), (2, False), (4, False)] + ([(2, True)] if direct_ok else [])
            for writers, direct in rows:
                base = plain_write(block, plain, direct)
                t = time.perf_counter()
                res = await save_guest(
                    guest, path, live=False, multifd_channels=writers, direct_io=direct
                )
                ours = time.perf_counter() - t
                label = ("single-writer" if writers == 1 else f"multifd {writers}") + (
                    " + direct-io" if direct else ""
                )
                row(
                    "save",
                    label,
                    size / ours / GB,
                    size / base / GB,
                    "plain pwrite" + (" O_DIRECT" if direct else ""),
                    f"   ({res.seconds:.2f} s incl. fsync, {res.present_pages} pages)",
                )
        finally:
            await guest.quit()
        from agents.mapped_ram import read_saved_file

        layout = read_saved_file(path).layout
        pages_at = layout.blocks[0].pages_offset
        for readers, direct in rows:
            if disk:
                evict(path)
            base_buf = plain_read(path, pages_at, size, direct, fresh=False)
            if disk:
                evict(path)
            base_fresh = plain_read(path, pages_at, size, direct, fresh=True)
            if disk:
                evict(path)
            marks: dict[str, float] = {}
            restored = await restore_guest(
                path, name="bench-r", readers=readers, direct_io=direct, timings=marks
            )
            await restored.quit()
            label = ("single-reader" if readers == 1 else f"multifd {readers}") + (
                " + direct-io" if direct else ""
            )
            ours = size / marks["complete"] / GB
            row(
                "restore",
                label,
                ours,
                size / base_buf / GB,
                "plain pread (8 MiB buffer)" + (" O_DIRECT" if direct else ""),
                f"   | into fresh memory {size / base_fresh / GB:5.2f} GB/s, ratio "
                f"{ours / (size / base_fresh / GB) * 100:4.0f}%",
            )
        # Lazy: time to the vCPUs' release, beside eager's, from the call and from process-up.
        if disk:
            evict(path)
        eager: dict[str, float] = {}
        restored = await restore_guest(path, name="bench-e", readers=2, timings=eager)
        await restored.quit()
        if disk:
            evict(path)
        lazy: dict[str, float] = {}
        restored = await restore_guest(path, name="bench-l", lazy=True, readers=2, timings=lazy)
        await restored.quit()
        ms = 1000.0
        after_l = (lazy["running"] - lazy["guest-ready"]) * ms
        after_e = (eager["running"] - eager["guest-ready"]) * ms
        print(
            f"  lazy     first instruction     {lazy['running'] * ms:7.1f} ms from the call "
            f"({after_l:5.1f} ms after the guest process is up; target <= 20)   "
            f"eager {eager['running'] * ms:7.1f} ms ({after_e:6.1f} ms after process up)   "
            f"ratio {lazy['running'] / eager['running'] * 100:4.0f}%; lazy all pages in "
            f"{lazy['complete'] * ms:.0f} ms",
            flush=True,
        )
    finally:
        for p in (path, plain):
            p.unlink(missing_ok=True)


async def main(args: argparse.Namespace) -> None:
    size = parse_size(args.size)
    avail = mem_available()
    # source guest + file (tmpfs) + restored guest + fresh-memory baseline, plus headroom
    while size > 1 << 30 and 4 * size + (2 << 30) > avail:
        size //= 2
    if size != parse_size(args.size):
        print(
            f"note: {avail >> 30} GiB available: guest shrunk from {args.size} to {size >> 20} MiB"
        )
    print(f"godwit mapped-ram bench: {os.cpu_count()} cores, kernel {os.uname().release}")
    print(
        "note: on this VM memory freed for a few seconds goes back to the host and costs "
        "~0.3 GB/s to touch again (measured), so rows that allocate (new tmpfs files, restored "
        "guests, the fresh-memory baseline) vary with what ran just before them",
        flush=True,
    )
    t0 = time.perf_counter()
    if args.dir:
        await section(Path(args.dir) / "godwit-bench", size)
    if args.disk_dir:
        await section(Path(args.disk_dir) / "godwit-bench", parse_size(args.disk_size))
    for d in (args.dir, args.disk_dir):
        if d:
            shutil.rmtree(Path(d) / "godwit-bench", ignore_errors=True)
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="4G", help="guest RAM for the memory-speed section")
    parser.add_argument("--dir", default="/dev/shm", help="memory-speed directory ('' to skip)")
    parser.add_argument("--disk-dir", default="/var/tmp", help="disk directory ('' to skip)")
    parser.add_argument("--disk-size", default="256M", help="guest RAM for the disk section")
    trio.run(main, parser.parse_args())
