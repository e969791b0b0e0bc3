"""The preempt worker program: ``python -m agents.preempt_worker FD``.

One end of postcopy's preempt channel in a process of its own, blocking and
single-threaded (agents/preempt.py says why, and how the agent drives it).
It imports only what the request path needs — no trio, no numpy on the
source's side, no ``cryptography`` — because a switch to postcopy waits for
both workers to be up and linked.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import mmap
import os
import select
import socket
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protocol.errors import ProtocolError
from protocol.preempt import (
    PAGES,
    REQ_PAGES,
    ZERO,
    Event,
    PreemptReader,
    pages_frame_into,
    pages_header,
    request_frame,
    zero_frame,
)

from .identity import Identity
from .sched import format_cpu_list, set_realtime
from .vm import ctl

GO = b"G"
"""Sent in the clear by the destination's worker once it owns the socket: the
source's worker starts its handshake only then."""

STATS_INTERVAL = 0.02
"""Seconds between a worker's statistics messages while it has news."""

HANDSHAKE_TIMEOUT = 10.0
RECEIVE_CHUNK = 64 << 10
JOIN_LIMIT = 64 << 10
"""Page data up to this size is built into one frame buffer with its header and sent
in one write (one TLS record for a 4 KiB page); a 2 MiB page goes after its header
as it is."""
CONTROL_MAX = 1 << 20
"""Largest control message (statistics carry latencies: ~100 per message)."""


class WorkerError(Exception):
    """A preempt worker failed (it says why) or died."""


class Connection:
    """The worker's preempt connection: blocking TLS (or plain TCP) and the fault
    path's codec (protocol/preempt.py: frames as tuples, in buffers reused)."""

    def __init__(self, sock: socket.socket, page_size: int = 4096) -> None:
        self.sock = sock
        # Decrypted bytes OpenSSL holds beyond the last read (poll cannot see them).
        self._pending: Callable[[], int] = (
            sock.pending if isinstance(sock, ssl.SSLSocket) else lambda: 0
        )
        capacity = page_size + RECEIVE_CHUNK  # the largest frame: one page and its header
        self.reader = PreemptReader(capacity=capacity)
        self._frame = memoryview(bytearray(JOIN_LIMIT + 64))  # + the PAGES header
        self.bytes_sent = 0
        self.bytes_received = 0

    @classmethod
    def open(
        cls,
        fd: int,
        role: str,
        identity: Identity | None,
        hostname: str | None,
        early: bytes,
        page_size: int = 4096,
    ) -> Connection:
        raw = socket.socket(fileno=fd)
        raw.settimeout(HANDSHAKE_TIMEOUT)
        try:
            if raw.family in (socket.AF_INET, socket.AF_INET6):
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if early and (role == "destination" or early != GO):
                raise ProtocolError(f"{len(early)} stray bytes at handover", channel="preempt")
            if role == "destination":
                raw.sendall(GO)
            elif not early and raw.recv(1) != GO:
                raise ProtocolError("no go-ahead from the destination's worker", channel="preempt")
            sock: socket.socket = raw
            if identity is not None:
                from .identity import client_context, server_context

                if role == "destination":
                    sock = server_context(identity).wrap_socket(raw, server_side=True)
                else:
                    sock = client_context(identity).wrap_socket(raw, server_hostname=hostname)
            sock.settimeout(None)
        except BaseException:
            raw.close()
            raise
        return cls(sock, page_size)

    def fileno(self) -> int:
        return self.sock.fileno()

    def buffered(self) -> bool:
        """A frame may be had without the socket becoming readable."""
        return self._pending() > 0 or self.reader.buffered

    def send(self, frame: bytes | memoryview) -> int:
        """One frame, one write (one TLS record)."""
        self.sock.sendall(frame)
        self.bytes_sent += len(frame)
        return len(frame)

    def send_pages(
        self, block: int, first: int, count: int, request_id: int, data: memoryview
    ) -> int:
        """PAGES: built in one buffer and sent in one write up to :data:`JOIN_LIMIT`;
        a larger page (2 MiB) goes after its header as it is, without a copy."""
        if data.nbytes <= JOIN_LIMIT:
            return self.send(pages_frame_into(self._frame, block, first, count, request_id, data))
        sent = self.send(pages_header(block, first, count, request_id, data.nbytes))
        self.sock.sendall(data)
        self.bytes_sent += data.nbytes
        return sent + data.nbytes

    def receive(self) -> list[Event]:
        """The frames one read completes (possibly none); raises EOFError at EOF.
        A page's data is a view valid until the next call."""
        reader = self.reader
        if not reader.buffered:
            # One read takes what the TLS record holds (a request, or a page with
            # its header), straight into the reader's buffer.
            n = self.sock.recv_into(reader.buffer())
            if n == 0:
                raise EOFError("closed by the peer")
            reader.filled(n)
            self.bytes_received += n
        out: list[Event] = []
        while (event := reader.next()) is not None:
            if not isinstance(event, tuple):  # a whole message: not the fault path's
                from protocol.messages import Error

                if isinstance(event, Error):
                    raise ProtocolError(f"peer error: {event.message}", channel="preempt")
                raise ProtocolError(
                    f"unexpected {type(event).__name__} on preempt", channel="preempt"
                )
            out.append(event)
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


