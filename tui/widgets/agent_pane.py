"""One agent's pane: its connection, its guests, and every widget about the selected guest.

The pane owns an :class:`~tui.client.AgentClient` running in a Textual
worker.  The client calls the pane back (as its Listener) on the same event
loop; the pane turns each call into a message, so updates are handled in
order on the pane's own queue, as memray's live TUI does with its snapshot
reader.  A second worker refreshes ``query-guests``/``query-migrate`` when
something changed (connected, a MIGRATION event, a guest came or went) and
every ``poll_interval`` seconds as a safety net; MIGRATION_PROGRESS events
carry the live figures in between and are the only samples the sparklines
take, so what they draw does not depend on how often anyone polled.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.message import Message
from textual.widgets import Static

from protocol.control import Event, Greeting
from tui.client import AgentAddress, AgentClient, AgentUnavailable, CommandError
from tui.model import AgentModel, GuestState, LogLine, parse_guests, parse_migration_info
from tui.widgets.channels import ChannelTable
from tui.widgets.eventlog import EventLog
from tui.widgets.postcopy import PostcopyPanel
from tui.widgets.progress import TransferBar
from tui.widgets.rates import Rates
from tui.widgets.status import DowntimeLine, ErrorLine, GuestLine, StatusLine

Clock = Callable[[], float]


class PaneTitle(Static):
    """Agent name, address and connection state; red and explicit when the link is lost."""

    DEFAULT_CSS = "PaneTitle { height: 1; background: $panel; }"


class AgentPane(Vertical):
    """Everything about one agent."""

    DEFAULT_CSS = """
    AgentPane { width: 1fr; height: 1fr; padding: 0 0; }
    AgentPane.-current > PaneTitle { background: $primary; color: $text; }
    AgentPane.-lost > PaneTitle { background: $error; color: $text; text-style: bold; }
    AgentPane.-lost > .data { text-opacity: 60%; }
    AgentPane > #bottom { height: 1fr; }
    """

    class Changed(Message):
        """Something the footer's enabled actions depend on may have changed."""

    class Connected(Message):
        def __init__(self, greeting: Greeting) -> None:
            super().__init__()
            self.greeting = greeting

    class Lost(Message):
        def __init__(self, reason: str, attempt: int, retry_in: float) -> None:
            super().__init__()
            self.reason = reason
            self.attempt = attempt
            self.retry_in = retry_in

    class EventArrived(Message):
        def __init__(self, event: Event) -> None:
            super().__init__()
            self.event = event

    class Nonsense(Message):
        def __init__(self, desc: str) -> None:
            super().__init__()
            self.desc = desc

    def __init__(
        self,
        agent_name: str,
        address: AgentAddress,
        *,
        ssl_context: ssl.SSLContext | None = None,
        clock: Clock = time.time,
        poll_interval: float = 2.0,
        backoff: tuple[float, float] = (0.2, 5.0),
        id: str | None = None,
    ) -> None:
        super().__init__(id=id)
        self.agent_name = agent_name
        self.address = address
        self.clock = clock
        self.poll_interval = poll_interval
        self.client = AgentClient(
            address,
            self,
            ssl_context=ssl_context,
            backoff_min=backoff[0],
            backoff_max=backoff[1],
        )
        self.model = AgentModel()
        self.selected: str | None = None
        self.connected = False
        self.version: str | None = None
        self.lost: tuple[str, int, float] | None = None
        self.ever_connected = False
        self.refusal: str | None = None
        self.nonsense_count = 0
        self.refreshes = 0
        """Completed refreshes, so tests can wait for one instead of sleeping."""
        self._wake = asyncio.Event()

    # --- layout -----------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield PaneTitle(id="title")
        yield GuestLine(classes="data")
        yield StatusLine(classes="data")
        yield TransferBar()
        yield DowntimeLine(classes="data")
        yield ErrorLine()
        yield Rates(classes="data")
        yield PostcopyPanel(classes="data")
        with Horizontal(id="bottom"):
            yield ChannelTable(classes="data")
            yield EventLog()

    def on_mount(self) -> None:
        self.run_worker(self.client.run(), name=f"client {self.agent_name}", group="client")
        self.run_worker(self._refresher(), name=f"refresh {self.agent_name}", group="refresh")
        self.redraw()

    # --- the client's Listener interface ------------------------------------

    def agent_connected(self, greeting: Greeting) -> None:
        self.post_message(self.Connected(greeting))

    def agent_lost(self, reason: str, attempt: int, retry_in: float) -> None:
        self.post_message(self.Lost(reason, attempt, retry_in))

    def agent_event(self, event: Event) -> None:
        self.post_message(self.EventArrived(event))

    def agent_nonsense(self, desc: str) -> None:
        self.post_message(self.Nonsense(desc))

    # --- handlers -----------------------------------------------------------

    def _log(self, line: LogLine) -> None:
        try:
            log = self.query_one(EventLog)
        except NoMatches:  # the app is shutting down and took the children first
            return
        log.add(line)

    def _note(self, text: str, severity: str = "info", guest: str | None = None) -> None:
        self._log(LogLine(self.clock(), text, guest, severity=severity))

    def on_agent_pane_connected(self, message: Connected) -> None:
        message.stop()
        self.connected = True
        self.ever_connected = True
        self.lost = None
        package = message.greeting.version.get("package")
        self.version = package if isinstance(package, str) else None
        self._note(f"connected to {self.address.text}")
        self.request_refresh()
        self.redraw()

    def on_agent_pane_lost(self, message: Lost) -> None:
        message.stop()
        was_connected = self.connected
        previous = self.lost
        self.connected = False
        self.lost = (message.reason, message.attempt, message.retry_in)
        if was_connected or previous is None or previous[0] != message.reason:
            self._note(f"connection lost: {message.reason}", "error")
        self.redraw()

    def on_agent_pane_event_arrived(self, message: EventArrived) -> None:
        message.stop()
        event = message.event
        line = self.model.apply_event(event)
        if line is not None:
            self._log(line)
        if event.name in ("MIGRATION", "GUEST_STARTED", "GUEST_EXITED"):
            if event.name == "MIGRATION":
                self.refusal = None
            self.request_refresh()
        self.redraw()

    def on_agent_pane_nonsense(self, message: Nonsense) -> None:
        message.stop()
        self.nonsense_count += 1
        self._note(f"agent sent nonsense: {message.desc}", "warning")

    # --- state the app asks about ---------------------------------------------

    @property
    def current(self) -> GuestState | None:
        state = self.model.guest(self.selected)
        if state is None and self.model.guests:
            state = next(iter(self.model.guests.values()))
            self.selected = state.name
        return state

    def allowed(self) -> frozenset[str]:
        """Commands the state table allows for the selected guest; none while disconnected."""
        state = self.current
        if not self.connected or state is None:
            return frozenset()
        return state.allowed()

    def next_guest(self) -> None:
        names = list(self.model.guests)
        if not names:
            return
        index = names.index(self.selected) if self.selected in names else -1
        self.selected = names[(index + 1) % len(names)]
        self.redraw()

    # --- talking to the agent -----------------------------------------------

    def request_refresh(self) -> None:
        self._wake.set()

    async def _refresher(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            except TimeoutError:
                pass
            self._wake.clear()
            if self.client.connected:
                try:
                    await self._refresh()
                except Exception as exc:  # a bug here must not take the whole monitor down
                    self._note(f"refresh failed: {exc!r}", "error")

    async def _refresh(self) -> None:
        try:
            guests, problems = parse_guests(await self.client.execute("query-guests"))
            for problem in problems:
                self.nonsense_count += 1
                self._note(f"agent sent nonsense: {problem}", "warning")
            self.model.apply_guests(guests)
            for state in list(self.model.guests.values()):
                if state.role is None and state.status is None:
                    continue  # never migrated: nothing to ask
                value = await self.client.execute("query-migrate", {"guest": state.name})
                info = parse_migration_info(value)
                if info is None:
                    self.nonsense_count += 1
                    self._note(f"agent sent nonsense: query-migrate answered {value!r:.60}")
                else:
                    state.apply_info(info, sample=False)
        except AgentUnavailable:
            return
        except CommandError as exc:
            self._note(f"{exc.command}: {exc.desc}", "warning")
        self.refreshes += 1
        self.redraw()

    async def settings(self, guest: str) -> tuple[dict[str, bool], dict[str, Any]]:
        """The guest's capabilities and parameters as the agent has them now.

        Empty when the agent cannot say (gone, refused, nonsense): the form then
        starts from blank fields, which it treats as "leave as is".
        """
        capabilities: dict[str, bool] = {}
        parameters: dict[str, Any] = {}
        try:
            caps = await self.client.execute("query-migrate-capabilities", {"guest": guest})
            params = await self.client.execute("query-migrate-parameters", {"guest": guest})
        except (CommandError, AgentUnavailable) as exc:
            desc = exc.desc if isinstance(exc, CommandError) else str(exc)
            self._note(f"current settings unknown: {desc}", "warning", guest)
            return capabilities, parameters
        if isinstance(caps, list):
            for item in caps:
                if isinstance(item, dict) and isinstance(item.get("capability"), str):
                    capabilities[item["capability"]] = item.get("state") is True
        if isinstance(params, dict):
            parameters = {k: v for k, v in params.items() if isinstance(k, str)}
        return capabilities, parameters

    def send(self, commands: Sequence[tuple[str, dict[str, Any]]], needs: str) -> None:
        """Send commands in order for the selected guest, stopping at the first refusal.

        ``needs`` is the state-table command that justified them; it is
        checked again here because a modal may have been open while the
        migration moved on.
        """
        state = self.current
        allowed = self.allowed()
        if needs not in allowed:
            status = state.status if state is not None else "no guest"
            self.refusal = f"{needs} is no longer possible ({status or 'none'})"
            self.redraw()
            return
        self.refusal = None
        self.run_worker(self._send(list(commands)), group="commands")

    async def _send(self, commands: list[tuple[str, dict[str, Any]]]) -> None:
        for name, arguments in commands:
            try:
                await self.client.execute(name, arguments)
            except (CommandError, AgentUnavailable) as exc:
                desc = exc.desc if isinstance(exc, CommandError) else str(exc)
                self.refusal = f"{name} refused: {desc}"
                self._note(self.refusal, "error", arguments.get("guest"))
                self.redraw()
                return
            self._note(f"{name} ok", guest=arguments.get("guest"))
            state = self.model.guest(arguments.get("guest"))
            if name == "migrate-recover" and state is not None:
                state.recovering = str(arguments.get("uri"))
        self.request_refresh()
        self.redraw()

    # --- drawing ------------------------------------------------------------

    def _title(self) -> Text:
        head = Text.assemble((f" {self.agent_name} ", "bold"), (self.address.text, ""))
        if self.connected:
            head.append("  ● connected")
            if self.version:
                head.append(f"  {self.version}")
        elif self.lost is not None:
            reason, attempt, retry_in = self.lost
            head.append(f"  ✗ LOST: {reason} — retry {attempt} in {retry_in:.1f} s")
        else:
            head.append("  … connecting")
        head.no_wrap = True
        head.overflow = "ellipsis"
        return head

    def redraw(self) -> None:
        if not self.is_mounted:
            return
        try:
            self._redraw()
        except NoMatches:  # the app is shutting down and took the children first
            return

    def _redraw(self) -> None:
        self.set_class(self.lost is not None, "-lost")
        self.query_one(PaneTitle).update(self._title())
        state = self.current
        names = list(self.model.guests)
        index = names.index(state.name) if state is not None else 0
        self.query_one(GuestLine).show(state, index, len(names))
        self.query_one(StatusLine).show(state)
        self.query_one(TransferBar).show(state)
        self.query_one(DowntimeLine).show(state)
        self.query_one(ErrorLine).show(state, self.refusal)
        self.query_one(Rates).show(state)
        self.query_one(PostcopyPanel).show(state)
        self.query_one(ChannelTable).show(state)
        self.query_one(EventLog).show_guest = len(names) > 1
        self.post_message(self.Changed())
