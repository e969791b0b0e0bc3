"""The event log: newest at the bottom, each line stamped with the agent's own time."""

from __future__ import annotations

from collections import deque

from rich.text import Text
from textual.widget import Widget

from tui import formatting as fmt
from tui.model import LogLine
from tui.phases import phase_style

KEEP = 500

_SEVERITY_STYLE = {"info": "", "warning": "yellow", "error": "bold red"}


class EventLog(Widget):
    """As many of the latest lines as fit; an agent's events and the TUI's own notes.

    Times are the agent's event timestamps (QMP carries them), so two panes
    agree on when something happened even if the TUI was late to hear it.
    """

    DEFAULT_CSS = (
        "EventLog { height: 1fr; width: 1fr; text-wrap: nowrap; text-overflow: ellipsis; }"
    )

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.lines: deque[LogLine] = deque(maxlen=KEEP)
        self.show_guest = False

    def add(self, line: LogLine) -> None:
        self.lines.append(line)
        self.refresh()

    def _format(self, line: LogLine) -> Text:
        text = Text(fmt.clock(line.when), style="dim")
        text.append(" ")
        if self.show_guest and line.guest:
            text.append(f"{line.guest} ", style="bold")
        style = phase_style(line.phase) if line.phase else _SEVERITY_STYLE.get(line.severity, "")
        text.append(line.text, style=style)
        text.no_wrap = True
        text.overflow = "ellipsis"
        return text

    def render(self) -> Text:
        height = max(self.size.height, 1)
        shown = list(self.lines)[-height:]
        if not shown:
            return Text("no events yet", style="dim")
        return Text("\n").join(self._format(line) for line in shown)
