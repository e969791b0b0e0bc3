"""The CPU latency request held while a migration streams pages (agents/pmqos.py), on the real device."""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import pytest
import trio
from conftest import needs_root, running_agent, start_postcopy_migration

from agents.pmqos import DEVICE, cpu_latency


def held_requests() -> int:
    """This process's open files on the PM QoS device: one per request held."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == DEVICE:
                count += 1
        except OSError:
            pass
    return count


def current_target() -> int:
    """The latency every CPU is held to now: the strictest open request (µs)."""
    with open(DEVICE, "rb") as f:
        return int(struct.unpack("=i", f.read(4))[0])


def needs_device() -> None:
    needs_root()
    if not os.path.exists(DEVICE):
        pytest.skip(f"no {DEVICE} in this kernel")


def test_a_request_is_held_for_the_block_and_ends_with_it() -> None:
    needs_device()
    before = held_requests()
    with cpu_latency(7) as held:
        assert held
        assert held_requests() == before + 1
        assert current_target() <= 7  # another process may ask for less, never more
    assert held_requests() == before


def test_disabled_holds_nothing() -> None:
    before = held_requests()
    with cpu_latency(enabled=False) as held:
        assert not held
        assert held_requests() == before


def test_a_missing_device_is_logged_once_and_the_block_still_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = str(tmp_path / "no-such-device")
    ran = 0
    with caplog.at_level(logging.INFO, logger="godwit.pmqos"):
        for _ in range(3):
            with cpu_latency(device=missing) as held:
                assert not held
                ran += 1
    assert ran == 3
    said = [r.getMessage() for r in caplog.records if "no-such-device" in r.getMessage()]
    assert len(said) == 1 and "No such file or directory" in said[0]


async def _in_postcopy(src, dst) -> None:
    await start_postcopy_migration(
        src, dst, memory="64M", preempt=True, **{"postcopy-blocktime": True}
    )
    # Slow background: postcopy lasts long enough to look at it.
    await src.client.execute(
        "migrate-set-parameters", {"guest": "vm1", "max-postcopy-bandwidth": 8 << 20}
    )
    await src.client.wait_status("vm1", {"postcopy-active"}, timeout=30, poll=0.01)
    await dst.client.wait_status("vm1", {"postcopy-active"}, timeout=30, poll=0.01)


async def _in_precopy(src, dst) -> None:
    """Precopy's stream wakes a thread per frame on each side too: on the VM
    these agents run on, holding the request cut a 1 GiB precopy from 1.6-2.6 s
    to 1.4-1.8 s (interleaved runs)."""
    await src.client.execute("guest-start", {"name": "vm1", "memory": "32M", "workload": "counter"})
    # Slow precopy: it lasts long enough to look at it.
    await src.client.execute("migrate-set-parameters", {"guest": "vm1", "max-bandwidth": 8 << 20})
    await src.client.execute("migrate", {"guest": "vm1", "uri": dst.uri})
    await src.client.wait_status("vm1", {"active"}, timeout=30, poll=0.01)
    await trio.sleep(0.3)  # the destination's guest exists from CONFIG on
    await dst.client.wait_status("vm1", {"active"}, timeout=30, poll=0.01)


@pytest.mark.parametrize("pm_qos", [True, False], ids=["pm-qos", "no-pm-qos"])
@pytest.mark.parametrize("phase", [_in_precopy, _in_postcopy], ids=["precopy", "postcopy"])
async def test_both_agents_hold_a_request_while_pages_stream_and_drop_it_at_the_end(
    short_tmp: Path, pki_dir: Path, pm_qos: bool, phase
) -> None:
    needs_device()
    before = held_requests()
    async with (
        running_agent(short_tmp, pki_dir, "source", listen=False, pm_qos=pm_qos) as src,
        running_agent(short_tmp, pki_dir, "destination", pm_qos=pm_qos) as dst,
    ):
        await phase(src, dst)
        await trio.sleep(0.2)
        during = held_requests() - before
        await src.client.execute(
            "migrate-set-parameters",
            {"guest": "vm1", "max-bandwidth": 0, "max-postcopy-bandwidth": 0},
        )
        await src.client.wait_status("vm1", {"completed"}, timeout=120, poll=0.05)
        await dst.client.wait_status("vm1", {"completed"}, timeout=30, poll=0.05)
        await trio.sleep(0.2)
        after = held_requests() - before
    assert during == (2 if pm_qos else 0)
    assert after == 0
