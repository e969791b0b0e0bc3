"""An agent that stops (SIGTERM) leaves its guests running; the next one adopts them."""

from __future__ import annotations

import contextlib
import json
import os
import signal

import pytest
import trio

from agents.demo import agent_process, make_pki

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (userfaultfd, PAGEMAP_SCAN)")


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read().lower()
    except FileNotFoundError:
        return False


async def test_guests_outlive_an_agent_restart_and_are_adopted(short_tmp):
    make_pki(short_tmp)
    state = ["--state-dir", str(short_tmp / "state")]
    try:
        await _story(short_tmp, state)
    finally:
        # A guest outlives its agent by design: never leave one behind, pass or fail.
        for record in (short_tmp / "state" / "guests").glob("*.json"):
            with contextlib.suppress(ProcessLookupError, ValueError, OSError):
                os.kill(json.loads(record.read_text())["pid"], signal.SIGKILL)


async def _story(short_tmp, state):
    async with agent_process(short_tmp, "source", listen=False, extra=state) as agent:
        info = await agent.execute(
            "guest-start", {"name": "vm1", "memory": "32M", "workload": "counter"}
        )
        pid = info["pid"]
        assert (await agent.execute("guest-verify", {"guest": "vm1"}))["verified"]
    # agent_process sent SIGTERM and reaped the agent: the guest must still be there.
    assert _alive(pid)
    await trio.sleep(0.3)
    async with agent_process(short_tmp, "source", listen=False, extra=state) as agent:
        [guest] = await agent.execute("query-guests")
        assert guest["name"] == "vm1" and guest["pid"] == pid and guest["status"] == "running"
        check = await agent.execute("guest-verify", {"guest": "vm1", "method": "counter"})
        assert check["verified"], check
        await agent.execute("guest-stop", {"guest": "vm1"})
    with trio.fail_after(10):
        while _alive(pid):
            await trio.sleep(0.05)
