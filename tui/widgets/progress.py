"""The transfer bar: how much of the guest's RAM is across, and what is left."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.widget import Widget

from tui import formatting as fmt
from tui.model import GuestState


def fraction_done(transferred: int | None, remaining: int | None, total: int | None) -> float:
    """Share of RAM already on the destination.

    ``transferred`` counts re-sent dirty pages too and can exceed ``total``,
    so ``total - remaining`` is the honest figure when the agent gives it.
    """
    if not total:
        return 0.0
    if remaining is not None:
        done = total - remaining
    elif transferred is not None:
        done = transferred
    else:
        return 0.0
    return min(max(done / total, 0.0), 1.0)


class TransferBar(Widget):
    """A one-line bar, then ``sent / total · left``; width-aware, no clock in it."""

    DEFAULT_CSS = """
    TransferBar { height: 1; }
    TransferBar > .transferbar--done { color: $success; }
    TransferBar > .transferbar--todo { color: $foreground 25%; }
    """
    COMPONENT_CLASSES: ClassVar[set[str]] = {"transferbar--done", "transferbar--todo"}

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._state: GuestState | None = None

    def show(self, state: GuestState | None) -> None:
        self._state = state
        self.refresh()

    def render(self) -> Text:
        info = self._state.info if self._state is not None else None
        ram = info.ram if info is not None else None
        if ram is None or ram.total is None:
            return Text("transfer —", style="dim")
        state = self._state
        pair = state.effective() if state is not None else None
        if pair is not None and pair[0].value == "destination":
            # A destination cannot know what is left (agents report 0): no bar nor
            # percentage until it is over, and what it counts is what it received.
            label = Text.assemble(
                ("received ", "dim"),
                fmt.size(ram.transferred),
                (" of a ", "dim"),
                fmt.size(ram.total),
                (" guest", "dim"),
            )
            if pair[1].value != "completed":
                label.no_wrap = True
                label.overflow = "ellipsis"
                return label
            frac = 1.0
            label = Text.assemble((" 100% ", "bold"), label)
        else:
            frac = fraction_done(ram.transferred, ram.remaining, ram.total)
            label = Text.assemble(
                (f" {frac * 100:3.0f}% ", "bold"),
                fmt.size(ram.transferred),
                (" sent / ", "dim"),
                fmt.size(ram.total),
                (" · ", "dim"),
                fmt.size(ram.remaining),
                (" left", "dim"),
            )
        width = max(self.size.width - label.cell_len, 4)
        filled = round(frac * width)
        done = self.get_component_rich_style("transferbar--done")
        todo = self.get_component_rich_style("transferbar--todo")
        bar = Text.assemble(("█" * filled, done), ("░" * (width - filled), todo))
        text = bar + label
        text.no_wrap = True
        text.overflow = "ellipsis"
        return text
