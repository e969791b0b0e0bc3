"""The agent's control server: QMP over a Unix socket (0600) and, optionally, mTLS TCP.

Each connection is a task in the server's nursery with two children: one
reads commands and answers them in order (QMP answers in order), one
forwards events once the client has negotiated capabilities.  Writes from
both go through one lock so lines never interleave.  Whatever a client
sends — bad JSON, unknown commands, wrong arguments, a handler that fails —
it gets a QMP error and the agent keeps serving; a connection that breaks
only ends its own task.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import trio

from protocol import qapi
from protocol.control import COMMAND_NOT_FOUND, GENERIC_ERROR, QmpError, ServerConnection

from .events import EventBus

log = logging.getLogger("godwit.control")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class Stream(Protocol):
    async def send_all(self, data: bytes) -> None: ...
    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray: ...
    async def aclose(self) -> None: ...


class ControlServer:
    """Serves QMP to any number of clients on behalf of one agent.

    ``handlers`` maps QMP command names to coroutines taking the validated
    arguments; a handler raises :class:`QmpError` (or ValueError, which
    becomes a GenericError) to fail the command.
    """

    def __init__(
        self, handlers: dict[str, Handler], events: EventBus, version: dict[str, Any]
    ) -> None:
        self.handlers = handlers
        self.events = events
        self.version = version
        self.connections = 0

    async def serve_unix(
        self, path: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on a Unix socket only root (the owner) can use: mode 0600."""
        path = Path(path)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise FileExistsError(f"control socket path {path} exists and is not a socket")
            if await _unix_socket_alive(path):
                raise FileExistsError(f"control socket {path} is in use by a running agent")
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        # Bind under a temporary name and rename once listening: the path
        # appearing is the agent's "ready", so it must never refuse a connection.
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        staging.unlink(missing_ok=True)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            await sock.bind(str(staging))
        finally:
            os.umask(old_umask)
        os.chmod(staging, 0o600)
        sock.listen(32)
        os.rename(staging, path)
        listener = trio.SocketListener(sock)
        try:
            task_status.started()
            await trio.serve_listeners(self._handle_plain, [listener])
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    async def serve_tls(
        self,
        host: str,
        port: int,
        ssl_context: Any,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on TCP with mutual TLS (the agents' PKI); started() gives the port."""
        from .tls import TLSError, TLSStream

        listeners = await trio.open_tcp_listeners(port, host=host)

        async def handle(stream: trio.SocketStream) -> None:
            try:
                with trio.fail_after(10):
                    tls = await TLSStream.accept(stream, ssl_context)
            except (TLSError, trio.TooSlowError, OSError, trio.BrokenResourceError) as exc:
                log.warning("control: TLS connection refused: %s", exc)
                await trio.aclose_forcefully(stream)
                return
            await self.serve_connection(tls)

        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handle, listeners)

    async def _handle_plain(self, stream: trio.SocketStream) -> None:
        await self.serve_connection(stream)

    async def serve_connection(self, stream: Stream) -> None:
        codec = ServerConnection(self.version)
        write_lock = trio.Lock()
        self.connections += 1

        async def write(data: bytes) -> None:
            if data:
                async with write_lock:
                    await stream.send_all(data)

        try:
            await write(codec.greeting())
            with self.events.subscribe() as event_queue:
                async with trio.open_nursery() as nursery:

                    async def forward_events() -> None:
                        async for event in event_queue:
                            if codec.negotiated:
                                await write(codec.event(event.name, event.data, event.timestamp))

                    nursery.start_soon(forward_events)
                    while True:
                        data = await stream.receive_some(65536)
                        if not data:
                            break
                        codec.receive_data(bytes(data))
                        await write(codec.data_to_send())
                        while (command := codec.next_event()) is not None:
                            await write(
                                await self._run(codec, command.name, command.arguments, command.id)
                            )
                    nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            # The client went away, maybe while an event was being written to it
            # (then trio wraps the error in a group): it ends this connection only.
            pass
        finally:
            self.connections -= 1
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)  # type: ignore[arg-type]

    async def _run(
        self, codec: ServerConnection, name: str, arguments: dict[str, Any], ident: Any
    ) -> bytes:
        handler = self.handlers.get(name)
        if handler is None:
            return codec.error(f"The command {name} has not been found", COMMAND_NOT_FOUND, ident)
        try:
            args = qapi.validate_arguments(name, arguments) if name in qapi.COMMANDS else arguments
            value = await handler(args)
        except QmpError as exc:
            return codec.error(exc.desc, exc.error_class, ident)
        except (ValueError, KeyError, LookupError) as exc:
            return codec.error(str(exc).strip("'\""), GENERIC_ERROR, ident)
        except Exception as exc:  # a bug in a handler must not take the agent down
            log.exception("control: command %s failed", name)
            return codec.error(
                f"internal error in {name}: {exc.__class__.__name__}: {exc}", GENERIC_ERROR, ident
            )
        return codec.reply(value, ident)


async def _unix_socket_alive(path: Path) -> bool:
    try:
        stream = await trio.open_unix_socket(str(path))
    except OSError:
        return False
    await stream.aclose()
    return True
