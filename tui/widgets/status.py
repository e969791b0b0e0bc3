"""The headline of a guest: which guest, its migration status in its phase colour, the pass."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from protocol.states import Role
from tui import formatting as fmt
from tui.model import GuestState
from tui.phases import PAUSED_HINT, PHASE_HINT, phase_text


class GuestLine(Static):
    """Which guest is shown (and how many there are): name, RAM, workload, run state."""

    DEFAULT_CSS = "GuestLine { height: 1; }"

    def show(self, state: GuestState | None, index: int, total: int) -> None:
        if state is None:
            self.update(Text("no guests on this agent", style="dim"))
            return
        g = state.guest
        text = Text.assemble(
            ("guest ", "dim"),
            (g.name, "bold"),
            (f" ({index + 1}/{total})" if total > 1 else "", "dim"),
            "  ",
            fmt.size(g.memory),
            "  ",
            (g.workload or fmt.DASH, "italic"),
            "  ",
            (g.status or "?", "bold" if g.status == "running" else ""),
        )
        text.no_wrap = True
        text.overflow = "ellipsis"
        self.update(text)


class StatusLine(Static):
    """Status badge, role, pass count and elapsed time: the state at a glance."""

    DEFAULT_CSS = "StatusLine { height: 1; }"

    def show(self, state: GuestState | None) -> None:
        if state is None:
            self.update("")
            return
        info = state.info
        status = state.status or "none"
        parts: list[str | tuple[str, str] | Text] = [phase_text(status), " "]
        pair = state.effective()
        parts.append((pair[0].value if pair else (state.role or "?"), "bold"))
        # A destination counts the passes it saw end: none yet is not worth a "pass 0".
        if status != "none" and (state.passes or (pair is not None and pair[0] == Role.SOURCE)):
            parts.append(("  pass ", "dim"))
            parts.append(str(state.passes) if state.passes is not None else fmt.DASH)
        if info is not None and info.total_time is not None:
            parts.append(("  time ", "dim"))
            parts.append(fmt.millis(info.total_time))
        hint = PHASE_HINT.get(status)
        if status == "postcopy-paused" and pair is not None:
            hint = PAUSED_HINT[pair[0].value]
            if pair[0].value == "destination" and state.recovering:
                hint = f"ready: resume the source to {state.recovering}"
        if hint and hint != status:
            parts.append((f"  {hint}", "italic dim"))
        text = Text.assemble(*parts)
        text.no_wrap = True
        text.overflow = "ellipsis"
        self.update(text)


class DowntimeLine(Static):
    """Expected downtime while running, measured downtime after, and throttling."""

    DEFAULT_CSS = "DowntimeLine { height: 1; }"

    def show(self, state: GuestState | None) -> None:
        info = state.info if state is not None else None
        if info is None:
            self.update(Text("downtime —", style="dim"))
            return
        parts: list[str | tuple[str, str]] = [("downtime ", "dim")]
        if info.downtime is not None:
            parts += [(fmt.millis(info.downtime), "bold"), (" measured", "dim")]
            if info.expected_downtime is not None:
                parts += [("  (expected ", "dim"), fmt.millis(info.expected_downtime), (")", "dim")]
        elif info.expected_downtime is not None:
            parts += [fmt.millis(info.expected_downtime), (" expected", "dim")]
        else:
            parts.append((fmt.DASH, "dim"))
        if info.setup_time is not None:
            parts += [("  setup ", "dim"), fmt.millis(info.setup_time)]
        if info.cpu_throttle_percentage:
            parts += [("  throttle ", "dim"), (f"{info.cpu_throttle_percentage:.0f}%", "yellow")]
        if info.uri:
            parts += [("  → ", "dim"), info.uri]
        text = Text.assemble(*parts)
        text.no_wrap = True
        text.overflow = "ellipsis"
        self.update(text)


class ErrorLine(Static):
    """``error-desc`` of a failed migration, or the agent's last refusal, in plain words."""

    DEFAULT_CSS = """
    ErrorLine { height: auto; max-height: 2; color: $text-error; display: none; }
    """

    def show(self, state: GuestState | None, refusal: str | None) -> None:
        info = state.info if state is not None else None
        lines: list[str] = []
        status = state.status if state is not None else None
        if info is not None and info.error_desc and status == "failed":
            lines.append(f"error: {info.error_desc}")
        elif info is not None and info.error_desc and status == "postcopy-paused":
            lines.append(f"why: {info.error_desc}")  # what broke the link, in the agent's words
        if refusal:
            lines.append(refusal)
        self.update(Text("\n".join(lines)))  # agent text: never markup
        self.display = bool(lines)
