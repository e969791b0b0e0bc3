"""An agent that goes away, comes back, answers nonsense or is not an agent at all.

The TUI must show the loss plainly, reconnect by itself and never crash.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import tui_scenarios as sc
from fake_agent import WHEN, FakeAgent, eventually

from agents.pki import init_ca, issue_cert
from tui.app import GodwitApp
from tui.client import tls_context
from tui.screens import MigrateForm
from tui.widgets.agent_pane import AgentPane, PaneTitle

pytestmark = pytest.mark.asyncio


def title(pane: AgentPane) -> str:
    return str(pane.query_one(PaneTitle).render())


def log_text(pane: AgentPane) -> list[str]:
    return [line.text for line in pane.query_one("EventLog").lines]  # type: ignore[attr-defined]


async def test_a_lost_agent_is_shown_and_reconnected_by_itself() -> None:
    fake = FakeAgent("src.sock", [sc.guest()])
    fake.set_migration("vm1", sc.postcopy())
    await fake.start()
    app = GodwitApp(["src.sock"], clock=lambda: WHEN, backoff=(0.02, 0.05))
    async with app.run_test(size=(80, 24)) as pilot:
        pane = app.panes[0]
        wait = lambda: pilot.pause(0.01)  # noqa: E731
        await eventually(lambda: pane.refreshes > 0, wait)
        assert "● connected" in title(pane)
        assert app.check_action("pause", ()) is True

        await fake.stop()
        await eventually(lambda: pane.lost is not None, wait)
        assert "LOST" in title(pane)
        assert pane.has_class("-lost")
        assert app.check_action("pause", ()) is False  # nothing is offered to a lost agent
        assert "connection lost: the agent closed the connection" in log_text(pane)
        await eventually(lambda: pane.lost is not None and pane.lost[1] >= 3, wait)
        assert "No such file or directory" in title(pane)  # the retries' own reason

        await fake.start()
        await eventually(lambda: pane.connected and fake.connections == 2, wait)
        await eventually(lambda: app.check_action("pause", ()) is True, wait)
        assert not pane.has_class("-lost")
        assert "● connected" in title(pane)
        # The last known state was kept while the agent was away.
        assert pane.current is not None and pane.current.status == "postcopy-active"
        await pilot.press("z")
        await eventually(lambda: fake.actions() == [("migrate-pause", {"guest": "vm1"})], wait)
    await fake.stop()


async def test_a_command_pending_when_the_agent_dies_fails_at_once() -> None:
    fake = FakeAgent("src.sock", [sc.guest()])
    fake.set_migration("vm1", sc.precopy())
    await fake.start()
    app = GodwitApp(["src.sock"], clock=lambda: WHEN, backoff=(5.0, 5.0))
    async with app.run_test(size=(80, 24)) as pilot:
        pane = app.panes[0]
        wait = lambda: pilot.pause(0.01)  # noqa: E731
        await eventually(lambda: pane.refreshes > 0, wait)
        fake.hang_up_on.add("migrate-start-postcopy")  # takes it, dies before answering
        await pilot.press("p")
        await eventually(lambda: pane.refusal is not None, wait)
        assert pane.refusal is not None
        assert pane.refusal.startswith(
            "migrate-start-postcopy refused: connection to src.sock lost"
        )
    await fake.stop()


GARBAGE = [
    b"this is not json\r\n",
    b"[1, 2, 3]\r\n",
    b'{"return": {}, "id": 99999}\r\n',  # a reply to nothing
    b'{"return": {}, "id": [1]}\r\n',  # an unhashable id
    b'{"error": "not an object"}\r\n',
    b'{"event": "MIGRATION", "data": [1], "timestamp": "x"}\r\n',
    b'{"event": "MIGRATION_PROGRESS", "data": {"guest": "vm1", "info": "lots"}}\r\n',
    b'{"event": "MIGRATION_PROGRESS", "data": {"guest": "vm1", "info": {"ram": 5}}}\r\n',
    b'{"event": "MIGRATION_PASS", "data": {"guest": {"x": 1}, "pass": "many"}}\r\n',
    b'{"event": "MIGRATION", "data": {"guest": "vm1", "status": "on-fire"}}\r\n',
    b'{"QMP": {"version": {}}}\r\n',  # a second greeting
    b"\xff\xfe\x00garbage\r\n",
    b'{"neither": 1}\r\n',
]


async def test_an_agent_that_answers_nonsense_never_crashes_the_app() -> None:
    fake = FakeAgent("src.sock", [sc.guest()])
    fake.set_migration("vm1", sc.precopy())
    await fake.start()
    app = GodwitApp(["src.sock"], clock=lambda: WHEN, backoff=(0.02, 0.05))
    async with app.run_test(size=(80, 24)) as pilot:
        pane = app.panes[0]
        wait = lambda: pilot.pause(0.01)  # noqa: E731
        await eventually(lambda: pane.refreshes > 0, wait)
        for line in GARBAGE:
            await fake.send_raw(line)
        # Answers of the wrong shape, to the TUI's own polling.
        fake.answers["query-guests"] = [sc.guest(), {"name": 5}, "vm9"]
        fake.answers["query-migrate"] = ["not", "info"]
        seen = pane.refreshes
        await fake.push_event("MIGRATION", {"guest": "vm1", "status": "active"})
        await eventually(lambda: pane.refreshes > seen, wait)
        assert pane.nonsense_count >= 8
        assert any("agent sent nonsense" in t for t in log_text(pane))
        assert pane.connected and app.is_running
        # A state the table does not know offers no actions rather than guessing.
        await fake.push_event("MIGRATION", {"guest": "vm1", "status": "on-fire"})
        await eventually(
            lambda: pane.current is not None and pane.current.status == "on-fire", wait
        )
        assert pane.allowed() == frozenset()
        # And good input after all that still works.
        del fake.answers["query-migrate"]
        fake.set_migration("vm1", sc.postcopy())
        await fake.push_event("MIGRATION", {"guest": "vm1", "status": "postcopy-active"})
        await eventually(lambda: app.check_action("pause", ()) is True, wait)
        await pilot.press("z")
        await eventually(lambda: fake.actions() == [("migrate-pause", {"guest": "vm1"})], wait)
        assert fake.connections == 1  # nonsense is reported, not a reason to hang up
    await fake.stop()


async def test_a_peer_that_does_not_greet_is_retried_not_trusted() -> None:
    fake = FakeAgent("src.sock", [sc.guest()])
    fake.greeting = b"SSH-2.0-OpenSSH_9.6\r\n"
    await fake.start()
    app = GodwitApp(["src.sock"], clock=lambda: WHEN, backoff=(0.02, 0.05))
    async with app.run_test(size=(80, 24)) as pilot:
        pane = app.panes[0]
        wait = lambda: pilot.pause(0.01)  # noqa: E731
        await eventually(lambda: fake.connections >= 2, wait)
        assert not pane.connected and pane.lost is not None
        assert "no QMP greeting from src.sock" in pane.lost[0]
        assert fake.received == []  # not even qmp_capabilities
        fake.greeting = None  # a real agent takes the socket over
        await eventually(lambda: pane.refreshes > 0, wait)
        assert pane.current is not None and pane.current.name == "vm1"
    await fake.stop()


def _pki(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    init_ca(tmp)
    issue_cert(tmp, "localhost")
    issue_cert(tmp, "admin")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(tmp / "localhost.pem", tmp / "localhost.key")
    server.load_verify_locations(tmp / "ca.pem")
    server.verify_mode = ssl.CERT_REQUIRED
    return server, tls_context(tmp, "admin")


async def test_tls_agent_with_mutual_authentication(tmp_path: Path) -> None:
    server_ctx, client_ctx = _pki(tmp_path / "pki")
    fake = FakeAgent("unused", [sc.guest()], ssl_context=server_ctx)
    fake.set_migration("vm1", sc.precopy())
    await fake.start()
    app = GodwitApp([f"src={fake.address}"], ssl_context=client_ctx, clock=lambda: WHEN)
    async with app.run_test(size=(80, 24)) as pilot:
        pane = app.panes[0]
        await eventually(lambda: pane.refreshes > 0, lambda: pilot.pause(0.01))
        assert pane.current is not None and pane.current.status == "active"
        await pilot.press("p")
        await eventually(lambda: len(fake.actions()) == 1, lambda: pilot.pause(0.01))
    await fake.stop()
    assert fake.actions() == [("migrate-start-postcopy", {"guest": "vm1"})]


async def test_tls_agent_with_a_foreign_ca_is_refused(tmp_path: Path) -> None:
    server_ctx, _ = _pki(tmp_path / "ours")
    _, foreign_client = _pki(tmp_path / "theirs")
    fake = FakeAgent("unused", [sc.guest()], ssl_context=server_ctx)
    await fake.start()
    app = GodwitApp([fake.address], ssl_context=foreign_client, backoff=(0.05, 0.1))
    async with app.run_test(size=(80, 24)) as pilot:
        pane = app.panes[0]
        await eventually(lambda: pane.lost is not None, lambda: pilot.pause(0.01))
        assert pane.lost is not None and pane.lost[0].startswith("TLS: ")
        assert "CERTIFICATE_VERIFY_FAILED" in pane.lost[0]
        assert not pane.connected
    await fake.stop()
    assert fake.received == []


async def test_agent_text_is_never_taken_for_markup() -> None:
    """Names and error texts come from the agent; a bracket in them must not crash Rich."""
    fake = FakeAgent("src.sock", [sc.guest("[bold]vm[/x]")])
    info = {**sc.failed(), "guest": "[bold]vm[/x]"}
    info["error-desc"] = "[/red] unbalanced [markup"
    info["channels"][0]["name"] = "[/main]"
    fake.set_migration("[bold]vm[/x]", info)
    fake.errors["migrate-set-capabilities"] = "[/oops] refused"
    await fake.start()
    app = GodwitApp(["src.sock"], clock=lambda: WHEN)
    async with app.run_test(size=(80, 24)) as pilot:
        pane = app.panes[0]
        wait = lambda: pilot.pause(0.01)  # noqa: E731
        await eventually(lambda: pane.refreshes > 0, wait)
        await pilot.press("m")
        await eventually(lambda: isinstance(app.screen, MigrateForm), wait)
        app.screen.query_one("#uri").value = "tls:[::1"  # type: ignore[attr-defined]
        await pilot.press("enter")
        app.screen.query_one("#uri").value = "tls:[::1]:4444"  # type: ignore[attr-defined]
        await pilot.press("enter")
        await eventually(lambda: pane.refusal is not None, wait)
        await pilot.pause()
        assert "error: [/red] unbalanced [markup" in str(pane.query_one("ErrorLine").render())
        assert "migrate-set-capabilities refused: [/oops] refused" in pane.refusal  # type: ignore[operator]
        assert app.is_running
    await fake.stop()
