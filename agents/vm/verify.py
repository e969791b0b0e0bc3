"""Verification of guest RAM after a migration: digests and the counter check.

Both are taken with the vCPUs stopped, on the agent's own mapping of the
blocks, and both must be able to fail:

- ``ram_digest``: a SHA-256 of the whole block (hashed in 64 MiB slices in a
  worker thread, ~1 GB/s with SHA-NI; blake2b measured 0.4 GB/s here) and,
  at the same time, a per-page digest: the page's 64-bit words dotted with
  fixed odd weights, mod 2⁶⁴ (numpy einsum, ~5 GB/s).  Any single changed
  word changes its page's digest (an odd weight is invertible mod 2⁶⁴), so
  comparing two per-page arrays names the pages that differ.
- ``counter_check``: QEMU migration-test's rule for the counter workload.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

SLICE = 64 << 20
_WEIGHTS: dict[int, np.ndarray] = {}


class Block(Protocol):
    name: str
    page_size: int
    npages: int
    array: np.ndarray


def _weights(words_per_page: int) -> np.ndarray:
    w = _WEIGHTS.get(words_per_page)
    if w is None:
        rng = np.random.Generator(np.random.SFC64(0x60D817))
        w = rng.integers(0, 2**63, words_per_page, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        _WEIGHTS[words_per_page] = w
    return w


def page_digests(buf: np.ndarray, page_size: int) -> np.ndarray:
    """One uint64 per page (see the module docstring)."""
    words = buf.view(np.uint64).reshape(-1, page_size // 8)
    out: np.ndarray = np.einsum("ij,j->i", words, _weights(page_size // 8))
    return out


def ram_digest(block: Block) -> tuple[str, np.ndarray]:
    """(SHA-256 hex of the whole block, per-page uint64 digests); take it while stopped."""
    arr = block.array
    view = memoryview(arr)  # type: ignore[arg-type]
    whole = hashlib.sha256()

    def hash_all() -> None:
        for off in range(0, len(view), SLICE):
            whole.update(view[off : off + SLICE])  # releases the GIL for large buffers

    t = threading.Thread(target=hash_all, name=f"digest-{block.name}")
    t.start()
    try:
        per_page = np.empty(block.npages, dtype=np.uint64)
        step = max(1, SLICE // block.page_size)
        for first in range(0, block.npages, step):
            n = min(step, block.npages - first)
            chunk = arr[first * block.page_size : (first + n) * block.page_size]
            per_page[first : first + n] = page_digests(chunk, block.page_size)
    finally:
        t.join()
    return whole.hexdigest(), per_page


def differing_pages(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Indices of pages whose digests differ (arrays of equal length)."""
    if a.shape != b.shape:
        raise ValueError(f"digest arrays differ in length: {a.shape[0]} vs {b.shape[0]} pages")
    return np.flatnonzero(a != b)


@dataclass
class CheckResult:
    ok: bool
    explanation: str
    first_bad_page: int | None = None

    def __bool__(self) -> bool:
        return self.ok


def counter_check(block: Block, state: dict[str, Any] | None = None) -> CheckResult:
    """All first bytes equal except one step of -1 (mod 256) where the walk stopped.

    ``state`` is the counter's stats (``(await guest.stats())["counter"]``);
    with it the step must sit exactly at the walk position (or nowhere, when
    the walk is in another block or at page 0).
    """
    ps = block.page_size
    first = block.array[::ps]
    step = (first[1:] - first[:-1]).astype(np.uint8)  # wraps mod 256
    bad = np.flatnonzero((step != 0) & (step != 255))
    where = f"ramblock {block.name!r}"
    if bad.size:
        p = int(bad[0]) + 1
        return CheckResult(
            False,
            f"{where}: page {p} has first byte 0x{first[p]:02x} after 0x{first[p - 1]:02x} on page {p - 1} "
            f"(expected equal, or one less where the walk stopped)",
            p,
        )
    downs = np.flatnonzero(step == 255) + 1
    if downs.size > 1:
        p = int(downs[1])
        return CheckResult(
            False,
            f"{where}: second step down at page {p} (0x{first[p - 1]:02x}→0x{first[p]:02x}); "
            f"the first was at page {int(downs[0])}: the walk cannot have stopped twice",
            p,
        )
    stop_at = int(downs[0]) if downs.size else None
    if state is not None:
        expect: int | None = None
        if state.get("block", block.name) == block.name:
            pos = int(state.get("block_page", state.get("position", 0)))
            expect = pos if pos > 0 else None
        if expect != stop_at:
            p = min(x for x in (expect, stop_at) if x is not None)
            return CheckResult(
                False,
                f"{where}: the walk stopped at page {expect if expect is not None else 'none (other block or start)'} "
                f"but RAM steps down at page {stop_at if stop_at is not None else 'nowhere'}",
                p,
            )
    value = int(first[0])
    if stop_at is None:
        return CheckResult(True, f"{where}: all {block.npages} pages at 0x{value:02x}")
    return CheckResult(
        True,
        f"{where}: pages 0..{stop_at - 1} at 0x{value:02x}, {stop_at}..{block.npages - 1} at "
        f"0x{int(first[stop_at]):02x} (walk stopped at page {stop_at})",
    )
