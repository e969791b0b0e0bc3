"""RAM blocks are memfds: writes through the fd show in the mapping, discard punches holes,
close leaves nothing, and zero-page detection agrees with a page-by-page check."""

import os
from pathlib import Path

import numpy as np
import pytest

from agents.vm.ramblock import RamBlock, zero_page_mask

PS = 4096


def memfd_links() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "memfd:godwit" in target:
            out.append(target)
    return out


def test_write_pages_lands_in_the_mapping_and_pages_is_zero_copy():
    with RamBlock.create("t", 64 * PS) as b:
        assert (b.name, b.size, b.page_size, b.npages) == ("t", 64 * PS, PS, 64)
        data = np.arange(2 * PS, dtype=np.uint32).astype(np.uint8)
        b.write_pages(5, data.tobytes())
        assert bytes(b.pages(5, 2)) == data.tobytes()
        window = b.pages(7, 1)
        b.array[7 * PS] = 0xAB  # a later change shows through an earlier slice
        assert window[0] == 0xAB
        del window


def test_discard_punches_the_page_out():
    with RamBlock.create("t", 16 * PS) as b:
        b.array[:] = 0x11
        b.discard(3, 2)
        assert not b.array[3 * PS : 5 * PS].any()
        assert (b.array[: 3 * PS] == 0x11).all() and (b.array[5 * PS :] == 0x11).all()
        with pytest.raises(IndexError, match=r"pages \[15, 17\) outside"):
            b.discard(15, 2)


def test_whole_pages_only():
    with RamBlock.create("t", 4 * PS) as b, pytest.raises(ValueError, match="not whole pages"):
        b.write_pages(0, b"x" * 100)
    with pytest.raises(ValueError, match="not a positive multiple"):
        RamBlock.create("odd", PS + 1)


def test_close_is_idempotent_and_leaves_no_memfd():
    before = memfd_links()
    b = RamBlock.create("gone", 8 * PS)
    assert len(memfd_links()) > len(before)  # ours (and mmap's private dup)
    b.close()
    b.close()
    assert memfd_links() == before
    assert "memfd:godwit:gone" not in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("kind", ["random", "zero", "mixed", "last-word", "one-byte"])
def test_zero_page_mask_matches_a_page_by_page_check(kind):
    n = 2048
    rng = np.random.default_rng(7)
    a = np.zeros(n * PS, dtype=np.uint8)
    pages = a.reshape(n, PS)
    if kind == "random":
        a[:] = rng.integers(0, 256, a.size, dtype=np.uint8)
        pages[::97] = 0
    elif kind == "mixed":
        sel = rng.random(n) < 0.5
        pages[sel] = rng.integers(1, 256, (sel.sum(), PS), dtype=np.uint8)
    elif kind == "last-word":
        pages[::3, -1] = 1  # first word zero, page not zero
    elif kind == "one-byte":
        pages[1000, 2049] = 1
    expected = np.array([not p.any() for p in pages])
    assert (zero_page_mask(a, PS) == expected).all()
