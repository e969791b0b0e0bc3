"""Every action, driven by keys against a fake agent that records what it was sent.

Each test puts the fake agent's guest in a state, lets the TUI see it, presses
the keys an admin would, and checks the exact command and arguments the agent
received — and that keys the state table forbids send nothing at all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import tui_scenarios as sc
from fake_agent import WHEN, FakeAgent, eventually
from textual.pilot import Pilot
from textual.widgets import Input

from protocol.states import MigrationStatus, Role, allowed_commands, is_terminal
from tui.app import ACTION_COMMANDS, GodwitApp
from tui.screens import Confirm, MigrateForm, Tick, UriPrompt

pytestmark = pytest.mark.asyncio  # collected as asyncio items (strict mode needs the mark early)

KEYS = {
    "migrate": "m",
    "postcopy": "p",
    "pause": "z",
    "recover": "r",
    "resume": "r",
    "continue": "c",
    "cancel": "x",
}


@asynccontextmanager
async def session(*fakes: FakeAgent, size: tuple[int, int] = (80, 24)) -> AsyncIterator[Pilot[Any]]:
    """Start the fakes and the app, and wait for the app's first look at every agent."""
    for fake in fakes:
        await fake.start()
    app = GodwitApp([f.address for f in fakes], clock=lambda: WHEN, backoff=(0.02, 0.1))
    try:
        async with app.run_test(size=size) as pilot:
            await eventually(lambda: all(p.refreshes > 0 for p in app.panes), pause(pilot))
            yield pilot
    finally:
        for fake in fakes:
            await fake.stop()


def pause(pilot: Pilot[Any]) -> Any:
    return lambda: pilot.pause(0.01)


def fake_in(role: str, status: str, info: dict[str, Any] | None = None) -> FakeAgent:
    fake = FakeAgent("agent.sock", [sc.guest()])
    if status != "none" or info is not None:
        base = info if info is not None else sc.precopy(role, status)
        fake.set_migration("vm1", {**base, "role": role, "status": status})
    return fake


async def wait_actions(pilot: Pilot[Any], fake: FakeAgent, n: int) -> list[tuple[str, dict]]:
    await eventually(lambda: len(fake.actions()) >= n, pause(pilot))
    await pilot.pause()
    return fake.actions()


async def open_form(pilot: Pilot[Any]) -> MigrateForm:
    """Press m and wait for the form (it opens once the agent said what is set now)."""
    await pilot.press("m")
    await eventually(lambda: isinstance(pilot.app.screen, MigrateForm), pause(pilot))
    form = pilot.app.screen
    assert isinstance(form, MigrateForm)
    return form


async def test_start_migration_form_sends_capabilities_parameters_then_migrate() -> None:
    fake = fake_in("source", "none")
    async with session(fake) as pilot:
        form = await open_form(pilot)
        form.query_one("#uri", Input).value = "tls:dst.lab:4444"
        form.query_one("#downtime-limit", Input).value = "250"
        await pilot.press("tab", "tab", *"5G")  # bandwidth, typed
        await pilot.press("tab", *"64M")  # postcopy bandwidth
        await pilot.press("tab", "4")  # multifd channels
        await pilot.press("tab", "space")  # postcopy
        await pilot.press("tab", "space")  # preempt
        await pilot.press("tab", "space")  # multifd
        await pilot.press("shift+tab", "shift+tab", "shift+tab", "enter")
        actions = await wait_actions(pilot, fake, 3)
    assert actions == [
        (
            "migrate-set-capabilities",
            {
                "guest": "vm1",
                "capabilities": [
                    {"capability": "postcopy-ram", "state": True},
                    {"capability": "postcopy-preempt", "state": True},
                    {"capability": "multifd", "state": True},
                    {"capability": "auto-converge", "state": False},
                    {"capability": "pause-before-switchover", "state": False},
                ],
            },
        ),
        (
            "migrate-set-parameters",
            {
                "guest": "vm1",
                "downtime-limit": 250,
                "max-bandwidth": 5 << 30,
                "max-postcopy-bandwidth": 64 << 20,
                "multifd-channels": 4,
            },
        ),
        ("migrate", {"guest": "vm1", "uri": "tls:dst.lab:4444"}),
    ]


