"""Modal screens for the actions that need more than a key: the migrate form, a URI, a yes/no.

Each is driven from the keyboard alone (tab between fields, space toggles,
enter submits, escape closes) and fits an 80×24 terminal.  They validate
what they can locally — a URI that does not parse, a size that is not one —
so the agent is only asked things that could succeed (names and texts that come
from an agent are shown as plain Text, never parsed as markup); whether the migration
state still allows the command is checked again when the answer comes back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal, Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.style import Style
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

PARAMETER_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("downtime-limit", "downtime limit (ms)", "agent default"),
    ("max-bandwidth", "bandwidth (bytes/s)", "unlimited; e.g. 500M"),
    ("max-postcopy-bandwidth", "postcopy bandwidth", "unlimited; e.g. 50M"),
    ("multifd-channels", "multifd channels", "agent default"),
)
"""Parameters the form offers: name, label, placeholder (what an empty field means)."""

BANDWIDTHS = frozenset({"max-bandwidth", "max-postcopy-bandwidth"})
"""Parameters where 0 means unlimited: an emptied field sets them to 0."""


def size_text(n: int) -> str:
    """A byte count the way an admin would type it (``8M``), exact, or plain digits."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def parameter_text(key: str, value: Any) -> str:
    """How the agent's current value of ``key`` is shown in its field ("" = placeholder)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return ""
    if key in BANDWIDTHS:
        return size_text(value) if value else ""
    return str(value)


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
{name} Checkbox:focus {{ border: none; background: $accent 30%; }}
{name} Button {{ margin: 0 1 0 0; }}
"""


def _check_uri(text: str) -> str | None:
    try:
        parse_uri(text)
    except ValueError as exc:
        return str(exc)
    return None


class Tick(Checkbox):
    """A checkbox that says on or off in its glyph, not only in its colour.

    Textual draws ``X`` either way and tells them apart by colour alone,
    which a monochrome terminal (or tmux without colours) loses.
    """

    @property
    def _button(self) -> Content:
        button_style = self.get_visual_style("toggle--button")
        side_style = Style(foreground=button_style.background, background=self.background_colors[1])
        return Content.assemble(
            (self.BUTTON_LEFT, side_style),
            ("X" if self.value else " ", button_style),
            (self.BUTTON_RIGHT, side_style),
        )


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

    def __init__(
        self,
        guest: str,
        agent: str,
        uri: str = "",
        *,
        capabilities: Mapping[str, bool] | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> None:
        """``capabilities``/``parameters``: the agent's current settings for the guest
        (``query-migrate-capabilities``/``-parameters``), so the form starts from them and
        never silently undoes what an admin set another way."""
        super().__init__()
        self.guest = guest
        self.agent = agent
        self.initial_uri = uri
        self.initial_caps = {
            name: bool((capabilities or {}).get(name, False)) for name, _ in CAPABILITIES
        }
        self.initial_params = {
            key: parameter_text(key, (parameters or {}).get(key)) for key, _, _ in PARAMETER_FIELDS
        }

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(Text(f"Migrate {self.guest} from {self.agent}"), classes="title")
            with Grid():
                yield Label("destination URI")
                yield Input(self.initial_uri, placeholder="tls:HOST:PORT", id="uri", compact=True)
                for key, label, placeholder in PARAMETER_FIELDS:
                    yield Label(label)
                    yield Input(
                        self.initial_params[key], placeholder=placeholder, id=key, compact=True
                    )
            with Vertical(id="caps"):
                for name, label in CAPABILITIES:
                    yield Tick(label, self.initial_caps[name], id=name)
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
        caps = {name: self.query_one(f"#{name}", Tick).value for name, _ in CAPABILITIES}
        if caps["postcopy-preempt"] and not caps["postcopy-ram"]:
            self._problem("the preempt channel needs postcopy")
            return
        params: dict[str, int] = {}
        for key, _, _ in PARAMETER_FIELDS:
            text = self.query_one(f"#{key}", Input).value.strip()
            if text == self.initial_params[key]:
                continue  # unchanged: the agent keeps what it has
            if not text:
                if key in BANDWIDTHS:
                    params[key] = 0  # emptied: back to unlimited
                continue
            try:
                value = parse_size(text) if key in BANDWIDTHS else int(text)
            except ValueError:
                self._problem(f"{key}: {text!r} is not a number")
                return
            if value < 0 or (value == 0 and key not in BANDWIDTHS):
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
