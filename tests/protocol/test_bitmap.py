"""PageBitmap against a plain bool-array model, including the tail past npages."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.bitmap import PageBitmap


def model_runs(bits: np.ndarray) -> list[tuple[int, int]]:
    runs, i, n = [], 0, len(bits)
    while i < n:
        if bits[i]:
            j = i
            while j < n and bits[j]:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs


def tail_is_clear(bm: PageBitmap) -> bool:
    rem = bm.npages % 64
    return rem == 0 or bm.words.size == 0 or int(bm.words[-1]) >> rem == 0


@st.composite
def bitmaps(draw: st.DrawFn, npages: int | None = None) -> tuple[PageBitmap, np.ndarray]:
    n = draw(st.integers(0, 300)) if npages is None else npages
    # one binary draw is much cheaper than n boolean draws; bias towards runs
    raw = np.frombuffer(draw(st.binary(min_size=n, max_size=n)), dtype=np.uint8)
    bits = np.zeros(n, dtype=bool) if raw.size == 0 else raw >= 128
    if draw(st.booleans()):
        bits = np.repeat(bits[: (n + 7) // 8], 8)[:n]
    return PageBitmap.from_bool(bits), bits


OPS = st.lists(
    st.tuples(
        st.sampled_from(["set", "clear", "set_idx", "clear_idx", "set_runs", "clear_runs"]),
        st.integers(0, 400),
        st.integers(0, 200),
    ),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 300), OPS)
def test_mutations_match_the_model(npages: int, ops: list[tuple[str, int, int]]) -> None:
    bm = PageBitmap(npages)
    model = np.zeros(npages, dtype=bool)
    for op, a, b in ops:
        start = a % (npages + 1)
        count = b % (npages - start + 1)
        if op == "set":
            bm.set_range(start, count)
            model[start : start + count] = True
        elif op == "clear":
            bm.clear_range(start, count)
            model[start : start + count] = False
        elif op in ("set_idx", "clear_idx"):
            idx = np.arange(start, start + count, 3, dtype=np.int64)
            getattr(bm, op.replace("idx", "indices"))(idx)
            model[idx] = op == "set_idx"
        else:
            starts = np.array([start, start // 2], dtype=np.int64)
            lengths = np.array([count, min(count, npages - start // 2)], dtype=np.int64)
            getattr(bm, op)(starts, lengths)
            for s, n in zip(starts, lengths, strict=True):
                model[s : s + n] = op == "set_runs"
        assert tail_is_clear(bm)
    assert np.array_equal(bm.to_bool(), model)
    assert bm.count() == int(model.sum())
    assert bm.any() == bool(model.any())
    assert np.array_equal(bm.indices(), np.flatnonzero(model))
    if npages:
        probe = np.arange(npages)
        assert np.array_equal(bm.test_indices(probe), model)
        assert [bm.test(int(i)) for i in probe[:70]] == list(model[:70])


@settings(max_examples=300, deadline=None)
@given(bitmaps())
def test_runs_match_the_model(pair: tuple[PageBitmap, np.ndarray]) -> None:
    bm, bits = pair
    starts, lengths = bm.runs()
    assert list(zip(starts.tolist(), lengths.tolist(), strict=True)) == model_runs(bits)


@settings(max_examples=300, deadline=None)
@given(bitmaps(), st.integers(0, 320), st.integers(1, 80))
def test_next_run_streams_the_same_runs_cut_to_max_len(
    pair: tuple[PageBitmap, np.ndarray], start: int, max_len: int
) -> None:
    bm, bits = pair
    got = []
    pos = start
    while (run := bm.next_run(pos, max_len)) is not None:
        first, count = run
        assert 0 < count <= max_len
        got.append(run)
        pos = first + count
    want = []
    for s, n in model_runs(np.where(np.arange(len(bits)) >= start, bits, False)):
        while n > 0:
            want.append((s, min(n, max_len)))
            s, n = s + min(n, max_len), n - min(n, max_len)
    assert got == want
    first_set = np.flatnonzero(bits[start:])
    assert bm.next_set(start) == (start + int(first_set[0]) if first_set.size else None)
    first_clear = np.flatnonzero(~bits[start:])
    assert bm.next_clear(start) == (start + int(first_clear[0]) if first_clear.size else None)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 200).flatmap(lambda n: st.tuples(bitmaps(n), bitmaps(n))))
def test_set_algebra_matches_the_model(
    pairs: tuple[tuple[PageBitmap, np.ndarray], tuple[PageBitmap, np.ndarray]],
) -> None:
    (a, ma), (b, mb) = pairs
    for got, want in (
        (a | b, ma | mb),
        (a & b, ma & mb),
        (a - b, ma & ~mb),
        (a ^ b, ma ^ mb),
        (a.complement(), ~ma),
        (~b, ~mb),
    ):
        assert np.array_equal(got.to_bool(), want) and tail_is_clear(got)
    c = a.copy()
    c |= b
    assert c == a | b and c is not a
    c = a.copy()
    c &= b
    assert c == a & b
    c = a.copy()
    c -= b
    assert c == a - b
    assert a.complement().count() == a.npages - a.count()
    assert (a == b) == bool(np.array_equal(ma, mb))


@settings(max_examples=200, deadline=None)
@given(bitmaps())
def test_le_words_roundtrip(pair: tuple[PageBitmap, np.ndarray]) -> None:
    bm, bits = pair
    wire = bm.to_le_words()
    assert len(wire) == 8 * ((len(bits) + 63) // 64)
    assert PageBitmap.from_le_words(wire, len(bits)) == bm
    # the wire bit order is QEMU's: page i is bit i % 64 of little-endian word i // 64
    for i in np.flatnonzero(bits)[:10].tolist():
        word = int.from_bytes(wire[8 * (i // 64) : 8 * (i // 64) + 8], "little")
        assert word >> (i % 64) & 1


def test_tail_bits_are_refused_on_the_wire_and_never_set() -> None:
    with pytest.raises(ValueError, match="bits set past its 70 pages"):
        PageBitmap.from_le_words(
            (1 << 6).to_bytes(8, "little") + (1 << 6).to_bytes(8, "little"), 70
        )
    with pytest.raises(ValueError, match="needs 16 bytes, got 8"):
        PageBitmap.from_le_words(bytes(8), 70)
    full = PageBitmap.full(70)
    assert full.count() == 70 and tail_is_clear(full)
    assert PageBitmap(70).complement() == full
    assert full.runs()[1].tolist() == [70]


def test_bounds() -> None:
    bm = PageBitmap(10)
    with pytest.raises(IndexError):
        bm.set_range(5, 6)
    with pytest.raises(IndexError):
        bm.test(10)
    with pytest.raises(IndexError):
        bm.set_indices(np.array([0, 10]))
    with pytest.raises(ValueError, match="differ in size"):
        _ = bm | PageBitmap(11)
    with pytest.raises(ValueError):
        bm.next_run(0, 0)
    assert bm.next_run() is None and PageBitmap(0).runs()[0].size == 0


def test_large_bitmap_runs_and_streaming() -> None:
    n = 1 << 24  # 64 GiB of 4 KiB pages
    bm = PageBitmap(n)
    bm.set_range(5, 1000)
    bm.set_range(n - 3, 3)
    bm.set_indices(np.array([1 << 20, (1 << 20) + 1]))
    starts, lengths = bm.runs()
    assert starts.tolist() == [5, 1 << 20, n - 3] and lengths.tolist() == [1000, 2, 3]
    assert bm.next_run(1006) == (1 << 20, 2)
    assert bm.next_run((1 << 20) + 2, 2) == (n - 3, 2)
    assert bm.count() == 1005
