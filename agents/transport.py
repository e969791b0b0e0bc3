"""Opening channels between agents: dial, listen, and sort channels by their HELLO.

The source dials every channel; the destination listens on one port and
learns what a connection is from its first frame, HELLO (version, migration
id, channel kind, resume flag).  The listener settles everything that can go
wrong before a migration sees the connection — TLS handshake (the CA and
host name checks live in the TLS contexts), a HELLO that does not come in
time, a version we do not speak — and answers with an ERROR frame and a
close.  Only then does it hand ``(hello, channel)`` to the agent, which
routes it to a migration or refuses it (unknown id).  A bad connection
therefore never touches a running migration.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from protocol import PROTOCOL_VERSION
from protocol.errors import ProtocolError
from protocol.messages import ChannelKind, Hello, channel_name, check_version
from protocol.uri import MigrationURI

from .channel import Channel, ChannelClosed, PeerError
from .migration import ChannelStats
from .pki import Identity
from .tls import (
    PlainStream,
    TLSError,
    TLSStream,
    client_context,
    server_context,
    set_keepalive,
    warn_plaintext,
)

log = logging.getLogger("godwit.transport")

HELLO_TIMEOUT = 10.0
DIAL_TIMEOUT = 10.0
USER_TIMEOUT_FLOOR_MS = 20_000


@dataclass
class Transport:
    """How this agent talks to other agents: its TLS identity, or plaintext for tests."""

    identity: Identity | None = None
    insecure_plaintext: bool = False

    def __post_init__(self) -> None:
        if self.identity is None and not self.insecure_plaintext:
            raise ValueError("an agent needs --pki DIR and --name (TLS), or --insecure-plaintext")
        self._client_ctx = client_context(self.identity) if self.identity else None
        self._server_ctx = server_context(self.identity) if self.identity else None

    def check_uri(self, uri: MigrationURI) -> None:
        if uri.scheme == "tcp" and not self.insecure_plaintext:
            raise ValueError(
                f"{uri}: plain TCP migration needs the agent's --insecure-plaintext flag; use tls:"
            )
        if uri.scheme == "tls" and self.identity is None:
            raise ValueError(
                f"{uri}: this agent has no TLS identity (start it with --pki DIR --name NAME)"
            )

    async def dial(self, uri: MigrationURI, *, timeout: float = DIAL_TIMEOUT) -> Any:
        """Connect (and handshake); a blackholed destination fails after ``timeout``
        instead of Linux's ~2 minutes of SYN retries."""
        self.check_uri(uri)
        try:
            with trio.fail_after(timeout):
                return await self._dial(uri)
        except trio.TooSlowError:
            raise trio.BrokenResourceError(
                f"no connection to {uri} within {timeout:.0f} s"
            ) from None

    async def _dial(self, uri: MigrationURI) -> Any:
        if uri.scheme == "tls":
            stream: Any = await TLSStream.connect(uri.host, uri.port, self._client_ctx, uri.host)  # type: ignore[arg-type]
        else:
            warn_plaintext(f"migration channel to {uri}")
            stream = await PlainStream.connect(uri.host, uri.port)
        return stream

    async def accept(self, socket_stream: trio.SocketStream) -> Any:
        if self._server_ctx is not None:
            return await TLSStream.accept(socket_stream, self._server_ctx)
        return await PlainStream.accept(socket_stream)


def keepalive(stream: Any, keepalive_ms: int) -> None:
    """TCP keepalive and TCP_USER_TIMEOUT so a hung link surfaces as an error."""
    sock = getattr(stream, "socket", None)
    if sock is None or keepalive_ms <= 0:
        return
    seconds = max(1, keepalive_ms // 1000)
    # TCP_USER_TIMEOUT is only the backstop: PING/PONG pauses postcopy at 3 x
    # keepalive-ms.  Tight values kill healthy links on a loaded host (a second of
    # unacknowledged data is normal there), which in precopy fails the migration.
    user_timeout_ms = max(USER_TIMEOUT_FLOOR_MS, 3 * keepalive_ms)
    try:
        set_keepalive(sock, idle_s=seconds, interval_s=1, count=3, user_timeout_ms=user_timeout_ms)
    except OSError as exc:  # never fatal: PING/PONG still detects hangs
        log.debug("keepalive not set: %s", exc)


async def open_channel(
    transport: Transport,
    uri: MigrationURI,
    migration_id: bytes,
    kind: ChannelKind,
    *,
    index: int = 0,
    resume: bool = False,
    stats: ChannelStats | None = None,
    keepalive_ms: int = 0,
) -> Channel:
    """Dial one channel and introduce it with HELLO."""
    stream = await transport.dial(uri)
    keepalive(stream, keepalive_ms)
    channel = Channel(channel_name(kind, index), stream, stats)
    try:
        await channel.send(Hello(PROTOCOL_VERSION, migration_id, kind, index, resume))
    except BaseException:
        await channel.aclose()
        raise
    return channel


ChannelHandler = Callable[[Hello, Channel, str], Awaitable[None]]


async def serve_migrations(
    transport: Transport,
    host: str,
    port: int,
    on_channel: ChannelHandler,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept channels forever; each good one goes to ``on_channel(hello, channel, peer)``.

    ``on_channel`` runs in this listener's nursery and owns the channel from
    then on (it must close it); refusals are handled here.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)

    async def handle(socket_stream: trio.SocketStream) -> None:
        try:
            await _handle(socket_stream)
        except Exception as exc:  # one bad connection must never take the agent down
            log.error(
                "migration listener: connection from %s ended badly",
                _peer(socket_stream),
                exc_info=exc,
            )

    async def _handle(socket_stream: trio.SocketStream) -> None:
        peer = _peer(socket_stream)
        try:
            stream = await transport.accept(socket_stream)
        except (TLSError, trio.BrokenResourceError, OSError) as exc:
            log.warning("refused a connection from %s: %s", peer, exc)
            await trio.aclose_forcefully(socket_stream)
            return
        peer_name = getattr(getattr(stream, "peer_identity", None), "name", peer)
        channel = Channel("incoming", stream)
        try:
            with trio.fail_after(HELLO_TIMEOUT):
                hello = await channel.receive()
            if not isinstance(hello, Hello):
                raise ProtocolError(
                    f"first frame must be HELLO, got {type(hello).__name__}", channel="incoming"
                )
            check_version(hello)
        except (
            ProtocolError,
            ChannelClosed,
            PeerError,
            trio.TooSlowError,
            trio.BrokenResourceError,
        ) as exc:
            reason = (
                f"no HELLO within {HELLO_TIMEOUT:.0f} s"
                if isinstance(exc, trio.TooSlowError)
                else str(exc)
            )
            log.warning("refused a channel from %s (%s): %s", peer, peer_name, reason)
            await channel.send_error("bad-hello", reason)
            await channel.aclose()
            return
        channel.name = hello.channel_name
        channel.decoder.channel = channel.name
        channel.stats.name = channel.name  # query-migrate's channel table names it by kind
        try:
            await on_channel(hello, channel, str(peer_name))
            await channel.closed_event.wait()  # the channel's owner closes it
        finally:
            await channel.aclose()

    task_status.started(listeners)
    await trio.serve_listeners(handle, listeners)


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


def pki_identity(pki: Path | None, name: str | None) -> Identity | None:
    from .pki import load_identity

    if pki is None:
        return None
    if not name:
        raise ValueError("--pki needs --name: the certificate NAME.pem in the PKI directory")
    return load_identity(pki, name)
