"""Spare guest processes: started ahead, a spare becomes a guest like any other — it outlives
its agent with a state dir and is adopted, exits without one — and unused spares end with
their pool; a spare that died is passed over for a cold start."""

import os
import signal

import pytest
import trio

from agents.vm.guest import Guest, GuestSpec
from agents.vm.spares import SparePool
from agents.vm.verify import counter_check
from tests.vm.test_adopt import advances, orphaned, proc_state, reap_as_parent, state_dir  # noqa: F401

pytestmark = pytest.mark.root


async def test_a_spare_becomes_a_guest_that_outlives_its_agent_and_is_adopted(state_dir):  # noqa: F811
    async with trio.open_nursery() as nursery:
        pool = SparePool(1, refill_delay=3600)  # no replacement during the test
        await nursery.start(pool.run)
        await pool.ready()
        spare_pid = pool._spares[0].pid
        assert os.getsid(spare_pid) == os.getsid(
            0
        )  # a spare is in our session until it is given a guest

        g = await Guest.start(
            GuestSpec(name="warm1", ram_size=4 << 20, workload="counter", fill="random"),
            state_dir=state_dir,
            spares=pool,
        )
        assert g.pid == spare_pid and len(pool) == 0
        assert os.getsid(spare_pid) == spare_pid  # its own session, as a cold start's
        assert (state_dir / "guests" / "warm1.sock").exists()
        await advances(g)

        g.detach()  # the agent dies
        del g
        rec = await orphaned(state_dir, "warm1")
        assert rec.pid == spare_pid and rec.attached_pid is None

        a = await Guest.adopt(rec.socket)
        assert (a.pid, a.state, a.spec.name) == (spare_pid, "running", "warm1")
        await advances(a)
        await a.stop()
        res = counter_check(a.blocks[0], (await a.stats())["counter"])
        assert res, res.explanation
        assert (await a.quit()).clean
        assert reap_as_parent(spare_pid) == 0
        nursery.cancel_scope.cancel()


async def test_without_a_state_dir_a_spare_guest_exits_when_its_agent_goes():
    async with trio.open_nursery() as nursery:
        pool = SparePool(1, refill_delay=3600)
        await nursery.start(pool.run)
        await pool.ready()
        g = await Guest.start_incoming(
            GuestSpec(name="warm2", ram_size=2 << 20), postcopy=True, spares=pool
        )
        assert g.uffd is not None and g.state == "incoming"
        proc = g.process
        assert proc is not None
        assert os.getsid(proc.pid) == os.getsid(0)  # no state dir: stays in our session
        g.detach()
        with trio.fail_after(10):
            assert await proc.wait() == 0
        nursery.cancel_scope.cancel()


async def test_unused_spares_end_with_their_pool():
    async with trio.open_nursery() as nursery:
        pool = SparePool(2)
        await nursery.start(pool.run)
        with trio.fail_after(30):
            while len(pool) < 2:
                await trio.sleep(0.02)
        procs = [s.process for s in pool._spares]
        nursery.cancel_scope.cancel()
    assert all(p.returncode == 0 for p in procs)  # hung up on, they exited (and were reaped)
    assert all(proc_state(p.pid) is None for p in procs)


async def test_a_dead_spare_is_passed_over_for_a_cold_start():
    async with trio.open_nursery() as nursery:
        pool = SparePool(1, refill_delay=3600)
        await nursery.start(pool.run)
        await pool.ready()
        dead = pool._spares[0].process
        dead.send_signal(signal.SIGKILL)
        await dead.wait()
        g = await Guest.start(
            GuestSpec(name="cold", ram_size=2 << 20, workload="counter"), spares=pool
        )
        try:
            assert g.pid != dead.pid and len(pool) == 0
            await advances(g)
        finally:
            await g.quit()
        nursery.cancel_scope.cancel()


async def test_a_taken_spare_is_replaced_only_once_no_migration_is_running():
    migrating = False
    async with trio.open_nursery() as nursery:
        pool = SparePool(1, refill_delay=0.05, busy=lambda: migrating)
        await nursery.start(pool.run)
        await pool.ready()
        migrating = True  # an incoming migration takes the spare
        spare = pool.take()
        assert spare is not None and len(pool) == 0
        await trio.sleep(1.0)  # 20 refill delays: a refill would have started and finished
        assert len(pool) == 0, "a spare was started while a migration was running"
        migrating = False
        with trio.fail_after(30):
            await pool.ready()
        assert len(pool) == 1 and pool._spares[0].pid != spare.pid
        await spare.close()
        nursery.cancel_scope.cancel()
