"""RamSender bookkeeping: what a pass leaves in to_send when it is left early."""

from __future__ import annotations

import numpy as np
import pytest
import trio
import trio.testing

from agents.migration import RamStats
from agents.ram import (
    PRECOPY_BATCH_BYTES,
    PageWriter,
    RamReceiver,
    RamSender,
    batch_pages,
    index_runs,
)
from agents.vm.ramblock import RamBlock


class _Stop(Exception):
    pass


@pytest.fixture
def block():
    b = RamBlock.create("ram", 8 << 20)
    b.array[:] = np.random.default_rng(7).integers(0, 256, b.size, dtype=np.uint8)
    b.array.reshape(-1, 4096)[::3] = 0
    yield b
    b.close()


async def test_a_pass_left_early_keeps_every_unsent_page_pending(block):
    sender = RamSender([block], RamStats())
    sent: list[object] = []
    batches = 0

    async def send(message):
        sent.append(message)
        return 1

    async def checkpoint():
        nonlocal batches
        batches += 1
        if batches == 1:
            raise _Stop

    with pytest.raises(_Stop):
        await sender.send_pass(send, checkpoint=checkpoint)
    assert sender.pending_pages() == block.npages - batch_pages(4096, PRECOPY_BATCH_BYTES)
    assert 0 < sender.pending_pages() < block.npages


async def test_pages_sent_by_a_pass_arrive_whole(block):
    """Everything a full pass sends, applied by a receiver, reproduces the block."""
    sender = RamSender([block], RamStats())
    target = RamBlock.create("ram", block.size)
    receiver = RamReceiver([target])
    try:

        async def send(message):
            receiver.apply(message)
            return 1

        await sender.send_pass(send)
        assert receiver.complete()
        assert bytes(target.view) == bytes(block.view)
        # Re-dirty scattered pages, one of them now zero: a second pass fixes them up.
        dirty = np.array([5, 77, 900, 1500], dtype=np.uint64)
        block.array.reshape(-1, 4096)[dirty[:3]] = 9
        block.array.reshape(-1, 4096)[1500] = 0
        sender.add_dirty(0, dirty)
        await trio.lowlevel.checkpoint()
        await sender.send_pass(send)
        assert bytes(target.view) == bytes(block.view)
    finally:
        target.close()


def test_index_runs():
    firsts, lengths, positions = index_runs(np.array([1, 2, 3, 7, 9, 10]))
    assert (
        firsts.tolist() == [1, 7, 9]
        and lengths.tolist() == [3, 1, 2]
        and positions.tolist() == [0, 3, 4]
    )


def test_another_pass_is_taken_only_while_it_shrinks_downtime():
    from agents.source import MAX_EXTRA_PASSES, _another_pass_pays

    gb = 1e9
    # 90 MB left after a 1 GB pass at 0.6 GB/s: fits 300 ms, but one more pass pays.
    assert _another_pass_pays(90_000_000, 1_000_000_000, 0.6 * gb, 300, 0)
    # Already tiny (< 30 ms expected): switch.
    assert not _another_pass_pays(6_000_000, 90_000_000, 0.6 * gb, 300, 1)
    # Not shrinking any more (the guest dirties as fast as we send): switch.
    assert not _another_pass_pays(90_000_000, 100_000_000, 0.6 * gb, 300, 0)
    # Bounded.
    assert not _another_pass_pays(90_000_000, 1_000_000_000, 0.6 * gb, 300, MAX_EXTRA_PASSES)
    # First measurement: nothing to compare with.
    assert not _another_pass_pays(90_000_000, None, 0.6 * gb, 300, 0)


async def test_the_page_writer_writes_in_order_and_drain_waits_for_every_frame():
    written: list[int] = []
    applied: list[int] = []
    release = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def store(n: int) -> None:
        if n == 0:  # the first write is slow: the queue fills up behind it
            trio.from_thread.run(release.wait, trio_token=token)
        written.append(n)

    writer = PageWriter(store, applied.append, depth=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        for n in range(2):  # the frame being written counts: the queue is full
            await writer.put(n)
        put_done = trio.Event()

        async def put_third() -> None:
            await writer.put(2)
            put_done.set()

        nursery.start_soon(put_third)
        await trio.testing.wait_all_tasks_blocked()
        assert written == [] and applied == [] and not put_done.is_set()
        release.set()
        await put_done.wait()
        await writer.drain()
        assert written == applied == [0, 1, 2]
        nursery.cancel_scope.cancel()


async def test_the_page_writer_thread_ends_with_its_task_and_raises_its_errors():
    def store(n: int) -> None:
        if n == 1:
            raise ValueError("bad frame")

    writer = PageWriter(store, lambda n: None)
    with pytest.RaisesGroup(
        pytest.RaisesExc(ValueError, match="bad frame"), flatten_subgroups=True
    ):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            await writer.put(0)
            await writer.put(1)
            await trio.sleep_forever()  # the writer's error cancels this
    writer = PageWriter(lambda n: None, lambda n: None)
    with trio.move_on_after(0.05):
        await writer.run()  # cancelled: returns only once its thread has
    with pytest.raises(trio.ClosedResourceError):
        await writer.put(0)
