"""The TUI against two real ``godwit agent`` processes: a paused postcopy driven to the end by keys.

Everything an admin would do in the TUI is done with key presses through
Pilot at 80×24 (one pane at a time, ``1``/``2`` to switch): the migrate form,
``p`` to switch to postcopy, ``z`` to pause, ``r`` on the destination to
recover, ``r`` on the source to resume.  Only what the TUI does not offer —
starting the guest, the destination's port, lifting the postcopy bandwidth cap
after the resume, the final memory check — goes over the TUI's own control
client.  Real TLS, real userfaultfd: root only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Input

from agents.demo import make_pki
from tui.app import GodwitApp
from tui.screens import MigrateForm, Tick, UriPrompt
from tui.widgets.agent_pane import AgentPane
from tui.widgets.eventlog import EventLog

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.skipif(os.geteuid() != 0, reason="real agents need root (userfaultfd, pagemap)"),
]

KEEPALIVE_MS = 5000
"""Long on purpose.  The agents set TCP_USER_TIMEOUT to twice the keepalive, so 300 ms
kills plain precopy with ETIMEDOUT whenever the machine is loaded (seen here, load 20 on
2 cores); this test pauses with migrate-pause, which closes the links, so a short
keepalive would buy nothing."""

GIVE_UP = 90.0
"""Seconds after which a wait fails the test instead of hanging it; not a timing claim."""


@contextlib.asynccontextmanager
async def agent(workdir: Path, name: str, *, listen: bool) -> AsyncIterator[str]:
    """``godwit agent`` as a child process; yields its control socket (relative to the cwd)."""
    sock = f"{name}.sock"
    cmd = [sys.executable, "-m", "agents.cli", "agent", "--name", name]
    cmd += ["--pki", str(workdir / "pki"), "--control", sock, "--log-level", "warning"]
    if listen:
        cmd += ["--listen", "127.0.0.1:0"]
    log = (workdir / f"{name}.log").open("wb")
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=log, stderr=asyncio.subprocess.STDOUT)
    try:
        for _ in range(400):
            if await asyncio.to_thread(os.path.exists, sock) or proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        if not await asyncio.to_thread(os.path.exists, sock):
            raise RuntimeError(
                f"agent {name} did not start: {(workdir / f'{name}.log').read_text()}"
            )
        yield sock
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


async def until(pilot: Pilot[Any], check: Callable[[], bool], what: str) -> None:
    """Wait for ``check``; fail at once, in the agent's own words, if either side's
    migration failed, and after GIVE_UP seconds otherwise."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GIVE_UP
    while not check():
        app = pilot.app
        for pane in app.panes if isinstance(app, GodwitApp) else ():
            state = pane.current
            if state is not None and state.status == "failed":
                desc = state.info.error_desc if state.info else None
                raise AssertionError(f"waiting for {what}: {pane.agent_name} failed: {desc}")
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await pilot.pause(0.05)


def status(pane: AgentPane) -> str | None:
    state = pane.current
    return state.status if state is not None else None


def offered(app: GodwitApp) -> set[str]:
    """The actions the footer offers now (what the keys would do)."""
    return {b.binding.action for b in app.screen.active_bindings.values() if b.enabled}


def logged(pane: AgentPane, text: str) -> bool:
    return any(line.text == text for line in pane.query_one(EventLog).lines)


