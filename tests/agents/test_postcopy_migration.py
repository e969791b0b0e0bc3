"""Postcopy (with and without the preempt channel) between two real agents.

The destination guest runs before all its memory has arrived: every touch of
a missing page faults into userfaultfd, is asked for (on the return path, or on
the preempt connection by the preempt workers) and
placed atomically.  Each story ends by checking the guest's memory.
"""

from __future__ import annotations

import os

import pytest
import trio
from conftest import set_caps, start_postcopy_migration

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (userfaultfd, PAGEMAP_SCAN)")


@pytest.mark.parametrize("preempt", [False, True], ids=["plain", "preempt"])
async def test_counter_guest_completes_by_postcopy_and_the_check_holds(pair, preempt):
    src, dst = pair
    await start_postcopy_migration(src, dst, preempt=preempt)
    info = await src.client.wait_status(
        "vm1", {"completed", "failed", "postcopy-paused"}, timeout=120
    )
    assert info["status"] == "completed", info.get("error-desc")
    assert info["ram"]["postcopy-bytes"] > 0
    dinfo = await dst.client.execute("query-migrate", {"guest": "vm1"})
    assert dinfo["status"] == "completed"
    # The counter ran on the destination while pages were missing: it faulted.
    assert dinfo["postcopy-latency-dist"] and sum(dinfo["postcopy-latency-dist"]) > 0
    assert dinfo["postcopy-latency"] > 0 and dinfo["postcopy-blocktime"] >= 0
    assert info["ram"]["postcopy-requests"] > 0
    names = {c["name"] for c in info["channels"]}
    assert ("preempt" in names) == preempt
    check = await dst.client.execute("guest-verify", {"guest": "vm1", "method": "counter"})
    assert check["verified"], check
    [old] = await src.client.execute("query-guests")
    assert old["status"] == "migrated"


@pytest.mark.parametrize("preempt", [False, True], ids=["plain", "preempt"])
async def test_read_only_guest_memory_equals_the_source_at_switchover(pair, preempt):
    src, dst = pair
    await start_postcopy_migration(
        src,
        dst,
        memory="96M",
        workload="stress:rate=40M,wss=96M,mode=read",
        preempt=preempt,
        **{"x-switchover-digest": True},
    )
    info = await src.client.wait_status(
        "vm1", {"completed", "failed", "postcopy-paused"}, timeout=120
    )
    assert info["status"] == "completed", info.get("error-desc")
    check = await dst.client.execute(
        "guest-verify", {"guest": "vm1", "method": "digest", "expect": info["switchover-digest"]}
    )
    assert check["verified"], check


async def test_a_destination_that_cannot_load_devices_lets_the_source_resume(pair):
    src, dst = pair
    dst.agent.test_hooks["fail-device-load"] = True
    await start_postcopy_migration(src, dst)
    info = await src.client.wait_status(
        "vm1", {"completed", "failed", "postcopy-paused"}, timeout=60
    )
    assert info["status"] == "failed"
    status = await src.client.execute("query-status", {"guest": "vm1"})
    assert status["running"]
    check = await src.client.execute("guest-verify", {"guest": "vm1", "method": "counter"})
    assert check["verified"], check
    with trio.fail_after(10):
        while await dst.client.execute("query-guests"):
            await trio.sleep(0.05)


async def test_a_lost_page_is_caught_by_verification(pair):
    src, dst = pair
    dst.agent.test_hooks["drop-page"] = (0, 1000)
    await dst.client.execute("migrate-incoming", {"uri": "defer", "autostart": False})
    await start_postcopy_migration(src, dst, workload="idle", **{"x-switchover-digest": True})
    info = await src.client.wait_status(
        "vm1", {"completed", "failed", "postcopy-paused"}, timeout=120
    )
    assert info["status"] == "completed", info.get("error-desc")
    assert "drop-page" not in dst.agent.test_hooks  # the hook fired
    check = await dst.client.execute(
        "guest-verify", {"guest": "vm1", "method": "digest", "expect": info["switchover-digest"]}
    )
    assert check["verified"] is False


