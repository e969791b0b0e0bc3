"""Frames: the 8-byte header every channel speaks, and an incremental decoder for it.

Wire form (big-endian, ``>BBHI``)::

    offset  size  field
    0       1     type      FrameType below; unknown types are refused
    1       1     flags     FrameFlags; undefined bits must be zero
    2       2     reserved  must be zero
    4       4     length    payload bytes that follow (<= the negotiated maximum)
    8       ...   payload   layout per type: see protocol.messages

Theory of operation
-------------------

:class:`FrameDecoder` is h11-shaped: the caller owns the socket and hands
bytes in (:meth:`~FrameDecoder.feed`), or lets the decoder say where to put
them (:meth:`~FrameDecoder.get_buffer` / :meth:`~FrameDecoder.buffer_updated`,
the ``asyncio.BufferedProtocol`` pattern, so a TLS layer can decrypt straight
into frame memory); whole frames come out of
:meth:`~FrameDecoder.next_frame`.  The decoder copies each byte at most once:
a header is checked the moment its 8 bytes are in — length against
``max_payload`` *before* anything is allocated — and then exactly one buffer
of exactly that length is allocated for the payload, which is filled in place
and handed out as ``Frame.payload``.  That buffer is never resized or reused,
so a payload stays valid however much is fed afterwards.

An error poisons the decoder: frames that were complete before the bad
header are still returned by :meth:`~FrameDecoder.next_frame`, then it
raises the error, and every later call raises the same error.  Data after a
bad header is meaningless, so nothing after it is looked at.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from protocol.errors import (
    FrameTooLarge,
    ProtocolError,
    ReservedBitsSet,
    TruncatedStream,
    UnknownFrameType,
)

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "HEADER",
    "HEADER_SIZE",
    "MAX_LENGTH",
    "Frame",
    "FrameDecoder",
    "FrameFlags",
    "FrameType",
    "encode_header",
]

HEADER = struct.Struct(">BBHI")
HEADER_SIZE = 8
DEFAULT_MAX_PAYLOAD = 16 << 20
MAX_LENGTH = 0xFFFF_FFFF
"""The largest length the u32 field can carry."""


class FrameType(enum.IntEnum):
    """Frame type numbers.  Stable: a number is never reused for another meaning.

    Grouped by the high nibble: 0x0_ channel set-up, 0x1_ precopy data,
    0x2_ switchover and postcopy commands (main), 0x3_ liveness, 0x4_ the
    return path.
    """

    HELLO = 0x01  # every channel, first frame, both ways
    ERROR = 0x02  # either way, then close
    CONFIG = 0x03  # main: ramblocks, capabilities, parameters
    PAGES = 0x10  # main, multifd-N, preempt: page data
    ZERO = 0x11  # main, multifd-N: a run of zero pages
    PASS_END = 0x12  # main: end of a precopy pass, with stats
    PAGE_BATCH = 0x13  # main, multifd-N: scattered pages of one ramblock, gathered
    ZERO_BATCH = 0x14  # main, multifd-N: scattered zero pages of one ramblock
    MULTIFD_SYNC = 0x15  # main and every multifd-N: all pages before this are sent
    POSTCOPY_ADVISE = 0x20  # main: postcopy may follow
    DISCARD = 0x21  # main: pages re-dirtied since sent
    DEVICE_STATE = 0x22  # main: one device section
    VMDESC = 0x23  # main: JSON description of what was sent
    SWITCHOVER_START = 0x24  # main: the source has stopped the guest
    POSTCOPY_LISTEN = 0x25  # main: register faults, start the fault task
    POSTCOPY_RUN = 0x26  # main: run the guest on the destination
    COMPLETE = 0x27  # main: everything is sent
    PING = 0x30  # main (source) or return (destination)
    PONG = 0x31  # the answer, on the other direction's channel
    REQ_PAGES = 0x40  # return: pages a faulting guest waits for
    RECV_BITMAP_REQUEST = 0x41  # main: recovery, ask for one ramblock's received bitmap
    RECV_BITMAP = 0x42  # return: the received bitmap of one ramblock
    RESUME = 0x43  # main: recovery handshake done on the source side
    RESUME_ACK = 0x44  # return: the destination resumed
    SWITCHOVER_ACK = 0x45  # return: the destination is ready for switchover
    SHUT = 0x46  # return: the destination is done (or gives up)
    POSTCOPY_RUN_ACK = 0x47  # return: devices loaded, the guest runs on the destination


class FrameFlags(enum.IntFlag):
    """Header flag bits.  A receiver refuses any bit not listed here."""

    NONE = 0
    URGENT = 0x01
    """The payload answers a page request: relays and receivers serve it first."""


_KNOWN_FLAGS = int(FrameFlags.URGENT)
_KNOWN_TYPES = frozenset(int(t) for t in FrameType)
_TYPE_BY_NUMBER = {int(t): t for t in FrameType}
_EMPTY = memoryview(b"")

DIRECT_THRESHOLD = 32 << 10
"""get_buffer hands out frame memory itself when at least this much payload is missing."""
SCRATCH_SIZE = 256 << 10
"""get_buffer's default staging buffer size (header and small frames go through it)."""
_NUMPY_ALLOC_MIN = 64 << 10