async def test_a_paused_postcopy_is_recovered_and_resumed_from_the_keyboard(tmp_path: Path) -> None:
    make_pki(tmp_path)
    async with (
        agent(tmp_path, "source", listen=False) as src_sock,
        agent(tmp_path, "destination", listen=True) as dst_sock,
    ):
        app = GodwitApp(
            [f"source={src_sock}", f"destination={dst_sock}"],
            poll_interval=0.5,
            backoff=(0.05, 0.5),
        )
        async with app.run_test(size=(80, 24)) as pilot:
            src, dst = app.panes
            await until(pilot, lambda: src.connected and dst.connected, "both agents")
            assert not app.side_by_side  # 80 columns: one pane at a time, as over ssh
            port = (await dst.client.execute("migrate-incoming", {"uri": "defer"}))["port"]
            uri = f"tls:127.0.0.1:{port}"
            await src.client.execute(
                "guest-start",
                {"name": "vm1", "memory": "64M", "workload": "counter", "fill": "random"},
            )
            await src.client.execute(
                "migrate-set-parameters",
                {"guest": "vm1", "max-bandwidth": 8 << 20, "keepalive-ms": KEEPALIVE_MS},
            )
            await src.client.execute(
                "migrate-set-capabilities",
                {"guest": "vm1", "capabilities": [{"capability": "postcopy-ram", "state": True}]},
            )
            await until(pilot, lambda: "migrate" in offered(app), "m offered")

            # The form starts from what the agent has: postcopy on, 8M precopy bandwidth.
            await pilot.press("m")
            await until(pilot, lambda: isinstance(app.screen, MigrateForm), "the form")
            form = app.screen
            assert form.query_one("#postcopy-ram", Tick).value is True
            assert form.query_one("#max-bandwidth", Input).value == "8M"
            # Typed into the fields (Pilot waits for an idle app after every key, and an app
            # watching a live migration is never idle for long: a key costs up to 2 s).
            form.query_one("#uri", Input).value = uri
            form.query_one("#max-postcopy-bandwidth", Input).value = "4M"
            await pilot.press("enter")
            await until(pilot, lambda: status(src) == "active", "precopy")
            await until(
                pilot,
                lambda: (
                    ((src.current and src.current.info and src.current.info.ram.transferred) or 0)
                    > 4 << 20
                ),
                "some precopy",
            )

            await pilot.press("p")
            await until(pilot, lambda: status(src) == "postcopy-active", "postcopy on the source")
            assert "pause" in offered(app)
            await pilot.press("z")
            await until(pilot, lambda: status(src) == "postcopy-paused", "the source paused")
            assert {"resume"} <= offered(app) and "recover" not in offered(app)
            await until(pilot, lambda: status(dst) == "postcopy-paused", "the destination paused")

            await pilot.press("2")  # the destination: recover, listening on its own address
            assert app.current is dst
            assert "recover" in offered(app) and "resume" not in offered(app)
            await pilot.press("r")
            await until(pilot, lambda: isinstance(app.screen, UriPrompt), "the recover prompt")
            app.screen.query_one(Input).value = uri
            await pilot.press("enter")
            await until(pilot, lambda: logged(dst, "migrate-recover ok"), "migrate-recover")

            await pilot.press("1")  # the source: resume to the same address
            assert app.current is src
            await pilot.press("r")
            await until(pilot, lambda: isinstance(app.screen, UriPrompt), "the resume prompt")
            prompt_uri = app.screen.query_one(Input)
            assert prompt_uri.value == uri  # offered: where it migrated to
            await pilot.press("enter")
            await until(pilot, lambda: logged(src, "migrate ok"), "the resume")
            # Not a TUI action: let the rest of RAM go at full speed.
            await src.client.execute(
                "migrate-set-parameters", {"guest": "vm1", "max-postcopy-bandwidth": 0}
            )
            await until(pilot, lambda: status(src) == "completed", "the source done")
            await until(pilot, lambda: status(dst) == "completed", "the destination done")
            src_info = src.current.info if src.current else None
            assert src_info is not None and status(src) == "completed", src_info
            assert status(dst) == "completed"
            # The figures the TUI shows came from the agents: one pause, one recovery, each side.
            await until(
                pilot,
                lambda: bool(dst.current and dst.current.info and dst.current.info.recoveries),
                "the destination's final figures",
            )
            for pane in (src, dst):
                info = pane.current.info if pane.current else None
                assert info is not None and (info.pauses, info.recoveries) == (1, 1), (
                    pane.agent_name
                )
            check = await dst.client.execute("guest-verify", {"guest": "vm1", "method": "counter"})
            assert check["verified"], check