LINK_ERRORS = (OSError, EOFError, ssl.SSLError, ProtocolError)


class Worker(abc.ABC):
    """What both roles share: the control socket, the link, the poll loop, statistics."""

    def __init__(self, control: socket.socket, setup: dict[str, Any]) -> None:
        self.control = control
        self.role = setup["role"]
        ident = setup.get("identity")
        self.identity = (
            Identity(ident["name"], Path(ident["ca"]), Path(ident["cert"]), Path(ident["key"]))
            if ident
            else None
        )
        self.conn: Connection | None = None
        self.page_size = int(setup.get("page_size", 4096))
        """The guest's largest page: the largest frame the link must carry."""
        self.epoch = 0
        self.stopping = False
        self.orphaned = False
        self.stats: dict[str, Any] = {}
        self._stats_due = time.monotonic() + STATS_INTERVAL

    # -- control ------------------------------------------------------------------

    def tell(self, msg: dict[str, Any]) -> None:
        self.control.send(ctl.encode(msg))

    def on_control(self) -> None:
        data, fds, _flags, _addr = socket.recv_fds(self.control, CONTROL_MAX, 8)
        if not data:
            for fd in fds:
                os.close(fd)
            self.stopping = self.orphaned = True  # the agent is gone
            return
        msg = ctl.decode(data)
        op = msg.get("op")
        if op == "connection":
            self.drop("replaced by a new connection")
            try:
                self.conn = Connection.open(
                    fds[0],
                    self.role,
                    self.identity if msg.get("tls") else None,
                    msg.get("server_hostname"),
                    bytes.fromhex(msg.get("early", "")),
                    self.page_size,
                )
            except LINK_ERRORS as exc:
                self.tell({"op": "disconnected", "reason": f"handshake: {exc}"})
                return
            self.epoch = int(msg.get("epoch", 0))
            self.tell({"op": "connected"})
            self.on_connected()
        elif op == "disconnect":
            self.drop("paused by the agent")
        elif op == "stop":
            self.stopping = True
        else:
            self.on_other(op, msg, fds)

    def on_other(self, op: Any, msg: dict[str, Any], fds: list[int]) -> None:
        raise ProtocolError(f"unexpected control message {op!r}", channel="control")

    def on_connected(self) -> None:  # noqa: B027 - a hook: only the fault worker has work here
        """A new link is up (the fault worker asks again for what is pending)."""

    def drop(self, reason: str) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
            self.tell({"op": "disconnected", "reason": reason})

    # -- the loop -------------------------------------------------------------------

    def watched(self) -> list[int]:
        fds = [self.control.fileno()]
        if self.conn is not None:
            fds.append(self.conn.fileno())
        return fds

    def run(self) -> None:
        poller = select.poll()
        registered: list[int] = []
        while not self.stopping:
            fds = self.watched()
            if fds != registered:
                for fd in registered:
                    poller.unregister(fd)
                for fd in fds:
                    poller.register(fd, select.POLLIN)
                registered = fds
            if self.conn is not None and self.conn.buffered():
                ready = [(self.conn.fileno(), select.POLLIN)]
            else:
                wait_ms = max(0, int((self._stats_due - time.monotonic()) * 1000)) + 1
                ready = poller.poll(wait_ms if self.stats else None)
            for fd, events in ready:
                if fd == self.control.fileno():
                    self.on_control()
                elif self.conn is not None and fd == self.conn.fileno():
                    try:
                        for event in self.conn.receive():
                            self.on_frame(event)
                    except LINK_ERRORS as exc:
                        self.broke(exc)
                else:
                    self.on_fd(fd, events)
            if self.stats and time.monotonic() >= self._stats_due:
                self.flush()
        if not self.orphaned:
            self.flush()
            self.tell({"op": "stopped"})

    @abc.abstractmethod
    def on_frame(self, event: Event) -> None:
        """One frame from the peer's worker (protocol.preempt's tuple)."""

    def on_fd(self, fd: int, events: int) -> None:
        """A file descriptor a role added to :meth:`watched` is ready."""
        raise ProtocolError(f"fd {fd} is ready but nothing watches it", channel="control")

    def send(self, frame: bytes | memoryview) -> int:
        """Bytes sent; 0 if there is no link (or it just broke)."""
        return self.on_link(lambda conn: conn.send(frame))

    def on_link(self, send: Callable[[Connection], int]) -> int:
        """``send`` on the link: its bytes, or 0 if there is no link or it breaks."""
        if self.conn is None:
            return 0
        try:
            return send(self.conn)
        except LINK_ERRORS as exc:
            self.broke(exc)
            return 0

    def broke(self, exc: BaseException) -> None:
        self.drop(f"{type(exc).__name__}: {exc}")

    # -- statistics -----------------------------------------------------------------

    def count(self, key: str, n: int | float = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def flush(self) -> None:
        if self.conn is not None:
            self.stats["bytes_sent"] = self.conn.bytes_sent
            self.stats["bytes_received"] = self.conn.bytes_received
        if self.stats:
            self.tell({"op": "stats", **self.stats})
        self.stats = {}
        self._stats_due = time.monotonic() + STATS_INTERVAL


class FaultWorker(Worker):
    """The destination's end: faults → REQ_PAGES, PAGES/ZERO → placed."""

    def __init__(self, control: socket.socket, setup: dict[str, Any]) -> None:
        super().__init__(control, setup)
        # Imported before ``ready``, not when the uffd comes (at the switch, in
        # downtime): it brings numpy, which the source's worker never loads.
        import agents.vm.postcopy  # noqa: F401

        self.placer: Any = None
        self.uffd = -1
        self.pending: dict[tuple[int, int], int] = {}  # (block, page) → fault ns
        self._next_request = 1
        self._blocked_since: int | None = None

    def on_other(self, op: Any, msg: dict[str, Any], fds: list[int]) -> None:
        if op != "uffd":
            super().on_other(op, msg, fds)
        from .vm.postcopy import UffdPlacer

        self.uffd = fds[0]
        self.placer = UffdPlacer(self.uffd, [_Mapping(**m) for m in msg["mappings"]])

    def watched(self) -> list[int]:
        fds = super().watched()
        if self.conn is not None and self.placer is not None:
            fds.append(self.uffd)  # while unlinked, faults wait in the uffd
        return fds

    def on_connected(self) -> None:
        """A new link (after recovery): ask again for everything still missing."""
        for (block, page), fault_ns in list(self.pending.items()):
            self.send(request_frame(block, page, 1, self._take_id(), fault_ns))

    def _take_id(self) -> int:
        request_id = self._next_request
        self._next_request += 1
        return request_id

    def on_fd(self, fd: int, events: int) -> None:
        assert self.placer is not None
        if events & (select.POLLERR | select.POLLHUP):
            raise WorkerError("the guest's userfaultfd hung up: the guest process is gone")
        now = time.monotonic_ns()
        for block, page in dict.fromkeys(self.placer.read_fault_pages()):
            self.count("faults")
            if (block, page) in self.pending:
                continue
            self.pending[(block, page)] = now
            if self._blocked_since is None:
                self._blocked_since = now
            self.send(request_frame(block, page, 1, self._take_id(), now))
            self.count("requests")

    def on_frame(self, event: Event) -> None:
        kind, block, first, count, _, data = event
        if self.placer is None:
            raise ProtocolError("pages before the userfaultfd", channel="preempt")
        if kind == PAGES:
            placed = self.placer.copy(block, first, data)
        elif kind == ZERO:
            placed = self.placer.zeropage(block, first, count)
        else:
            raise ProtocolError("a page request sent to the destination", channel="preempt")
        placed_ns = time.monotonic_ns()
        if placed:  # else the background stream's copy was first (EEXIST)
            self.stats.setdefault("placed", []).append([block, first, count, int(kind == PAGES)])
        latencies = self.stats.setdefault("latencies_ns", [])
        for page in range(first, first + count):
            fault_ns = self.pending.pop((block, page), None)
            if fault_ns is not None:
                latencies.append(placed_ns - fault_ns)
        if not self.pending and self._blocked_since is not None:
            self.count("blocktime_ms", (placed_ns - self._blocked_since) / 1e6)
            self._blocked_since = None


class RequestWorker(Worker):
    """The source's end: REQ_PAGES → PAGES (or ZERO) from the stopped guest's RAM."""

    def __init__(self, control: socket.socket, setup: dict[str, Any], fds: list[int]) -> None:
        super().__init__(control, setup)
        self.detect_zero = bool(setup.get("detect_zero", True))
        self.blocks: list[tuple[str, int, memoryview]] = []
        for spec, fd in zip(setup["blocks"], fds, strict=True):
            try:
                ram = mmap.mmap(fd, spec["size"], mmap.MAP_SHARED, mmap.PROT_READ)
            finally:
                os.close(fd)
            self.blocks.append((spec["name"], spec["page_size"], memoryview(ram)))
        self._zeros = {ps: bytes(ps) for _, ps, _ in self.blocks}

    def on_frame(self, event: Event) -> None:
        kind, block, first, count, request_id, _ = event
        if kind != REQ_PAGES:
            raise ProtocolError("pages sent to the source", channel="preempt")
        if not 0 <= block < len(self.blocks):
            raise ProtocolError(f"page request for block {block}", channel="preempt")
        name, ps, ram = self.blocks[block]
        if (first + count) * ps > len(ram):
            raise ProtocolError(
                f"page request {first}+{count} outside RAM block {name}", channel="preempt"
            )
        if count * ps > self.page_size:  # the destination's worker asks page by page
            raise ProtocolError(
                f"page request {first}+{count} of RAM block {name}: more than "
                f"{self.page_size} bytes at once",
                channel="preempt",
            )
        data = ram[first * ps : (first + count) * ps]
        zero = self.detect_zero and count == 1 and data == self._zeros[ps]
        if zero:
            sent = self.send(zero_frame(block, first, 1))
        else:
            sent = self.on_link(lambda conn: conn.send_pages(block, first, count, request_id, data))
        if sent:
            served = [block, first, count, int(zero), self.epoch]
            self.stats.setdefault("served", []).append(served)
            self.count("sent", sent)


class _Mapping:
    """agents.vm.dirty.Mapping from the control message."""

    def __init__(self, name: str, addr: int, size: int, page_size: int) -> None:
        self.name, self.addr, self.size, self.page_size = name, addr, size, page_size


def main(argv: list[str]) -> int:
    control = socket.socket(fileno=int(argv[0]))
    with contextlib.suppress(OSError):  # never outlive the agent
        import ctypes

        ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    data, fds, _flags, _addr = socket.recv_fds(control, CONTROL_MAX, 64)
    if not data:
        return 0
    setup = ctl.decode(data)
    worker: Worker
    try:
        if setup.get("role") == "destination":
            worker = FaultWorker(control, setup)
        else:
            worker = RequestWorker(control, setup, fds)
        # The whole worker is the request path: SCHED_FIFO, as the agents' threads.
        realtime = set_realtime(True, "preempt worker")
        if setup.get("cpus"):
            os.sched_setaffinity(0, setup["cpus"])
        cpus = format_cpu_list(os.sched_getaffinity(0))
        worker.tell({"op": "ready", "realtime": realtime, "pid": os.getpid(), "cpus": cpus})
        worker.run()
    except Exception as exc:
        with contextlib.suppress(OSError):
            control.send(ctl.encode({"op": "error", "message": f"{type(exc).__name__}: {exc}"}))
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except OSError as exc:
        if exc.errno in (errno.EPIPE, errno.ECONNRESET):  # the agent went away
            sys.exit(0)
        raise
