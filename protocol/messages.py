"""Migration messages: one typed class per frame type, with its payload layout.

Each message is a frozen dataclass; ``encode()`` gives ``[header, *parts]``
ready for a gather-write (page data is the caller's own memoryview, never
copied), and :func:`decode_message` turns a received :class:`Frame` back into
a message, refusing anything inconsistent with :class:`MalformedMessage`.

Scalars are big-endian (network order, like the frame header and QEMU's
stream).  Bulk arrays — DISCARD ranges and RECV_BITMAP words — are
little-endian u64, so numpy uses them in place on the hosts we run on (and
RECV_BITMAP is QEMU's ``ramblock_recv_bitmap_send`` form).  Strings are UTF-8.
Offsets are within the payload; ``rest`` runs to the end of the payload.

=================== ====== ===== ========= ========================================
message             offset size  type      field
=================== ====== ===== ========= ========================================
HELLO 0x01          0      2     u16 BE    version major
                    2      2     u16 BE    version minor
                    4      16    bytes     migration id (random, chosen by source)
                    20     1     u8        channel: 0 main, 1 return, 2 preempt,
                                           3 multifd
                    21     1     u8        flags: bit 0 = resume; others zero
                    22     2     u16 BE    index (multifd channel number, else 0)
ERROR 0x02          0      2     u16 BE    code length n
                    2      n     UTF-8     code (e.g. ``version-mismatch``)
                    2+n    rest  UTF-8     message for a human
CONFIG 0x03         0      rest  JSON      {"ramblocks": [{"name", "size",
                                           "page_size"}...], "capabilities": {},
                                           "parameters": {}, "guest": {}}
PAGES 0x10          0      4     u32 BE    block (index into CONFIG ramblocks)
                    4      4     u32 BE    count of pages, > 0
                    8      8     u64 BE    first page
                    16     8     u64 BE    request id (0 = background)
                    24     rest  bytes     count pages of equal, power-of-two size
ZERO 0x11           0      4     u32 BE    block
                    4      4     u32 BE    count, > 0
                    8      8     u64 BE    first page
PASS_END 0x12       0      4     u32 BE    pass number
                    4      rest  JSON      stats object
PAGE_BATCH 0x13     0      4     u32 BE    block
                    4      4     u32 BE    n pages, > 0
                    8      8n    u64 LE    page indices (any order, no repeats)
                    8+8n   rest  bytes     n pages of equal, power-of-two size,
                                           in the order of the indices
ZERO_BATCH 0x14     0      4     u32 BE    block
                    4      4     u32 BE    n pages, > 0
                    8      8n    u64 LE    page indices of pages that are zero
POSTCOPY_ADVISE     0      4     u32 BE    n, number of ramblocks
0x20                4      4     u32       reserved, zero
                    8      8n    u64 BE    page size of each ramblock, in order
DISCARD 0x21        0      4     u32 BE    block
                    4      4     u32 BE    n ranges, > 0
                    8      16n   u64 LE    n × (first page, count > 0)
DEVICE_STATE 0x22   0      4     u32 BE    instance
                    4      4     u32 BE    version
                    8      2     u16 BE    section name length n
                    10     n     UTF-8     section name
                    10+n   rest  bytes     section data
VMDESC 0x23         0      rest  JSON      description object
SWITCHOVER_START    -      0               (no payload; also POSTCOPY_LISTEN 0x25,
0x24                                       POSTCOPY_RUN 0x26, COMPLETE 0x27,
                                           RESUME 0x43, RESUME_ACK 0x44,
                                           SWITCHOVER_ACK 0x45,
                                           POSTCOPY_RUN_ACK 0x47)
PING 0x30, PONG     0      8     u64 BE    sequence number
0x31                8      8     u64 BE    sender's monotonic ns (echoed by PONG)
REQ_PAGES 0x40      0      4     u32 BE    block
                    4      4     u32 BE    count, > 0
                    8      8     u64 BE    first page
                    16     8     u64 BE    request id, > 0
                    24     8     u64 BE    destination's monotonic ns at the fault
RECV_BITMAP_REQUEST 0      4     u32 BE    block
0x41
RECV_BITMAP 0x42    0      4     u32 BE    block
                    4      4     u32       reserved, zero
                    8      8     u64 BE    npages
                    16     8     u64 BE    size in bytes = 8 × ceil(npages / 64)
                    24     size  u64 LE    bitmap words, bit i = page i, LSB first;
                                           bits past npages zero
                    24+size 8    u64 BE    end mark 0x0123456789abcdef
SHUT 0x46           0      rest  UTF-8     reason ("" = done)
=================== ====== ===== ========= ========================================
"""

from __future__ import annotations

import enum
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt

from protocol import PROTOCOL_VERSION
from protocol.bitmap import PageBitmap
from protocol.errors import CapabilityMismatch, MalformedMessage, VersionMismatch
from protocol.frames import Frame, FrameFlags, FrameType, encode_header
from protocol.options import CAPABILITIES

