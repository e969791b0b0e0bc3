"""2 MiB hugetlb RAM blocks: a clear error without reserved pages; with them a guest runs,
its dirty log and postcopy placement work in whole huge pages.  The test reserves the
pages it needs through /proc/sys/vm/nr_hugepages and gives them back."""

import numpy as np
import pytest
import trio

from agents.vm.errors import HugePagesUnavailable, PlacementError
from agents.vm.ramblock import HUGE_PAGE_SIZE, RamBlock, free_huge_pages
from agents.vm.verify import counter_check

pytestmark = pytest.mark.root
NEED = 24


@pytest.fixture
def huge_pages(reserve_huge_pages):
    reserve_huge_pages(NEED)


def test_no_reserved_pages_is_a_clear_error():
    want = free_huge_pages() + 1
    with pytest.raises(
        HugePagesUnavailable, match=r"needs \d+ free 2 MiB huge pages, \d+ free: reserve them"
    ):
        RamBlock.create("big", want * HUGE_PAGE_SIZE, hugetlb=True)


async def test_hugetlb_guest_runs_logs_and_places_whole_pages(huge_pages, guests):
    g = await guests.start(ram_size=8 * HUGE_PAGE_SIZE, workload="counter", hugetlb=True)
    assert g.blocks[0].page_size == HUGE_PAGE_SIZE and g.blocks[0].npages == 8
    log = await g.start_dirty_log()
    armed_at = (await g.stats())["counter"]["passes"]
    with trio.fail_after(10):
        while (await g.stats())["counter"]["passes"] < armed_at + 2:
            await trio.sleep(0.01)
    await g.stop()
    assert log.get_and_clear()["ram"].tolist() == list(range(8))  # in huge-page units
    state = (await g.stats())["counter"]
    res = counter_check(g.blocks[0], state)
    assert res, res.explanation
    await g.stop_dirty_log()
    await g.quit()

    dst = await guests.incoming(
        ram_size=4 * HUGE_PAGE_SIZE, workload="idle", hugetlb=True, postcopy=True
    )
    placer = dst.placer()
    data = np.full(HUGE_PAGE_SIZE, 0x5A, dtype=np.uint8)
    with pytest.raises(PlacementError, match="not whole pages"):
        placer.copy(0, 1, data[:4096])
    assert placer.copy(0, 1, data) == 1
    assert placer.copy(0, 1, data) == 0  # present: woken, skipped
    assert placer.zeropage(0, 2, 2) == 2
    got = await dst.job("read", "ram", np.array([1, 2]))
    assert got["values"].tolist() == [0x5A5A5A5A5A5A5A5A, 0]
