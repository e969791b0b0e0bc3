"""A channel: one connection between agents, carrying frames (QEMU's QEMUFile).

A :class:`Channel` composes a byte stream (godwit's TLS stream, or plain TCP
in tests) with protocol/'s :class:`FrameDecoder`: ``send`` writes a
message's buffers with one gather-write (page data goes straight from guest
RAM to the stream, no join), ``receive`` returns the next decoded message.
It counts bytes and the time of the last frame for query-migrate's channel
table.  Sends are serialised by a fair lock, so when several tasks share
main (the background stream and the request server without preempt), a
request waits for at most one piece, never for a whole run.
"""

from __future__ import annotations

import time
from typing import Any

import trio

from protocol.frames import FrameDecoder
from protocol.messages import Error, Message, decode_message

from .migration import ChannelStats
from .tls import WaitFn

RECEIVE_CHUNK = 256 * 1024


class ChannelClosed(Exception):
    """The peer closed the channel cleanly (EOF between frames)."""


class PeerError(Exception):
    """The peer sent an ERROR frame: it refused or abandoned the migration."""

    def __init__(self, channel: str, error: Error) -> None:
        super().__init__(f"peer refused on channel {channel}: {error.message} ({error.code})")
        self.code = error.code
        self.message = error.message


def frame_size(buffers: list[Any]) -> int:
    """Bytes of an encoded frame (``Message.encode()``'s parts)."""
    return sum(memoryview(b).nbytes for b in buffers)


class Channel:
    def __init__(
        self,
        name: str,
        stream: Any,
        stats: ChannelStats | None = None,
        max_payload: int | None = None,
    ):
        self.name = name
        self.stream = stream
        self.stats = stats or ChannelStats(name)
        self.stats.connected = True
        self.decoder = (
            FrameDecoder(channel=name)
            if max_payload is None
            else FrameDecoder(channel=name, max_payload=max_payload)
        )
        self._send_lock = trio.StrictFIFOLock()
        self._receive_into = hasattr(stream, "receive_into")
        self.closed = False
        self.closed_event = trio.Event()
        """Set by aclose: whoever accepted the connection waits for it (trio closes a
        listener's stream when its handler returns)."""

    async def send(self, message: Message) -> int:
        """Send one message; returns the bytes written (header included)."""
        return await self.send_parts(message.encode())

    async def send_parts(self, buffers: list[Any]) -> int:
        """Send one message already encoded (``Message.encode()``); returns its size."""
        size = frame_size(buffers)
        async with self._send_lock:
            if hasattr(self.stream, "send_many"):
                await self.stream.send_many(buffers)
            else:
                await self.stream.send_all(b"".join(bytes(b) for b in buffers))
        self.stats.bytes_sent += size
        self.stats.last_frame = time.monotonic()
        return size

    def _next_message(self) -> Message | None:
        frame = self.decoder.next_frame()
        if frame is None:
            return None
        self.stats.last_frame = time.monotonic()
        message = decode_message(frame, channel=self.name)
        if isinstance(message, Error):
            raise PeerError(self.name, message)
        return message

    async def receive(self) -> Message:
        """The next message; raises ChannelClosed at a clean EOF, ProtocolError on bad input."""
        while True:
            message = self._next_message()
            if message is not None:
                return message
            if self._receive_into:
                buffer = self.decoder.get_buffer(RECEIVE_CHUNK)
                self._took(await self.stream.receive_into(buffer))
            else:
                data = await self.stream.receive_some(RECEIVE_CHUNK)
                if not data:
                    self._eof()
                self.decoder.feed(data)
                self.stats.bytes_received += len(data)

    # -- from a thread that owns the channel (agents/threads.py) ----------------

    def thread_send(self, message: Message, wait: WaitFn) -> int:
        """:meth:`send` for the thread that owns this channel now; returns bytes sent."""
        buffers = message.encode()
        size = frame_size(buffers)
        self.stream.thread_send_many(buffers, wait)
        self.stats.bytes_sent += size
        self.stats.last_frame = time.monotonic()
        return size

    def buffered(self) -> bool:
        """A message may be had without the socket becoming readable (decoded
        frames, or TLS bytes already read): a thread that polls must receive first."""
        return self.decoder.frames_ready or self.stream.has_buffered

    def thread_receive(self, wait: WaitFn, *, block: bool = True) -> Message | None:
        """:meth:`receive` for the owning thread; with ``block`` false, None as soon
        as no whole message is left in what has arrived."""
        while True:
            message = self._next_message()
            if message is not None:
                return message
            buffer = self.decoder.get_buffer(RECEIVE_CHUNK)
            n = self.stream.thread_receive_into(buffer, wait, block=block)
            if n is None:
                self.decoder.buffer_updated(0)
                return None
            self._took(n)

    def _took(self, n: int) -> None:
        """``n`` bytes went into the decoder's buffer; 0 is the peer's EOF."""
        self.decoder.buffer_updated(n)
        if n == 0:
            self._eof()
        self.stats.bytes_received += n

    def _eof(self) -> None:
        self.stats.connected = False
        self.decoder.eof()  # raises TruncatedStream inside a frame
        raise ChannelClosed(f"channel {self.name} closed by peer")

    async def send_error(self, code: str, message: str) -> None:
        """Best effort: tell the peer why we give up, without waiting long."""
        with trio.move_on_after(2):
            try:
                await self.send(Error(code=code, message=message))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.closed_event.set()
        self.stats.connected = False
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
