"""The channel table: main, return, preempt, multifd-N — link, bytes, age of the last frame."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from tui import formatting as fmt
from tui.model import Channel, GuestState

STALE_MS = 1000.0
"""A frame older than this on a connected channel is worth a yellow; five times it, red."""


def _age(ch: Channel) -> Text:
    age = ch.last_frame_age_ms
    if age is None:
        return Text(fmt.DASH, style="dim")
    style = "red" if age >= 5 * STALE_MS else "yellow" if age >= STALE_MS else ""
    return Text(fmt.millis(age) if age >= 1 else "now", style=style)


def _link(ch: Channel) -> Text:
    if ch.connected is None:
        return Text("?", style="dim")
    return Text("up", style="green") if ch.connected else Text("DOWN", style="bold red")


class ChannelTable(Static):
    """One row per channel, QEMU-style names, in the order the agent lists them."""

    DEFAULT_CSS = "ChannelTable { width: 44; height: 1fr; padding-right: 1; }"

    def show(self, state: GuestState | None) -> None:
        info = state.info if state is not None else None
        if info is None or not info.channels:
            self.update(Text("channels —", style="dim"))
            return
        table = Table(box=None, padding=(0, 1), pad_edge=False, expand=False, show_edge=False)
        table.add_column("channel", style="bold", no_wrap=True, max_width=10)
        table.add_column("link", no_wrap=True)
        table.add_column("sent", justify="right", no_wrap=True)
        table.add_column("recv", justify="right", no_wrap=True)
        table.add_column("last", justify="right", no_wrap=True)
        for ch in info.channels:
            table.add_row(
                Text(ch.name),  # the agent's string: plain text, not markup
                _link(ch),
                fmt.size(ch.bytes_sent),
                fmt.size(ch.bytes_received),
                _age(ch),
            )
        self.update(table)