async def test_the_form_starts_from_the_agents_settings_and_sends_only_changes() -> None:
    """What an admin set another way (the CLI, a script) is shown, and kept unless changed."""
    fake = fake_in("source", "none")
    fake.capabilities["vm1"] = {"postcopy-ram": True, "postcopy-preempt": True}
    fake.parameters["vm1"] = {"max-bandwidth": 8 << 20, "downtime-limit": 500, "keepalive-ms": 300}
    async with session(fake) as pilot:
        form = await open_form(pilot)
        assert form.query_one("#max-bandwidth", Input).value == "8M"
        assert form.query_one("#downtime-limit", Input).value == "500"
        assert form.query_one("#max-postcopy-bandwidth", Input).value == ""  # unset: unlimited
        assert form.query_one("#postcopy-ram", Tick).value is True
        assert form.query_one("#multifd", Tick).value is False
        # On and off differ in the glyph, not only in colour (tmux without colours, mono).
        assert str(form.query_one("#postcopy-ram", Tick).render()).startswith("▐X▌")
        assert str(form.query_one("#multifd", Tick).render()).startswith("▐ ▌")
        form.query_one("#uri", Input).value = "tls:dst.lab:4444"
        form.query_one("#max-bandwidth", Input).value = ""  # emptied: unlimited again
        await pilot.press("enter")
        actions = await wait_actions(pilot, fake, 3)
    caps = {c["capability"]: c["state"] for c in actions[0][1]["capabilities"]}
    assert caps["postcopy-ram"] and caps["postcopy-preempt"] and not caps["multifd"]
    assert actions[1] == ("migrate-set-parameters", {"guest": "vm1", "max-bandwidth": 0})
    assert actions[2] == ("migrate", {"guest": "vm1", "uri": "tls:dst.lab:4444"})


async def test_migrate_form_refuses_a_bad_uri_and_sends_nothing() -> None:
    fake = fake_in("source", "none")
    async with session(fake) as pilot:
        form = await open_form(pilot)
        form.query_one("#uri", Input).value = "dst.lab:4444"
        await pilot.press("enter")
        assert isinstance(form, MigrateForm)  # still open, with the reason shown
        assert "scheme must be one of" in str(form.query_one("#problem").render())
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(pilot.app.screen, MigrateForm)
    assert fake.actions() == []


async def test_migrate_without_parameters_sends_no_set_parameters() -> None:
    fake = fake_in("source", "completed", sc.completed())
    async with session(fake) as pilot:
        form = await open_form(pilot)
        assert form.query_one("#uri", Input).value == "tls:dst.lab:4444"  # last URI offered
        await pilot.press("enter")
        actions = await wait_actions(pilot, fake, 2)
    assert [name for name, _ in actions] == ["migrate-set-capabilities", "migrate"]
    assert actions[1] == ("migrate", {"guest": "vm1", "uri": "tls:dst.lab:4444"})


async def test_switch_to_postcopy() -> None:
    fake = fake_in("source", "active")
    async with session(fake) as pilot:
        await pilot.press("p")
        actions = await wait_actions(pilot, fake, 1)
    assert actions == [("migrate-start-postcopy", {"guest": "vm1"})]


async def test_pause_postcopy() -> None:
    fake = fake_in("destination", "postcopy-active", sc.postcopy("destination"))
    async with session(fake) as pilot:
        await pilot.press("z")
        actions = await wait_actions(pilot, fake, 1)
    assert actions == [("migrate-pause", {"guest": "vm1"})]


async def test_continue_from_pre_switchover() -> None:
    fake = fake_in("source", "pre-switchover")
    async with session(fake) as pilot:
        await pilot.press("c")
        actions = await wait_actions(pilot, fake, 1)
    assert actions == [("migrate-continue", {"guest": "vm1", "state": "pre-switchover"})]


async def test_recover_on_the_destination_asks_for_the_uri() -> None:
    fake = fake_in("destination", "postcopy-paused", sc.paused("destination"))
    async with session(fake) as pilot:
        await pilot.press("r")
        prompt = pilot.app.screen
        assert isinstance(prompt, UriPrompt)
        assert prompt.title_text.startswith("Recover vm1")
        prompt.query_one(Input).value = "tls:0.0.0.0:4455"
        await pilot.press("enter")
        actions = await wait_actions(pilot, fake, 1)
    assert actions == [("migrate-recover", {"guest": "vm1", "uri": "tls:0.0.0.0:4455"})]