def encode_header(ftype: FrameType, length: int, flags: int = 0) -> bytes:
    """The 8-byte header for a payload of ``length`` bytes."""
    if not 0 <= length <= MAX_LENGTH:
        raise ValueError(f"frame length {length} does not fit in 32 bits")
    if flags & ~_KNOWN_FLAGS or not 0 <= flags <= 0xFF:
        raise ValueError(f"frame flags 0x{flags:02x} has undefined bits")
    return HEADER.pack(int(ftype), flags, 0, length)


@dataclass(frozen=True, slots=True)
class Frame:
    """One received frame.  ``payload`` owns its memory: it stays valid forever."""

    type: FrameType
    flags: int
    payload: memoryview
    offset: int
    """Stream byte offset of this frame's header on its channel."""

    @property
    def size(self) -> int:
        """Bytes on the wire, header included."""
        return HEADER_SIZE + self.payload.nbytes


def _allocate(n: int) -> memoryview:
    # numpy.empty skips bytearray's zero fill; big payloads are written over anyway.
    # (Imported here: the preempt workers use this module's constants, and never
    # allocate a payload, so they start without numpy.)
    if n >= _NUMPY_ALLOC_MIN:
        import numpy as np

        buf: Any = np.empty(n, dtype=np.uint8)
        return memoryview(buf)
    return memoryview(bytearray(n))


