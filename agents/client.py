"""A small trio client for an agent's control socket, for lab scripts and the CLI.

    async with open_client("/run/godwit/control.sock") as agent:
        await agent.execute("migrate", {"guest": "vm1", "uri": "tls:10.0.0.2:4444"})
        info = await agent.wait_status("vm1", {"completed", "failed"}, timeout=60)

It owns one reader task (in the nursery of the ``async with``) that routes
replies to the command awaiting them by id and keeps every event, so a
script can wait for an event that arrived before it started waiting.
Timeouts are explicit arguments because scripts always want them; they
raise ``trio.TooSlowError``.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from protocol.control import (
    ClientConnection,
    ErrorReply,
    Event,
    Greeting,
    ProtocolViolation,
    Return,
)


class CommandFailed(Exception):
    """The agent answered a command with a QMP error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class AgentGone(Exception):
    """The control connection closed or broke."""


@dataclass
class ControlClient:
    target: str
    stream: Any
    codec: ClientConnection = field(default_factory=ClientConnection)
    greeting: Greeting | None = None
    events: list[Event] = field(default_factory=list)
    _pending: dict[Any, tuple[trio.Event, list[Return | ErrorReply]]] = field(default_factory=dict)
    _event_arrived: trio.Condition | None = None
    _closed: str | None = None

    async def execute(
        self, name: str, arguments: dict[str, Any] | None = None, *, timeout: float = 30
    ) -> Any:
        """Run one command and return its ``return`` value, or raise CommandFailed."""
        ident, wire = self.codec.command(name, arguments)
        done = trio.Event()
        slot: list[Return | ErrorReply] = []
        self._pending[ident] = (done, slot)
        try:
            with trio.fail_after(timeout):
                await self.stream.send_all(wire)
                await done.wait()
        finally:
            self._pending.pop(ident, None)
        if not slot:
            raise AgentGone(
                f"{self.target}: connection closed while waiting for {name} ({self._closed})"
            )
        reply = slot[0]
        if isinstance(reply, ErrorReply):
            raise CommandFailed(name, reply.error_class, reply.desc)
        return reply.value

    async def wait_event(
        self,
        name: str,
        predicate: Callable[[Event], bool] = lambda e: True,
        *,
        timeout: float = 30,
        since: int = 0,
    ) -> Event:
        """Wait for an event (including ones already received after index ``since``)."""
        assert self._event_arrived is not None
        with trio.fail_after(timeout):
            async with self._event_arrived:
                seen = since
                while True:
                    for event in self.events[seen:]:
                        if event.name == name and predicate(event):
                            return event
                    seen = len(self.events)
                    if self._closed:
                        raise AgentGone(
                            f"{self.target}: closed while waiting for {name} ({self._closed})"
                        )
                    await self._event_arrived.wait()

    async def wait_status(
        self, guest: str, statuses: Iterable[str], *, timeout: float = 60, poll: float = 0.2
    ) -> dict[str, Any]:
        """Wait until ``query-migrate`` for the guest reports one of ``statuses``."""
        wanted = set(statuses)
        with trio.fail_after(timeout):
            while True:
                info = await self.execute("query-migrate", {"guest": guest})
                if info.get("status") in wanted:
                    return dict(info)
                await trio.sleep(poll)

    async def _reader(self) -> None:
        assert self._event_arrived is not None
        try:
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    self._closed = "agent closed the connection"
                    break
                self.codec.receive_data(bytes(data))
                while (item := self.codec.next_event()) is not None:
                    if isinstance(item, Return | ErrorReply):
                        waiter = self._pending.get(item.id)
                        if waiter:
                            waiter[1].append(item)
                            waiter[0].set()
                    elif isinstance(item, Event):
                        self.events.append(item)
                        async with self._event_arrived:
                            self._event_arrived.notify_all()
                    elif isinstance(item, Greeting):
                        self.greeting = item
                    elif isinstance(item, ProtocolViolation):
                        self._closed = f"not QMP: {item.desc}"
                        return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._closed = f"connection broke: {exc}"
        finally:
            for done, _slot in self._pending.values():
                done.set()
            async with self._event_arrived:
                self._event_arrived.notify_all()


async def _connect(target: str, pki: Path | None, name: str | None) -> Any:
    if target.startswith("tls:"):
        from protocol.uri import parse_uri

        from .pki import load_identity
        from .tls import TLSStream, client_context

        if pki is None or name is None:
            raise ValueError(f"{target}: a TLS control connection needs --pki DIR and --name NAME")
        uri = parse_uri(target)
        return await TLSStream.connect(
            uri.host, uri.port, client_context(load_identity(pki, name)), uri.host
        )
    return await trio.open_unix_socket(target)


@asynccontextmanager
async def open_client(
    target: str | Path, *, pki: Path | None = None, name: str | None = None, timeout: float = 10
) -> AsyncIterator[ControlClient]:
    """Connect to an agent (Unix socket path or ``tls:HOST:PORT``) and negotiate QMP."""
    target = str(target)
    with trio.fail_after(timeout):
        try:
            stream = await _connect(target, pki, name)
        except (OSError, ssl.SSLError) as exc:
            raise AgentGone(f"cannot reach agent at {target}: {exc}") from exc
    client = ControlClient(target, stream)
    client._event_arrived = trio.Condition()
    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(client._reader)
        await client.execute("qmp_capabilities", timeout=timeout)
        try:
            yield client
        finally:
            nursery.cancel_scope.cancel()