async def test_after_recover_the_destination_says_its_part_is_done() -> None:
    """A real destination stays postcopy-paused until the source resumes, and reports
    where the migration came from as its ``uri``: no address to offer for recover."""
    info = sc.paused("destination")
    info["uri"] = "from source"
    info["error-desc"] = "paused: TLS connection with 10.0.0.1:4444 failed: Broken pipe"
    fake = fake_in("destination", "postcopy-paused", info)
    async with session(fake) as pilot:
        pane = pilot.app.panes[0]
        assert "why: paused: TLS connection" in str(pane.query_one("ErrorLine").render())
        await pilot.press("r")
        prompt = pilot.app.screen
        assert isinstance(prompt, UriPrompt)
        assert prompt.query_one(Input).value == ""  # "from source" is not a URI
        prompt.query_one(Input).value = "tls:0.0.0.0:4455"
        await pilot.press("enter")
        await wait_actions(pilot, fake, 1)
        line = pane.query_one("StatusLine")
        await eventually(lambda: "ready: resume the source" in str(line.render()), pause(pilot))
        fake.set_migration("vm1", {**info, "status": "postcopy-recover"})
        await fake.push_event("MIGRATION", {"guest": "vm1", "status": "postcopy-recover"})
        await eventually(lambda: "ready" not in str(line.render()), pause(pilot))
        assert "received 960 MiB of a 1.00 GiB guest" in str(pane.query_one("TransferBar").render())


async def test_a_guest_that_arrived_can_be_migrated_on_from_its_new_host() -> None:
    fake = fake_in("destination", "completed", sc.completed("destination"))
    async with session(fake) as pilot:
        form = await open_form(pilot)
        form.query_one("#uri", Input).value = "tls:src.lab:4444"
        await pilot.press("enter")
        actions = await wait_actions(pilot, fake, 2)
    assert actions[-1] == ("migrate", {"guest": "vm1", "uri": "tls:src.lab:4444"})


async def test_resume_on_the_source_is_migrate_with_resume() -> None:
    fake = fake_in("source", "postcopy-paused", sc.paused("source"))
    async with session(fake) as pilot:
        await pilot.press("r")
        prompt = pilot.app.screen
        assert isinstance(prompt, UriPrompt)
        assert prompt.title_text.startswith("Resume vm1")
        assert prompt.query_one(Input).value == "tls:dst.lab:4444"  # the URI it migrated to
        await pilot.press("enter")
        actions = await wait_actions(pilot, fake, 1)
    assert actions == [("migrate", {"guest": "vm1", "uri": "tls:dst.lab:4444", "resume": True})]


async def test_cancel_needs_a_yes() -> None:
    fake = fake_in("source", "active")
    async with session(fake) as pilot:
        await pilot.press("x")
        assert isinstance(pilot.app.screen, Confirm)
        await pilot.press("n")
        await pilot.pause()
        assert not isinstance(pilot.app.screen, Confirm)
        await pilot.press("x", "escape")
        await pilot.pause()
        assert fake.actions() == []
        await pilot.press("x", "y")
        actions = await wait_actions(pilot, fake, 1)
    assert actions == [("migrate-cancel", {"guest": "vm1"})]


async def test_a_refusal_is_shown_in_the_agents_words() -> None:
    fake = fake_in("source", "active")
    fake.errors["migrate-start-postcopy"] = "postcopy-ram capability is not enabled"
    async with session(fake) as pilot:
        await pilot.press("p")
        pane = pilot.app.panes[0]
        await eventually(lambda: pane.refusal is not None, pause(pilot))
        assert pane.refusal == (
            "migrate-start-postcopy refused: postcopy-ram capability is not enabled"
        )
        assert "postcopy-ram capability is not enabled" in str(pane.query_one("ErrorLine").render())


ALL_STATES = [(role, status) for role in Role for status in MigrationStatus]


