"""What an admin sees at 80×24 in each phase (and a pair at 160×24), as SVG baselines.

Deterministic by construction: events carry a fixed timestamp, the app's own
clock is fixed, the time zone is UTC, socket paths are relative, polling is
off (only events trigger a refresh) and the sparklines take only the pushed
MIGRATION_PROGRESS samples.  Regenerate with
``pytest --snapshot-update tests/tui`` and look at the SVGs before committing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import tui_scenarios as sc
from fake_agent import WHEN, FakeAgent, ThreadedFake, eventually
from textual.pilot import Pilot

from tui.app import GodwitApp
from tui.screens import MigrateForm
from tui.widgets.eventlog import EventLog

Story = list[tuple[str, dict[str, Any]]]


def precopy_story(guest: str = "vm1", passes: int = 4) -> Story:
    return [
        ("MIGRATION", {"guest": guest, "status": "setup"}),
        ("MIGRATION", {"guest": guest, "status": "active"}),
        *[("MIGRATION_PASS", {"guest": guest, "pass": n + 1}) for n in range(passes)],
    ]


def postcopy_story(guest: str = "vm1") -> Story:
    return [
        *precopy_story(guest, passes=5),
        ("MIGRATION", {"guest": guest, "status": "device"}),
        ("STOP", {"guest": guest}),
        ("MIGRATION", {"guest": guest, "status": "postcopy-device"}),
        ("MIGRATION", {"guest": guest, "status": "postcopy-active"}),
    ]


def shoot(
    snap_compare: Callable[..., bool],
    fakes: list[FakeAgent],
    *,
    progress: list[dict[str, Any]] | None = None,
    story: Story = (),  # type: ignore[assignment]
    size: tuple[int, int] = (80, 24),
    press: tuple[str, ...] = (),
    connect: bool = True,
    form: tuple[str, ...] | None = None,
) -> bool:
    """``form``: open the migrate form (m), wait for it, then press these keys in it."""
    with contextlib.ExitStack() as stack:
        threads = [ThreadedFake(f) for f in fakes]
        if connect:
            for t in threads:
                stack.enter_context(t.running())
        app = GodwitApp(
            [f"{f.path.split('.')[0]}={f.path}" for f in fakes],
            clock=lambda: WHEN,
            poll_interval=3600,
            backoff=(3600, 3600),
        )

        async def run_before(pilot: Pilot[Any]) -> None:
            def wait() -> Any:
                return pilot.pause(0.01)

            if not connect:
                await eventually(lambda: all(p.lost is not None for p in app.panes), wait)
                return
            await eventually(lambda: all(p.refreshes > 0 for p in app.panes), wait)
            for t, pane in zip(threads, app.panes, strict=True):
                for name, data in story:
                    t.call(lambda n=name, d=data, a=t.agent: a.push_event(n, d))
                for info in progress or ():
                    data = {"guest": "vm1", "info": info}
                    t.call(lambda d=data, a=t.agent: a.push_event("MIGRATION_PROGRESS", d))
                # Every event in, and the agent's (static) answers seen at least once:
                # whichever of the two came last, the screen is the same.
                log = pane.query_one(EventLog)
                state = pane.model.guests["vm1"]
                final = t.agent.migrations.get("vm1", {}).get("status")
                lines = 1 + len(story)  # "connected", then one per event

                def settled(log=log, state=state, final=final, lines=lines) -> bool:
                    return (
                        len(log.lines) == lines
                        and len(state.throughput) == len(progress or ())
                        and state.status == final
                    )

                await eventually(settled, wait)
            if form is not None:
                await pilot.press("m")
                await eventually(lambda: isinstance(app.screen, MigrateForm), wait)
                await pilot.press(*form)

        return snap_compare(app, terminal_size=size, run_before=run_before, press=press)


def agent(name: str, info: dict[str, Any] | None, status: str = "running") -> FakeAgent:
    fake = FakeAgent(f"{name}.sock", [sc.guest(status=status)])
    if info is not None:
        fake.set_migration("vm1", info)
    return fake


def test_idle(snap_compare: Callable[..., bool]) -> None:
    fake = agent("src", None)
    assert shoot(snap_compare, [fake])


def test_precopy_active(snap_compare: Callable[..., bool]) -> None:
    info = sc.precopy()
    fake = agent("src", info)
    assert shoot(snap_compare, [fake], progress=sc.progress_series(info), story=precopy_story())


def test_postcopy_active(snap_compare: Callable[..., bool]) -> None:
    info = sc.postcopy()
    fake = agent("src", info)
    assert shoot(snap_compare, [fake], progress=sc.progress_series(info), story=postcopy_story())


def test_postcopy_paused_source_offers_resume(snap_compare: Callable[..., bool]) -> None:
    info = sc.paused("source")
    fake = agent("src", info)
    story = [*postcopy_story(), ("MIGRATION", {"guest": "vm1", "status": "postcopy-paused"})]
    assert shoot(snap_compare, [fake], progress=sc.progress_series(info), story=story)


def test_postcopy_paused_destination_offers_recover(snap_compare: Callable[..., bool]) -> None:
    info = sc.paused("destination")
    fake = agent("dst", info)
    story = [
        ("MIGRATION", {"guest": "vm1", "status": "active"}),
        ("MIGRATION", {"guest": "vm1", "status": "postcopy-device"}),
        ("MIGRATION", {"guest": "vm1", "status": "postcopy-active"}),
        ("RESUME", {"guest": "vm1"}),
        ("MIGRATION", {"guest": "vm1", "status": "postcopy-paused"}),
    ]
    assert shoot(snap_compare, [fake], progress=sc.progress_series(info), story=story)


def test_completed(snap_compare: Callable[..., bool]) -> None:
    info = sc.completed()
    fake = agent("src", info, status="migrated")
    story = [*postcopy_story(), ("MIGRATION", {"guest": "vm1", "status": "completed"})]
    assert shoot(snap_compare, [fake], progress=sc.progress_series(info), story=story)


def test_failed(snap_compare: Callable[..., bool]) -> None:
    info = sc.failed()
    fake = agent("src", info)
    story = [*precopy_story(), ("MIGRATION", {"guest": "vm1", "status": "failed"})]
    assert sc.failed()["ram"]["dirty-sync-count"] == 4
    assert shoot(snap_compare, [fake], progress=sc.progress_series(info), story=story)


def test_agent_lost(snap_compare: Callable[..., bool]) -> None:
    fake = agent("src", None)
    assert shoot(snap_compare, [fake], connect=False)


def test_pair_side_by_side_when_paused(snap_compare: Callable[..., bool]) -> None:
    src = agent("src", sc.paused("source"))
    dst = agent("dst", sc.paused("destination"), status="incoming")
    assert shoot(snap_compare, [src, dst], size=(160, 24), press=("2",))


def test_migrate_form_fits_80x24(snap_compare: Callable[..., bool]) -> None:
    fake = agent("src", None)
    # Focus on the postcopy box, switched on: the focused box keeps its one row and its label.
    assert shoot(snap_compare, [fake], form=("tab",) * 5 + ("space",))
