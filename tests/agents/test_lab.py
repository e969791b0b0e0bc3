"""The network-namespace lab: two agents on two hosts joined by a real veth, and faults on it.

One story, as an admin would run it: bring the lab up, migrate a guest
across the link, cut the link and watch a migration fail, heal it and watch
the same guest go, then take the lab down and find nothing left behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import trio

from agents.client import open_client
from agents.lab import NFT_TABLE, Lab, LabError, _alive


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, nftables)"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) not installed"
    if shutil.which("nft") is None:
        return "`nft` not installed (apt-get install nftables)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` unavailable: {probe.stderr.strip()}"
    return None


pytestmark = pytest.mark.skipif(_netns_unavailable() is not None, reason=str(_netns_unavailable()))

PREFIX = "gwt"  # not the default "gw": a lab a person brought up by hand is left alone


async def _migrate(src, guest: str, uri: str) -> dict:
    await src.execute("migrate", {"guest": guest, "uri": uri})
    return await src.wait_status(guest, {"completed", "failed"}, timeout=120)


def _nft_tables_anywhere() -> str:
    return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout


async def test_lab_migrates_across_the_veth_fails_when_cut_and_works_after_heal():
    directory = Path(tempfile.mkdtemp(prefix="gwlab-"))
    lab = Lab(directory, prefix=PREFIX, log_level="warning")
    pids: list[int] = []
    try:
        await lab.up()
        await lab.up()  # already up: a no-op, not an error
        status = await lab.status()
        assert status["up"] and status["reachable"], status
        pids = [h["agent_pid"] for h in status["hosts"]]
        assert [h["address"] for h in status["hosts"]] == ["10.77.0.1/24", "10.77.0.2/24"]

        async with (
            open_client(lab.source_control) as src,
            open_client(lab.destination_control) as dst,
        ):
            assert await src.execute("query-guests") == []
            assert await dst.execute("query-guests") == []
            for name in ("vm1", "vm2"):
                await src.execute(
                    "guest-start",
                    {"name": name, "memory": "64M", "workload": "counter", "fill": "random"},
                )
                await src.execute(
                    "migrate-set-parameters", {"guest": name, "downtime-limit": 20_000}
                )

            # Across the real link, a precopy migration completes and the counter holds.
            info = await _migrate(src, "vm1", lab.destination_uri)
            assert info["status"] == "completed", info.get("error-desc")
            check = await dst.execute("guest-verify", {"guest": "vm1", "method": "counter"})
            assert check["verified"], check

            # Blackhole: the link is up but nothing crosses it.
            await lab.blackhole()
            status = await lab.status()
            assert not status["reachable"]
            assert all(NFT_TABLE in (h["nft"] or "") for h in status["hosts"])
            await lab.heal()
            assert (await lab.status())["reachable"]

            # Cut: the link is down; a migration fails and the guest keeps running at home.
            await lab.cut()
            status = await lab.status()
            assert not status["reachable"]
            assert all(h["link"].startswith("down") for h in status["hosts"]), status
            info = await _migrate(src, "vm2", lab.destination_uri)
            assert info["status"] == "failed", info
            state = await src.execute("query-status", {"guest": "vm2"})
            assert state["running"], state

            # Heal: the same guest goes.
            await lab.heal()
            info = await _migrate(src, "vm2", lab.destination_uri)
            assert info["status"] == "completed", info.get("error-desc")
            check = await dst.execute("guest-verify", {"guest": "vm2", "method": "counter"})
            assert check["verified"], check
    finally:
        with trio.CancelScope(shield=True):
            await lab.down()
        try:
            assert await lab.namespaces() == set()
            assert NFT_TABLE not in _nft_tables_anywhere()
            assert pids and not any(_alive(pid) for pid in pids)
            assert not lab.source_control.exists() and not lab.destination_control.exists()
        finally:
            shutil.rmtree(directory, ignore_errors=True)


async def test_down_cleans_a_half_built_lab_and_up_refuses_one():
    directory = Path(tempfile.mkdtemp(prefix="gwlab-"))
    lab = Lab(directory, prefix=PREFIX)
    try:
        # Half built: one namespace and nothing else, as a crash in `up` might leave.
        await trio.run_process(["ip", "netns", "add", lab.source.namespace])
        with pytest.raises(LabError, match=r"half up.*lab down"):
            await lab.up()
        done = await lab.down()
        assert f"deleted namespace {lab.source.namespace}" in done
        assert await lab.namespaces() == set()
        with pytest.raises(LabError, match="not up"):
            await lab.cut()
    finally:
        with trio.CancelScope(shield=True):
            await lab.down()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("fault", ["cut", "blackhole"])
async def test_postcopy_over_the_lab_pauses_on_a_broken_link_and_recovers(fault):
    """Issue 6's story on a real link: postcopy between two namespaces, the veth
    breaks (link down, or an nftables drop: a hung link), both agents pause, the
    link heals, migrate-recover + resume, the guest completes and is whole."""
    directory = Path(tempfile.mkdtemp(prefix="gwlab-"))
    lab = Lab(directory, prefix=PREFIX, log_level="warning")
    try:
        await lab.up()
        async with (
            open_client(lab.source_control) as src,
            open_client(lab.destination_control) as dst,
        ):
            await src.execute(
                "guest-start",
                {"name": "vm1", "memory": "64M", "workload": "counter", "fill": "mixed:60%"},
            )
            await src.execute(
                "migrate-set-capabilities",
                {
                    "guest": "vm1",
                    "capabilities": [
                        {"capability": "postcopy-ram", "state": True},
                        {"capability": "postcopy-preempt", "state": True},
                    ],
                },
            )
            await src.execute(
                "migrate-set-parameters",
                {
                    "guest": "vm1",
                    "max-bandwidth": 8 << 20,
                    "max-postcopy-bandwidth": 8 << 20,
                    "keepalive-ms": 500,
                },
            )
            await src.execute("migrate", {"guest": "vm1", "uri": lab.destination_uri})
            await src.wait_status("vm1", {"active"}, timeout=30, poll=0.02)
            await src.execute("migrate-start-postcopy", {"guest": "vm1"})
            info = await src.wait_status(
                "vm1", {"postcopy-active", "failed"}, timeout=30, poll=0.02
            )
            assert info["status"] == "postcopy-active", info.get("error-desc")
            await trio.sleep(0.3)
            await (lab.cut() if fault == "cut" else lab.blackhole())
            for client in (src, dst):
                paused = await client.wait_status(
                    "vm1", {"postcopy-paused", "completed", "failed"}, timeout=60, poll=0.05
                )
                assert paused["status"] == "postcopy-paused", paused
            await lab.heal()
            await src.execute(
                "migrate-set-parameters", {"guest": "vm1", "max-postcopy-bandwidth": 0}
            )
            # As an admin would: recover, and recover again should a loaded host miss
            # a PONG deadline meanwhile (the guest waits safely while paused).
            for _attempt in range(3):
                await dst.wait_status("vm1", {"postcopy-paused"}, timeout=60, poll=0.05)
                await dst.execute("migrate-recover", {"guest": "vm1", "uri": lab.destination_uri})
                await src.wait_status("vm1", {"postcopy-paused"}, timeout=60, poll=0.05)
                await src.execute(
                    "migrate", {"guest": "vm1", "uri": lab.destination_uri, "resume": True}
                )
                done = await src.wait_status(
                    "vm1", {"completed", "failed", "postcopy-paused"}, timeout=120, poll=0.1
                )
                if done["status"] != "postcopy-paused":
                    break
            assert done["status"] == "completed", done.get("error-desc")
            assert done["pauses"] >= 1 and done["recoveries"] >= 1
            check = await dst.execute("guest-verify", {"guest": "vm1", "method": "counter"})
            assert check["verified"], check
    finally:
        with trio.CancelScope(shield=True):
            await lab.down()
        shutil.rmtree(directory, ignore_errors=True)
