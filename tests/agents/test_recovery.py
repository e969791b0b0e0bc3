"""Postcopy recovery: the link breaks mid-postcopy, both sides pause, an admin recovers.

The source reaches the destination through a FaultProxy so a test can cut
the link (both ends see a reset) or blackhole it (a hung link: no error, no
data — only the keepalive deadline notices).  After each story the guest's
memory is checked on the destination.
"""

from __future__ import annotations

import os
import random

import pytest
import trio

from agents.client import CommandFailed
from agents.faults import FaultProxy

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (userfaultfd, PAGEMAP_SCAN)")

KEEPALIVE_MS = 500  # deadline 1.5 s: a loaded 2-core CI box must not miss PONGs
DEADLINE = 3 * KEEPALIVE_MS / 1000
PAUSED = {"postcopy-paused"}


async def _postcopy_through(proxy, src, dst, *, preempt):
    await src.client.execute(
        "guest-start", {"name": "vm1", "memory": "64M", "workload": "counter", "fill": "mixed:60%"}
    )
    await src.client.execute(
        "migrate-set-capabilities",
        {
            "guest": "vm1",
            "capabilities": [
                {"capability": "postcopy-ram", "state": True},
                {"capability": "postcopy-preempt", "state": preempt},
            ],
        },
    )
    await src.client.execute(
        "migrate-set-parameters",
        {
            "guest": "vm1",
            "max-bandwidth": 8 << 20,
            "max-postcopy-bandwidth": 16 << 20,
            "keepalive-ms": KEEPALIVE_MS,
        },
    )
    await src.client.execute("migrate", {"guest": "vm1", "uri": f"tls:127.0.0.1:{proxy.port}"})
    await src.client.wait_status("vm1", {"active"}, timeout=30, poll=0.02)
    await src.client.execute("migrate-start-postcopy", {"guest": "vm1"})
    info = await src.client.wait_status("vm1", {"postcopy-active", "failed"}, timeout=30, poll=0.02)
    assert info["status"] == "postcopy-active", info.get("error-desc")


async def _both(src, dst, statuses, timeout):
    s = await src.client.wait_status("vm1", statuses, timeout=timeout, poll=0.02)
    d = await dst.client.wait_status("vm1", statuses, timeout=timeout, poll=0.02)
    return s, d


async def _recover(proxy, src, dst):
    await dst.client.execute("migrate-recover", {"guest": "vm1", "uri": dst.uri})
    await src.client.execute(
        "migrate", {"guest": "vm1", "uri": f"tls:127.0.0.1:{proxy.port}", "resume": True}
    )


async def _finish_and_verify(src, dst, *, pauses=1, recoveries=1, destination_pauses=None):
    info = await src.client.wait_status("vm1", {"completed", "failed"}, timeout=120)
    assert info["status"] == "completed", info.get("error-desc")
    dinfo = await dst.client.execute("query-migrate", {"guest": "vm1"})
    assert dinfo["status"] == "completed"
    assert info["pauses"] == pauses and info["recoveries"] == recoveries
    expected = pauses if destination_pauses is None else destination_pauses
    assert dinfo["pauses"] in ((expected,) if isinstance(expected, int) else expected)
    assert dinfo["recoveries"] == recoveries
    check = await dst.client.execute("guest-verify", {"guest": "vm1", "method": "counter"})
    assert check["verified"], check


@pytest.mark.parametrize("preempt", [False, True], ids=["plain", "preempt"])
@pytest.mark.parametrize("fault", ["cut", "blackhole"])
async def test_link_failure_mid_postcopy_pauses_both_sides_and_recovery_completes(
    pair, preempt, fault
):
    src, dst = pair
    async with FaultProxy(target_port=dst.agent.listen_port) as proxy:
        await _postcopy_through(proxy, src, dst, preempt=preempt)
        await trio.sleep(random.uniform(0, 0.3))
        getattr(proxy, fault)()
        s, d = await _both(src, dst, PAUSED, timeout=10 * DEADLINE + 10)
        assert "paused" in s["error-desc"] and "paused" in d["error-desc"]
        # Nothing was thrown away: the destination guest still exists, blocked or running.
        [guest] = await dst.client.execute("query-guests")
        assert guest["status"] == "running" and guest["pid"]
        with pytest.raises(CommandFailed, match="not possible"):
            await src.client.execute("migrate-cancel", {"guest": "vm1"})
        proxy.heal()
        await _recover(proxy, src, dst)
        await _finish_and_verify(src, dst)


async def test_a_second_failure_during_recovery_pauses_again_and_a_retry_completes(pair):
    src, dst = pair
    async with FaultProxy(target_port=dst.agent.listen_port) as proxy:
        await _postcopy_through(proxy, src, dst, preempt=True)
        proxy.cut()
        await _both(src, dst, PAUSED, timeout=10 * DEADLINE + 10)
        proxy.cut_after(200)  # the recovery handshake itself breaks
        await _recover(proxy, src, dst)
        s, _d = await _both(src, dst, PAUSED, timeout=60)
        assert "recovery failed" in s["error-desc"] or "paused" in s["error-desc"]
        proxy.heal()
        await _recover(proxy, src, dst)
        # The source paused twice (the failed recovery); the destination may not even
        # have seen the broken handshake, depending on where the cut fell.
        await _finish_and_verify(src, dst, pauses=2, recoveries=1, destination_pauses=(1, 2))


