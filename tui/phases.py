"""How each migration status looks: a colour per phase, and a word that survives no colour.

The status name itself (QEMU's) is always printed, in capitals, so a
monochrome terminal or a colour-blind admin loses nothing but the tint.
"""

from __future__ import annotations

from rich.style import Style
from rich.text import Text

PHASE_STYLE: dict[str, str] = {
    "none": "dim",
    "setup": "bold yellow",
    "active": "bold blue",
    "pre-switchover": "bold magenta",
    "device": "bold magenta",
    "postcopy-device": "bold magenta",
    "postcopy-active": "bold cyan",
    "postcopy-paused": "bold white on red",
    "postcopy-recover-setup": "bold black on yellow",
    "postcopy-recover": "bold black on yellow",
    "completed": "bold green",
    "failed": "bold white on dark_red",
    "cancelling": "yellow",
    "cancelled": "dim",
}

PHASE_HINT: dict[str, str] = {
    "none": "idle",
    "setup": "connecting",
    "active": "precopy",
    "pre-switchover": "waiting for continue",
    "device": "switchover",
    "postcopy-device": "switchover to postcopy",
    "postcopy-active": "postcopy",
    "postcopy-paused": "link lost",
    "postcopy-recover-setup": "reconnecting",
    "postcopy-recover": "recovering",
    "completed": "done",
    "failed": "failed",
    "cancelling": "cancelling",
    "cancelled": "cancelled",
}

PAUSED_HINT: dict[str, str] = {
    "destination": "link lost: r to recover here",
    "source": "link lost: recover dst, r resume",
}
"""The one action that matters when paused, said on the side that must take it."""


def phase_style(status: str | None) -> Style:
    return Style.parse(PHASE_STYLE.get(status or "", "bold red"))


def phase_text(status: str | None, *, upper: bool = True) -> Text:
    """The status as shown: unknown names are shown as they came, in red."""
    label = status if status is not None else "unknown"
    return Text(f" {label.upper() if upper else label} ", style=phase_style(status))
