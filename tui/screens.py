"""Modal screens for the actions that need more than a key: the migrate form, a URI, a yes/no.

Each is driven from the keyboard alone (tab between fields, space toggles,
enter submits, escape closes) and fits an 80×24 terminal.  They validate
what they can locally — a URI that does not parse, a size that is not one —
so the agent is only asked things that could succeed (names and texts that come
from an agent are shown as plain Text, never parsed as markup); whether the migration
state still allows the command is checked again when the answer comes back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, Static

from protocol.qapi import parse_size
from protocol.uri import parse_uri

CAPABILITIES: tuple[tuple[str, str], ...] = (
    ("postcopy-ram", "postcopy"),
    ("postcopy-preempt", "postcopy preempt channel"),
    ("multifd", "multifd"),
    ("auto-converge", "auto-converge (throttle the guest)"),
    ("pause-before-switchover", "pause before switchover"),
)
"""Capabilities the form offers, as ``migrate-set-capabilities`` names them."""


@dataclass(frozen=True)
class MigrateRequest:
    """What the form produced: the URI, every offered capability's state, parameters set."""

    uri: str
    capabilities: dict[str, bool]
    parameters: dict[str, int] = field(default_factory=dict)


_MODAL_CSS = """
{name} {{ align: center middle; }}
{name} > Vertical {{
    width: 72; max-width: 100%; height: auto; max-height: 100%;
    border: round $accent; background: $surface; padding: 0 1;
}}
{name} .title {{ text-style: bold; width: 100%; }}
{name} .hint {{ color: $text-muted; width: 100%; }}
{name} .problem {{ color: $text-error; width: 100%; height: auto; }}
{name} Checkbox {{ border: none; height: 1; padding: 0; background: transparent; }}
{name} Checkbox:focus {{ background: $accent 30%; }}
{name} Button {{ margin: 0 1 0 0; }}
"""


def _check_uri(text: str) -> str | None:
    try:
        parse_uri(text)
    except ValueError as exc:
        return str(exc)
    return None


class MigrateForm(ModalScreen[MigrateRequest | None]):
    """Start a migration: where to, which capabilities, which limits."""

    DEFAULT_CSS = (
        _MODAL_CSS.format(name="MigrateForm")
        + """
    MigrateForm Grid { grid-size: 2; grid-columns: 20 1fr; height: auto; grid-gutter: 0 1; }
    MigrateForm Grid Label { height: 1; }
    MigrateForm #caps { height: auto; margin: 1 0 0 0; }
    MigrateForm #buttons { height: 1; margin-top: 1; }
    """
    )
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "close", "Close")]

    def __init__(self, guest: str, agent: str, uri: str = "") -> None:
        super().__init__()
        self.guest = guest
        self.agent = agent
        self.initial_uri = uri

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(Text(f"Migrate {self.guest} from {self.agent}"), classes="title")
            with Grid():
                yield Label("destination URI")
                yield Input(self.initial_uri, placeholder="tls:HOST:PORT", id="uri", compact=True)
                yield Label("downtime limit (ms)")
                yield Input(placeholder="agent default", id="downtime-limit", compact=True)
                yield Label("bandwidth (bytes/s)")
                yield Input(placeholder="unlimited; e.g. 500M", id="max-bandwidth", compact=True)
                yield Label("multifd channels")
                yield Input(placeholder="agent default", id="multifd-channels", compact=True)
            with Vertical(id="caps"):
                for name, label in CAPABILITIES:
                    yield Checkbox(label, id=name)
            yield Static("", classes="problem", id="problem")
            with Horizontal(id="buttons"):
                yield Button("Start", variant="primary", id="start", compact=True)
                yield Button("Close", id="close", compact=True)
            yield Static("tab next · space toggle · enter start · esc close", classes="hint")

    def on_mount(self) -> None:
        self.query_one("#uri", Input).focus()

    def action_close(self) -> None:
        self.dismiss(None)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "start":
            self._submit()
        else:
            self.dismiss(None)

    def _problem(self, text: str) -> None:
        self.query_one("#problem", Static).update(Text(text))

    def _submit(self) -> None:
        uri = self.query_one("#uri", Input).value.strip()
        problem = _check_uri(uri) if uri else "the destination URI is missing (tls:HOST:PORT)"
        if problem:
            self._problem(problem)
            return
        caps = {name: self.query_one(f"#{name}", Checkbox).value for name, _ in CAPABILITIES}
        if caps["postcopy-preempt"] and not caps["postcopy-ram"]:
            self._problem("the preempt channel needs postcopy")
            return
        params: dict[str, int] = {}
        for key in ("downtime-limit", "max-bandwidth", "multifd-channels"):
            text = self.query_one(f"#{key}", Input).value.strip()
            if not text:
                continue
            try:
                value = parse_size(text) if key == "max-bandwidth" else int(text)
            except ValueError:
                self._problem(f"{key}: {text!r} is not a number")
                return
            if value <= 0:
                self._problem(f"{key}: must be more than 0")
                return
            params[key] = value
        if "multifd-channels" in params and not caps["multifd"]:
            self._problem("multifd channels given but multifd is off")
            return
        self.dismiss(MigrateRequest(uri, caps, params))


class UriPrompt(ModalScreen[str | None]):
    """Ask for one URI: where the destination listens again, or where the source dials."""

    DEFAULT_CSS = _MODAL_CSS.format(name="UriPrompt")
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "close", "Close")]

    def __init__(self, title: str, explanation: str, uri: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.explanation = explanation
        self.initial_uri = uri

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(Text(self.title_text), classes="title")
            yield Static(Text(self.explanation), classes="hint")
            yield Input(self.initial_uri, placeholder="tls:HOST:PORT", id="uri", compact=True)
            yield Static("", classes="problem", id="problem")
            yield Static("enter send · esc close", classes="hint")

    def on_mount(self) -> None:
        self.query_one("#uri", Input).focus()

    def action_close(self) -> None:
        self.dismiss(None)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        uri = event.value.strip()
        problem = _check_uri(uri) if uri else "a URI is needed (tls:HOST:PORT)"
        if problem:
            self.query_one("#problem", Static).update(Text(problem))
            return
        self.dismiss(uri)


class Confirm(ModalScreen[bool]):
    """A yes/no question answered with y or n (escape is no)."""

    DEFAULT_CSS = _MODAL_CSS.format(name="Confirm")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n", "answer(False)", "No"),
        Binding("escape", "answer(False)", "No", show=False),
    ]

    def __init__(self, question: str, detail: str = "") -> None:
        super().__init__()
        self.question = question
        self.detail = detail

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(Text(self.question), classes="title")
            if self.detail:
                yield Static(Text(self.detail), classes="hint")
            yield Static("y yes · n no", classes="hint")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)
