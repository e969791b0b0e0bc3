"""The preempt channel's page-request exchange, without objects: the fault path.

Why a second codec.  A postcopy fault waits for four hops, two of which
encode a frame and two decode one.  Through :mod:`protocol.frames` and
:mod:`protocol.messages` a REQ_PAGES or a 4 KiB PAGES costs ~5 µs to decode
and ~3-5 µs to build and encode (a ``Frame`` and a frozen, validated
dataclass per frame, a payload buffer per frame): ~19 µs of Python per
fault on an idle machine, about three times that on one busy moving the
background stream, against a p50 target of 200 µs.  Here each frame is one
``struct`` call over a buffer the caller owns, and a page is handed out as
a view of that buffer: nothing is allocated per frame.

Same wire, same errors.  The frames are byte for byte what
:class:`~protocol.messages.ReqPages`, :class:`~protocol.messages.Pages` and
:class:`~protocol.messages.Zero` encode (the tests check every field at its
limits).  Only valid frames take the short path: anything else (a bad
header, a malformed payload, an ERROR from the peer, a frame of another
type) goes through :class:`~protocol.frames.FrameDecoder` and
:func:`~protocol.messages.decode_message`, so the error raised — its class,
its text, its stream offset — is the one every other channel gives, and an
ERROR frame becomes an :class:`~protocol.messages.Error` message.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Final

from protocol.errors import ProtocolError
from protocol.frames import HEADER_SIZE, FrameDecoder, FrameFlags, FrameType

if TYPE_CHECKING:
    from protocol.messages import Message

__all__ = [
    "PAGES",
    "REQ_PAGES",
    "ZERO",
    "PreemptReader",
    "pages_frame_into",
    "pages_header",
    "request_frame",
    "zero_frame",
]

REQ_PAGES: Final = int(FrameType.REQ_PAGES)
PAGES: Final = int(FrameType.PAGES)
ZERO: Final = int(FrameType.ZERO)

# Header (">BBHI": type, flags, reserved, length) and payload in one format.
_REQ_FRAME = struct.Struct(">BBHIIIQQQ")  # block, count, first, request id, sent ns
_PAGES_HEAD = struct.Struct(">BBHIIIQQ")  # block, count, first, request id; then data
_ZERO_FRAME = struct.Struct(">BBHIIIQ")  # block, count, first
_HEADER = struct.Struct(">BBHI")
_REQ_LEN = _REQ_FRAME.size - HEADER_SIZE
_PAGES_LEN = _PAGES_HEAD.size - HEADER_SIZE
_ZERO_LEN = _ZERO_FRAME.size - HEADER_SIZE
_URGENT = int(FrameFlags.URGENT)
_U64 = 0xFFFF_FFFF_FFFF_FFFF
_KNOWN_TYPES = frozenset(int(t) for t in FrameType)
_MIN_READ = 4096 + _PAGES_HEAD.size
"""Room below which the buffer is compacted before a read: a 4 KiB page's frame."""


def request_frame(block: int, first: int, count: int, request_id: int, sent_ns: int) -> bytes:
    """REQ_PAGES as :class:`~protocol.messages.ReqPages` encodes it.  ``struct``
    refuses a field out of its range; the caller passes counts and ids > 0."""
    return _REQ_FRAME.pack(REQ_PAGES, 0, 0, _REQ_LEN, block, count, first, request_id, sent_ns)


def zero_frame(block: int, first: int, count: int) -> bytes:
    """ZERO as :class:`~protocol.messages.Zero` encodes it."""
    return _ZERO_FRAME.pack(ZERO, 0, 0, _ZERO_LEN, block, count, first)


def pages_header(block: int, first: int, count: int, request_id: int, nbytes: int) -> bytes:
    """What precedes ``nbytes`` of page data in a PAGES frame (a huge page is sent
    after it as it is, not copied)."""
    flags = _URGENT if request_id else 0
    return _PAGES_HEAD.pack(PAGES, flags, 0, _PAGES_LEN + nbytes, block, count, first, request_id)


def pages_frame_into(
    buffer: memoryview, block: int, first: int, count: int, request_id: int, data: memoryview
) -> memoryview:
    """PAGES as :class:`~protocol.messages.Pages` encodes it, built in ``buffer``
    (header, then ``data`` copied after it): the frame, one write's worth."""
    n = data.nbytes
    flags = _URGENT if request_id else 0
    _PAGES_HEAD.pack_into(
        buffer, 0, PAGES, flags, 0, _PAGES_LEN + n, block, count, first, request_id
    )
    end = _PAGES_HEAD.size + n
    buffer[_PAGES_HEAD.size : end] = data
    return buffer[:end]


Event = tuple[int, int, int, int, int, Any]
"""``(type, block, first, count, request id, sent ns | data | 0)``: see
:meth:`PreemptReader.next`."""


