"""The mapped-ram file format (sans-IO): layout planning, header, bitmaps and device tail codecs, validation.

Theory of operation
-------------------
QEMU's mapped-ram (docs/devel/migration/mapped-ram.rst) gives every guest
page a fixed offset in the migration file.  Parallel writers then pwrite
without coordinating, O_DIRECT works (every page sits on a page boundary),
and a page dirtied again during a live save overwrites its own slot, so the
file never grows past the size its layout fixes before the first byte is
written.  godwit keeps that design and, unlike QEMU's stream, puts the whole
layout in one header at the front, so a reader (or ``godwit inspect``)
learns every offset from the first few KiB and can refuse a damaged file
before it creates a guest.

File layout (every offset is from the start of the file)::

    0              header: fixed part, block table, guest config JSON,
                   zero padding to ``header_size`` (a multiple of 4 KiB)
    per RAM block, in table order:
      bitmap_offset  bitmap of pages present, ``bitmap_size`` bytes
                     (4 KiB aligned; the first one at ``header_size``)
      pages_offset   the block's pages, ``size`` bytes, page i at
                     ``pages_offset + i * page_size`` (1 MiB aligned;
                     the gap after the bitmap is a hole)
    tail_offset    device tail: device sections then the VMDESC JSON
                   (4 KiB aligned, after the last pages region)
    file_size      = tail_offset + tail_size: nothing is ever written past it

A page whose bit is clear was zero when saved and was never written (its
slot is a hole, or holds an older copy from a live pass, which a reader
must ignore).  The writer sets the ``COMPLETE`` flag last, after every page,
bitmap and the tail are on disk; a file without it is an interrupted save.

Header, fixed part (128 bytes, integers big-endian as on the wire):

=======  ====  ==================  ===============================================
offset   size  field               meaning
=======  ====  ==================  ===============================================
0        8     magic               ``b"GODWITMR"``
8        4     version             ``1`` (:data:`VERSION`); other versions refused
12       4     flags               bit 0 ``COMPLETE``; other bits must be zero
16       4     header_size         bytes of the whole header, multiple of 4096
20       4     block_count         RAM blocks in the table, 1..:data:`MAX_BLOCKS`
24       4     alignment           pages-region alignment, 1 MiB (:data:`ALIGNMENT`)
28       4     config_length       bytes of the guest config JSON after the table
32       8     tail_offset         where the device tail starts
40       8     tail_size           bytes of the device tail
48       32    tail_sha256         SHA-256 of the device tail
80       8     file_size           ``tail_offset + tail_size``
88       4     header_crc32        CRC-32 of the ``header_size`` bytes, this field zero
92       36    reserved            zero
=======  ====  ==================  ===============================================

Block table entry (``block_count`` × 320 bytes from offset 128):

=======  ====  ==================  ===============================================
offset   size  field               meaning
=======  ====  ==================  ===============================================
0        256   name                UTF-8, NUL-padded, 1..255 bytes, unique
256      8     size                bytes of RAM, a positive multiple of page_size
264      8     page_size           4096, or 2 MiB for hugetlb blocks
272      8     bitmap_offset       4 KiB aligned
280      8     bitmap_size         ``ceil(size / page_size / 64) * 8``
288      8     pages_offset        ``alignment``-aligned, after the bitmap
296      8     present_pages       bits set in the bitmap (cross-check)
304      16    reserved            zero
=======  ====  ==================  ===============================================

Then ``config_length`` bytes of UTF-8 JSON: the guest's configuration
(``GuestSpec.to_json()`` plus what the saver adds), then zero padding.

Bitmap: QEMU's ``unsigned long`` bitmap on a little-endian host — page
``i`` is bit ``i % 64`` of little-endian 64-bit word ``i // 64``
(:class:`protocol.bitmap.PageBitmap`'s wire form); bits past the block's
last page are zero.

Device tail (checked against ``tail_sha256`` before it is parsed):

=======  ==========  ===============================================
size     field       meaning
=======  ==========  ===============================================
4        magic       ``b"GWDV"``
4        count       device sections that follow
per section:
2        name_len    then ``name_len`` bytes of UTF-8 name
4        instance
4        version
4        data_len    then ``data_len`` bytes of section data
4        vmdesc_len  then ``vmdesc_len`` bytes of VMDESC JSON (an object)
=======  ==========  ===============================================

Every decoder raises :class:`MappedRamError` naming the file, the byte
offset and what was expected there.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from protocol.bitmap import PageBitmap

__all__ = [
    "ALIGNMENT",
    "BLOCK_ENTRY_SIZE",
    "FLAG_COMPLETE",
    "HEADER_FIXED_SIZE",
    "MAGIC",
    "MAX_BLOCKS",
    "TAIL_MAGIC",
    "VERSION",
    "BlockLayout",
    "FileLayout",
    "MappedRamError",
    "TailSection",
    "bitmap_size_for",
    "check_ram_layout",
    "decode_bitmap",
    "decode_header",
    "decode_tail",
    "encode_bitmap",
    "encode_header",
    "encode_tail",
    "header_size_from_prefix",
    "plan_layout",
    "validate_layout",
]

MAGIC = b"GODWITMR"
VERSION = 1
FLAG_COMPLETE = 1
ALIGNMENT = 1 << 20
HEADER_ALIGN = 4096
HEADER_FIXED_SIZE = 128
BLOCK_ENTRY_SIZE = 320
NAME_SIZE = 256
MAX_BLOCKS = 1024
MAX_CONFIG = 1 << 20
TAIL_MAGIC = b"GWDV"
PAGE_SIZES = (4096, 2 << 20)

_FIXED = struct.Struct(">8sIIIIII QQ32sQ I36s")
_ENTRY = struct.Struct(">256sQQQQQQ16s")
_CRC_AT = 88
assert _FIXED.size == HEADER_FIXED_SIZE and _ENTRY.size == BLOCK_ENTRY_SIZE


class MappedRamError(ValueError):
    """A mapped-ram file is not what it must be; ``str()`` says which file, where, and what."""

    def __init__(self, source: str, offset: int | None, reason: str) -> None:
        self.source = source
        self.offset = offset
        self.reason = reason
        where = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"{source}{where}: {reason}")


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def bitmap_size_for(npages: int) -> int:
    """Bytes of a block's bitmap: whole 64-bit words."""
    return (npages + 63) // 64 * 8


