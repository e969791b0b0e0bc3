"""Human-readable figures for the TUI: sizes, rates, durations, timestamps.

Every function takes ``None`` (a field the agent left out, as QEMU does when a
figure is not meaningful yet) and answers with a dash, so a widget never has
to decide how to draw a missing value.
"""

from __future__ import annotations

import time

DASH = "—"

_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def size(n: float | None) -> str:
    """Bytes in binary units, three significant figures: ``1.50 GiB``."""
    if n is None:
        return DASH
    value = float(n)
    for unit in _BINARY_UNITS:
        if abs(value) < 1024 or unit == _BINARY_UNITS[-1]:
            if unit == "B":
                return f"{int(value)} B"
            if abs(value) >= 100:
                return f"{value:.0f} {unit}"
            if abs(value) >= 10:
                return f"{value:.1f} {unit}"
            return f"{value:.2f} {unit}"
        value /= 1024
    return DASH  # pragma: no cover - the loop always returns


def rate(bytes_per_second: float | None) -> str:
    if bytes_per_second is None:
        return DASH
    return f"{size(bytes_per_second)}/s"


def mbps(megabits: float | None) -> str:
    """QEMU's ``mbps`` is megabits per second; admins read it as such."""
    if megabits is None:
        return DASH
    if megabits >= 1000:
        return f"{megabits / 1000:.2f} Gbit/s"
    return f"{megabits:.0f} Mbit/s"


def count(n: float | None) -> str:
    """Counts with a k/M suffix so a column keeps its width."""
    if n is None:
        return DASH
    value = float(n)
    if abs(value) >= 1e6:
        return f"{value / 1e6:.1f}M"
    if abs(value) >= 1e4:
        return f"{value / 1e3:.0f}k"
    return f"{int(value):,}"


def millis(ms: float | None) -> str:
    """A duration given in milliseconds: ``85 ms``, ``12.4 s``, ``3m07s``."""
    if ms is None:
        return DASH
    if ms < 1:
        return f"{ms:.2f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def micros(us: float | None) -> str:
    """A duration in microseconds, as fault latencies are: ``38 µs``, ``1.2 ms``."""
    if us is None:
        return DASH
    if us < 1000:
        return f"{us:.0f} µs"
    return millis(us / 1000)


def bucket_label(i: int) -> str:
    """Lower bound of latency bucket ``i`` (``[2^i, 2^(i+1))`` µs), shortest form."""
    us = 1 << i
    if us < 1000:
        return f"{us}µs"
    if us < 1_000_000:
        return f"{us // 1000}ms"
    return f"{us // 1_000_000}s"


def clock(when: float) -> str:
    """Local wall-clock time of an event, to the second."""
    return time.strftime("%H:%M:%S", time.localtime(when))
