"""An asyncio client for one agent's control socket that keeps itself connected.

Theory of operation
-------------------
Textual runs on asyncio, so the TUI cannot borrow the agents' trio code; it
speaks the control protocol with protocol/'s sans-IO codec
(:class:`protocol.control.ClientConnection`) over asyncio streams, to a unix
socket path or to ``tls:HOST:PORT`` with mutual TLS against godwit's CA.

:meth:`AgentClient.run` never returns: it connects, reads the greeting,
negotiates with ``qmp_capabilities`` and then reads until the connection
ends; then it tells its :class:`Listener` why, waits (0.2 s, doubling up to
5 s, reset by every successful handshake) and tries again.  A peer that is
not an agent — no greeting, nonsense lines, replies to commands nobody sent —
is reported to the listener, never raised into the app.  Commands
(:meth:`AgentClient.execute`) are matched to replies by id, so events and
replies may interleave freely; a command pending when the connection drops
fails with :class:`AgentUnavailable` at once rather than waiting out its
timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

from protocol.control import (
    ClientConnection,
    ClientEvent,
    ErrorReply,
    Event,
    Greeting,
    ProtocolViolation,
    Return,
)
from protocol.uri import parse_uri

READ_CHUNK = 1 << 16


class AgentUnavailable(Exception):
    """The agent is not connected (or the connection broke while waiting)."""


class CommandError(Exception):
    """The agent refused a command; ``desc`` is its own words, shown as they are."""

    def __init__(self, command: str, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(f"{command}: {desc}")
        self.command = command
        self.desc = desc
        self.error_class = error_class


class HandshakeError(Exception):
    """The peer did not greet and negotiate like a QMP server."""


@dataclass(frozen=True, slots=True)
class AgentAddress:
    """Where an agent's control socket is: a unix socket path or ``tls:HOST:PORT``."""

    text: str
    path: str | None = None
    host: str = ""
    port: int = 0

    @property
    def is_tls(self) -> bool:
        return self.path is None

    @classmethod
    def parse(cls, text: str) -> AgentAddress:
        """Parse ``tls:HOST:PORT``, ``unix:PATH`` or a bare path; ValueError says why not."""
        if text.startswith("tls:"):
            uri = parse_uri(text)
            return cls(text, host=uri.host, port=uri.port)
        path = text.removeprefix("unix:")
        if not path:
            raise ValueError(f"agent address {text!r}: empty socket path")
        if ":" in path and not path.startswith(("/", ".")):
            raise ValueError(f"agent address {text!r}: use a unix socket path or tls:HOST:PORT")
        return cls(text, path=path)


def tls_context(pki_dir: Path, name: str) -> ssl.SSLContext:
    """Client context for mutual TLS 1.3 against godwit's CA only (no system store).

    ``pki_dir`` holds ``ca.pem`` and this host's ``NAME.pem``/``NAME.key``
    as ``godwit pki`` lays them out.
    """
    ca = pki_dir / "ca.pem"
    cert, key = pki_dir / f"{name}.pem", pki_dir / f"{name}.key"
    for p in (ca, cert, key):
        if not p.is_file():
            raise FileNotFoundError(f"TLS for the control socket needs {p}: file not found")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


class Listener(Protocol):
    """What the client tells its owner.  Called on the client's task; must not block."""

    def agent_connected(self, greeting: Greeting) -> None: ...

    def agent_lost(self, reason: str, attempt: int, retry_in: float) -> None: ...

    def agent_event(self, event: Event) -> None: ...

    def agent_nonsense(self, desc: str) -> None: ...


def describe_failure(exc: BaseException) -> str:
    """A connection failure in words an admin can act on."""
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    text = str(exc)
    return text or type(exc).__name__


