"""``godwit tui``: watch and steer migrations on one or more agents through their control sockets.

The app is a view of the control protocol (see ARCHITECTURE.md): one
:class:`~tui.widgets.agent_pane.AgentPane` per agent — side by side when the
terminal is wide enough for all of them, otherwise one at a time with the
others a key away — and a footer of plain-letter keys, which survive ssh,
tmux and screen (no ctrl or alt combinations, no function keys).  Which
actions the footer offers is asked of protocol/'s state table through the
selected guest's (role, status); the UI never decides that itself.

Entry points: :func:`run` for the CLI (``godwit tui``), :class:`GodwitApp`
for tests, :func:`main` for ``python -m tui.app``.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.widgets import Footer, Static

from protocol.uri import parse_uri
from tui.client import AgentAddress, tls_context
from tui.screens import Confirm, MigrateForm, MigrateRequest, UriPrompt
from tui.widgets.agent_pane import AgentPane, Clock

DEFAULT_AGENT = "/run/godwit/control.sock"
"""The agent's control socket when neither --agent nor $GODWIT_AGENT says otherwise
(the same default as agents/cli.py's verbs; not imported: the TUI imports nothing from agents/)."""

PANE_MIN_WIDTH = 80
"""Panes go side by side only when each can have this many columns."""

ACTION_COMMANDS: dict[str, str] = {
    "migrate": "migrate",
    "postcopy": "migrate-start-postcopy",
    "pause": "migrate-pause",
    "recover": "migrate-recover",
    "resume": "migrate-resume",
    "continue": "migrate-continue",
    "cancel": "migrate-cancel",
}
"""Each app action and the state-table command that must be allowed for it."""


def agent_label(spec: str, index: int) -> tuple[str, str]:
    """Split ``NAME=ADDRESS``; without a name, derive one from the socket file or host."""
    name, sep, address = spec.partition("=")
    if sep and name and "/" not in name and ":" not in name:
        return name, address
    address = spec
    if address.startswith("tls:"):
        host = address[4:].rpartition(":")[0].strip("[]")
        return host or f"agent{index + 1}", address
    stem = Path(address.removeprefix("unix:")).name.split(".")[0]
    return stem or f"agent{index + 1}", address


class PaneRow(Horizontal):
    """The row of agent panes; its width decides between side by side and one at a time."""

    def on_resize(self) -> None:
        app = self.app
        if isinstance(app, GodwitApp):
            app.arrange_panes()


class AgentBar(Static):
    """Which agents there are and which one the keys act on (when not all are visible)."""

    DEFAULT_CSS = "AgentBar { height: 1; background: $panel; }"


class GodwitApp(App[int]):
    """The monitor.  ``GodwitApp(agents=["src=/run/godwit/src.sock", "tls:dst:4445"])``."""

    TITLE = "godwit"
    ENABLE_COMMAND_PALETTE = False  # its key is ctrl+p, which tmux and screen users lose
    CSS = """
    Screen { layout: vertical; }
    GuestLine, StatusLine, DowntimeLine, PaneTitle, AgentBar, RateGraph > Static, PostcopyPanel {
        text-wrap: nowrap; text-overflow: ellipsis;
    }
    #panes { height: 1fr; }
    #panes > AgentPane.-side-right { border-left: vkey $panel-lighten-2; }
    Footer { height: 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("m", "migrate", "Migrate"),
        Binding("p", "postcopy", "Postcopy"),
        Binding("c", "continue", "Continue"),
        Binding("r", "recover", "Recover"),
        Binding("r", "resume", "Resume"),
        Binding("z", "pause", "Pause"),
        Binding("x", "cancel", "Cancel"),
        Binding("g", "next_guest", "Guest"),
        Binding("a", "next_agent", "Agent"),
        Binding("q", "quit", "Quit"),
        *(
            Binding(str(n), f"select_agent({n - 1})", f"Agent {n}", show=False)
            for n in range(1, 10)
        ),
    ]

    def __init__(
        self,
        agents: Sequence[str],
        *,
        ssl_context: ssl.SSLContext | None = None,
        clock: Clock = time.time,
        poll_interval: float = 2.0,
        backoff: tuple[float, float] = (0.2, 5.0),
    ) -> None:
        super().__init__()
        if not agents:
            raise ValueError("godwit tui needs at least one agent (--agent SOCKET|tls:HOST:PORT)")
        self.clock = clock
        self.panes: list[AgentPane] = []
        names: set[str] = set()
        for i, spec in enumerate(agents):
            name, text = agent_label(spec, i)
            if name in names:
                name = f"{name}-{i + 1}"
            names.add(name)
            self.panes.append(
                AgentPane(
                    name,
                    AgentAddress.parse(text),
                    ssl_context=ssl_context,
                    clock=clock,
                    poll_interval=poll_interval,
                    backoff=backoff,
                    id=f"agent-{i}",
                )
            )
        self.current_index = 0
        # Held, not queried: while a modal screen is up, queries see only the modal.
        self.agent_bar = AgentBar()
        self.pane_row = PaneRow(id="panes")

    def compose(self) -> ComposeResult:
        yield self.agent_bar
        with self.pane_row:
            yield from self.panes
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.arrange_panes()

    @property
    def current(self) -> AgentPane:
        return self.panes[self.current_index]

    @property
    def side_by_side(self) -> bool:
        width = self.pane_row.size.width or self.size.width
        return len(self.panes) > 1 and width >= PANE_MIN_WIDTH * len(self.panes)

    def arrange_panes(self) -> None:
        side = self.side_by_side
        for i, pane in enumerate(self.panes):
            pane.display = side or i == self.current_index
            pane.set_class(side and i > 0, "-side-right")
            pane.set_class(i == self.current_index and len(self.panes) > 1, "-current")
        bar = self.agent_bar
        bar.display = len(self.panes) > 1 and not side
        bar.update(self._bar_text())
        self.refresh_bindings()

    def _bar_text(self) -> Text:
        text = Text()
        for i, pane in enumerate(self.panes):
            mark = "●" if pane.connected else "✗"
            style = "reverse bold" if i == self.current_index else ""
            if not pane.connected and pane.lost is not None:
                style += " red"
            text.append(f" {i + 1} {pane.agent_name} {mark} ", style=style.strip())
            text.append(" ")
        text.append("a/1-9 switch", style="dim")
        return text

    def on_agent_pane_changed(self, message: AgentPane.Changed) -> None:
        message.stop()
        self.agent_bar.update(self._bar_text())
        self.refresh_bindings()

    # --- which keys are live -------------------------------------------------

    def refresh_bindings(self) -> None:
        # An agent's news may arrive while the app shuts down, after the last screen
        # went: there is no footer left to refresh then, and asking would raise.
        if self.screen_stack:
            super().refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        command = ACTION_COMMANDS.get(action)
        if command is not None:
            return command in self.current.allowed()
        if action == "next_guest":
            return len(self.current.model.guests) > 1
        if action in ("next_agent", "select_agent"):
            return len(self.panes) > 1
        return True

    # --- actions ---------------------------------------------------------------

    def _guest(self) -> str | None:
        state = self.current.current
        return state.name if state is not None else None

    def _uri_hint(self) -> str:
        """The migration's URI to offer again, if it is one (a destination may
        report where the migration came from instead, which is no address to use)."""
        state = self.current.current
        info = state.info if state is not None else None
        if info is None or not info.uri:
            return ""
        try:
            parse_uri(info.uri)
        except ValueError:
            return ""
        return info.uri

    def action_select_agent(self, index: int) -> None:
        if 0 <= index < len(self.panes):
            self.current_index = index
            self.arrange_panes()

    def action_next_agent(self) -> None:
        self.action_select_agent((self.current_index + 1) % len(self.panes))

    def action_next_guest(self) -> None:
        self.current.next_guest()

    def action_migrate(self) -> None:
        pane, guest = self.current, self._guest()
        if guest is not None:
            self.run_worker(self._migrate_form(pane, guest), group="form", exclusive=True)

    async def _migrate_form(self, pane: AgentPane, guest: str) -> None:
        """Ask the agent for the guest's current settings, then open the form on them."""
        capabilities, parameters = await pane.settings(guest)

        def start(request: MigrateRequest | None) -> None:
            if request is None:
                return
            caps = [{"capability": k, "state": v} for k, v in request.capabilities.items()]
            commands: list[tuple[str, dict[str, Any]]] = [
                ("migrate-set-capabilities", {"guest": guest, "capabilities": caps})
            ]
            if request.parameters:
                commands.append(("migrate-set-parameters", {"guest": guest, **request.parameters}))
            commands.append(("migrate", {"guest": guest, "uri": request.uri}))
            pane.send(commands, "migrate")

        self.push_screen(
            MigrateForm(
                guest,
                pane.agent_name,
                self._uri_hint(),
                capabilities=capabilities,
                parameters=parameters,
            ),
            start,
        )

    def action_postcopy(self) -> None:
        if (guest := self._guest()) is not None:
            self.current.send(
                [("migrate-start-postcopy", {"guest": guest})], "migrate-start-postcopy"
            )

    def action_pause(self) -> None:
        if (guest := self._guest()) is not None:
            self.current.send([("migrate-pause", {"guest": guest})], "migrate-pause")

    def action_continue(self) -> None:
        if (guest := self._guest()) is not None:
            self.current.send(
                [("migrate-continue", {"guest": guest, "state": "pre-switchover"})],
                "migrate-continue",
            )

    def action_recover(self) -> None:
        pane, guest = self.current, self._guest()
        if guest is None:
            return

        def recover(uri: str | None) -> None:
            if uri:
                pane.send([("migrate-recover", {"guest": guest, "uri": uri})], "migrate-recover")

        self.push_screen(
            UriPrompt(
                f"Recover {guest} on {pane.agent_name}",
                "Listen again on this address; then resume on the source.",
                self._uri_hint(),
            ),
            recover,
        )

    def action_resume(self) -> None:
        pane, guest = self.current, self._guest()
        if guest is None:
            return

        def resume(uri: str | None) -> None:
            if uri:
                pane.send(
                    [("migrate", {"guest": guest, "uri": uri, "resume": True})], "migrate-resume"
                )

        self.push_screen(
            UriPrompt(
                f"Resume {guest} from {pane.agent_name}",
                "Dial the destination where it listens again (after recover there).",
                self._uri_hint(),
            ),
            resume,
        )

    def action_cancel(self) -> None:
        pane, guest = self.current, self._guest()
        if guest is None:
            return

        def cancel(yes: bool | None) -> None:
            if yes:
                pane.send([("migrate-cancel", {"guest": guest})], "migrate-cancel")

        self.push_screen(
            Confirm(
                f"Cancel the migration of {guest}?",
                "The guest keeps running here; the destination drops what it received.",
            ),
            cancel,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="godwit tui", description="Watch and steer migrations on godwit agents."
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``godwit tui``, for the CLI to mount on its subcommand."""
    parser.add_argument(
        "--agent",
        action="append",
        metavar="[NAME=]SOCKET|tls:HOST:PORT",
        help="an agent's control socket; repeat for several (a pane each); "
        f"default: $GODWIT_AGENT or {DEFAULT_AGENT}",
    )
    parser.add_argument("--pki", type=Path, metavar="DIR", help="PKI directory for tls: agents")
    parser.add_argument(
        "--name", metavar="NAME", help="this host's certificate name in --pki (NAME.pem/NAME.key)"
    )


def default_agents() -> list[str]:
    """The local agent's control socket, as every other ``godwit`` verb defaults to it."""
    return [os.environ.get("GODWIT_AGENT") or DEFAULT_AGENT]


def run(agents: Sequence[str] | None, *, pki: Path | None = None, name: str | None = None) -> int:
    """Run the TUI until the admin quits; the exit status for the CLI.

    No agents (no ``--agent`` given) means the local one: ``$GODWIT_AGENT``
    or /run/godwit/control.sock.
    """
    agents = list(agents) if agents else default_agents()
    ctx = None
    if any(a.partition("=")[2].startswith("tls:") or a.startswith("tls:") for a in agents):
        if pki is None or name is None:
            print("godwit tui: tls: agents need --pki DIR and --name NAME", file=sys.stderr)
            return 2
        try:
            ctx = tls_context(pki, name)
        except (OSError, ssl.SSLError) as exc:
            print(f"godwit tui: {exc}", file=sys.stderr)
            return 2
    try:
        for i, spec in enumerate(agents):
            AgentAddress.parse(agent_label(spec, i)[1])
    except ValueError as exc:
        print(f"godwit tui: {exc}", file=sys.stderr)
        return 2
    app = GodwitApp(agents, ssl_context=ctx)
    app.run()
    return app.return_code or 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.agent, pki=args.pki, name=args.name)


if __name__ == "__main__":
    sys.exit(main())
