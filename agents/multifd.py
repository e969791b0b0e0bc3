"""Network multifd: precopy page data over N TLS channels (QEMU's multifd.c).

One TLS channel is CPU-bound on one core at each end (AES plus OpenSSL's
record layer, and on the destination the first touch of fresh memfd pages).
With the ``multifd`` capability the source opens ``multifd-channels`` more
channels (``multifd-0`` … ``multifd-N-1``) after CONFIG and sends every page
frame of precopy and of the switchover's final pass on them; main keeps the
order of everything else.  Each multifd channel encrypts and decrypts in a
worker thread of its own task (``TLSStream.offload_crypto``), and the
destination writes its pages from a worker thread too, so the work spreads
over the cores.

Ordering is the whole difficulty: a page sent in pass 3 on ``multifd-0`` and
again, newer, in pass 4 on ``multifd-1`` must never be applied in the other
order.  As QEMU does with MULTIFD_FLAG_SYNC, the source ends every round (a
pass, the final pass, the switch to postcopy) with MULTIFD_SYNC *n* on every
multifd channel and on main.  A destination reader that reaches sync *n*
waits until all readers have reached it before it applies anything newer, and
main waits for the same before it goes on (so DISCARD, device state and
COMPLETE only ever follow every page sent before them).

Postcopy does not use multifd channels: after the switch the source closes
them (cleanly, after the last sync) and pages travel on main and preempt,
placed with UFFDIO_COPY; recovery re-creates only main, return and preempt.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from protocol.errors import ProtocolError
from protocol.messages import Message, MultifdSync

from .channel import Channel, ChannelClosed, frame_size
from .ram import PAGE_MESSAGES

QUEUE_DEPTH = 2
"""Frames waiting per channel: enough to keep its thread busy while the
producer gathers the next batch, few enough that a slow channel is noticed."""

MAX_CHANNELS = 16


def offload_crypto(channel: Channel) -> None:
    """Let the channel's TLS stream do its crypto in worker threads (plaintext has none)."""
    if hasattr(channel.stream, "offload_crypto"):
        channel.stream.offload_crypto = True


class MultifdSender:
    """Source: spreads page frames over the multifd channels, least-loaded first."""

    def __init__(self, channels: list[Channel]) -> None:
        if not channels:
            raise ValueError("multifd needs at least one channel")
        self.channels = channels
        # Frames are queued encoded: encoding once tells the producer their size too.
        self._queues = [trio.open_memory_channel[list[Any]](QUEUE_DEPTH) for _ in channels]
        self.sync_no = 0
        self.closed = False

    async def run(self) -> None:
        """One task per channel sends what its queue holds; ends once closed and drained."""
        async with trio.open_nursery() as nursery:
            for channel, (_, receive) in zip(self.channels, self._queues, strict=True):
                nursery.start_soon(self._pump, channel, receive)

    async def _pump(self, channel: Channel, queue: trio.MemoryReceiveChannel[list[Any]]) -> None:
        async with queue:
            async for parts in queue:
                await channel.send_parts(parts)
        await channel.aclose()

    async def send(self, message: Message) -> int:
        """Queue one page frame on the least busy channel; returns its size on the wire."""
        send, _ = min(self._queues, key=lambda q: q[0].statistics().current_buffer_used)
        parts = message.encode()
        await send.send(parts)
        return frame_size(parts)

    async def sync(self, send_main: Callable[[Message], Awaitable[Any]]) -> None:
        """End a round: MULTIFD_SYNC on every multifd channel (after its pages), then main."""
        self.sync_no += 1
        for send, _ in self._queues:
            await send.send(MultifdSync(self.sync_no).encode())
        await send_main(MultifdSync(self.sync_no))

    async def close(self) -> None:
        """No more pages: each channel drains its queue, then closes (a clean EOF)."""
        if self.closed:
            return
        self.closed = True
        for send, _ in self._queues:
            await send.aclose()


class MultifdReceiver:
    """Destination: the readers of the multifd channels and their sync barrier."""

    def __init__(self, nchannels: int) -> None:
        if not 1 <= nchannels <= MAX_CHANNELS:
            raise ValueError(f"multifd-channels {nchannels}: must be 1..{MAX_CHANNELS}")
        self.nchannels = nchannels
        self.channels: dict[int, Channel] = {}
        self.all_attached = trio.Event()
        self._reached: dict[int, int] = {}  # sync number → readers that reached it
        self._released: dict[int, trio.Event] = {}
        self._ended: dict[int, int] = {}  # channel index → last sync before a clean EOF
        self.error: str | None = None

    def attach(self, index: int, channel: Channel) -> str | None:
        """A multifd channel said HELLO; returns a refusal reason, or None."""
        if not 0 <= index < self.nchannels:
            return f"multifd channel {index} refused: this migration has {self.nchannels} (0..{self.nchannels - 1})"
        if index in self.channels:
            return f"multifd channel {index} is already attached"
        self.channels[index] = channel
        offload_crypto(channel)
        if len(self.channels) == self.nchannels:
            self.all_attached.set()
        return None

    def _event(self, sync_no: int) -> trio.Event:
        return self._released.setdefault(sync_no, trio.Event())

    async def read(
        self,
        index: int,
        store: Callable[[Any], None],
        record: Callable[[Any], None],
    ) -> None:
        """Read one channel until the source closes it.

        ``store`` writes a page frame's data (run in a worker thread);
        ``record`` then marks it received (on the trio thread).
        """
        channel = self.channels[index]
        last = 0
        while True:
            try:
                message = await channel.receive()
            except ChannelClosed:
                self._ended[index] = last
                for sync_no, event in self._released.items():
                    if sync_no > last and not event.is_set():
                        self.error = f"{channel.name} closed before multifd sync {sync_no}"
                        event.set()
                return
            if isinstance(message, PAGE_MESSAGES):
                await trio.to_thread.run_sync(store, message)
                record(message)
            elif isinstance(message, MultifdSync):
                if message.sync_no != last + 1:
                    raise ProtocolError(
                        f"multifd sync {message.sync_no} after {last}: syncs must count up by one",
                        channel=channel.name,
                    )
                last = message.sync_no
                self._reached[last] = self._reached.get(last, 0) + 1
                if self._reached[last] == self.nchannels:
                    del self._reached[last]
                    self._event(last).set()
                await self._event(last).wait()
                self._check()
            else:
                raise ProtocolError(
                    f"unexpected {type(message).__name__} on a multifd channel",
                    channel=channel.name,
                )

    def _check(self) -> None:
        if self.error is not None:
            raise ProtocolError(self.error, channel="multifd")

    async def wait(self, sync_no: int) -> None:
        """Main reached MULTIFD_SYNC ``sync_no``: wait until every page before it is applied."""
        for index, last in self._ended.items():
            if last < sync_no:
                raise ProtocolError(
                    f"multifd-{index} closed before multifd sync {sync_no}", channel="main"
                )
        await self._event(sync_no).wait()
        self._check()