@dataclass(frozen=True)
class BlockLayout:
    """One RAM block's place in the file."""

    name: str
    size: int
    page_size: int
    bitmap_offset: int
    bitmap_size: int
    pages_offset: int
    present_pages: int = 0

    @property
    def npages(self) -> int:
        return self.size // self.page_size

    @property
    def pages_end(self) -> int:
        return self.pages_offset + self.size

    def page_offset(self, page: int) -> int:
        return self.pages_offset + page * self.page_size


@dataclass(frozen=True)
class FileLayout:
    """Everything the header says: where each block's bitmap and pages are, and the tail."""

    blocks: tuple[BlockLayout, ...]
    config: dict[str, Any]
    header_size: int
    tail_offset: int
    tail_size: int = 0
    tail_sha256: bytes = b"\0" * 32
    flags: int = 0
    version: int = VERSION
    alignment: int = ALIGNMENT

    @property
    def complete(self) -> bool:
        return bool(self.flags & FLAG_COMPLETE)

    @property
    def ram_end(self) -> int:
        """End of the last pages region: no page is ever written at or past it."""
        return max(b.pages_end for b in self.blocks)

    @property
    def file_size(self) -> int:
        return self.tail_offset + self.tail_size

    def block(self, name: str) -> BlockLayout:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)

    def finished(self, tail: bytes, present: Sequence[int], *, complete: bool = True) -> FileLayout:
        """This layout with the tail and per-block present counts filled in (and COMPLETE set)."""
        if len(present) != len(self.blocks):
            raise ValueError(f"{len(present)} present counts for {len(self.blocks)} blocks")
        return replace(
            self,
            blocks=tuple(
                replace(b, present_pages=int(n)) for b, n in zip(self.blocks, present, strict=True)
            ),
            tail_size=len(tail),
            tail_sha256=hashlib.sha256(tail).digest(),
            flags=self.flags | (FLAG_COMPLETE if complete else 0),
        )

    def describe(self) -> dict[str, Any]:
        """JSON-friendly view for ``godwit inspect``."""
        return {
            "version": self.version,
            "complete": self.complete,
            "header-size": self.header_size,
            "alignment": self.alignment,
            "tail-offset": self.tail_offset,
            "tail-size": self.tail_size,
            "file-size": self.file_size,
            "config": self.config,
            "blocks": [
                {
                    "name": b.name,
                    "size": b.size,
                    "page-size": b.page_size,
                    "pages": b.npages,
                    "bitmap-offset": b.bitmap_offset,
                    "bitmap-size": b.bitmap_size,
                    "pages-offset": b.pages_offset,
                    "present-pages": b.present_pages,
                }
                for b in self.blocks
            ],
        }


