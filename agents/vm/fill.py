"""Initial RAM contents: zero, random, or mixed:P% (P percent random pages), seeded.

Benchmarks must not flatter themselves with zero pages, so guests usually
start random or mixed.  Filling is numpy over 64 MiB chunks (SFC64
``integers`` runs at ~2 GB/s here; ``random_raw`` only ~0.3 GB/s).
"""

from __future__ import annotations

import numpy as np

from agents.vm.ramblock import RamBlock

CHUNK = 64 << 20


def parse_fill(text: str) -> float:
    """Fraction of pages filled with random data: zero → 0, random → 1, mixed:P% → P/100."""
    if text == "zero":
        return 0.0
    if text == "random":
        return 1.0
    kind, _, pct = text.partition(":")
    if kind == "mixed" and pct:
        try:
            p = float(pct.rstrip("%"))
        except ValueError:
            p = -1
        if 0 <= p <= 100:
            return p / 100.0
    raise ValueError(f"fill {text!r}: expected zero, random or mixed:P% with 0 ≤ P ≤ 100")


def _rng(seed: int, salt: int) -> np.random.Generator:
    return np.random.Generator(np.random.SFC64([seed, salt]))


def fill_block(block: RamBlock, fill: str, seed: int, salt: int = 0) -> int:
    """Fill a fresh block; returns how many pages got random data."""
    frac = parse_fill(fill)
    if frac == 0.0:
        return 0
    rng = _rng(seed, salt)
    ps = block.page_size
    words = block.array.view(np.uint64)
    wpp = ps // 8
    if frac >= 1.0:
        step = CHUNK // 8
        for i in range(0, len(words), step):
            n = min(step, len(words) - i)
            words[i : i + n] = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
        return block.npages
    chosen = np.flatnonzero(rng.random(block.npages) < frac)
    rows = words.reshape(block.npages, wpp)
    per = max(1, CHUNK // ps)
    for i in range(0, len(chosen), per):
        sel = chosen[i : i + per]
        rows[sel] = rng.integers(0, 2**64 - 1, (len(sel), wpp), dtype=np.uint64, endpoint=True)
    return len(chosen)
