"""incoming-prealloc (agents/vm/prealloc.py): RAM touched ahead for the next incoming guest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from conftest import huge_tmpfs, needs_root, running_agent, set_caps

from agents.vm.prealloc import PreallocPool

MiB = 1 << 20


def _resident(fd: int) -> int:
    """Bytes of a shmem file that are allocated (its blocks), not merely sized."""
    return os.fstat(fd).st_blocks * 512


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_the_pool_fills_a_touched_memfd_hands_it_out_cut_to_size_and_fills_again() -> None:
    before = _open_fds()
    pool = PreallocPool(16 * MiB)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        with trio.fail_after(30):
            await pool.ready.wait()
        assert pool.info() == {"size": 16 * MiB, "ready": True, "taken": 0}
        assert pool.take(32 * MiB) is None  # larger than the pool: a fresh block instead
        fd = pool.take(12 * MiB)
        assert fd is not None
        try:
            assert os.fstat(fd).st_size == 12 * MiB
            assert _resident(fd) == 12 * MiB  # every page allocated before the guest came
            assert os.pread(fd, 4096, 5 * MiB) == bytes(4096)  # and zero, as fresh RAM is
        finally:
            os.close(fd)
        assert pool.take(12 * MiB) is None  # taken: nothing until it is filled again
        with trio.fail_after(30):
            await pool.ready.wait()
        assert pool.info()["taken"] == 1 and pool.info()["ready"]
        nursery.cancel_scope.cancel()
    assert _open_fds() == before  # the memfd not taken is closed with the pool's task


async def test_the_pool_waits_while_a_migration_moves_pages() -> None:
    migrating = True
    pool = PreallocPool(8 * MiB, busy=lambda: migrating, idle_poll=0.01)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        await trio.sleep(0.3)
        assert not pool.ready.is_set()
        migrating = False
        with trio.fail_after(30):
            await pool.ready.wait()
        nursery.cancel_scope.cancel()


async def test_the_pool_fills_on_the_ram_path_tmpfs(tmp_path: Path) -> None:
    needs_root()
    with huge_tmpfs(tmp_path / "ram") as mount:
        pool = PreallocPool(8 * MiB, directory=mount)
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            with trio.fail_after(30):
                await pool.ready.wait()
            fd = pool.take(8 * MiB)
            assert fd is not None
            try:
                assert os.readlink(f"/proc/self/fd/{fd}").startswith(str(mount))  # on that tmpfs
                assert _resident(fd) == 8 * MiB
            finally:
                os.close(fd)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy"])
async def test_an_incoming_guest_takes_the_pool_unless_postcopy_needs_its_pages_missing(
    short_tmp: Path, pki_dir: Path, postcopy: bool
) -> None:
    needs_root()
    async with (
        running_agent(short_tmp, pki_dir, "source", listen=False) as src,
        running_agent(short_tmp, pki_dir, "destination", incoming_prealloc=64 * MiB) as dst,
    ):
        with trio.fail_after(60):
            await dst.agent.prealloc.ready.wait()
        workload = "counter" if postcopy else "stress:rate=4M,wss=16M,mode=write"
        await src.client.execute(
            "guest-start", {"name": "vm1", "memory": "64M", "workload": workload}
        )
        await src.client.execute(
            "migrate-set-parameters", {"guest": "vm1", "downtime-limit": 20_000}
        )
        await set_caps(src.client, **{"postcopy-ram": postcopy, "x-switchover-digest": True})
        if not postcopy:  # the guest stays as it arrived: its RAM is comparable
            await dst.client.execute("migrate-incoming", {"uri": "defer", "autostart": False})
        await src.client.execute("migrate", {"guest": "vm1", "uri": dst.uri})
        if postcopy:
            await src.client.wait_status("vm1", {"active"}, timeout=30, poll=0.01)
            await src.client.execute("migrate-start-postcopy", {"guest": "vm1"})
        info = await src.client.wait_status("vm1", {"completed", "failed"}, timeout=120)
        assert info["status"] == "completed", info.get("error-desc")
        await dst.client.wait_status("vm1", {"completed"}, timeout=30)
        pool = await dst.client.execute("query-incoming-prealloc")
        assert pool["taken"] == (0 if postcopy else 1)
        # The guest arrived whole, whichever memory it landed in.
        if postcopy:
            await trio.sleep(0.2)
            check = await dst.client.execute("guest-verify", {"guest": "vm1", "method": "counter"})
            assert check["verified"], check
        else:
            check = await dst.client.execute("guest-verify", {"guest": "vm1", "method": "digest"})
            assert check["digest"] == info["switchover-digest"], check