@dataclass(frozen=True)
class TailSection:
    """A device section as stored in the tail (the agents' DeviceSection, minus its field list)."""

    name: str
    instance: int
    version: int
    data: bytes = field(repr=False)


# -- planning ------------------------------------------------------------------


def plan_layout(
    blocks: Sequence[tuple[str, int, int]], config: dict[str, Any] | None = None
) -> FileLayout:
    """Fix every offset for RAM blocks given as (name, size, page_size), before anything is written."""
    config = dict(config or {})
    if not blocks:
        raise ValueError("mapped-ram: a guest needs at least one RAM block")
    if len(blocks) > MAX_BLOCKS:
        raise ValueError(f"mapped-ram: {len(blocks)} RAM blocks, at most {MAX_BLOCKS}")
    names = [n for n, _, _ in blocks]
    if len(set(names)) != len(names):
        raise ValueError(f"mapped-ram: duplicate RAM block names {names}")
    cfg = _encode_config(config)
    header_size = _align(
        HEADER_FIXED_SIZE + BLOCK_ENTRY_SIZE * len(blocks) + len(cfg), HEADER_ALIGN
    )
    at = header_size
    out: list[BlockLayout] = []
    for name, size, page_size in blocks:
        raw = name.encode()
        if not 0 < len(raw) < NAME_SIZE or b"\0" in raw:
            raise ValueError(f"mapped-ram: RAM block name {name!r} must be 1..255 bytes, no NUL")
        if page_size not in PAGE_SIZES or size <= 0 or size % page_size:
            raise ValueError(
                f"mapped-ram: RAM block {name!r}: size {size} / page size {page_size} not supported"
            )
        bitmap_offset = _align(at, HEADER_ALIGN)
        bsize = bitmap_size_for(size // page_size)
        pages_offset = _align(bitmap_offset + bsize, ALIGNMENT)
        out.append(BlockLayout(name, size, page_size, bitmap_offset, bsize, pages_offset))
        at = pages_offset + size
    return FileLayout(tuple(out), config, header_size, _align(at, HEADER_ALIGN))


def _encode_config(config: dict[str, Any]) -> bytes:
    cfg = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    if len(cfg) > MAX_CONFIG:
        raise ValueError(f"mapped-ram: guest config of {len(cfg)} bytes exceeds {MAX_CONFIG}")
    return cfg


# -- header ------------------------------------------------------------------------


def encode_header(layout: FileLayout) -> bytes:
    """The ``header_size`` bytes at offset 0, CRC included."""
    cfg = _encode_config(layout.config)
    buf = bytearray(layout.header_size)
    if HEADER_FIXED_SIZE + BLOCK_ENTRY_SIZE * len(layout.blocks) + len(cfg) > layout.header_size:
        raise ValueError("mapped-ram: header does not fit its header_size")
    _FIXED.pack_into(
        buf,
        0,
        MAGIC,
        layout.version,
        layout.flags,
        layout.header_size,
        len(layout.blocks),
        layout.alignment,
        len(cfg),
        layout.tail_offset,
        layout.tail_size,
        layout.tail_sha256,
        layout.file_size,
        0,
        b"\0" * 36,
    )
    at = HEADER_FIXED_SIZE
    for b in layout.blocks:
        _ENTRY.pack_into(
            buf,
            at,
            b.name.encode(),
            b.size,
            b.page_size,
            b.bitmap_offset,
            b.bitmap_size,
            b.pages_offset,
            b.present_pages,
            b"\0" * 16,
        )
        at += BLOCK_ENTRY_SIZE
    buf[at : at + len(cfg)] = cfg
    struct.pack_into(">I", buf, _CRC_AT, zlib.crc32(buf))
    return bytes(buf)


def header_size_from_prefix(prefix: bytes, *, source: str = "mapped-ram file") -> int:
    """Check magic and version in the first bytes and say how many header bytes to read."""
    if len(prefix) < HEADER_FIXED_SIZE:
        raise MappedRamError(
            source,
            len(prefix),
            f"file ends after {len(prefix)} bytes; expected a {HEADER_FIXED_SIZE}-byte mapped-ram header",
        )
    magic, version, _flags, header_size = struct.unpack_from(">8sIII", prefix)
    if magic != MAGIC:
        raise MappedRamError(
            source, 0, f"magic {magic!r} is not {MAGIC!r}: not a godwit mapped-ram file"
        )
    if version != VERSION:
        raise MappedRamError(
            source, 8, f"format version {version}; this godwit reads version {VERSION}"
        )
    if header_size < HEADER_ALIGN or header_size % HEADER_ALIGN:
        raise MappedRamError(
            source, 16, f"header_size {header_size} is not a positive multiple of {HEADER_ALIGN}"
        )
    limit = _align(HEADER_FIXED_SIZE + BLOCK_ENTRY_SIZE * MAX_BLOCKS + MAX_CONFIG, HEADER_ALIGN)
    if header_size > limit:
        raise MappedRamError(source, 16, f"header_size {header_size} exceeds the maximum {limit}")
    return int(header_size)


def decode_header(data: bytes, *, source: str = "mapped-ram file") -> FileLayout:
    """Parse and check the header bytes alone (offsets against the file: :func:`validate_layout`)."""
    header_size = header_size_from_prefix(data, source=source)
    if len(data) < header_size:
        raise MappedRamError(
            source,
            len(data),
            f"file ends inside the header; expected {header_size} header bytes",
        )
    data = bytes(data[:header_size])
    (
        _magic,
        version,
        flags,
        _hs,
        count,
        alignment,
        config_length,
        tail_offset,
        tail_size,
        tail_sha,
        file_size,
        crc,
        reserved,
    ) = _FIXED.unpack_from(data)
    expect_crc = zlib.crc32(data[:_CRC_AT] + b"\0\0\0\0" + data[_CRC_AT + 4 :])
    if crc != expect_crc:
        raise MappedRamError(
            source,
            _CRC_AT,
            f"header CRC-32 0x{crc:08x}, expected 0x{expect_crc:08x}: header damaged",
        )
    if flags & ~FLAG_COMPLETE:
        raise MappedRamError(source, 12, f"unknown flags 0x{flags:x} (only COMPLETE=1 is defined)")
    if reserved != b"\0" * 36:
        raise MappedRamError(source, 92, "reserved header bytes are not zero")
    if not 1 <= count <= MAX_BLOCKS:
        raise MappedRamError(source, 20, f"block_count {count}, expected 1..{MAX_BLOCKS}")
    if alignment != ALIGNMENT:
        raise MappedRamError(source, 24, f"alignment {alignment}, expected {ALIGNMENT}")
    table_end = HEADER_FIXED_SIZE + BLOCK_ENTRY_SIZE * count
    if table_end + config_length > header_size:
        raise MappedRamError(
            source,
            28,
            f"block table and config ({table_end + config_length} bytes) overflow header_size {header_size}",
        )
    if file_size != tail_offset + tail_size:
        raise MappedRamError(
            source,
            80,
            f"file_size {file_size}, expected tail_offset + tail_size = {tail_offset + tail_size}",
        )
    blocks: list[BlockLayout] = []
    seen: set[str] = set()
    for i in range(count):
        at = HEADER_FIXED_SIZE + i * BLOCK_ENTRY_SIZE
        raw, size, ps, boff, bsize, poff, present, res = _ENTRY.unpack_from(data, at)
        name_raw = raw.rstrip(b"\0")
        try:
            name = name_raw.decode()
        except UnicodeDecodeError:
            raise MappedRamError(source, at, f"block {i}: name is not UTF-8") from None
        if not name or b"\0" in name_raw or name in seen:
            raise MappedRamError(
                source, at, f"block {i}: name {name!r} empty, malformed or repeated"
            )
        seen.add(name)
        where = f"block {name!r}"
        if res != b"\0" * 16:
            raise MappedRamError(source, at + 304, f"{where}: reserved bytes are not zero")
        if ps not in PAGE_SIZES:
            raise MappedRamError(
                source, at + 264, f"{where}: page size {ps}, expected one of {PAGE_SIZES}"
            )
        if size <= 0 or size % ps:
            raise MappedRamError(
                source,
                at + 256,
                f"{where}: size {size} is not a positive multiple of page size {ps}",
            )
        npages = size // ps
        if bsize != bitmap_size_for(npages):
            raise MappedRamError(
                source,
                at + 280,
                f"{where}: bitmap_size {bsize}, expected {bitmap_size_for(npages)} for {npages} pages",
            )
        if present > npages:
            raise MappedRamError(
                source, at + 296, f"{where}: present_pages {present} exceeds its {npages} pages"
            )
        blocks.append(BlockLayout(name, size, ps, boff, bsize, poff, present))
    cfg_raw = data[table_end : table_end + config_length]
    try:
        config = json.loads(cfg_raw) if config_length else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MappedRamError(source, table_end, f"guest config is not JSON ({e})") from None
    if not isinstance(config, dict):
        raise MappedRamError(source, table_end, "guest config is not a JSON object")
    if any(data[table_end + config_length :]):
        raise MappedRamError(
            source, table_end + config_length, "header padding after the config is not zero"
        )
    return FileLayout(
        tuple(blocks),
        config,
        header_size,
        tail_offset,
        tail_size,
        tail_sha,
        flags,
        version,
        alignment,
    )


def validate_layout(layout: FileLayout, file_size: int, *, source: str = "mapped-ram file") -> None:
    """Offsets aligned, in order, not overlapping, inside the file; a complete file is exactly its size."""
    if layout.complete:
        if file_size != layout.file_size:
            what = "truncated" if file_size < layout.file_size else "longer than its layout"
            raise MappedRamError(
                source,
                min(file_size, layout.file_size),
                f"file is {file_size} bytes, header says {layout.file_size}: {what}",
            )
    elif file_size < layout.tail_offset:
        raise MappedRamError(
            source,
            file_size,
            f"file is {file_size} bytes, shorter than its RAM layout ({layout.tail_offset})",
        )
    entry = HEADER_FIXED_SIZE
    prev_end = layout.header_size
    for b in layout.blocks:
        where = f"block {b.name!r}"
        if b.bitmap_offset % HEADER_ALIGN or b.bitmap_offset < prev_end:
            raise MappedRamError(
                source,
                entry + 272,
                f"{where}: bitmap_offset {b.bitmap_offset}, expected a multiple of {HEADER_ALIGN} "
                f"at or after {prev_end} (end of the previous region)",
            )
        if b.pages_offset % layout.alignment or b.pages_offset < b.bitmap_offset + b.bitmap_size:
            raise MappedRamError(
                source,
                entry + 288,
                f"{where}: pages_offset {b.pages_offset}, expected a multiple of {layout.alignment} "
                f"at or after the bitmap's end {b.bitmap_offset + b.bitmap_size}",
            )
        if b.pages_end > layout.tail_offset:
            raise MappedRamError(
                source,
                entry + 288,
                f"{where}: pages_offset {b.pages_offset}: its pages [{b.pages_offset}, {b.pages_end}) "
                f"run past the device tail at {layout.tail_offset}; expected them before it",
            )
        prev_end = b.pages_end
        entry += BLOCK_ENTRY_SIZE
    if layout.tail_offset % HEADER_ALIGN or layout.tail_offset < prev_end:
        raise MappedRamError(
            source,
            32,
            f"tail_offset {layout.tail_offset}, expected a multiple of {HEADER_ALIGN} at or after "
            f"the last pages region's end {prev_end}",
        )


def check_ram_layout(
    layout: FileLayout,
    expected: Sequence[tuple[str, int]] | Sequence[tuple[str, int, int]],
    *,
    source: str = "mapped-ram file",
) -> None:
    """Refuse a file whose RAM blocks are not the (name, size[, page_size]) asked for."""
    have = [(b.name, b.size, b.page_size) for b in layout.blocks]
    want = [tuple(e) for e in expected]
    if len(have) != len(want):
        raise MappedRamError(
            source,
            20,
            f"{len(have)} RAM blocks {[h[:2] for h in have]}, expected {len(want)} {[w[:2] for w in want]}",
        )
    for i, (h, w) in enumerate(zip(have, want, strict=True)):
        if h[: len(w)] != w:
            raise MappedRamError(
                source,
                HEADER_FIXED_SIZE + i * BLOCK_ENTRY_SIZE,
                f"RAM block {i} is {h[0]!r} of {h[1]} bytes (page {h[2]}), expected "
                f"{w[0]!r} of {w[1]} bytes" + (f" (page {w[2]})" if len(w) > 2 else ""),
            )


# -- bitmaps ---------------------------------------------------------------------


def encode_bitmap(bitmap: PageBitmap) -> bytes:
    return bitmap.to_le_words()


def decode_bitmap(
    data: bytes, block: BlockLayout, *, source: str = "mapped-ram file"
) -> PageBitmap:
    """The block's bitmap; refuses a wrong size, bits past its pages, or a count unlike the table's."""
    where = f"block {block.name!r} bitmap"
    if len(data) != block.bitmap_size:
        raise MappedRamError(
            source,
            block.bitmap_offset + len(data),
            f"{where}: {len(data)} bytes, expected {block.bitmap_size}",
        )
    words = np.frombuffer(data, dtype="<u8")
    npages = block.npages
    if npages % 64 and len(words) and int(words[-1]) >> (npages % 64):
        raise MappedRamError(
            source,
            block.bitmap_offset + block.bitmap_size - 8,
            f"{where}: bits set past its {npages} pages",
        )
    bm = PageBitmap.from_le_words(data, npages)
    if bm.count() != block.present_pages:
        raise MappedRamError(
            source,
            block.bitmap_offset,
            f"{where}: {bm.count()} pages set, the block table says {block.present_pages}",
        )
    return bm


# -- device tail -------------------------------------------------------------------


def encode_tail(sections: Sequence[TailSection], vmdesc: dict[str, Any]) -> bytes:
    out = bytearray(TAIL_MAGIC)
    out += struct.pack(">I", len(sections))
    for s in sections:
        name = s.name.encode()
        if not 0 < len(name) < 1 << 16:
            raise ValueError(f"device section name {s.name!r} must be 1..65535 bytes")
        out += struct.pack(">H", len(name)) + name
        out += struct.pack(">III", s.instance, s.version, len(s.data)) + bytes(s.data)
    desc = json.dumps(vmdesc, sort_keys=True).encode()
    out += struct.pack(">I", len(desc)) + desc
    return bytes(out)


def decode_tail(
    data: bytes, layout: FileLayout, *, source: str = "mapped-ram file"
) -> tuple[list[TailSection], dict[str, Any]]:
    """Device sections and VMDESC; the tail must match the header's SHA-256 first."""
    base = layout.tail_offset
    if len(data) != layout.tail_size:
        raise MappedRamError(
            source,
            base + len(data),
            f"device tail is {len(data)} bytes, expected {layout.tail_size}",
        )
    digest = hashlib.sha256(data).digest()
    if digest != layout.tail_sha256:
        raise MappedRamError(
            source,
            base,
            f"device tail SHA-256 {digest.hex()[:16]}…, header says {layout.tail_sha256.hex()[:16]}…: "
            "device state damaged",
        )
    view = memoryview(data)
    at = 0

    def take(n: int, what: str) -> memoryview:
        nonlocal at
        if at + n > len(view):
            raise MappedRamError(
                source, base + at, f"device tail ends inside {what} (needs {n} bytes)"
            )
        out = view[at : at + n]
        at += n
        return out

    if bytes(take(4, "the tail magic")) != TAIL_MAGIC:
        raise MappedRamError(source, base, f"device tail magic is not {TAIL_MAGIC!r}")
    (count,) = struct.unpack(">I", take(4, "the section count"))
    sections: list[TailSection] = []
    for i in range(count):
        (nlen,) = struct.unpack(">H", take(2, f"section {i}'s name length"))
        start = at
        try:
            name = bytes(take(nlen, f"section {i}'s name")).decode()
        except UnicodeDecodeError:
            raise MappedRamError(source, base + start, f"section {i}: name is not UTF-8") from None
        instance, version, dlen = struct.unpack(">III", take(12, f"section {name!r}'s header"))
        sections.append(
            TailSection(name, instance, version, bytes(take(dlen, f"section {name!r}")))
        )
    (dlen,) = struct.unpack(">I", take(4, "the VMDESC length"))
    start = at
    raw = bytes(take(dlen, "the VMDESC"))
    try:
        vmdesc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MappedRamError(source, base + start, f"VMDESC is not JSON ({e})") from None
    if not isinstance(vmdesc, dict):
        raise MappedRamError(source, base + start, "VMDESC is not a JSON object")
    if at != len(view):
        raise MappedRamError(source, base + at, f"{len(view) - at} stray bytes after the VMDESC")
    return sections, vmdesc
