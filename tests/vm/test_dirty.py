"""The dirty log reports exactly the pages the guest wrote — no more, no fewer — while it
keeps writing, and a get-and-clear really clears."""

import numpy as np
import pytest
import trio

from agents.vm.dirty import as_mask, regions_to_pages
from agents.vm.errors import PagemapScanUnavailable
from agents.vm.guest import GuestMapping

pytestmark = pytest.mark.root


def test_regions_expand_to_sorted_pages():
    pages = regions_to_pages(np.array([0, 5, 9], np.uint64), np.array([2, 6, 12], np.uint64))
    assert pages.tolist() == [0, 1, 5, 9, 10, 11]
    assert regions_to_pages(np.zeros(0, np.uint64), np.zeros(0, np.uint64)).size == 0


async def test_get_and_clear_reports_exactly_the_touched_pages(guests):
    g = await guests.start(
        ram_size=[("a", 4 << 20), ("b", 1 << 20)], workload="idle", fill="random"
    )
    log = await g.start_dirty_log()
    assert all(v.size == 0 for v in log.get_and_clear().values())  # freshly protected: nothing
    touched = np.array([0, 1, 2, 77, 500, 1023])
    await g.job("touch", "a", touched, value=7)
    await g.job("touch", "b", np.array([255]))
    assert log.peek()["a"].tolist() == touched.tolist()  # peek does not clear
    dirty = await log.get_and_clear_async()
    assert dirty["a"].tolist() == touched.tolist()
    assert dirty["b"].tolist() == [255]
    assert all(v.size == 0 for v in log.get_and_clear().values())  # cleared and re-protected
    await g.job("touch", "a", np.array([77]))
    assert log.get_and_clear()["a"].tolist() == [77]
    assert g.blocks[0].array.view(np.uint64)[touched * 512].tolist() == [7, 7, 7, 1, 7, 7]
    await g.stop_dirty_log()


async def test_dirty_log_is_exact_while_the_guest_keeps_writing(guests):
    g = await guests.start(
        ram_size=64 << 20,
        workload="stress:rate=24M,mode=write,record=1,burst_us=500",
        fill="mixed:50%",
    )
    log = await g.start_dirty_log()  # the guest's record restarts when protection starts
    seen = np.zeros(g.blocks[0].npages, dtype=bool)
    scans_with_pages = 0
    for _ in range(40):
        dirty = await log.get_and_clear_async()
        seen[dirty["ram"]] = True
        scans_with_pages += dirty["ram"].size > 0
        await trio.sleep(0.01)
    await g.stop()
    seen[log.get_and_clear()["ram"]] = True
    written = (await g.stats(record=True))["record"]["ram"]["written"]
    assert scans_with_pages > 5  # the scans really raced with the writes
    assert 500 < written.sum() < len(written)  # some pages, not all
    missed = np.flatnonzero(written & ~seen)
    extra = np.flatnonzero(seen & ~written)
    assert missed.size == 0, f"writes lost by the dirty log: pages {missed[:10]}"
    assert extra.size == 0, f"pages reported but never written: {extra[:10]}"


async def test_scan_without_write_protect_is_a_clear_error(guests):
    from agents.vm.dirty import DirtyLog

    g = await guests.start(ram_size=1 << 20, workload="idle")
    m = g.mappings[0]
    log = DirtyLog(g.pid, [GuestMapping(m.name, m.addr, m.size, m.page_size)])
    with log, pytest.raises(PagemapScanUnavailable, match="not registered write-protect async"):
        log.get_and_clear()
    assert as_mask(np.array([1, 3]), 4).tolist() == [False, True, False, True]