async def test_migrate_pause_forces_a_pause_and_resume_continues(pair):
    src, dst = pair
    async with FaultProxy(target_port=dst.agent.listen_port) as proxy:
        await _postcopy_through(proxy, src, dst, preempt=False)
        await src.client.execute("migrate-pause", {"guest": "vm1"})
        s, _d = await _both(src, dst, PAUSED, timeout=30)
        assert "migrate-pause" in s["error-desc"]
        await _recover(proxy, src, dst)
        await _finish_and_verify(src, dst)


async def test_resume_channels_are_refused_until_migrate_recover(pair, pki_dir):
    src, dst = pair
    async with FaultProxy(target_port=dst.agent.listen_port) as proxy:
        await _postcopy_through(proxy, src, dst, preempt=False)
        proxy.cut()
        await _both(src, dst, PAUSED, timeout=10 * DEADLINE + 10)
        # The source tries before the admin ran migrate-recover on the destination: refused, paused again.
        await src.client.execute(
            "migrate", {"guest": "vm1", "uri": f"tls:127.0.0.1:{proxy.port}", "resume": True}
        )
        info = await src.client.wait_status("vm1", PAUSED, timeout=60, poll=0.05)
        assert "migrate-recover" in info["error-desc"]
        await _recover(proxy, src, dst)
        await _finish_and_verify(src, dst, pauses=2, destination_pauses=1)


@pytest.mark.slow
async def test_soak_twenty_cuts_and_recoveries_in_one_postcopy(pair):
    """The cut/recover story again and again on one migration: nothing lost, ever."""
    src, dst = pair
    rounds = 20
    async with FaultProxy(target_port=dst.agent.listen_port) as proxy:
        await src.client.execute(
            "guest-start",
            {"name": "vm1", "memory": "256M", "workload": "counter", "fill": "mixed:60%"},
        )
        await src.client.execute(
            "migrate-set-capabilities",
            {
                "guest": "vm1",
                "capabilities": [
                    {"capability": "postcopy-ram", "state": True},
                    {"capability": "postcopy-preempt", "state": True},
                ],
            },
        )
        await src.client.execute(
            "migrate-set-parameters",
            {
                "guest": "vm1",
                "max-bandwidth": 8 << 20,
                "max-postcopy-bandwidth": 2 << 20,
                "keepalive-ms": KEEPALIVE_MS,
            },
        )
        await src.client.execute("migrate", {"guest": "vm1", "uri": f"tls:127.0.0.1:{proxy.port}"})
        await src.client.wait_status("vm1", {"active"}, timeout=30, poll=0.02)
        await src.client.execute("migrate-start-postcopy", {"guest": "vm1"})
        await src.client.wait_status("vm1", {"postcopy-active"}, timeout=30, poll=0.02)
        for n in range(rounds):
            await trio.sleep(random.uniform(0.05, 0.4))
            (proxy.cut if n % 2 == 0 else proxy.blackhole)()
            await _both(src, dst, PAUSED, timeout=10 * DEADLINE + 10)
            proxy.heal()
            await _recover(proxy, src, dst)
            await _both(src, dst, {"postcopy-active", "completed"}, timeout=60)
        # Let it finish at full speed.
        await src.client.execute(
            "migrate-set-parameters", {"guest": "vm1", "max-postcopy-bandwidth": 0}
        )
        info = await src.client.wait_status("vm1", {"completed", "failed"}, timeout=300)
        assert info["status"] == "completed", info.get("error-desc")
        assert info["recoveries"] == rounds
        check = await dst.client.execute("guest-verify", {"guest": "vm1", "method": "counter"})
        assert check["verified"], check


def _migration(agent, role):
    """The one migration an in-process agent runs."""
    if role == "destination":
        [migration] = agent.incoming.values()
    else:
        [migration] = [e.migration for e in agent.guests.values() if e.migration is not None]
    return migration


@pytest.mark.parametrize("role", ["destination", "source"])
async def test_a_preempt_worker_killed_mid_postcopy_pauses_and_recovery_starts_another(pair, role):
    """Postcopy must survive its request path dying: the agent pauses (no host has
    the whole guest), and recovery runs with a new worker."""
    src, dst = pair
    async with FaultProxy(target_port=dst.agent.listen_port) as proxy:
        await _postcopy_through(proxy, src, dst, preempt=True)
        migration = _migration(dst.agent if role == "destination" else src.agent, role)
        worker = migration.worker
        assert worker is not None and worker.process is not None
        worker.process.kill()
        s, d = await _both(src, dst, PAUSED, timeout=10 * DEADLINE + 10)
        mine = d if role == "destination" else s
        assert "worker failed" in mine["error-desc"], mine["error-desc"]
        await _recover(proxy, src, dst)
        await _finish_and_verify(src, dst)
    assert migration.worker is not worker  # a new one served the rest
    assert migration.worker.stopped.is_set()  # and was stopped at the end, not killed
