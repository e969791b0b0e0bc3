"""Postcopy figures: page requests, vCPU blocktime and the fault-latency histogram."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.widgets import Static

from tui import formatting as fmt
from tui.model import GuestState

BARS = " ▁▂▃▄▅▆▇█"


def histogram(dist: Sequence[int]) -> Text:
    """Power-of-two µs buckets as a bar row, trimmed to the non-empty range, with its span.

    Bucket ``i`` counts faults that took ``[2^i, 2^(i+1))`` µs.  Heights are
    linear in the count; an empty bucket inside the range is a dot so gaps
    stay visible.
    """
    nonzero = [i for i, n in enumerate(dist) if n > 0]
    if not nonzero:
        return Text("no faults yet", style="dim")
    lo, hi = nonzero[0], nonzero[-1]
    peak = max(dist)
    mode = dist.index(peak)
    bars = Text()
    for n in dist[lo : hi + 1]:
        if n == 0:
            bars.append("··", style="dim")
        else:
            level = max(1, round(n / peak * (len(BARS) - 1)))
            bars.append(BARS[level] * 2, style="cyan")
    return Text.assemble(
        (f"{fmt.bucket_label(lo)} ", "dim"),
        bars,
        (f" {fmt.bucket_label(hi + 1)}", "dim"),
        ("  most ", "dim"),
        f"{fmt.bucket_label(mode)}–{fmt.bucket_label(mode + 1)}",
    )


class PostcopyPanel(Static):
    """Shown once a migration has postcopy figures; hidden in plain precopy.

    The source only serves page requests, so it gets one line; blocktime and
    fault latencies are the destination's to measure, and only it shows them.
    """

    DEFAULT_CSS = "PostcopyPanel { height: auto; max-height: 2; display: none; }"

    def show(self, state: GuestState | None) -> None:
        info = state.info if state is not None else None
        if state is None or info is None or not info.has_postcopy:
            self.display = False
            return
        self.display = True
        pair = state.effective()
        destination = pair is not None and pair[0].value == "destination"
        if destination:
            # The destination counts its faults in the histogram; its request counter
            # (the source's figure) may stay 0.
            faults = sum(info.postcopy_latency_dist) or info.ram.postcopy_requests
            first = Text.assemble(("postcopy  faults ", "dim"), fmt.count(faults))
        else:
            first = Text.assemble(
                ("postcopy  requests ", "dim"), fmt.count(info.ram.postcopy_requests)
            )
        if destination:
            first.append_text(
                Text.assemble(("  blocktime ", "dim"), fmt.millis(info.postcopy_blocktime))
            )
        else:
            first.append_text(Text.assemble(("  sent ", "dim"), fmt.size(info.ram.postcopy_bytes)))
        if info.pauses:
            first.append_text(
                Text.assemble(
                    ("  paused ", "dim"),
                    str(info.pauses),
                    ("  recovered ", "dim"),
                    str(info.recoveries or 0),
                )
            )
        lines = [first]
        if destination:
            avg_ns = info.postcopy_latency_ns
            avg_us = avg_ns / 1000 if avg_ns else None
            lines.append(
                Text.assemble(
                    ("faults avg ", "dim"),
                    fmt.micros(avg_us),
                    "  ",
                    histogram(info.postcopy_latency_dist),
                )
            )
        for line in lines:
            line.no_wrap = True
            line.overflow = "ellipsis"
        self.update(Text("\n").join(lines))