__all__ = [
    "RECV_BITMAP_END_MARK",
    "ChannelKind",
    "Complete",
    "Config",
    "DeviceState",
    "Discard",
    "Error",
    "Hello",
    "Message",
    "PageBatch",
    "Pages",
    "PassEnd",
    "Ping",
    "Pong",
    "PostcopyAdvise",
    "PostcopyListen",
    "PostcopyRun",
    "PostcopyRunAck",
    "RamBlockInfo",
    "RecvBitmap",
    "RecvBitmapRequest",
    "ReqPages",
    "Resume",
    "ResumeAck",
    "Shut",
    "SwitchoverAck",
    "SwitchoverStart",
    "Vmdesc",
    "Zero",
    "ZeroBatch",
    "check_version",
    "decode_message",
    "negotiate_capabilities",
]

RECV_BITMAP_END_MARK = 0x0123456789ABCDEF
"""QEMU's RAMBLOCK_RECV_BITMAP_ENDING: proves the bitmap was not cut or shifted."""

_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF

Part = bytes | memoryview


class _Bad(ValueError):
    """A payload inconsistency, raised inside decoders and turned into MalformedMessage."""


def _nbytes(part: Part) -> int:
    return part.nbytes if isinstance(part, memoryview) else len(part)


def _uint(name: str, value: int, limit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, not {value!r}")
    if not 0 <= value <= limit:
        raise ValueError(f"{name} {value} outside [0, {limit}]")


def _positive(name: str, value: int, limit: int) -> None:
    _uint(name, value, limit)
    if value == 0:
        raise ValueError(f"{name} must be > 0")


def _power_of_two(name: str, value: int) -> None:
    if value <= 0 or value & (value - 1):
        raise ValueError(f"{name} {value} is not a power of two")


def _need(payload: memoryview, size: int, what: str) -> None:
    if payload.nbytes < size:
        raise _Bad(f"payload {payload.nbytes} bytes, {what} needs at least {size}")


def _exact(payload: memoryview, size: int) -> None:
    if payload.nbytes != size:
        if payload.nbytes > size:
            raise _Bad(f"{payload.nbytes - size} trailing bytes after {size}")
        raise _Bad(f"payload {payload.nbytes} bytes, needs {size}")


def _utf8(data: memoryview | bytes, what: str) -> str:
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Bad(f"{what} is not valid UTF-8 (byte {exc.start})") from None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_object(data: memoryview, what: str) -> dict[str, Any]:
    text = _utf8(data, what)
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except ValueError as exc:
        raise _Bad(f"{what} is not JSON: {exc}") from None
    except RecursionError:
        raise _Bad(f"{what} is nested too deeply") from None
    if not isinstance(value, dict):
        raise _Bad(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def _dump_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


# --- base -----------------------------------------------------------------

_REGISTRY: dict[FrameType, type[Message]] = {}


class Message:
    """Base of every message: ``TYPE`` names its frame type."""

    __slots__ = ()
    TYPE: ClassVar[FrameType]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "TYPE" in cls.__dict__:
            _REGISTRY[cls.TYPE] = cls

    def payload_parts(self) -> list[Part]:
        """The payload as parts for a gather-write (no copy of bulk data)."""
        return []

    def flags(self) -> int:
        return 0

    def encode(self) -> list[Part]:
        """``[header, *payload parts]``, ready for ``sendmsg``-style writing."""
        parts = self.payload_parts()
        length = sum(_nbytes(p) for p in parts)
        return [encode_header(self.TYPE, length, self.flags()), *parts]

    def to_bytes(self) -> bytes:
        """The whole frame as one bytes object (copies; for tests and small messages)."""
        return b"".join(self.encode())

    @classmethod
    def decode_payload(cls, payload: memoryview) -> Self:
        """Parse a payload; raises ``ValueError`` on any inconsistency."""
        _exact(payload, 0)
        return cls()


def decode_message(frame: Frame, *, channel: str | None = None) -> Message:
    """Turn a frame into its message, or raise :class:`MalformedMessage` saying what and where."""
    cls = _REGISTRY[frame.type]
    try:
        return cls.decode_payload(frame.payload)
    except (ValueError, struct.error) as exc:
        raise MalformedMessage(
            f"malformed {frame.type.name}: {exc}", channel=channel, offset=frame.offset
        ) from None


# --- channel set-up ---------------------------------------------------------


class ChannelKind(enum.StrEnum):
    """What a channel carries (see ARCHITECTURE.md); the wire uses the codes below."""

    MAIN = "main"
    RETURN = "return"
    PREEMPT = "preempt"
    MULTIFD = "multifd"


_CHANNEL_CODES = {
    ChannelKind.MAIN: 0,
    ChannelKind.RETURN: 1,
    ChannelKind.PREEMPT: 2,
    ChannelKind.MULTIFD: 3,
}
_CHANNEL_BY_CODE = {v: k for k, v in _CHANNEL_CODES.items()}
_HELLO = struct.Struct(">HH16sBBH")
_HELLO_RESUME = 0x01


def channel_name(kind: ChannelKind, index: int = 0) -> str:
    """How a channel is named in logs and query-migrate: its kind, multifd ones numbered."""
    return f"multifd-{index}" if kind is ChannelKind.MULTIFD else kind.value


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First frame on every channel: who we are and which migration this joins."""

    TYPE: ClassVar[FrameType] = FrameType.HELLO
    version: tuple[int, int]
    migration_id: bytes
    channel: ChannelKind
    index: int = 0
    resume: bool = False

    def __post_init__(self) -> None:
        if len(self.version) != 2:
            raise ValueError(f"version must be (major, minor), not {self.version!r}")
        _uint("version major", self.version[0], _U16)
        _uint("version minor", self.version[1], _U16)
        if not isinstance(self.migration_id, bytes) or len(self.migration_id) != 16:
            raise ValueError(f"migration id must be 16 bytes, not {self.migration_id!r}")
        if not isinstance(self.channel, ChannelKind):
            raise ValueError(f"channel must be a ChannelKind, not {self.channel!r}")
        _uint("channel index", self.index, _U16)
        if self.index and self.channel is not ChannelKind.MULTIFD:
            raise ValueError(f"channel index {self.index} on a {self.channel.value} channel")

    @property
    def channel_name(self) -> str:
        """``main``, ``return``, ``preempt`` or ``multifd-N``."""
        return channel_name(self.channel, self.index)

    def payload_parts(self) -> list[Part]:
        flags = _HELLO_RESUME if self.resume else 0
        return [
            _HELLO.pack(
                self.version[0],
                self.version[1],
                self.migration_id,
                _CHANNEL_CODES[self.channel],
                flags,
                self.index,
            )
        ]

    @classmethod
    def decode_payload(cls, payload: memoryview) -> Self:
        _exact(payload, _HELLO.size)
        major, minor, mid, code, flags, index = _HELLO.unpack(payload)
        if code not in _CHANNEL_BY_CODE:
            raise _Bad(f"channel kind {code} unknown")
        if flags & ~_HELLO_RESUME:
            raise _Bad(f"undefined flag bits 0x{flags & ~_HELLO_RESUME:02x}")
        return cls((major, minor), mid, _CHANNEL_BY_CODE[code], index, bool(flags))


def check_version(hello: Hello, ours: tuple[int, int] = PROTOCOL_VERSION) -> tuple[int, int]:
    """The version both speak, or :class:`VersionMismatch` if the majors differ.

    A newer minor on either side is fine: minors only add what the other
    side may ignore.  The agent sends the exception's text in an ERROR
    frame (code ``version-mismatch``) before closing.
    """
    theirs = hello.version
    if theirs[0] != ours[0]:
        raise VersionMismatch(
            f"peer speaks protocol {theirs[0]}.{theirs[1]} on its {hello.channel_name} channel, "
            f"this agent {ours[0]}.{ours[1]}; major versions must match"
        )
    return ours[0], min(ours[1], theirs[1])


_ERROR_HEAD = struct.Struct(">H")


@dataclass(frozen=True, slots=True)
class Error(Message):
    """The sender gives up on this channel (and says why) before closing it."""

    TYPE: ClassVar[FrameType] = FrameType.ERROR
    code: str
    message: str

    def __post_init__(self) -> None:
        if len(self.code.encode()) > _U16:
            raise ValueError("error code longer than 65535 bytes")

    @classmethod
    def from_exception(cls, exc: BaseException) -> Error:
        return cls(str(getattr(exc, "code", "internal-error")), str(exc))

    def payload_parts(self) -> list[Part]:
        code = self.code.encode()
        return [_ERROR_HEAD.pack(len(code)) + code + self.message.encode()]

    @classmethod
    def decode_payload(cls, payload: memoryview) -> Self:
        _need(payload, 2, "the code length")
        (n,) = _ERROR_HEAD.unpack_from(payload)
        _need(payload, 2 + n, "the error code")
        return cls(_utf8(payload[2 : 2 + n], "code"), _utf8(payload[2 + n :], "message"))


@dataclass(frozen=True, slots=True)
class RamBlockInfo:
    name: str
    size: int
    page_size: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"ramblock name must be a non-empty string, not {self.name!r}")
        _uint(f"ramblock {self.name} size", self.size, _U64)
        _power_of_two(f"ramblock {self.name} page size", self.page_size)
        if self.size % self.page_size:
            raise ValueError(
                f"ramblock {self.name} size {self.size} is not a multiple of "
                f"its page size {self.page_size}"
            )

    @property
    def npages(self) -> int:
        return self.size // self.page_size


ParamValue = int | float | str | bool


@dataclass(frozen=True, slots=True)
class Config(Message):
    """The source's ramblocks and the capabilities and parameters it will use."""

    TYPE: ClassVar[FrameType] = FrameType.CONFIG
    ramblocks: tuple[RamBlockInfo, ...]
    capabilities: dict[str, bool] = field(default_factory=dict)
    parameters: dict[str, ParamValue] = field(default_factory=dict)
    guest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ramblocks", tuple(self.ramblocks))
        names = [b.name for b in self.ramblocks]
        if len(set(names)) != len(names):
            raise ValueError(f"ramblock names repeat: {names}")
        if len(self.ramblocks) > _U32:
            raise ValueError("too many ramblocks")
        for k, v in self.capabilities.items():
            if not isinstance(k, str) or not isinstance(v, bool):
                raise ValueError(f"capability {k!r} must map a name to true/false, not {v!r}")
        for key, value in self.parameters.items():
            if not isinstance(key, str) or not isinstance(value, int | float | str | bool):
                raise ValueError(f"parameter {key!r} has a value of type {type(value).__name__}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"parameter {key!r} is not finite")

    def block(self, index: int) -> RamBlockInfo:
        if not 0 <= index < len(self.ramblocks):
            raise MalformedMessage(f"ramblock {index} unknown ({len(self.ramblocks)} configured)")
        return self.ramblocks[index]

    def check_pages(self, block: int, first_page: int, count: int) -> RamBlockInfo:
        """The ramblock, if ``[first_page, first_page + count)`` lies inside it.

        Raises :class:`MalformedMessage` otherwise: an agent calls this on
        every PAGES, ZERO, DISCARD or REQ_PAGES before touching memory.
        """
        info = self.block(block)
        if first_page + count > info.npages:
            raise MalformedMessage(
                f"pages [{first_page}, {first_page + count}) outside ramblock "
                f"{info.name} of {info.npages} pages"
            )
        return info

    def payload_parts(self) -> list[Part]:
        doc = {
            "ramblocks": [
                {"name": b.name, "size": b.size, "page_size": b.page_size} for b in self.ramblocks
            ],
            "capabilities": self.capabilities,
            "parameters": self.parameters,
            "guest": self.guest,
        }
        return [_dump_json(doc)]

    @classmethod
    def decode_payload(cls, payload: memoryview) -> Self:
        doc = _json_object(payload, "CONFIG")
        blocks = doc.get("ramblocks")
        if not isinstance(blocks, list):
            raise _Bad("'ramblocks' must be a list")
        infos = []
        for i, b in enumerate(blocks):
            if not isinstance(b, dict) or not {"name", "size", "page_size"} <= b.keys():
                raise _Bad(f"ramblock {i} needs name, size and page_size")
            if not isinstance(b["size"], int) or not isinstance(b["page_size"], int):
                raise _Bad(f"ramblock {i} size and page_size must be integers")
            infos.append(RamBlockInfo(b["name"], b["size"], b["page_size"]))
        sections = {}
        for key in ("capabilities", "parameters", "guest"):
            value = doc.get(key, {})
            if not isinstance(value, dict):
                raise _Bad(f"{key!r} must be an object")
            sections[key] = value
        return cls(
            tuple(infos), sections["capabilities"], sections["parameters"], sections["guest"]
        )


def negotiate_capabilities(ours: Mapping[str, bool], theirs: Mapping[str, bool]) -> dict[str, bool]:
    """The capabilities a migration runs with, or :class:`CapabilityMismatch`.

    A capability that changes the wire or the channel set (``both_sides`` in
    :data:`protocol.options.CAPABILITIES`, like QEMU's postcopy-ram or
    multifd) must be on for both hosts or off for both; a capability only
    one side acts on (auto-converge…) takes our value.  A capability the
    peer turned on that this agent does not know is a mismatch too; one it
    left off is ignored (a newer minor version may list more).  Every
    mismatch is named at once, so the admin fixes both hosts in one go.
    """
    problems: list[str] = []
    for name in sorted(set(theirs) - set(CAPABILITIES)):
        if theirs[name]:
            problems.append(f"peer enabled {name!r}, which this agent does not implement")
    result: dict[str, bool] = {}
    for name, spec in CAPABILITIES.items():
        mine = bool(ours.get(name, spec.default))
        if spec.both_sides:
            other = bool(theirs.get(name, spec.default))
            if mine != other:
                here, there = ("on", "off") if mine else ("off", "on")
                problems.append(f"{name!r} is {here} here but {there} on the peer")
        result[name] = mine
    if problems:
        raise CapabilityMismatch(
            "capabilities differ: " + "; ".join(problems) + " (set them alike on both hosts)"
        )
    return result


# --- precopy data -------------------------------------------------------------

_PAGES = struct.Struct(">IIQQ")


@dataclass(frozen=True, slots=True)
class Pages(Message):
    """``count`` whole pages of one ramblock, starting at ``first_page``.

    ``data`` is sent as given (a memoryview of guest RAM) and decoded as a
    memoryview slice of the frame payload: no copy either way.
    """

    TYPE: ClassVar[FrameType] = FrameType.PAGES
    block: int
    first_page: int
    count: int
    data: bytes | memoryview
    request_id: int = 0

    def __post_init__(self) -> None:
        _uint("block", self.block, _U32)
        _uint("first page", self.first_page, _U64)
        _positive("page count", self.count, _U32)
        _uint("request id", self.request_id, _U64)
        if self.first_page + self.count - 1 > _U64:
            raise ValueError("page range overflows 64 bits")
        n = _nbytes(self.data)
        if n == 0 or n % self.count:
            raise ValueError(f"{n} data bytes are not {self.count} pages of equal size")
        _power_of_two("page size", n // self.count)

    @property
    def page_size(self) -> int:
        return _nbytes(self.data) // self.count

    def flags(self) -> int:
        return int(FrameFlags.URGENT) if self.request_id else 0

    def payload_parts(self) -> list[Part]:
        head = _PAGES.pack(self.block, self.count, self.first_page, self.request_id)
        data = self.data
        if isinstance(data, memoryview) and (data.ndim != 1 or data.itemsize != 1):
            data = data.cast("B")
        return [head, data]

    @classmethod
    def decode_payload(cls, payload: memoryview) -> Self:
        _need(payload, _PAGES.size, "the PAGES header")
        block, count, first, request_id = _PAGES.unpack_from(payload)
        return cls(block, first, count, payload[_PAGES.size :], request_id)


_ZERO = struct.Struct(">IIQ")


@dataclass(frozen=True, slots=True)
class Zero(Message):
    """A run of pages that are all zero (sent instead of their data)."""

    TYPE: ClassVar[FrameType] = FrameType.ZERO
    block: int
    first_page: int
    count: int

    def __post_init__(self) -> None:
        _uint("block", self.block, _U32)
        _uint("first page", self.first_page, _U64)
        _positive("page count", self.count, _U32)
        if self.first_page + self.count - 1 > _U64:
            raise ValueError("page range overflows 64 bits")

    def payload_parts(self) -> list[Part]:
        return [_ZERO.pack(self.block, self.count, self.first_page)]

    @classmethod
    def decode_payload(cls, payload: memoryview) -> Self:
        _exact(payload, _ZERO.size)
        block, count, first = _ZERO.unpack(payload)
        return cls(block, first, count)


_U32_HEAD = struct.Struct(">I")


def _only_u32(payload: memoryview) -> int:
    """The payload of a message that is one u32 (MULTIFD_SYNC, RECV_BITMAP_REQUEST)."""
    _exact(payload, 4)
    return int(_U32_HEAD.unpack(payload)[0])


@dataclass(frozen=True, slots=True)
class PassEnd(Message):
    """End of one precopy pass, with what it measured (bytes, pages, dirty rate…)."""

    TYPE: ClassVar[FrameType] = FrameType.PASS_END
    pass_no: int
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _uint("pass number", self.pass_no, _U32)

    def payload_parts(self) -> list[Part]:
        return [_U32_HEAD.pack(self.pass_no) + _dump_json(self.stats)]

    @classmethod
    def decode_payload(cls, payload: memoryview) -> Self:
        _need(payload, 4, "the pass number")
        (pass_no,) = _U32_HEAD.unpack_from(payload)
        return cls(pass_no, _json_object(payload[4:], "stats"))


@dataclass(frozen=True, slots=True)
class MultifdSync(Message):
    """A sync point of the multifd channels (QEMU's MULTIFD_FLAG_SYNC).

    Sent on every multifd-N channel after its pages of one round, and on main.
    A destination reader stops at sync N until every multifd channel has
    reached it, and main waits for the same: a page sent again in a later
    round (on another channel) is never applied before its older copy.
    """

    TYPE: ClassVar[FrameType] = FrameType.MULTIFD_SYNC
    sync_no: int

    def __post_init__(self) -> None:
        _uint("sync number", self.sync_no, _U32)

    def payload_parts(self) -> list[Part]:
        return [_U32_HEAD.pack(self.sync_no)]

    @classmethod
    def decode_payload(cls, payload: memoryview) -> Self:
        return cls(_only_u32(payload))


_BATCH = struct.Struct(">II")


def _page_indices(pages: Any, what: str) -> npt.NDArray[np.uint64]:
    arr = np.asarray(pages)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(
            f"{what} needs a non-empty 1-d array of page indices, not shape {arr.shape}"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} page indices must be integers, not {arr.dtype}")
    if np.issubdtype(arr.dtype, np.signedinteger) and (arr < 0).any():
        raise ValueError(f"{what} page indices must not be negative")
    _uint("page count", arr.size, _U32)
    out: npt.NDArray[np.uint64] = arr.astype(np.uint64, copy=False)
    return out


@dataclass(frozen=True, slots=True, eq=False)
class PageBatch(Message):
    """Scattered pages of one ramblock in one frame (like a multifd packet's page list).

    Dirty passes find pages all over RAM; one frame per page would cost a
    Python iteration and a frame header per 4 KiB.  ``data`` holds the pages
    in the order of ``pages`` (gathered by the sender with one numpy take).
    """

    TYPE: ClassVar[FrameType] = FrameType.PAGE_BATCH
    block: int
    pages: npt.NDArray[np.uint64]
    data: bytes | memoryview

    def __post_init__(self) -> None:
        _uint("block", self.block, _U32)
        object.__setattr__(self, "pages", _page_indices(self.pages, "PAGE_BATCH"))
        n = _nbytes(self.data)
        count = self.pages.size
        if n == 0 or n % count:
            raise ValueError(f"{n} data bytes are not {count} pages of equal size")
        _power_of_two("page size", n // count)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PageBatch):
            return NotImplemented
        return (
            self.block == other.block
            and bool(np.array_equal(self.pages, other.pages))
            and bytes(self.data) == bytes(other.data)
        )

    __hash__ = None  # type: ignore[assignment]

    @property
    def page_size(self) -> int:
        return _nbytes(self.data) // self.pages.size

    def payload_parts(self) -> list[Part]:
        index: Any = np.ascontiguousarray(self.pages, dtype=_LE64)
        data = self.data
        if isinstance(data, memoryview) and (data.ndim != 1 or data.itemsize != 1):
            data = data.cast("B")
        return [_BATCH.pack(self.block, self.pages.size), memoryview(index).cast("B"), data]

    @classmethod
    def decode_payload(cls, payload: memoryview) -> Self:
        _need(payload, _BATCH.size, "the PAGE_BATCH header")
        block, n = _BATCH.unpack_from(payload)
        if n == 0:
            raise _Bad("PAGE_BATCH with no pages")
        _need(payload, _BATCH.size + 8 * n, "the PAGE_BATCH page indices")
        pages = np.frombuffer(payload, dtype=_LE64, count=n, offset=_BATCH.size)
        return cls(block, pages.astype(np.uint64, copy=False), payload[_BATCH.size + 8 * n :])


@dataclass(frozen=True, slots=True, eq=False)
class ZeroBatch(Message):
    """Scattered zero pages of one ramblock (sent instead of their data)."""

    TYPE: ClassVar[FrameType] = FrameType.ZERO_BATCH
    block: int
    pages: npt.NDArray[np.uint64]

    def __post_init__(self) -> None:
        _uint("block", self.block, _U32)
        object.__setattr__(self, "pages", _page_indices(self.pages, "ZERO_BATCH"))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ZeroBatch):
            return NotImplemented
        return self.block == other.block and bool(np.array_equal(self.pages, other.pages))

    __hash__ = None  # type: ignore[assignment]

    def payload_parts(self) -> list[Part]:
        index: Any = np.ascontiguousarray(self.pages, dtype=_LE64)
        return [_BATCH.pack(self.block, self.pages.size), memoryview(index).cast("B")]

    @classmethod
    def decode_payload(cls, payload: memoryview) -> Self:
        _need(payload, _BATCH.size, "the ZERO_BATCH header")
        block, n = _BATCH.unpack_from(payload)
        if n == 0:
            raise _Bad("ZERO_BATCH with no pages")
        _exact(payload, _BATCH.size + 8 * n)
        pages = np.frombuffer(payload, dtype=_LE64, count=n, offset=_BATCH.size)
        return cls(block, pages.astype(np.uint64, copy=False))


# --- switchover and postcopy commands -------------------------------------------

_ADVISE = struct.Struct(">II")


@dataclass(frozen=True, slots=True)
class PostcopyAdvise(Message):
    """Postcopy may follow: the destination prepares (page size per ramblock, as QEMU checks)."""

    TYPE: ClassVar[FrameType] = FrameType.POSTCOPY_ADVISE
    page_sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "page_sizes", tuple(int(p) for p in self.page_sizes))
        _uint("ramblock count", len(self.page_sizes), _U32)
        for i, p in enumerate(self.page_sizes):
            _uint(f"page size of ramblock {i}", p, _U64)
            _power_of_two(f"page size of ramblock {i}", p)

    def payload_parts(self) -> list[Part]:
        n = len(self.page_sizes)
        return [_ADVISE.pack(n, 0) + struct.pack(f">{n}Q", *self.page_sizes)]

    @classmethod
    def decode_payload(cls, payload: memoryview) -> Self:
        _need(payload, _ADVISE.size, "the ramblock count")
        n, reserved = _ADVISE.unpack_from(payload)
        if reserved:
            raise _Bad(f"reserved field 0x{reserved:x} set")
        _exact(payload, _ADVISE.size + 8 * n)
        return cls(struct.unpack_from(f">{n}Q", payload, _ADVISE.size))


_DISCARD = struct.Struct(">II")
_LE64 = np.dtype("<u8")


@dataclass(frozen=True, slots=True, eq=False)
class Discard(Message):
    """Pages the destination must drop: re-dirtied after they were sent (postcopy).

    ``ranges`` is an ``(n, 2)`` uint64 array of ``(first_page, count)``.
    """

    TYPE: ClassVar[FrameType] = FrameType.DISCARD
    block: int
    ranges: npt.NDArray[np.uint64]

    def __post_init__(self) -> None:
        _uint("block", self.block, _U32)
        arr = np.asarray(self.ranges)
        if arr.size == 0:
            raise ValueError("DISCARD needs at least one range")
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise ValueError(f"ranges must have shape (n, 2), not {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"ranges must be integers, not {arr.dtype}")
        if np.issubdtype(arr.dtype, np.signedinteger) and (arr < 0).any():
            raise ValueError("ranges must not be negative")
        arr = arr.astype(np.uint64, copy=False)
        _uint("range count", arr.shape[0], _U32)
        counts = arr[:, 1]
        if (counts == 0).any():
            raise ValueError(f"range {int(np.flatnonzero(counts == 0)[0])} has count 0")
        if (arr[:, 0] > np.uint64(_U64) - (counts - np.uint64(1))).any():
            raise ValueError("a range overflows 64 bits")
        object.__setattr__(self, "ranges", arr)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Discard):
            return NotImplemented
        return self.block == other.block and bool(np.array_equal(self.ranges, other.ranges))

    __hash__ = None  # type: ignore[assignment]

    def payload_parts(self) -> list[Part]:
        body: Any = np.ascontiguousarray(self.ranges, dtype=_LE64)
        return [_DISCARD.pack(self.block, self.ranges.shape[0]), memoryview(body).cast("B")]

    @classmethod
    def decode_payload(cls, payload: memoryview) -> Self:
        _need(payload, _DISCARD.size, "the DISCARD header")
        block, n = _DISCARD.unpack_from(payload)
        if n == 0:
            raise _Bad("DISCARD with no ranges")
        _exact(payload, _DISCARD.size + 16 * n)
        ranges = np.frombuffer(payload, dtype=_LE64, count=2 * n, offset=_DISCARD.size)
        return cls(block, ranges.astype(np.uint64, copy=False).reshape(n, 2))


_DEVICE = struct.Struct(">IIH")


@dataclass(frozen=True, slots=True)
class DeviceState(Message):
    """One device section (QEMU's idstr, instance id and version id, then its bytes)."""

    TYPE: ClassVar[FrameType] = FrameType.DEVICE_STATE
    section: str
    instance: int
    version: int
    data: bytes

    def __post_init__(self) -> None:
        if not self.section:
            raise ValueError("device section name must not be empty")
        if len(self.section.encode()) > _U16:
            raise ValueError("device section name longer than 65535 bytes")
        _uint("instance", self.instance, _U32)
        _uint("version", self.version, _U32)

    def payload_parts(self) -> list[Part]:
        name = self.section.encode()
        return [_DEVICE.pack(self.instance, self.version, len(name)) + name, self.data]

    @classmethod
    def decode_payload(cls, payload: memoryview) -> Self:
        _need(payload, _DEVICE.size, "the section header")
        instance, version, n = _DEVICE.unpack_from(payload)
        _need(payload, _DEVICE.size + n, "the section name")
        name = _utf8(payload[_DEVICE.size : _DEVICE.size + n], "section name")
        return cls(name, instance, version, bytes(payload[_DEVICE.size + n :]))


@dataclass(frozen=True, slots=True)
class Vmdesc(Message):
    """QEMU's VMDESC: a JSON description of every section sent, for analysis tools."""

    TYPE: ClassVar[FrameType] = FrameType.VMDESC
    description: dict[str, Any]

    def payload_parts(self) -> list[Part]:
        return [_dump_json(self.description)]

    @classmethod
    def decode_payload(cls, payload: memoryview) -> Self:
        return cls(_json_object(payload, "VMDESC"))


@dataclass(frozen=True, slots=True)
class SwitchoverStart(Message):
    """The source stopped the guest; what follows is the final state."""

    TYPE: ClassVar[FrameType] = FrameType.SWITCHOVER_START


@dataclass(frozen=True, slots=True)
class PostcopyListen(Message):
    """Destination: register the guest's memory for faults and start serving them."""

    TYPE: ClassVar[FrameType] = FrameType.POSTCOPY_LISTEN


@dataclass(frozen=True, slots=True)
class PostcopyRun(Message):
    """Destination: run the guest now."""

    TYPE: ClassVar[FrameType] = FrameType.POSTCOPY_RUN


@dataclass(frozen=True, slots=True)
class Complete(Message):
    """Everything has been sent."""

    TYPE: ClassVar[FrameType] = FrameType.COMPLETE


@dataclass(frozen=True, slots=True)
class Resume(Message):
    """Recovery: the source has rebuilt its state and continues postcopy."""

    TYPE: ClassVar[FrameType] = FrameType.RESUME


@dataclass(frozen=True, slots=True)
class ResumeAck(Message):
    """Recovery: the destination continues too."""

    TYPE: ClassVar[FrameType] = FrameType.RESUME_ACK


@dataclass(frozen=True, slots=True)
class SwitchoverAck(Message):
    """The destination is ready for switchover (capability switchover-ack)."""

    TYPE: ClassVar[FrameType] = FrameType.SWITCHOVER_ACK


@dataclass(frozen=True, slots=True)
class PostcopyRunAck(Message):
    """The destination loaded the devices and runs the guest: postcopy-device ends.

    Until the source has this, its own copy of the guest is whole and is
    resumed on any failure; after it, no host has the whole guest.
    """

    TYPE: ClassVar[FrameType] = FrameType.POSTCOPY_RUN_ACK


@dataclass(frozen=True, slots=True)
class Shut(Message):
    """The destination is finished with the return path (reason empty) or gives up."""

    TYPE: ClassVar[FrameType] = FrameType.SHUT
    reason: str = ""

    def payload_parts(self) -> list[Part]:
        return [self.reason.encode()] if self.reason else []

    @classmethod
    def decode_payload(cls, payload: memoryview) -> Self:
        return cls(_utf8(payload, "reason"))


# --- liveness and the return path -----------------------------------------------

_PING = struct.Struct(">QQ")


@dataclass(frozen=True, slots=True)
class Ping(Message):
    TYPE: ClassVar[FrameType] = FrameType.PING
    seq: int
    sent_ns: int

    def __post_init__(self) -> None:
        _uint("sequence number", self.seq, _U64)
        _uint("send time", self.sent_ns, _U64)

    def payload_parts(self) -> list[Part]:
        return [_PING.pack(self.seq, self.sent_ns)]

    @classmethod
    def decode_payload(cls, payload: memoryview) -> Self:
        _exact(payload, _PING.size)
        return cls(*_PING.unpack(payload))


@dataclass(frozen=True, slots=True)
class Pong(Message):
    """Answers a PING with its ``seq`` and ``sent_ns`` echoed (the sender computes RTT)."""

    TYPE: ClassVar[FrameType] = FrameType.PONG
    seq: int
    sent_ns: int

    def __post_init__(self) -> None:
        _uint("sequence number", self.seq, _U64)
        _uint("send time", self.sent_ns, _U64)

    def payload_parts(self) -> list[Part]:
        return [_PING.pack(self.seq, self.sent_ns)]

    @classmethod
    def decode_payload(cls, payload: memoryview) -> Self:
        _exact(payload, _PING.size)
        return cls(*_PING.unpack(payload))


_REQ = struct.Struct(">IIQQQ")


@dataclass(frozen=True, slots=True)
class ReqPages(Message):
    """Postcopy: a faulting guest waits for these pages; answered by PAGES with the same id."""

    TYPE: ClassVar[FrameType] = FrameType.REQ_PAGES
    block: int
    first_page: int
    count: int
    request_id: int
    sent_ns: int = 0

    def __post_init__(self) -> None:
        _uint("block", self.block, _U32)
        _uint("first page", self.first_page, _U64)
        _positive("page count", self.count, _U32)
        _positive("request id", self.request_id, _U64)
        _uint("send time", self.sent_ns, _U64)
        if self.first_page + self.count - 1 > _U64:
            raise ValueError("page range overflows 64 bits")

    def payload_parts(self) -> list[Part]:
        return [_REQ.pack(self.block, self.count, self.first_page, self.request_id, self.sent_ns)]

    @classmethod
    def decode_payload(cls, payload: memoryview) -> Self:
        _exact(payload, _REQ.size)
        block, count, first, request_id, sent_ns = _REQ.unpack(payload)
        return cls(block, first, count, request_id, sent_ns)


@dataclass(frozen=True, slots=True)
class RecvBitmapRequest(Message):
    """Recovery: send me the received bitmap of this ramblock."""

    TYPE: ClassVar[FrameType] = FrameType.RECV_BITMAP_REQUEST
    block: int

    def __post_init__(self) -> None:
        _uint("block", self.block, _U32)

    def payload_parts(self) -> list[Part]:
        return [_U32_HEAD.pack(self.block)]

    @classmethod
    def decode_payload(cls, payload: memoryview) -> Self:
        return cls(_only_u32(payload))


_BITMAP_HEAD = struct.Struct(">IIQQ")
_END = struct.Struct(">Q")


@dataclass(frozen=True, slots=True)
class RecvBitmap(Message):
    """Recovery: which pages of a ramblock the destination holds (QEMU's wire form)."""

    TYPE: ClassVar[FrameType] = FrameType.RECV_BITMAP
    block: int
    bitmap: PageBitmap

    def __post_init__(self) -> None:
        _uint("block", self.block, _U32)
        if not isinstance(self.bitmap, PageBitmap):
            raise ValueError(f"bitmap must be a PageBitmap, not {type(self.bitmap).__name__}")

    def payload_parts(self) -> list[Part]:
        words = self.bitmap.to_le_words()
        head = _BITMAP_HEAD.pack(self.block, 0, self.bitmap.npages, len(words))
        return [head, words, _END.pack(RECV_BITMAP_END_MARK)]

    @classmethod
    def decode_payload(cls, payload: memoryview) -> Self:
        _need(payload, _BITMAP_HEAD.size + _END.size, "the bitmap header and end mark")
        block, reserved, npages, size = _BITMAP_HEAD.unpack_from(payload)
        if reserved:
            raise _Bad(f"reserved field 0x{reserved:x} set")
        want = 8 * ((npages + 63) // 64)
        if size != want:
            raise _Bad(f"size {size} does not match {npages} pages ({want} bytes)")
        _exact(payload, _BITMAP_HEAD.size + size + _END.size)
        (mark,) = _END.unpack_from(payload, _BITMAP_HEAD.size + size)
        if mark != RECV_BITMAP_END_MARK:
            raise _Bad(f"end mark 0x{mark:016x}, expected 0x{RECV_BITMAP_END_MARK:016x}")
        words = payload[_BITMAP_HEAD.size : _BITMAP_HEAD.size + size]
        return cls(block, PageBitmap.from_le_words(words, npages))
