"""The agent's event bus: one emitter, many control connections listening.

QMP events are broadcast to every negotiated control connection.  A slow or
stuck client must never slow a migration down, so each subscriber gets a
bounded queue and events that do not fit are dropped for that subscriber
only (counted, and reported to it as a ``EVENTS_DROPPED`` event when room
returns).  Emitting is synchronous and never blocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

SUBSCRIBER_QUEUE = 256


@dataclass(frozen=True, slots=True)
class AgentEvent:
    name: str
    data: dict[str, Any]
    timestamp: float = field(default_factory=time.time)


class _Subscriber:
    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[AgentEvent](SUBSCRIBER_QUEUE)
        self.dropped = 0

    def offer(self, event: AgentEvent) -> None:
        try:
            if self.dropped:
                self.send.send_nowait(AgentEvent("EVENTS_DROPPED", {"count": self.dropped}))
                self.dropped = 0
            self.send.send_nowait(event)
        except trio.WouldBlock:
            self.dropped += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass


class EventBus:
    def __init__(self) -> None:
        self._subscribers: set[_Subscriber] = set()
        self.listeners: list[Callable[[str], None]] = []
        """In-process observers (sd_notify status); called with the event name."""
        self.history: list[AgentEvent] = []
        """The most recent events, for ``godwit status`` and post-mortems."""

    def emit(self, name: str, data: dict[str, Any] | None = None) -> AgentEvent:
        event = AgentEvent(name, data or {})
        self.history.append(event)
        del self.history[:-200]
        for sub in list(self._subscribers):
            sub.offer(event)
        for listener in self.listeners:
            listener(name)
        return event

    @contextmanager
    def subscribe(self) -> Iterator[trio.MemoryReceiveChannel[AgentEvent]]:
        sub = _Subscriber()
        self._subscribers.add(sub)
        try:
            yield sub.receive
        finally:
            self._subscribers.discard(sub)
            sub.send.close()
