"""Postcopy placement: a destination guest faults on missing pages, the agent serves
them from its own buffer with UFFDIO_COPY, and the guest reads the right bytes — while
its control thread keeps answering even with a vCPU asleep on a missing page."""

from functools import partial

import numpy as np
import pytest
import trio

from agents.vm.fill import fill_block
from agents.vm.ramblock import RamBlock

pytestmark = pytest.mark.root
PS = 4096


def first_words(block: RamBlock) -> np.ndarray:
    return block.array.view(np.uint64)[:: block.page_size // 8].copy()


async def serve_faults(placer, source, *, run_pages=1, served=None, pending=None):
    """The agent's fault task, in small: wait for faults, place the pages they need."""
    while True:
        if pending is not None:
            faults, pending = pending, None
        else:
            await trio.lowlevel.wait_readable(placer.fileno())
            faults = placer.read_faults()
        for b, p in np.unique(faults, axis=0).tolist():
            first = p - p % run_pages
            count = min(run_pages, source[b].npages - first)
            placer.copy(b, first, source[b].pages(first, count))
            if served is not None:
                served.append((b, p))


async def test_guest_answers_while_vcpu_blocked(guests):
    g = await guests.incoming(ram_size=1 << 20, workload="stress:rate=4M,mode=read", postcopy=True)
    placer = g.placer()
    await g.cont()
    with trio.fail_after(10):
        await trio.lowlevel.wait_readable(placer.fileno())
    faults = placer.read_faults()
    assert len(faults) >= 1  # the vCPU is asleep in the kernel on a missing page
    with trio.fail_after(5):  # a guest frozen by a vCPU holding the GIL never answers
        first = await g.stats()
        await trio.sleep(0.6)  # heartbeats keep coming from a guest whose vCPU is blocked
        second = await g.stats()
    assert second["stress"]["bursts"] == 0  # still blocked in its very first burst
    assert second["beat"] > first["beat"]
    assert second["guest_ns"] > first["guest_ns"]
    assert await g.ping() > 0
    # Serve everything: the vCPU wakes and completes bursts.
    source = [RamBlock.create("src", 1 << 20)]
    try:
        async with trio.open_nursery() as n:
            n.start_soon(partial(serve_faults, placer, source, pending=faults))
            with trio.fail_after(10):
                while (await g.stats())["stress"]["bursts"] == 0:
                    await trio.sleep(0.02)
            n.cancel_scope.cancel()
    finally:
        source[0].close()


@pytest.mark.parametrize("run_pages", [1, 16])
async def test_served_faults_give_the_guest_the_right_bytes(guests, run_pages):
    src = RamBlock.create("src", 4 << 20)
    try:
        fill_block(src, "random", seed=3)
        g = await guests.incoming(
            ram_size=4 << 20, workload="stress:rate=16M,mode=read,record=1", postcopy=True
        )
        # Precopy already delivered some pages: they must never fault, nor be overwritten.
        g.blocks[0].write_pages(0, src.pages(0, 64))
        placer = g.placer()
        served: list = []
        async with trio.open_nursery() as n:
            n.start_soon(partial(serve_faults, placer, [src], run_pages=run_pages, served=served))
            await g.cont()
            with trio.fail_after(20):
                while (await g.stats())["stress"]["reads"] < 2000:
                    await trio.sleep(0.02)
            await g.stop()
            n.cancel_scope.cancel()
        rec = (await g.stats(record=True))["record"]["ram"]
        seen = rec["seen"]
        assert seen.sum() > 300
        expected = first_words(src)
        wrong = np.flatnonzero(seen & (rec["values"] != expected))
        assert wrong.size == 0, f"guest read wrong bytes on pages {wrong[:8]}"
        assert not any(p < 64 for _, p in served), "a precopied page faulted"
        assert bytes(g.blocks[0].pages(0, 64)) == bytes(src.pages(0, 64))
    finally:
        src.close()


async def test_copy_skips_present_pages_and_wakes(guests):
    g = await guests.incoming(ram_size=1 << 20, workload="idle", postcopy=True)
    blk, placer = g.blocks[0], g.placer()
    data = np.random.default_rng(1).integers(0, 256, 16 * PS, dtype=np.uint8)
    blk.write_pages(5, b"\xee" * PS)  # present before the copy: EAGAIN partial, then EEXIST
    assert placer.copy(0, 0, data) == 15
    assert bytes(blk.pages(5, 1)) == b"\xee" * PS
    assert bytes(blk.pages(0, 5)) == data[: 5 * PS].tobytes()
    assert bytes(blk.pages(6, 10)) == data[6 * PS :].tobytes()
    assert placer.copy(0, 3, data[:PS]) == 0  # EEXIST: nothing placed, waiter woken
    assert placer.zeropage(0, 20, 4) == 4
    assert not blk.array[20 * PS : 24 * PS].any()

    # A discarded page faults again and is served again (DISCARD in postcopy).
    blk.discard(2, 1)
    async with trio.open_nursery() as n:
        n.start_soon(serve_faults, placer, [_Const(data)])
        got = await g.job("read", "ram", np.array([2, 40]))
        n.cancel_scope.cancel()
    w = data.view(np.uint64)
    assert got["values"].tolist() == [
        int(w[2 * PS // 8]),
        int(w[8 * PS // 8]),
    ]  # page 40 = pattern 8

    # pwrite + UFFDIO_WAKE resolves a fault as well as COPY does.
    async with trio.open_nursery() as n:

        async def reader():
            nonlocal values
            values = (await g.job("read", "ram", np.array([50])))["values"]

        values = None
        n.start_soon(reader)
        with trio.fail_after(10):
            await trio.lowlevel.wait_readable(placer.fileno())
        assert placer.read_faults().tolist() == [[0, 50]]
        blk.write_pages(50, b"\x01" * PS)
        placer.wake(0, 50, 1)
    assert values.tolist() == [0x0101010101010101]


class _Const:
    """A 'source block' whose every page is one given 16-page pattern, page-aligned."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.npages = 1 << 20

    def pages(self, first: int, count: int):
        out = np.concatenate(
            [self.data[(p % 16) * PS : (p % 16 + 1) * PS] for p in range(first, first + count)]
        )
        return out