class PreemptReader:
    """REQ_PAGES, PAGES and ZERO out of a byte stream, into a buffer it owns.

    :meth:`buffer` is where the next read goes and :meth:`filled` says how
    much it wrote; :meth:`next` returns one frame at a time, as a tuple (no
    object per frame: this is the fault path):

    - ``(REQ_PAGES, block, first, count, request_id, sent_ns)``
    - ``(PAGES, block, first, count, request_id, data)``: ``data`` is a view
      of the reader's buffer, valid until the next :meth:`buffer` call
    - ``(ZERO, block, first, count, 0, 0)``

    or ``None`` when it needs more bytes.  Any other frame is decoded in full
    and returned as a :class:`~protocol.messages.Message` (an ERROR from the
    peer: :class:`~protocol.messages.Error`), and anything malformed raises
    what :class:`~protocol.frames.FrameDecoder` and
    :func:`~protocol.messages.decode_message` raise for it.  ``capacity``
    is the largest payload (a 2 MiB huge page and its header need more than
    the default).
    """

    def __init__(self, *, channel: str = "preempt", capacity: int = 64 << 10) -> None:
        self.channel = channel
        self.capacity = capacity
        self._buf = bytearray(HEADER_SIZE + capacity)
        self._view = memoryview(self._buf)
        self._start = 0  # first byte not yet returned
        self._end = 0  # first byte not yet written
        self._offset = 0  # stream offset of _buf[0]
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> bool:
        """A whole frame (or an error) is waiting: :meth:`next` needs no read."""
        if self._error is not None:
            return True
        have = self._end - self._start
        if have < HEADER_SIZE:
            return False
        length: int = _HEADER.unpack_from(self._buf, self._start)[3]
        return have >= HEADER_SIZE + length

    def buffer(self) -> memoryview:
        """Free room for the next read (views from :meth:`next` end here)."""
        start, have = self._start, self._end - self._start
        if not have:
            self._offset += start
            self._start = self._end = 0
        elif start:
            missing = HEADER_SIZE - have
            if have >= HEADER_SIZE:
                missing = HEADER_SIZE + _HEADER.unpack_from(self._buf, start)[3] - have
            if len(self._buf) - self._end < max(missing, _MIN_READ):
                # Move the part-frame to the front, where any frame fits whole.
                self._view[:have] = self._view[start : self._end]
                self._offset += start
                self._start, self._end = 0, have
        return self._view[self._end :]

    def filled(self, n: int) -> None:
        """``n`` bytes were written at the start of the last :meth:`buffer`."""
        self._end += n

    def feed(self, data: bytes | memoryview) -> None:
        """Copy bytes in, for callers with no buffer to read into (tests).  Frames
        must be taken with :meth:`next` before the buffer fills."""
        view = memoryview(data)
        room = self.buffer()
        if view.nbytes > room.nbytes:
            raise BufferError(f"{view.nbytes} bytes fed, room for {room.nbytes}")
        room[: view.nbytes] = view
        self.filled(view.nbytes)

    def next(self) -> Event | Message | None:
        if self._error is not None:
            raise self._error
        start, have = self._start, self._end - self._start
        if have < HEADER_SIZE:
            return None
        buf = self._buf
        ftype, flags, reserved, length = _HEADER.unpack_from(buf, start)
        if reserved or flags & ~_URGENT or length > self.capacity or ftype not in _KNOWN_TYPES:
            self._refuse_header(start)
        if have < HEADER_SIZE + length:
            return None
        end = start + HEADER_SIZE + length
        if ftype == REQ_PAGES and length == _REQ_LEN:
            _, _, _, _, block, count, first, request_id, sent_ns = _REQ_FRAME.unpack_from(
                buf, start
            )
            if count and request_id and first + count - 1 <= _U64:
                self._start = end
                return (REQ_PAGES, block, first, count, request_id, sent_ns)
        elif ftype == PAGES and length > _PAGES_LEN:
            _, _, _, _, block, count, first, request_id = _PAGES_HEAD.unpack_from(buf, start)
            n = length - _PAGES_LEN
            size = n // count if count else 0
            if size and size * count == n and not size & (size - 1) and first + count - 1 <= _U64:
                self._start = end
                return (PAGES, block, first, count, request_id, self._view[end - n : end])
        elif ftype == ZERO and length == _ZERO_LEN:
            _, _, _, _, block, count, first = _ZERO_FRAME.unpack_from(buf, start)
            if count and first + count - 1 <= _U64:
                self._start = end
                return (ZERO, block, first, count, 0, 0)
        # The long way: the general decoder's verdict and message (or error).
        self._start = end
        return self._slow(self._view[start:end], self._offset + start)

    def _decoder(self, offset: int) -> FrameDecoder:
        decoder = FrameDecoder(channel=self.channel, max_payload=self.capacity)
        decoder.bytes_received = offset
        return decoder

    def _refuse_header(self, start: int) -> None:
        """Raise what FrameDecoder raises for the bad header at ``start``."""
        try:
            decoder = self._decoder(self._offset + start)
            decoder.feed(self._view[start : start + HEADER_SIZE])
            decoder.next_frame()
        except ProtocolError as exc:
            self._error = exc
            raise

    def _slow(self, frame_bytes: memoryview, offset: int) -> Message:
        # Imported here: the preempt workers start without numpy (messages uses it).
        from protocol.messages import decode_message

        try:
            decoder = self._decoder(offset)
            decoder.feed(frame_bytes)
            frame = decoder.next_frame()
            assert frame is not None
            return decode_message(frame, channel=self.channel)
        except ProtocolError as exc:
            self._error = exc
            raise