@pytest.mark.parametrize("preempt", [False, True], ids=["plain", "preempt"])
async def test_postcopy_after_a_dirty_sync_discards_every_stale_page(pair, preempt):
    """Pages re-dirtied during pass 1 and not yet re-sent when postcopy starts
    are stale on the destination: the DISCARD must cover all of them, not only
    those dirtied since the last sync (issue 6's "one increment behind" bug)."""
    src, dst = pair
    await src.client.execute(
        "guest-start",
        # A counter slow enough that pages it dirtied before the last sync are not
        # dirtied again before the switch (a fast one rewrites everything each time).
        {"name": "vm1", "memory": "32M", "workload": "counter:rate=8M", "fill": "mixed:60%"},
    )
    await set_caps(src.client, **{"postcopy-ram": True, "postcopy-preempt": preempt})
    await src.client.execute("migrate-set-parameters", {"guest": "vm1", "max-bandwidth": 32 << 20})
    await src.client.execute("migrate", {"guest": "vm1", "uri": dst.uri})
    with trio.fail_after(60):
        while True:
            info = await src.client.execute("query-migrate", {"guest": "vm1"})
            assert info["status"] in ("setup", "active"), info
            if info["ram"]["dirty-sync-count"] >= 1:
                break
            await trio.sleep(0.01)
    # Pass 2 has begun with what the walk dirtied during pass 1; switch before it ends.
    await src.client.execute("migrate-start-postcopy", {"guest": "vm1"})
    info = await src.client.wait_status(
        "vm1", {"completed", "failed", "postcopy-paused"}, timeout=120
    )
    assert info["status"] == "completed", info.get("error-desc")
    assert info["ram"]["dirty-sync-count"] >= 2  # the first sync really came before the switch
    check = await dst.client.execute("guest-verify", {"guest": "vm1", "method": "counter"})
    assert check["verified"], check


async def test_a_late_duplicate_page_never_overwrites_what_the_guest_wrote(pair):
    """A page sent twice (requested and streamed) can arrive after the last
    missing page, while the destination is letting go of the uffd: it must be
    dropped, not written over the guest's newer data (issue 6: a run of pages
    one increment behind after recovery, where duplicates are common)."""
    src, dst = pair
    src.agent.test_hooks["late-duplicate"] = 0.3  # after COMPLETE
    dst.agent.test_hooks["delay-shut"] = 1.5  # hold the window open past it
    await start_postcopy_migration(src, dst, memory="32M")
    info = await src.client.wait_status(
        "vm1", {"completed", "failed", "postcopy-paused"}, timeout=120
    )
    assert info["status"] == "completed", info.get("error-desc")
    migration = next(e for e in dst.agent.guests.values() if e.name == "vm1").migration
    assert migration.ram.late_duplicates >= 256  # the duplicate arrived, inside the window
    check = await dst.client.execute("guest-verify", {"guest": "vm1", "method": "counter"})
    assert check["verified"], check


@pytest.mark.parametrize("preempt", [False, True], ids=["plain", "preempt"])
async def test_huge_page_guest_faults_and_gets_whole_huge_pages(pair, reserve_huge_pages, preempt):
    """Each request is for a whole 2 MiB page and is placed whole (with preempt,
    by the fault worker, the page sent whole by the request worker)."""
    reserve_huge_pages(40)  # a 32 MiB guest on each side, and a margin
    src, dst = pair
    await start_postcopy_migration(src, dst, memory="32M", preempt=preempt, hugetlb=True)
    info = await src.client.wait_status(
        "vm1", {"completed", "failed", "postcopy-paused"}, timeout=120
    )
    assert info["status"] == "completed", info.get("error-desc")
    assert info["ram"]["page-size"] == 2 << 20
    assert info["ram"]["postcopy-requests"] > 0
    dinfo = await dst.client.execute("query-migrate", {"guest": "vm1"})
    assert dinfo["status"] == "completed"
    assert sum(dinfo["postcopy-latency-dist"]) > 0
    check = await dst.client.execute("guest-verify", {"guest": "vm1", "method": "counter"})
    assert check["verified"], check
