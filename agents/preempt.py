"""Postcopy's request path in worker processes: the two ends of the preempt channel.

Why processes.  A postcopy fault waits for a round trip of four hops, each
a few syscalls and a few dozen lines of Python.  As threads in the agents,
those hops share the GIL with the trio thread and the background stream's
workers: every syscall hands the GIL to whoever waits for it, and taking it
back means waiting for them.  Measured on the 2-core machine with the
background stream at full speed (strace, 2 s), the destination's fault
thread made about 6 futex (GIL) waits per request and the source's
return-path thread 2; fault latency p50 was ~250 µs, p99 ~1.2 ms, where a
bare request/page round trip between two processes over TLS took p50 60-70
µs, p99 ~130 µs on the same loaded machine.  A worker process holds nothing
but the request path, so it waits for no one.

What moves.  After HELLO, both agents end TLS on the preempt connection
(close_notify both ways, :meth:`agents.tls.TLSStream.handover`) and pass the
TCP socket to their worker, which handshakes anew on it: mutual TLS with the
agent's own certificate, the peer checked as the channel was.  The source's
worker waits for the destination's worker to send one byte (:data:`GO`)
first, so nothing of the new handshake can reach an agent still reading the
old session.  On that connection:

- the destination's worker reads the guest's faults off the userfaultfd
  (passed over the control socket), sends REQ_PAGES on the preempt
  connection itself (QEMU sends them on the return path, which stays in the
  agent here, for PING/PONG and SHUT), and places the pages that come back
  with UFFDIO_COPY / UFFDIO_ZEROPAGE;
- the source's worker maps the guest's RAM read-only (the memfds, passed
  over) and answers each request with PAGES, or ZERO for a zero page.

The source guest is stopped: its RAM no longer changes, so the background
stream on main and the worker may both send a page, and whichever copy
arrives second fails EEXIST and is skipped (linux-uffd.md).  The background
stream therefore sends every page, requested or not: one page more per
request, and no bitmap shared between processes.

Faults read but not answered when the link breaks stay the worker's: it
asks again on the next connection (after recovery).  The agent learns what
its worker did from statistics messages every :data:`STATS_INTERVAL`.

Control.  A SOCK_SEQPACKET socketpair, one JSON object per packet
(agents/vm/ctl.py's encoding), file descriptors by SCM_RIGHTS.  Agent →
worker: ``setup`` (role, identity, CPUs to run on, the source's RAM blocks with their fds),
``uffd`` (the destination's, with the blocks' addresses), ``connection``
(a handed-over socket), ``disconnect`` (the agent paused: drop the link,
keep the requests), ``stop``.  Worker → agent: ``ready``, ``connected``,
``disconnected`` (with the reason), ``stats``, ``error`` (then it exits).
The worker exits when the agent's end closes: it never outlives its agent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from .migration import ChannelStats
from .preempt_worker import CONTROL_MAX, WorkerError
from .vm import ctl

log = logging.getLogger("godwit.preempt")

START_TIMEOUT = 30.0
ROLES = ("source", "destination")

# ---------------------------------------------------------------- in the agent (trio)


class PreemptWorker:
    """One worker process and the agent's end of its control socket.

    :meth:`run` (started with ``nursery.start``) spawns it, sends ``setup``
    and reports ready; it then receives the worker's messages until the
    worker exits, and kills it if cancelled.  ``on_stats`` gets every
    statistics message (the trio thread), after the ``preempt`` row of
    ``channels`` has taken its byte counts.
    """

    def __init__(
        self,
        role: str,
        name: str,
        on_stats: Callable[[dict[str, Any]], None],
        channels: dict[str, ChannelStats],
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"preempt worker role {role!r}: expected one of {ROLES}")
        self.role = role
        self.name = name
        self.on_stats = on_stats
        self.channels = channels
        """The migration's channel table: the worker's link shows as ``preempt``."""
        self.process: trio.Process | None = None
        self._sock: trio.socket.SocketType | None = None
        self.connected = trio.Event()
        self.disconnect_reason: str | None = None
        self.realtime = False
        self.cpus = ""
        """The CPUs the worker may run on (``0-3,8``), as it reported."""
        self.stopped = trio.Event()
        self.dead = trio.Event()
        """Set when the worker failed or exited unasked once :attr:`survivable`."""
        self.failure: str | None = None
        self.survivable = False
        """Postcopy sets it: from then on a failed worker must not end the migration
        (no host has the whole guest) but pause it; :meth:`run` then returns
        quietly, :attr:`dead` is set, and the agent starts another at recovery."""
        self.epoch = 0
        """Connections handed over so far: the worker tags what it reports with the
        epoch of the link it used, so a report that lags behind a recovery is known."""

    async def run(
        self,
        setup: dict[str, Any],
        fds: list[int],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "agents.preempt_worker", str(child.fileno())],
                pass_fds=[child.fileno()],
                env={**os.environ, "PYTHONPATH": _import_path()},
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self._sock = trio.socket.from_stdlib_socket(parent)
        try:
            await self._send({"op": "setup", "role": self.role, **setup}, fds)
            with trio.fail_after(START_TIMEOUT):
                ready = await self._receive()
            if ready.get("op") != "ready":
                raise WorkerError(f"{self.name}: expected ready, got {ready!r:.200}")
            self.realtime = bool(ready.get("realtime"))
            self.cpus = str(ready.get("cpus"))
            log.debug("%s: worker pid %s on CPUs %s", self.name, self.process.pid, self.cpus)
            if not self.realtime:
                log.info("%s: no SCHED_FIFO (CAP_SYS_NICE?): page requests may wait", self.name)
            task_status.started()
            try:
                await self._serve()
            except (WorkerError, OSError) as exc:
                self.failure = str(exc)
                self.dead.set()
                if not self.survivable:
                    raise
                log.warning("%s failed: %s", self.name, exc)
        finally:
            with trio.CancelScope(shield=True):
                await self._reap()

    async def _serve(self) -> None:
        while True:
            msg = await self._receive()
            op = msg.get("op")
            if op == "stats":
                link = self.channels.get("preempt")
                if link is not None:
                    link.bytes_sent = int(msg.get("bytes_sent", link.bytes_sent))
                    link.bytes_received = int(msg.get("bytes_received", link.bytes_received))
                    link.connected = self.connected.is_set()
                self.on_stats(msg)
            elif op == "connected":
                self.disconnect_reason = None
                self.connected.set()
            elif op == "disconnected":
                self.disconnect_reason = str(msg.get("reason"))
                self.connected = trio.Event()
                log.info("%s: link lost: %s", self.name, self.disconnect_reason)
            elif op == "stopped":
                self.stopped.set()
                return
            elif op == "error":
                raise WorkerError(f"{self.name}: {msg.get('message')}")

    async def _reap(self) -> None:
        if self._sock is not None:
            self._sock.close()
        if self.process is not None:
            with trio.move_on_after(2):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()

    async def _send(self, msg: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        assert self._sock is not None
        data = ctl.encode(msg)
        if fds:
            await self._sock.sendmsg(
                [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fd_array(fds))]
            )
        else:
            await self._sock.send(data)

    async def _receive(self) -> dict[str, Any]:
        assert self._sock is not None and self.process is not None
        data = await self._sock.recv(CONTROL_MAX)
        if not data:
            code = await self.process.wait()
            raise WorkerError(f"{self.name}: worker pid {self.process.pid} exited ({code})")
        return ctl.decode(data)

    async def connect(
        self, fd: int, early: bytes = b"", *, tls: bool, server_hostname: str | None = None
    ) -> None:
        """Hand the worker a preempt connection (this end's fd is closed here), with
        what :meth:`~agents.tls.TLSStream.handover` read past the old session."""
        try:
            self.epoch += 1
            msg = {
                "op": "connection",
                "epoch": self.epoch,
                "tls": tls,
                "server_hostname": server_hostname,
                "early": early.hex(),
            }
            await self._send(msg, [fd])
        finally:
            os.close(fd)

    async def set_uffd(self, uffd: int, mappings: list[dict[str, Any]]) -> None:
        """The destination's guest RAM as the worker must place it (the uffd is duplicated)."""
        await self._send({"op": "uffd", "mappings": mappings}, [uffd])

    async def disconnect(self) -> None:
        """The agent paused: the worker drops its link, keeps its unanswered requests."""
        with contextlib.suppress(OSError, trio.ClosedResourceError):
            await self._send({"op": "disconnect"})

    async def stop(self) -> None:
        """Final statistics, then the worker exits; :meth:`run` returns."""
        with contextlib.suppress(OSError, trio.ClosedResourceError):
            await self._send({"op": "stop"})
            with trio.move_on_after(5):
                await self.stopped.wait()


def _fd_array(fds: list[int] | tuple[int, ...]) -> bytes:
    import array

    return array.array("i", fds).tobytes()


def _import_path() -> str:
    """PYTHONPATH for the worker: where this agent's ``agents`` package is, first."""
    root = str(Path(__file__).resolve().parent.parent)
    rest = os.environ.get("PYTHONPATH")
    return root if not rest else f"{root}{os.pathsep}{rest}"