async def test_keys_follow_the_state_table_in_every_state() -> None:
    """For every (role, status): the footer offers exactly what allowed_commands allows,
    and every other action, run as its key would run it, is refused and sends nothing."""
    fake = fake_in("source", "none")
    async with session(fake) as pilot:
        app = pilot.app
        pane = app.panes[0]
        for role, status in ALL_STATES:
            fake.set_migration("vm1", {**sc.precopy(role.value, status.value)})
            await fake.push_event("MIGRATION", {"guest": "vm1", "status": status.value})
            seen = pane.refreshes
            await eventually(lambda s=seen: pane.refreshes > s, pause(pilot))
            assert pane.current is not None and pane.current.status == status.value
            # A guest that arrived and runs (the fake's guest runs) may be sent on.
            arrived = role == Role.DESTINATION and is_terminal(status)
            allowed = allowed_commands(Role.SOURCE if arrived else role, status)
            expected = {a for a, cmd in ACTION_COMMANDS.items() if cmd in allowed}
            offered = {
                b.binding.action
                for b in app.screen.active_bindings.values()
                if b.binding.action in ACTION_COMMANDS
            }
            assert offered == expected, (role, status)
            for action in ACTION_COMMANDS.keys() - expected:
                # What a key press does once the binding is found (App._check_bindings).
                assert await app.run_action(action) is False, (role, status, action)
            assert app.screen is app.screen_stack[0]
        await pilot.pause(0.05)
    assert fake.actions() == []


@pytest.mark.parametrize("status", ["postcopy-active", "completed", "failed", "cancelled"])
async def test_postcopy_and_cancel_keys_do_nothing_outside_their_states(status: str) -> None:
    fake = fake_in("source", status)
    async with session(fake) as pilot:
        await pilot.press("p", "x", "c")
        await pilot.pause(0.05)
        assert pilot.app.screen is pilot.app.screen_stack[0]
    assert fake.actions() == []


async def test_a_state_change_while_the_prompt_is_open_stops_the_command() -> None:
    fake = fake_in("source", "active")
    async with session(fake) as pilot:
        await pilot.press("x")
        assert isinstance(pilot.app.screen, Confirm)
        fake.set_migration("vm1", sc.postcopy())
        await fake.push_event("MIGRATION", {"guest": "vm1", "status": "postcopy-active"})
        pane = pilot.app.panes[0]
        await eventually(
            lambda: pane.current is not None and pane.current.status == "postcopy-active",
            pause(pilot),
        )
        await pilot.press("y")
        await pilot.pause(0.05)
        assert pane.refusal == "migrate-cancel is no longer possible (postcopy-active)"
    assert fake.actions() == []


async def test_two_agents_side_by_side_when_wide_and_keys_act_on_the_selected_one() -> None:
    src = FakeAgent("src.sock", [sc.guest()])
    src.set_migration("vm1", sc.paused("source"))
    dst = FakeAgent("dst.sock", [sc.guest(status="incoming")])
    dst.set_migration("vm1", sc.paused("destination"))
    async with session(src, dst, size=(160, 24)) as pilot:
        app = pilot.app
        assert app.side_by_side
        assert all(p.display for p in app.panes)
        await pilot.press("2", "r")
        assert isinstance(app.screen, UriPrompt)
        assert app.screen.title_text == "Recover vm1 on dst"
        await pilot.press("enter")
        await wait_actions(pilot, dst, 1)
        await pilot.press("1", "r", "enter")
        await wait_actions(pilot, src, 1)
        await pilot.resize_terminal(80, 24)
        await pilot.pause()
        assert not app.side_by_side
        assert [p.display for p in app.panes] == [True, False]
    assert dst.actions() == [("migrate-recover", {"guest": "vm1", "uri": "tls:dst.lab:4444"})]
    assert src.actions() == [
        ("migrate", {"guest": "vm1", "uri": "tls:dst.lab:4444", "resume": True})
    ]


async def test_next_guest_key_selects_the_other_guest() -> None:
    fake = FakeAgent("agent.sock", [sc.guest("vm1"), sc.guest("vm2")])
    info = sc.precopy()
    fake.set_migration("vm2", {**info, "guest": "vm2"})
    async with session(fake) as pilot:
        pane = pilot.app.panes[0]
        assert pane.selected == "vm1"
        await pilot.press("p")  # vm1 is not migrating: nothing to switch
        await pilot.press("g")
        assert pane.selected == "vm2"
        await pilot.press("p")
        actions = await wait_actions(pilot, fake, 1)
    assert actions == [("migrate-start-postcopy", {"guest": "vm2"})]
