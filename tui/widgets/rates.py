"""Throughput and dirty-rate sparklines, side by side, each with its current figure."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Sparkline, Static

from tui import formatting as fmt
from tui.model import GuestState


class RateGraph(Vertical):
    """A label with the latest value above a sparkline of the recent history."""

    DEFAULT_CSS = """
    RateGraph { height: 2; width: 1fr; padding-right: 1; }
    RateGraph > Static { height: 1; }
    RateGraph > Sparkline { height: 1; }
    """

    def __init__(self, title: str, render_value: Callable[[float], str], *, id: str) -> None:
        super().__init__(id=id)
        self._title = title
        self._render_value = render_value

    def compose(self) -> ComposeResult:
        yield Static(Text(self._title, style="dim"))
        yield Sparkline([])

    def show(self, samples: Sequence[float]) -> None:
        latest = self._render_value(samples[-1]) if samples else fmt.DASH
        peak = f"  max {self._render_value(max(samples))}" if samples else ""
        text = Text.assemble((self._title + " ", "dim"), (latest, "bold"), (peak, "dim"))
        text.no_wrap = True
        text.overflow = "ellipsis"
        self.query_one(Static).update(text)
        # Anchored at zero: Sparkline scales from the smallest sample to the largest, so
        # a steady rate (a bandwidth cap) would lie flat on the floor and a single sample
        # fills the row; a leading 0 makes heights mean "share of the peak".  With no
        # data yet, a flat line rather than an empty row that looks broken.
        self.query_one(Sparkline).data = [0.0, *samples] if samples else [0.0, 0.0]


class Rates(Horizontal):
    """Network throughput against the guest's dirty rate: will precopy converge?"""

    DEFAULT_CSS = "Rates { height: 2; }"

    def compose(self) -> ComposeResult:
        yield RateGraph("network", fmt.mbps, id="throughput")
        yield RateGraph("dirty", fmt.rate, id="dirty")

    def show(self, state: GuestState | None) -> None:
        self.query_one("#throughput", RateGraph).show(state.throughput if state else ())
        self.query_one("#dirty", RateGraph).show(state.dirty_rate if state else ())
