"""Verification can fail: a flipped byte and a dropped page are caught by the digests and
by the counter check, and a counter guest moved by hand continues where it stopped."""

import numpy as np
import pytest
import trio

from agents.vm.verify import counter_check, differing_pages, ram_digest

pytestmark = pytest.mark.root


async def stopped_counter(guests, **kw):
    g = await guests.start(workload="counter", fill="random", **kw)
    with trio.fail_after(10):
        while (await g.stats())["counter"]["passes"] < 3:
            await trio.sleep(0.02)
    await g.stop()
    return g, (await g.stats())["counter"]


async def test_counter_check_passes_then_catches_a_flip_and_a_drop(guests):
    g, state = await stopped_counter(guests, ram_size=4 << 20)
    blk = g.blocks[0]
    ok = counter_check(blk, state)
    assert ok, ok.explanation
    victim = (state["block_page"] + 100) % blk.npages
    blk.array[victim * blk.page_size] ^= 0x10
    bad = counter_check(blk, state)
    assert not bad and bad.first_bad_page == victim
    assert f"page {victim}" in bad.explanation
    blk.array[victim * blk.page_size] ^= 0x10
    assert counter_check(blk, state)

    # A dropped page reads as zero: it stands out unless its neighbours' count is
    # 0 or 1 mod 256 (a fast counter can be there: the byte wraps), so run on.
    while blk.array[((victim - 1) % blk.npages) * blk.page_size] in (0, 1):
        await g.cont()
        await trio.sleep(0.01)
        await g.stop()
        state = (await g.stats())["counter"]
        victim = (state["block_page"] + 100) % blk.npages
    blk.discard(victim, 1)
    bad = counter_check(blk, state)
    assert not bad and bad.first_bad_page == victim


async def test_counter_check_knows_where_the_walk_stopped(guests):
    g, state = await stopped_counter(guests, ram_size=4 << 20)
    blk = g.blocks[0]
    moved = dict(state, block_page=(state["block_page"] + 7) % blk.npages or 1)
    assert not counter_check(blk, moved)


async def test_digest_names_the_page_that_changed(guests):
    g, _ = await stopped_counter(guests, ram_size=8 << 20)
    blk = g.blocks[0]
    whole, pages = ram_digest(blk)
    assert (whole, pages.tolist()) == (lambda d: (d[0], d[1].tolist()))(ram_digest(blk))
    blk.array[1234 * blk.page_size + 777] ^= 1  # not a first byte: the counter check cannot see it
    whole2, pages2 = ram_digest(blk)
    assert whole2 != whole
    assert differing_pages(pages, pages2).tolist() == [1234]
    blk.array[1234 * blk.page_size + 777] ^= 1
    blk.discard(99, 1)
    whole3, pages3 = ram_digest(blk)
    assert whole3 != whole
    assert differing_pages(pages, pages3).tolist() == [99]


async def test_counter_continues_on_a_destination(guests):
    src, _ = await stopped_counter(guests, ram_size=[("lo", 1 << 20), ("hi", 2 << 20)])
    sections = await src.save_devices()
    src_ns = (await src.stats())["guest_ns"]
    dst = await guests.incoming(ram_size=[("lo", 1 << 20), ("hi", 2 << 20)], workload="counter")
    assert dst.state == "incoming"
    for s, d in zip(src.blocks, dst.blocks, strict=True):
        d.write_pages(0, s.pages(0, s.npages))
    await dst.load_devices(sections)
    keys = ("position", "passes", "block", "block_page")
    before, after = (await src.stats())["counter"], (await dst.stats())["counter"]
    assert {k: after[k] for k in keys} == {k: before[k] for k in keys}
    assert (await dst.stats())["guest_ns"] == src_ns  # the clock picks up where it froze
    await src.quit()
    await dst.cont()
    with trio.fail_after(10):
        while (await dst.stats())["counter"]["passes"] < after["passes"] + 2:
            await trio.sleep(0.02)
    await dst.stop()
    st = await dst.stats()
    assert st["guest_ns"] > src_ns
    for blk in dst.blocks:
        res = counter_check(blk, st["counter"])
        assert res, res.explanation
    lines = st["console"]
    assert any("devices loaded" in line for line in lines)
    assert np.all(
        np.diff([float(line[1:13]) for line in lines]) >= 0
    )  # console time never goes back
