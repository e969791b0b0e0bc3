"""Guest RAM on a tmpfs with transparent huge pages (``ram-path``), migrated both ways.

Each agent keeps its guests' RAM on its own tmpfs mounted ``huge=within_size``
(the throughput configuration of bench/migrate.py).  The stories check that
the RAM really lives there, that the dirty log (uffd-wp on shmem THP) and
userfaultfd placement work on it, and that anything but a tmpfs is refused
before a guest exists.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from conftest import huge_tmpfs, running_agent, set_caps, start_postcopy_migration

from agents.vm.ramblock import ram_path_mount

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root (mount, userfaultfd, PAGEMAP_SCAN)"
)


def used(d: Path) -> int:
    st = os.statvfs(d)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.fixture
async def huge_pair(short_tmp: Path, pki_dir: Path):
    with huge_tmpfs(short_tmp / "src-ram") as src_ram, huge_tmpfs(short_tmp / "dst-ram") as dst_ram:
        async with (
            running_agent(short_tmp, pki_dir, "source", listen=False, ram_path=src_ram) as src,
            running_agent(short_tmp, pki_dir, "destination", ram_path=dst_ram) as dst,
        ):
            yield src, dst, src_ram, dst_ram


async def test_precopy_of_a_writing_guest_on_huge_pages_arrives_whole(huge_pair):
    src, dst, src_ram, dst_ram = huge_pair
    await dst.client.execute("migrate-incoming", {"uri": "defer", "autostart": False})
    await src.client.execute(
        "guest-start",
        {
            "name": "vm1",
            "memory": "128M",
            "workload": "stress:rate=50M,wss=64M,mode=write",
            "fill": "random",
        },
    )
    # The RAM is on the source's tmpfs (a memfd would leave it empty).
    assert used(src_ram) >= 128 << 20
    assert used(dst_ram) == 0
    await set_caps(src.client, **{"x-switchover-digest": True})
    await src.client.execute("migrate-set-parameters", {"guest": "vm1", "downtime-limit": 20_000})
    await trio.sleep(0.3)
    await src.client.execute("migrate", {"guest": "vm1", "uri": dst.uri})
    info = await src.client.wait_status("vm1", {"completed", "failed"}, timeout=120)
    assert info["status"] == "completed", info.get("error-desc")
    # Pages the guest wrote during the bulk pass were found by the dirty log.
    assert info["ram"]["dirty-sync-count"] >= 2
    assert used(dst_ram) >= 128 << 20
    check = await dst.client.execute("guest-verify", {"guest": "vm1", "method": "digest"})
    assert check["digest"] == info["switchover-digest"]


@pytest.mark.parametrize("preempt", [False, True], ids=["plain", "preempt"])
async def test_postcopy_onto_huge_pages_keeps_the_counter_whole(huge_pair, preempt):
    src, dst, _, dst_ram = huge_pair
    await start_postcopy_migration(src, dst, preempt=preempt)
    info = await src.client.wait_status(
        "vm1", {"completed", "failed", "postcopy-paused"}, timeout=120
    )
    assert info["status"] == "completed", info.get("error-desc")
    assert info["ram"]["postcopy-requests"] > 0  # the guest faulted on the tmpfs mapping
    assert used(dst_ram) >= 32 << 20  # at least the non-zero 60 % landed there
    check = await dst.client.execute("guest-verify", {"guest": "vm1", "method": "counter"})
    assert check["verified"], check


def test_ram_path_must_be_a_tmpfs_directory(short_tmp: Path) -> None:
    with pytest.raises(ValueError, match="proc file system, not tmpfs"):
        ram_path_mount("/proc")
    with pytest.raises(ValueError, match="not a directory"):
        ram_path_mount(short_tmp / "missing")
    with huge_tmpfs(short_tmp / "ram") as d:
        point, options = ram_path_mount(d)
        assert point == str(d) and "huge=within_size" in options
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "agents.cli",
            "agent",
            "--control",
            short_tmp / "c.sock",
            "--ram-path",
            "/proc",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "ram-path /proc: on a proc file system, not tmpfs" in done.stderr
