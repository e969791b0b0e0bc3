"""Guest-memory benchmark: dirty log, guest write cost, fault service, bulk placement.

Every figure is printed beside a baseline measured in the same run, as a ratio:

- scan-and-clear (PAGEMAP_SCAN WP_MATCHING) ms per GiB at 1/10/100 % dirty,
  against reading the same range's /proc/PID/pagemap entries (8 bytes a page,
  what a soft-dirty scan would have to read);
- guest µs per write to a page with the dirty log on (first write after
  protection) against the same write with it off;
- postcopy fault service p50/p99 µs as the vCPU sees it (4 KiB and 64 KiB
  placements) against an agent↔guest control round trip (the IPC floor);
- bulk UFFDIO_COPY GB/s (2 MiB and 64 KiB calls) against a memory copy into a
  fresh memfd mapping (both allocate the destination pages);
- guest stop latency against the same round trip; zero-page detection GB/s
  against a memory copy.

Run: python bench/dirty.py [--size 1G]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial

import numpy as np
import trio

from agents.vm.fill import fill_block
from agents.vm.guest import Guest, GuestSpec
from agents.vm.ramblock import RamBlock, zero_page_mask
from agents.vm.workloads import parse_size

PS = 4096


def row(
    label: str, value: float, unit: str, base_label: str, base: float, base_unit: str | None = None
) -> None:
    ratio = value / base if base else float("nan")
    print(
        f"  {label:<38} {value:10.3f} {unit:<7} | {base_label:<30} {base:10.3f} {base_unit or unit:<7} | x{ratio:.2f}"
    )


def pct(values: list[float] | np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def pagemap_read_ms(pid: int, addr: int, size: int) -> float:
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            n = size // PS * 8
            off = addr // PS * 8
            while n:
                got = os.pread(fd, min(n, 4 << 20), off)
                n -= len(got)
                off += len(got)
            best = min(best, time.perf_counter() - t0)
        return best * 1000
    finally:
        os.close(fd)


async def bench_dirty(size: int) -> None:
    gib = size / (1 << 30)
    print(f"dirty log (guest of {size >> 20} MiB, random fill)")
    g = await Guest.start(GuestSpec(name="bench", ram_size=size, workload="idle", fill="random"))
    try:
        m = g.mappings[0]
        npages = m.size // PS
        base_ms = pagemap_read_ms(g.pid, m.addr, m.size) / gib
        log = await g.start_dirty_log()
        t0 = time.perf_counter()
        log.get_and_clear()
        clean_ms = (time.perf_counter() - t0) * 1000 / gib
        row("scan+clear, 0% dirty", clean_ms, "ms/GiB", "pagemap read (8 B/page)", base_ms)
        rng = np.random.default_rng(5)
        writes: dict[int, tuple[float, float]] = {}
        for percent in (1, 10, 100):
            n = npages * percent // 100
            times = []
            for _ in range(3):
                pages = (
                    np.sort(rng.choice(npages, n, replace=False))
                    if percent < 100
                    else np.arange(npages)
                )
                first = await g.job("touch", "ram", pages, value=percent)  # protected: faults
                again = await g.job("touch", "ram", pages, value=percent + 1)  # now writable
                writes[percent] = (first["ns"] / 1000 / n, again["ns"] / 1000 / n)
                t0 = time.perf_counter()
                dirty = log.get_and_clear()["ram"]
                times.append(time.perf_counter() - t0)
                assert len(dirty) == n, (len(dirty), n)
            row(
                f"scan+clear, {percent}% dirty",
                min(times) * 1000 / gib,
                "ms/GiB",
                "pagemap read (8 B/page)",
                base_ms,
            )
        print("guest write cost: one u64 into each page, in one vectorised call")
        for percent in (1, 10, 100):
            logged, warm = writes[percent]
            row(
                f"first write after protect ({percent}%)",
                logged,
                "µs",
                "same write again (unlogged)",
                warm,
            )
        await g.stop_dirty_log()
    finally:
        await g.quit()


async def bench_stop() -> None:
    print("guest stop (counter workload running)")
    g = await Guest.start(GuestSpec(name="stop", ram_size=64 << 20, workload="counter"))
    try:
        pings = [await g.ping() * 1e6 for _ in range(200)]
        stops, guest_side = [], []
        for _ in range(50):
            await trio.sleep(0.005)
            t0 = time.perf_counter()
            guest_side.append(await g.stop())
            stops.append((time.perf_counter() - t0) * 1e6)
            await g.cont()
        row("stop round trip p50", pct(stops, 50), "µs", "ping round trip p50", pct(pings, 50))
        row("stop round trip p99", pct(stops, 99), "µs", "ping round trip p99", pct(pings, 99))
        row(
            "stop inside the guest p50",
            statistics.median(guest_side),
            "µs",
            "ping round trip p50",
            pct(pings, 50),
        )
    finally:
        await g.quit()


async def serve(placer, src: RamBlock, run_pages: int, pending=None) -> None:
    while True:
        if pending is not None:
            faults, pending = pending, None
        else:
            await trio.lowlevel.wait_readable(placer.fileno())
            faults = placer.read_faults()
        for _b, p in faults.tolist():
            first = p - p % run_pages
            placer.copy(0, first, src.pages(first, run_pages))


async def bench_faults() -> None:
    print("postcopy fault service, latency seen by the vCPU")
    size = 64 << 20
    src = RamBlock.create("src", size)
    fill_block(src, "random", 9)
    try:
        for run_pages, label in ((1, "4 KiB"), (16, "64 KiB")):
            g = await Guest.start_incoming(GuestSpec(name="faults", ram_size=size), postcopy=True)
            try:
                pings = [await g.ping() * 1e6 for _ in range(200)]
                placer = g.placer()
                pages = np.arange(0, size // PS, run_pages)[:1000]  # every read a fresh fault
                async with trio.open_nursery() as n:
                    n.start_soon(partial(serve, placer, src, run_pages))
                    res = await g.job("read_timed", "ram", pages)
                    n.cancel_scope.cancel()
                lat = res["lat_us"]
                expect = src.array.view(np.uint64)[pages * (PS // 8)]
                assert (res["values"] == expect).all(), "guest read wrong bytes"
                present = await g.job("read_timed", "ram", pages)
                row(f"fault {label} p50", pct(lat, 50), "µs", "ping round trip p50", pct(pings, 50))
                row(f"fault {label} p99", pct(lat, 99), "µs", "ping round trip p99", pct(pings, 99))
                row(
                    f"  (present page read p50, {label} run)",
                    pct(present["lat_us"], 50),
                    "µs",
                    "ping round trip p50",
                    pct(pings, 50),
                )
            finally:
                await g.quit()
    finally:
        src.close()


async def bench_placement(size: int) -> None:
    print(f"bulk placement of {size >> 20} MiB")
    src = RamBlock.create("src", size)
    fill_block(src, "random", 11)
    try:
        memcpy = 0.0
        for _ in range(2):  # best of two: the machine is shared
            dst = RamBlock.create("memcpy", size)
            t0 = time.perf_counter()
            np.copyto(dst.array, src.array)
            memcpy = max(memcpy, size / (time.perf_counter() - t0) / 1e9)
            dst.close()
        for run in (2 << 20, 64 << 10):
            g = await Guest.start_incoming(GuestSpec(name="place", ram_size=size), postcopy=True)
            try:
                placer = g.placer()
                per = run // PS
                t0 = time.perf_counter()
                placed = 0
                for first in range(0, size // PS, per):
                    placed += placer.copy(0, first, src.pages(first, per))
                rate = size / (time.perf_counter() - t0) / 1e9
                assert placed == size // PS
                assert bytes(g.blocks[0].pages(12345, 1)) == bytes(src.pages(12345, 1))
                row(
                    f"UFFDIO_COPY in {run >> 10} KiB calls",
                    rate,
                    "GB/s",
                    "memcpy into fresh memfd",
                    memcpy,
                )
            finally:
                await g.quit()
        for kind, frac in (("random", 1.0), ("half zero", 0.5), ("all zero", 0.0)):
            buf = np.zeros(256 << 20, dtype=np.uint8)
            if frac:
                rows = buf.reshape(-1, PS)
                sel = np.random.default_rng(1).random(len(rows)) < frac
                rows[sel] = src.array[: sel.sum() * PS].reshape(-1, PS)
            t0 = time.perf_counter()
            zero_page_mask(buf, PS)
            zr = len(buf) / (time.perf_counter() - t0) / 1e9
            t0 = time.perf_counter()
            buf.copy()
            mc = len(buf) / (time.perf_counter() - t0) / 1e9
            row(f"zero_page_mask, {kind}", zr, "GB/s", "memcpy of the same buffer", mc)
    finally:
        src.close()


async def main(size: int) -> None:
    t0 = time.perf_counter()
    await bench_dirty(size)
    await bench_stop()
    await bench_faults()
    await bench_placement(size)
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="guest RAM for the scan and placement figures")
    args = ap.parse_args()
    trio.run(main, parse_size(args.size))