class AgentClient:
    """One agent's control connection, re-established by itself with backoff."""

    def __init__(
        self,
        address: AgentAddress,
        listener: Listener,
        *,
        ssl_context: ssl.SSLContext | None = None,
        backoff_min: float = 0.2,
        backoff_max: float = 5.0,
        connect_timeout: float = 5.0,
        command_timeout: float = 10.0,
    ) -> None:
        self.address = address
        self.listener = listener
        self.ssl_context = ssl_context
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._writer: asyncio.StreamWriter | None = None
        self._conn = ClientConnection()
        self._pending: dict[Any, asyncio.Future[Return | ErrorReply]] = {}
        self._handshaken = False

    @property
    def connected(self) -> bool:
        return self._writer is not None

    async def run(self) -> NoReturn:
        """Stay connected until cancelled, reporting every loss and every retry."""
        delay = self.backoff_min
        attempt = 0
        while True:
            try:
                await self._session()
                reason = "the agent closed the connection"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every failure of one session is a reason to retry
                reason = describe_failure(exc)
            if self._handshaken:
                delay, attempt = self.backoff_min, 0
            attempt += 1
            self._fail_pending(reason)
            self.listener.agent_lost(reason, attempt, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        addr = self.address
        if addr.path is not None:
            return await asyncio.wait_for(
                asyncio.open_unix_connection(addr.path), self.connect_timeout
            )
        if self.ssl_context is None:
            raise HandshakeError(f"{addr.text} needs TLS: give --pki DIR --name NAME")
        return await asyncio.wait_for(
            asyncio.open_connection(
                addr.host, addr.port, ssl=self.ssl_context, server_hostname=addr.host
            ),
            self.connect_timeout,
        )

    async def _session(self) -> None:
        """One connection from dial to EOF; ``_handshaken`` says if it got that far."""
        self._handshaken = False
        reader, writer = await self._open()
        self._conn = conn = ClientConnection()
        try:
            first = await asyncio.wait_for(self._next(reader), self.connect_timeout)
            if not isinstance(first, Greeting):
                raise HandshakeError(f"no QMP greeting from {self.address.text}: {_what(first)}")
            ident, data = conn.command("qmp_capabilities")
            writer.write(data)
            await writer.drain()
            while True:
                reply = await asyncio.wait_for(self._next(reader), self.connect_timeout)
                if isinstance(reply, Return | ErrorReply) and reply.id == ident:
                    break
                if isinstance(reply, Event):  # a server may speak early; keep it
                    self.listener.agent_event(reply)
            if isinstance(reply, ErrorReply):
                raise HandshakeError(f"qmp_capabilities refused: {reply.desc}")
            self._writer = writer
            self._handshaken = True
            self.listener.agent_connected(first)
            while True:
                self._dispatch(await self._next(reader))
        except EOFError:
            return
        finally:
            self._writer = None
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _next(self, reader: asyncio.StreamReader) -> ClientEvent:
        while True:
            event = self._conn.next_event()
            if event is not None:
                return event
            data = await reader.read(READ_CHUNK)
            if not data:
                raise EOFError
            self._conn.receive_data(data)

    def _dispatch(self, event: ClientEvent) -> None:
        if isinstance(event, Event):
            self.listener.agent_event(event)
        elif isinstance(event, Return | ErrorReply):
            try:
                future = self._pending.pop(event.id, None)
            except TypeError:  # an unhashable id is nonsense too
                future = None
            if future is None:
                self.listener.agent_nonsense(f"reply to no pending command (id {event.id!r})")
            elif not future.done():
                future.set_result(event)
        else:
            self.listener.agent_nonsense(_what(event))

    def _fail_pending(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(
                    AgentUnavailable(f"connection to {self.address.text} lost: {reason}")
                )

    async def execute(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command; its return value, or CommandError with the agent's desc."""
        writer = self._writer
        if writer is None:
            raise AgentUnavailable(f"{name}: not connected to {self.address.text}")
        ident, data = self._conn.command(name, arguments)
        future: asyncio.Future[Return | ErrorReply] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        try:
            writer.write(data)
            await writer.drain()
            reply = await asyncio.wait_for(future, self.command_timeout)
        except TimeoutError:
            raise CommandError(
                name, f"no answer from {self.address.text} in {self.command_timeout:.0f} s"
            ) from None
        except OSError as exc:
            raise AgentUnavailable(f"{name}: {describe_failure(exc)}") from None
        finally:
            self._pending.pop(ident, None)
        if isinstance(reply, ErrorReply):
            raise CommandError(name, reply.desc, reply.error_class)
        return reply.value


def _what(event: ClientEvent) -> str:
    if isinstance(event, ProtocolViolation):
        line = event.line[:80].decode("utf-8", "replace")
        return f"{event.desc}: {line!r}" if line else event.desc
    return f"unexpected {type(event).__name__}"