class FrameDecoder:
    """Turn a byte stream, cut anywhere, into :class:`Frame` objects.

    ``channel`` only names the channel in errors.  ``max_payload`` may be
    changed at any time (after CONFIG negotiated it); it applies to every
    header parsed afterwards.
    """

    def __init__(self, *, channel: str | None = None, max_payload: int = DEFAULT_MAX_PAYLOAD):
        self.channel = channel
        self._max_payload = 0
        self.max_payload = max_payload
        self.bytes_received = 0
        """Bytes handed to the decoder so far (feed and buffer_updated)."""
        self.largest_allocation = 0
        """The largest payload buffer ever allocated: never above max_payload."""
        self._ready: deque[Frame] = deque()
        self._error: ProtocolError | None = None
        self._header = bytearray(HEADER_SIZE)
        self._header_fill = 0
        # the frame in progress (payload buffer is None while reading a header)
        self._payload: memoryview | None = None
        self._fill = 0
        self._type = FrameType.HELLO
        self._flags = 0
        self._frame_offset = 0
        # get_buffer bookkeeping
        self._scratch: memoryview | None = None
        self._lent: memoryview | None = None
        self._lent_direct = False
        self._last_large = False

    # -- configuration ----------------------------------------------------

    @property
    def max_payload(self) -> int:
        return self._max_payload

    @max_payload.setter
    def max_payload(self, value: int) -> None:
        if not 0 <= value <= MAX_LENGTH:
            raise ValueError(f"max_payload must be in [0, {MAX_LENGTH}], not {value}")
        self._max_payload = value

    @property
    def in_frame(self) -> bool:
        """True while part of a frame has arrived and the rest has not."""
        return self._header_fill > 0 or self._payload is not None

    # -- input --------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take bytes from the stream.  The caller may reuse ``data`` afterwards."""
        if self._error is not None:
            raise self._error
        view = data if isinstance(data, memoryview) else memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        self._consume(view)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Memory for the next read; call :meth:`buffer_updated` with the bytes written.

        While a large payload is missing this is the payload buffer itself
        (the receive path writes page data to its final place).  Right after a
        large frame it is room for just the next header, so that the next
        large payload goes straight to frame memory too.  Otherwise it is a
        staging buffer of at least ``sizehint`` bytes (default 256 KiB),
        which suits a run of small frames.
        """
        if self._error is not None:
            raise self._error
        if self._payload is not None and len(self._payload) - self._fill >= DIRECT_THRESHOLD:
            self._lent = self._payload[self._fill :]
            self._lent_direct = True
            return self._lent
        size = max(sizehint, SCRATCH_SIZE)
        if self._scratch is None or len(self._scratch) < size:
            self._scratch = memoryview(bytearray(size))
        if self._payload is None and self._last_large:
            # After a large frame, expect another: read just its header so its
            # payload can go straight to frame memory (one extra short read
            # when a small frame follows, after which staging resumes).
            size = HEADER_SIZE - self._header_fill
        self._lent = self._scratch[:size]
        self._lent_direct = False
        return self._lent

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last :meth:`get_buffer` result."""
        if self._error is not None:
            raise self._error
        lent, self._lent = self._lent, None
        if lent is None:
            raise RuntimeError("buffer_updated() without a get_buffer() before it")
        if not 0 <= nbytes <= len(lent):
            raise ValueError(f"buffer_updated({nbytes}) but the buffer holds {len(lent)}")
        if self._lent_direct:
            assert self._payload is not None
            self._fill += nbytes
            self.bytes_received += nbytes
            if self._fill == len(self._payload):
                self._finish()
        else:
            self._consume(lent[:nbytes])

    def eof(self) -> None:
        """The stream ended.  Raises :class:`TruncatedStream` if a frame was cut off."""
        if self._error is not None:
            raise self._error
        if self._payload is not None:
            what = (
                f"{self._type.name} frame cut off after {self._fill} of "
                f"{len(self._payload)} payload bytes"
            )
            self._fail(TruncatedStream, what, self._frame_offset)
        elif self._header_fill:
            self._fail(
                TruncatedStream,
                f"frame header cut off after {self._header_fill} of {HEADER_SIZE} bytes",
                self.bytes_received - self._header_fill,
            )
        if self._error is not None:
            raise self._error

    # -- output -------------------------------------------------------------

    @property
    def frames_ready(self) -> bool:
        """:meth:`next_frame` has a frame (or the stream's error) without more bytes."""
        return bool(self._ready) or self._error is not None

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None if more bytes are needed.

        Raises the stream's error once the frames before it are drained.
        """
        if self._ready:
            return self._ready.popleft()
        if self._error is not None:
            raise self._error
        return None

    def frames(self) -> Iterator[Frame]:
        """Every frame complete so far."""
        while (frame := self.next_frame()) is not None:
            yield frame

    # -- internals ----------------------------------------------------------

    def _fail(self, cls: type[ProtocolError], reason: str, offset: int) -> None:
        self._error = cls(reason, channel=self.channel, offset=offset)
        self._payload = None
        self._header_fill = 0

    def _consume(self, view: memoryview) -> None:
        pos = 0
        end = len(view)
        base = self.bytes_received
        self.bytes_received += end
        while pos < end:
            payload = self._payload
            if payload is not None:
                take = min(len(payload) - self._fill, end - pos)
                payload[self._fill : self._fill + take] = view[pos : pos + take]
                self._fill += take
                pos += take
                if self._fill == len(payload):
                    self._finish()
                continue
            if self._header_fill == 0 and end - pos >= HEADER_SIZE:
                ftype, flags, reserved, length = HEADER.unpack_from(view, pos)
                pos += HEADER_SIZE
            else:
                take = min(HEADER_SIZE - self._header_fill, end - pos)
                self._header[self._header_fill : self._header_fill + take] = view[pos : pos + take]
                self._header_fill += take
                pos += take
                if self._header_fill < HEADER_SIZE:
                    return
                self._header_fill = 0
                ftype, flags, reserved, length = HEADER.unpack_from(self._header)
            if not self._start(ftype, flags, reserved, length, base + pos - HEADER_SIZE):
                return

    def _start(self, ftype: int, flags: int, reserved: int, length: int, offset: int) -> bool:
        if ftype not in _KNOWN_TYPES:
            self._fail(UnknownFrameType, f"frame type 0x{ftype:02x} unknown", offset)
            return False
        name = _TYPE_BY_NUMBER[ftype].name
        if reserved:
            self._fail(
                ReservedBitsSet, f"{name} frame has reserved field 0x{reserved:04x} set", offset
            )
            return False
        if flags & ~_KNOWN_FLAGS:
            self._fail(
                ReservedBitsSet,
                f"{name} frame has undefined flag bits 0x{flags & ~_KNOWN_FLAGS:02x} set",
                offset,
            )
            return False
        if length > self._max_payload:
            self._fail(
                FrameTooLarge,
                f"{name} frame of {length} bytes exceeds the maximum of {self._max_payload}",
                offset,
            )
            return False
        self._type = _TYPE_BY_NUMBER[ftype]
        self._flags = flags
        self._frame_offset = offset
        if length == 0:
            self._ready.append(Frame(self._type, flags, _EMPTY, offset))
            self._last_large = False
            return True
        self._payload = _allocate(length)
        self._last_large = length >= DIRECT_THRESHOLD
        self.largest_allocation = max(self.largest_allocation, length)
        self._fill = 0
        return True

    def _finish(self) -> None:
        payload = self._payload
        assert payload is not None
        self._ready.append(Frame(self._type, self._flags, payload, self._frame_offset))
        self._payload = None
        self._fill = 0
