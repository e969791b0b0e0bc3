"""The mapped-ram file format: layout rules, header/bitmap/tail round trips, and every refusal."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.bitmap import PageBitmap
from protocol.mapped_ram import (
    ALIGNMENT,
    BLOCK_ENTRY_SIZE,
    HEADER_FIXED_SIZE,
    MAGIC,
    VERSION,
    FileLayout,
    MappedRamError,
    TailSection,
    bitmap_size_for,
    check_ram_layout,
    decode_bitmap,
    decode_header,
    decode_tail,
    encode_bitmap,
    encode_header,
    encode_tail,
    header_size_from_prefix,
    plan_layout,
    validate_layout,
)

SRC = "/srv/vm1.img"
MIB = 1 << 20
BLOCKS = [("ram", 64 * MIB, 4096), ("vram", 3 * MIB + 4096, 4096), ("huge", 8 * MIB, 2 * MIB)]
SECTIONS = [TailSection("vcpu", 0, 1, b"\x01" * 44), TailSection("console", 0, 2, b"hello")]
VMDESC = {"ram": [{"name": "ram"}], "devices": [{"name": "vcpu"}]}


def finished_layout() -> tuple[FileLayout, bytes]:
    layout = plan_layout(BLOCKS, {"guest": {"name": "vm1"}})
    tail = encode_tail(SECTIONS, VMDESC)
    return layout.finished(tail, [10, 0, 4]), tail


def test_layout_aligns_pages_to_1mib_and_keeps_regions_apart() -> None:
    layout = plan_layout(BLOCKS, {"guest": {"name": "vm1"}})
    assert layout.header_size % 4096 == 0
    assert layout.blocks[0].bitmap_offset == layout.header_size
    end = layout.header_size
    for b in layout.blocks:
        assert b.bitmap_offset % 4096 == 0 and b.bitmap_offset >= end
        assert b.bitmap_size == bitmap_size_for(b.npages) == (b.npages + 63) // 64 * 8
        assert b.pages_offset % ALIGNMENT == 0
        assert b.pages_offset >= b.bitmap_offset + b.bitmap_size
        end = b.pages_end
    assert layout.tail_offset >= layout.ram_end == end
    assert layout.tail_offset % 4096 == 0
    assert not layout.complete
    validate_layout(layout, layout.tail_offset, source=SRC)


def test_layout_of_a_big_guest_puts_page_i_at_a_fixed_offset() -> None:
    layout = plan_layout([("ram", 1 << 40, 4096)])
    b = layout.blocks[0]
    assert b.bitmap_size == (1 << 28) // 8  # 32 MiB of bitmap for 1 TiB
    assert b.page_offset(12345) == b.pages_offset + 12345 * 4096


@pytest.mark.parametrize(
    ("blocks", "text"),
    [
        ([], "at least one"),
        ([("a", 4096, 4096), ("a", 4096, 4096)], "duplicate"),
        ([("", 4096, 4096)], "1..255 bytes"),
        ([("x" * 256, 4096, 4096)], "1..255 bytes"),
        ([("ram", 4097, 4096)], "not supported"),
        ([("ram", 8192, 8192)], "not supported"),
    ],
)
def test_plan_refuses_impossible_blocks(blocks: list[tuple[str, int, int]], text: str) -> None:
    with pytest.raises(ValueError, match=text):
        plan_layout(blocks)


def test_header_round_trip() -> None:
    layout, _tail = finished_layout()
    data = encode_header(layout)
    assert len(data) == layout.header_size
    assert data[:8] == MAGIC
    back = decode_header(data, source=SRC)
    assert back == layout
    assert back.complete
    assert [b.present_pages for b in back.blocks] == [10, 0, 4]
    assert back.config == {"guest": {"name": "vm1"}}
    assert header_size_from_prefix(data[:4096], source=SRC) == layout.header_size


def test_header_fields_sit_where_the_table_says() -> None:
    layout, tail = finished_layout()
    data = encode_header(layout)
    assert struct.unpack_from(">I", data, 8)[0] == VERSION
    assert struct.unpack_from(">I", data, 12)[0] == 1  # COMPLETE
    assert struct.unpack_from(">I", data, 20)[0] == len(BLOCKS)
    assert struct.unpack_from(">Q", data, 32)[0] == layout.tail_offset
    assert struct.unpack_from(">Q", data, 40)[0] == len(tail)
    assert data[48:80] == hashlib.sha256(tail).digest()
    entry = HEADER_FIXED_SIZE + BLOCK_ENTRY_SIZE
    assert data[entry : entry + 4] == b"vram"
    assert struct.unpack_from(">Q", data, entry + 288)[0] == layout.blocks[1].pages_offset


def _reencode(layout: FileLayout, **changes: object) -> bytes:
    return encode_header(replace(layout, **changes))  # type: ignore[arg-type]


def test_bad_magic_is_refused_with_file_and_offset() -> None:
    data = bytearray(encode_header(finished_layout()[0]))
    data[0:8] = b"QEVM\0\0\0\3"
    with pytest.raises(MappedRamError, match=r"/srv/vm1.img at byte 0: magic .* not a godwit"):
        decode_header(bytes(data), source=SRC)


def test_other_version_is_refused() -> None:
    data = bytearray(encode_header(finished_layout()[0]))
    struct.pack_into(">I", data, 8, VERSION + 1)
    with pytest.raises(
        MappedRamError, match=r"at byte 8: format version 2; this godwit reads version 1"
    ):
        decode_header(bytes(data), source=SRC)


def test_a_flipped_header_byte_fails_the_crc() -> None:
    data = bytearray(encode_header(finished_layout()[0]))
    data[HEADER_FIXED_SIZE + BLOCK_ENTRY_SIZE * 3 + 5] ^= 0x20  # inside the config JSON
    with pytest.raises(MappedRamError, match=r"at byte 88: header CRC-32 .*damaged"):
        decode_header(bytes(data), source=SRC)


def test_short_prefix_and_header_cut_short() -> None:
    data = encode_header(finished_layout()[0])
    with pytest.raises(MappedRamError, match=r"at byte 40: file ends after 40 bytes"):
        decode_header(data[:40], source=SRC)
    big = plan_layout([(f"b{i}", 4096, 4096) for i in range(40)])
    raw = encode_header(big)
    assert big.header_size > 4096
    with pytest.raises(MappedRamError, match="ends inside the header"):
        decode_header(raw[:4096], source=SRC)


@pytest.mark.parametrize(
    ("change", "offset", "text"),
    [
        ({"flags": 0x5}, 12, "unknown flags"),
        ({"alignment": 4096}, 24, "alignment 4096"),
        ({"tail_size": 1 << 50}, None, None),  # consistent (file_size follows): checked later
    ],
)
def test_header_field_checks(change: dict[str, int], offset: int | None, text: str | None) -> None:
    layout = finished_layout()[0]
    data = _reencode(layout, **change)
    if text is None:
        decode_header(data, source=SRC)
        return
    with pytest.raises(MappedRamError, match=rf"at byte {offset}: {text}"):
        decode_header(data, source=SRC)


def test_block_entry_checks() -> None:
    layout = finished_layout()[0]
    b0 = layout.blocks[0]
    bad_bitmap = replace(layout, blocks=(replace(b0, bitmap_size=8), *layout.blocks[1:]))
    with pytest.raises(
        MappedRamError,
        match=rf"at byte {HEADER_FIXED_SIZE + 280}: block 'ram': bitmap_size 8, expected 2048",
    ):
        decode_header(encode_header(bad_bitmap), source=SRC)
    too_many = replace(
        layout, blocks=(replace(b0, present_pages=b0.npages + 1), *layout.blocks[1:])
    )
    with pytest.raises(MappedRamError, match="present_pages 16385 exceeds"):
        decode_header(encode_header(too_many), source=SRC)
    odd_size = replace(layout, blocks=(replace(b0, size=b0.size + 1), *layout.blocks[1:]))
    with pytest.raises(MappedRamError, match="not a positive multiple of page size"):
        decode_header(encode_header(odd_size), source=SRC)


def test_validate_refuses_offsets_out_of_place() -> None:
    layout, _ = finished_layout()
    b0, b1 = layout.blocks[0], layout.blocks[1]
    cases = [
        (replace(b0, pages_offset=b0.pages_offset + 4096), HEADER_FIXED_SIZE + 288, "pages_offset"),
        (replace(b0, bitmap_offset=0), HEADER_FIXED_SIZE + 272, "bitmap_offset 0"),
    ]
    for block, offset, text in cases:
        bad = replace(layout, blocks=(block, *layout.blocks[1:]))
        with pytest.raises(MappedRamError, match=rf"at byte {offset}: block 'ram': {text}"):
            validate_layout(
                decode_header(encode_header(bad), source=SRC), layout.file_size, source=SRC
            )
    # vram's bitmap inside ram's pages: overlapping regions
    overlap = replace(
        layout, blocks=(b0, replace(b1, bitmap_offset=b0.pages_offset), layout.blocks[2])
    )
    with pytest.raises(
        MappedRamError, match=r"block 'vram': bitmap_offset .*end of the previous region"
    ):
        validate_layout(overlap, layout.file_size, source=SRC)
    early_tail = replace(layout, tail_offset=layout.ram_end - 4096)
    huge_entry = HEADER_FIXED_SIZE + 2 * BLOCK_ENTRY_SIZE + 288
    with pytest.raises(
        MappedRamError, match=rf"at byte {huge_entry}: block 'huge': .* run past the device tail"
    ):
        validate_layout(early_tail, early_tail.file_size, source=SRC)
    odd_tail = replace(layout, tail_offset=layout.ram_end + 1)
    with pytest.raises(MappedRamError, match=r"at byte 32: tail_offset \d+, expected a multiple"):
        validate_layout(odd_tail, odd_tail.file_size, source=SRC)


def test_validate_refuses_truncated_and_overlong_files() -> None:
    layout, _ = finished_layout()
    validate_layout(layout, layout.file_size, source=SRC)
    with pytest.raises(
        MappedRamError, match=r"at byte 1000: file is 1000 bytes, header says \d+: truncated"
    ):
        validate_layout(layout, 1000, source=SRC)
    with pytest.raises(MappedRamError, match="longer than its layout"):
        validate_layout(layout, layout.file_size + 1, source=SRC)
    incomplete = replace(layout, flags=0)
    validate_layout(incomplete, layout.tail_offset, source=SRC)
    with pytest.raises(MappedRamError, match="shorter than its RAM layout"):
        validate_layout(incomplete, layout.tail_offset - 1, source=SRC)


def test_check_ram_layout_names_the_difference() -> None:
    layout, _ = finished_layout()
    check_ram_layout(layout, [(n, s) for n, s, _ in BLOCKS], source=SRC)
    check_ram_layout(layout, BLOCKS, source=SRC)
    with pytest.raises(MappedRamError, match=r"at byte 20: 3 RAM blocks .* expected 1"):
        check_ram_layout(layout, [("ram", 64 * MIB)], source=SRC)
    with pytest.raises(
        MappedRamError,
        match=rf"at byte {HEADER_FIXED_SIZE + BLOCK_ENTRY_SIZE}: RAM block 1 is 'vram' of 3149824 bytes .* expected 'vram' of 4194304",
    ):
        check_ram_layout(
            layout, [("ram", 64 * MIB), ("vram", 4 * MIB), ("huge", 8 * MIB)], source=SRC
        )


# -- bitmaps -----------------------------------------------------------------------


@given(st.lists(st.booleans(), min_size=1, max_size=300))
def test_bitmap_round_trip(bits: list[bool]) -> None:
    n = len(bits)
    block = replace(plan_layout([("ram", n * 4096, 4096)]).blocks[0], present_pages=sum(bits))
    data = encode_bitmap(PageBitmap.from_bool(bits))
    assert len(data) == block.bitmap_size
    assert decode_bitmap(data, block, source=SRC).to_bool().tolist() == bits


def test_bitmap_is_qemus_little_endian_words() -> None:
    bits = np.zeros(130, dtype=bool)
    bits[[0, 65, 129]] = True
    data = encode_bitmap(PageBitmap.from_bool(bits))
    words = struct.unpack("<3Q", data)
    assert words == (1, 2, 2)


def test_bitmap_refusals() -> None:
    block = replace(plan_layout([("ram", 100 * 4096, 4096)]).blocks[0], present_pages=3)
    good = bytearray(encode_bitmap(PageBitmap.from_bool([True] * 3 + [False] * 97)))
    decode_bitmap(bytes(good), block, source=SRC)
    with pytest.raises(
        MappedRamError,
        match=rf"at byte {block.bitmap_offset + 8}: block 'ram' bitmap: 8 bytes, expected 16",
    ):
        decode_bitmap(bytes(good[:8]), block, source=SRC)
    past = bytearray(good)
    past[15] |= 0x80  # page 127 of a 100-page block
    with pytest.raises(
        MappedRamError, match=rf"at byte {block.bitmap_offset + 8}: .*bits set past its 100 pages"
    ):
        decode_bitmap(bytes(past), block, source=SRC)
    more = bytearray(good)
    more[1] |= 1
    with pytest.raises(MappedRamError, match="4 pages set, the block table says 3"):
        decode_bitmap(bytes(more), block, source=SRC)


# -- device tail ---------------------------------------------------------------------


def test_tail_round_trip() -> None:
    layout, tail = finished_layout()
    sections, vmdesc = decode_tail(tail, layout, source=SRC)
    assert sections == SECTIONS
    assert vmdesc == VMDESC


def test_a_flipped_device_byte_fails_the_checksum() -> None:
    layout, tail = finished_layout()
    bad = bytearray(tail)
    bad[20] ^= 1
    with pytest.raises(
        MappedRamError,
        match=rf"at byte {layout.tail_offset}: device tail SHA-256 .* device state damaged",
    ):
        decode_tail(bytes(bad), layout, source=SRC)
    with pytest.raises(
        MappedRamError, match=rf"device tail is {len(tail) - 1} bytes, expected {len(tail)}"
    ):
        decode_tail(tail[:-1], layout, source=SRC)


def test_tail_structure_is_checked_even_when_the_checksum_matches() -> None:
    layout = finished_layout()[0]
    # A section claiming more data than the tail holds (written by a buggy saver).
    raw = (
        b"GWDV"
        + struct.pack(">I", 1)
        + struct.pack(">H", 4)
        + b"vcpu"
        + struct.pack(">III", 0, 1, 999)
    )
    lay = layout.finished(raw, [10, 0, 4])
    with pytest.raises(
        MappedRamError,
        match=rf"at byte {lay.tail_offset + 26}: device tail ends inside section 'vcpu'",
    ):
        decode_tail(raw, lay, source=SRC)
    junk = encode_tail(SECTIONS, VMDESC) + b"xx"
    lay = layout.finished(junk, [10, 0, 4])
    with pytest.raises(MappedRamError, match="2 stray bytes after the VMDESC"):
        decode_tail(junk, lay, source=SRC)
    nomagic = b"NOPE" + encode_tail(SECTIONS, VMDESC)[4:]
    lay = layout.finished(nomagic, [10, 0, 4])
    with pytest.raises(MappedRamError, match="tail magic"):
        decode_tail(nomagic, lay, source=SRC)
