"""A scriptable stand-in for a godwit agent's control socket, speaking the real codec.

It serves protocol.control.ServerConnection over an asyncio unix socket:
greeting, capabilities negotiation, ``query-guests``, ``query-migrate``
answers the test sets, events the test pushes, and every other command
answered ``{}`` (or with the error a test scripted).  Every command it got
is recorded, so a test asserts exactly what the TUI sent.  For sync tests
(snapshot tests run the app on their own event loop) :class:`ThreadedFake`
runs it on a loop in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import ssl
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from protocol.control import ServerConnection
from protocol.options import CAPABILITIES, PARAMETERS

T = TypeVar("T")

WHEN = 1_700_000_000.0
"""Timestamp of pushed events: fixed, so snapshots never show a live clock."""

VERSION = {"qemu": {"major": 9, "minor": 2, "micro": 0}, "package": "godwit 0.1.0"}

QUERIES = frozenset(
    {
        "query-guests",
        "query-migrate",
        "query-status",
        "query-version",
        "query-migrate-capabilities",
        "query-migrate-parameters",
    }
)


class FakeAgent:
    """One agent's control socket with state a test writes directly."""

    def __init__(
        self,
        path: str | Path,
        guests: list[dict[str, Any]] | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.path = str(path)
        self.ssl_context = ssl_context
        """With TLS the fake listens on localhost TCP instead of ``path``."""
        self.port = 0
        self.guests: list[dict[str, Any]] = guests if guests is not None else []
        self.migrations: dict[str, dict[str, Any]] = {}
        self.capabilities: dict[str, dict[str, bool]] = {}
        self.parameters: dict[str, dict[str, Any]] = {}
        """Per guest, what migrate-set-* set, over protocol/'s defaults (as an agent keeps them)."""
        self.errors: dict[str, str] = {}
        """Command name → the desc of the error it is answered with."""
        self.hang_up_on: set[str] = set()
        """Commands taken and then answered by closing the connection."""
        self.answers: dict[str, Any] = {}
        """Command name → a raw value to return instead of the usual answer."""
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.connections = 0
        self.greeting: bytes | None = None
        """Replace the greeting line (bytes, newline included) to play a confused peer."""
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._servers: dict[asyncio.StreamWriter, ServerConnection] = {}

    # --- scripting -----------------------------------------------------------

    def guest(self, name: str) -> dict[str, Any]:
        for g in self.guests:
            if g["name"] == name:
                return g
        raise KeyError(name)

    def set_migration(self, name: str, info: dict[str, Any]) -> None:
        """Make ``name`` be in ``info["status"]`` as ``info["role"]``, in both queries."""
        self.migrations[name] = info
        self.guest(name)["migration"] = {"role": info["role"], "status": info["status"]}

    def actions(self) -> list[tuple[str, dict[str, Any]]]:
        """Commands received other than the TUI's own polling."""
        return [(n, a) for n, a in self.received if n not in QUERIES]

    # --- serving -------------------------------------------------------------

    @property
    def address(self) -> str:
        """What to give the TUI as ``--agent``."""
        return f"tls:localhost:{self.port}" if self.ssl_context is not None else self.path

    async def start(self) -> None:
        if self.ssl_context is None:
            self._server = await asyncio.start_unix_server(self._serve, path=self.path)
            return
        self._server = await asyncio.start_server(
            self._serve, "localhost", self.port, ssl=self.ssl_context
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the listener and every connection (the socket file goes too)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        await self.drop_clients()
        if self.ssl_context is not None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def drop_clients(self) -> None:
        for w in list(self._writers):
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()
        self._writers.clear()

    async def push_event(self, name: str, data: dict[str, Any], when: float = WHEN) -> None:
        for w, conn in list(self._servers.items()):
            with contextlib.suppress(Exception):
                w.write(conn.event(name, data, when))
                await w.drain()

    async def send_raw(self, data: bytes) -> None:
        for w in list(self._writers):
            with contextlib.suppress(Exception):
                w.write(data)
                await w.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = ServerConnection(VERSION)
        self._writers.add(writer)
        self.connections += 1
        try:
            writer.write(self.greeting if self.greeting is not None else conn.greeting())
            await writer.drain()
            while data := await reader.read(65536):
                conn.receive_data(data)
                writer.write(conn.data_to_send())
                if conn.negotiated:
                    self._servers[writer] = conn
                while (cmd := conn.next_event()) is not None:
                    self.received.append((cmd.name, copy.deepcopy(cmd.arguments)))
                    if cmd.name in self.hang_up_on:
                        return
                    writer.write(self._answer(conn, cmd.name, cmd.arguments, cmd.id))
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            self._servers.pop(writer, None)
            writer.close()

    def _answer(self, conn: ServerConnection, name: str, args: dict[str, Any], ident: Any) -> bytes:
        if name in self.errors:
            return conn.error(self.errors[name], id=ident)
        if name in self.answers:
            return conn.reply(self.answers[name], ident)
        if name == "query-guests":
            return conn.reply(copy.deepcopy(self.guests), ident)
        if name == "query-migrate":
            return conn.reply(copy.deepcopy(self.migrations.get(args.get("guest", ""), {})), ident)
        guest = str(args.get("guest", ""))
        caps = self.capabilities.setdefault(guest, {k: c.default for k, c in CAPABILITIES.items()})
        params = self.parameters.setdefault(guest, {k: p.default for k, p in PARAMETERS.items()})
        if name == "query-migrate-capabilities":
            return conn.reply([{"capability": k, "state": v} for k, v in caps.items()], ident)
        if name == "query-migrate-parameters":
            return conn.reply(dict(params), ident)
        if name == "migrate-set-capabilities":
            caps.update({c["capability"]: c["state"] for c in args.get("capabilities", [])})
        if name == "migrate-set-parameters":
            params.update({k: v for k, v in args.items() if k != "guest"})
        return conn.reply({}, ident)


class ThreadedFake:
    """A FakeAgent on its own event loop in a thread, for tests that are not async."""

    def __init__(self, agent: FakeAgent) -> None:
        self.agent = agent
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def call(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return asyncio.run_coroutine_threadsafe(make(), self.loop).result(timeout=10)

    @contextlib.contextmanager
    def running(self) -> Iterator[FakeAgent]:
        self._thread.start()
        self.call(self.agent.start)
        try:
            yield self.agent
        finally:
            self.call(self.agent.stop)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()


async def eventually(check: Callable[[], bool], pause: Callable[[], Awaitable[Any]]) -> None:
    """Wait until ``check()`` holds, yielding to the app between looks; fail after ~10 s.

    The bound is a give-up for a test that would otherwise hang, not a
    timing assertion.
    """
    for _ in range(1000):
        if check():
            return
        await pause()
    raise AssertionError("condition never became true")
