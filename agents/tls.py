"""Mutual TLS 1.3 byte streams for godwit's channels, fast enough for page traffic.

Theory of operation
-------------------

``trio.SSLStream`` moves about 0.35 GB/s on this 2-core machine: it asks the
transport for one record's worth of bytes and decrypts one 16 KiB record per
trip through the event loop. A migration channel needs >= 1.0 GB/s, so
:class:`TLSStream` drives an ``ssl.SSLObject`` over two ``ssl.MemoryBIO`` s
itself and amortises the loop over large chunks:

* receive: a nonblocking read of up to 1 MiB into a preallocated buffer,
  fed to the incoming BIO, then *every* complete record is decrypted
  straight into the caller's buffer (``receive_into``); while that buffer is
  not full and the socket already holds more, it reads and decrypts again
  without going back to the event loop, and it waits (``wait_readable``) only
  while it has nothing to deliver;
* send: plaintext is encrypted into the outgoing BIO 256 KiB at a time and
  each piece written straight to the socket, waiting (``wait_writable``) only
  when the kernel's buffer is full; ``send_many`` puts a small frame header
  into the same TLS record as the start of its payload (one copy of at most
  16 KiB) instead of joining header and payload in Python.

Each ``send_many`` / ``receive_into`` is one trio checkpoint however many
socket calls it makes: a trip through the event loop per 256 KiB written or
per read cost the sender 0.53 s and the receiver 0.61 s of user CPU per GiB,
one per call 0.44 s and 0.50 s (bench/tls.py's send_many transport, 1 GiB).
Everything runs on the trio thread, so cancellation is plain trio cancellation, nothing outlives its task, and a
cancelled ``receive_*`` leaves the stream intact (bytes taken from the
socket go straight into the BIO, and a receive only waits, and so can only
be cancelled, while it holds nothing to deliver). A
cancelled *send* may have put part of a record on the wire; the stream then
refuses further sends (``trio.BrokenResourceError``), as trio's own do.
OpenSSL releases the GIL while it encrypts, so other threads of the agent
(pwrite, mapped-ram writers) still run during crypto.

Two exceptions, both threads owned by a task: ``offload_crypto`` hands the
crypto of large frames to ``trio.to_thread`` (multifd, postcopy's background
stream), and during postcopy a request-path thread (agents/threads.py) takes
a stream over whole and uses the blocking ``thread_*`` methods — the same
SSL object and buffers, one owner at a time, the guards refusing a second.

Post-handshake messages: servers send no session tickets (``num_tickets=0``)
and OpenSSL never starts a KeyUpdate by itself, so a receiver never has to
write. Should a peer request a KeyUpdate, the answer OpenSSL queues goes out
with this side's next send.

Measured with ``python bench/tls.py`` (1 GiB in 1 MiB writes, loopback, sender
and receiver in two processes, 2 cores shared with other work, OpenSSL 3.0,
TLS_AES_256_GCM_SHA384; best of 2).  "now": one checkpoint per call, on a
quiet machine (load average 0.95); the two columns before it are earlier
runs, with a trip through the event loop per 256 KiB:

============================================  ==========  ==========  ==========
transport                                     now         quiet       busy
============================================  ==========  ==========  ==========
plain TCP, blocking sockets                   4.41 GB/s   3.9 GB/s    3.1 GB/s
blocking stdlib ssl pair (one thread each)    1.42 GB/s   1.21 GB/s   0.95 GB/s
TLSStream (this module), send_all             1.92 GB/s   1.65 GB/s   0.94 GB/s
TLSStream, send_many(header, payload)         1.94 GB/s   1.78 GB/s   0.87 GB/s
MemoryBIO + crypto in trio.to_thread          --          --          0.52 GB/s (ssl pair 0.89)
blocking ssl, one to_thread call per recv     --          --          0.07 GB/s
trio.SSLStream                                0.45 GB/s   0.49 GB/s   0.47 GB/s
============================================  ==========  ==========  ==========

Both sides are CPU-bound (send_many, 1 GiB: 0.55–0.6 s of CPU each side,
most of it AES and OpenSSL's record layer, the rest BIO copies and the
kernel; the blocking pair 0.75–1.0 s each side), so on
two cores the figure follows whatever else runs; the ratio to the
blocking-ssl pair measured in the same run is the steadier number (75–145 %
in our runs).

Why not threads: handing each operation to ``trio.to_thread`` costs more
than it overlaps (rows 5 and 6; ``SSLSocket.recv_into`` returns one 16 KiB
record per call). Long-lived reader/writer threads around blocking ssl
sockets match the blocking pair, but a thread blocked in ``recv`` cannot be
cancelled: honouring a cancel scope would mean shutting the socket down
under it, which breaks the stream (a cancelled receive must leave the stream
usable), and one ``SSL*`` shared by a reader and a writer thread needs
locking that Python's ssl module does not do. The MemoryBIO design is at
least as fast here and keeps trio's semantics whole.

TLS 1.3 sends the client's certificate in the client's *last* flight, so a
client whose certificate the server refuses completes its own handshake and
learns of the refusal (an alert, raised as :class:`TLSError`) on its first
receive. The server side always fails in :meth:`TLSStream.accept`.

Plaintext (:class:`PlainStream`) has the same interface and exists only for
``--insecure-plaintext`` (benchmarks, unit tests); :func:`warn_plaintext`
logs why that is dangerous.
"""

from __future__ import annotations

import logging
import math
import os
import select
import socket as stdlib_socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import trio

from .identity import client_context, server_context

__all__ = [
    "PeerIdentity",
    "PlainStream",
    "TLSError",
    "TLSStream",
    "client_context",
    "server_context",
    "set_keepalive",
    "set_nodelay",
    "warn_plaintext",
]

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview

RECV_CHUNK = 1024 * 1024  # bytes taken from the socket per wait (at most)
SEND_CHUNK = 256 * 1024  # plaintext encrypted per send()
RECORD = 16 * 1024  # TLS maximum plaintext per record
DEFAULT_RECEIVE = 256 * 1024  # receive_some() without max_bytes
OFFLOAD_MIN = 64 * 1024  # offloaded streams: less than this is not worth a thread hop
HANDSHAKE_TIMEOUT = 10.0
CLOSE_TIMEOUT = 1.0


class TLSError(trio.BrokenResourceError):
    """A TLS connection failed: handshake refused, alert, bad record, reset.

    ``peer`` is "host:port" of the other end, ``reason`` OpenSSL's words
    (e.g. "certificate verify failed: unable to get local issuer certificate").
    A subclass of ``trio.BrokenResourceError`` so channel code that handles a
    broken stream handles this too.
    """

    def __init__(self, peer: str, reason: str, *, during: str = "connection") -> None:
        super().__init__(f"TLS {during} with {peer} failed: {reason}")
        self.peer = peer
        self.reason = reason


@dataclass(frozen=True)
class PeerIdentity:
    """Who is on the other end, from the certificate the CA signed."""

    common_name: str | None
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    address: str

    @property
    def name(self) -> str:
        """The peer's name for logs: its CN, else its first SAN, else its address."""
        for candidate in (self.common_name, *self.dns_names, *self.ip_addresses):
            if candidate:
                return candidate
        return self.address

    @classmethod
    def from_cert(cls, cert: dict[str, Any] | None, address: str) -> PeerIdentity:
        cert = cert or {}
        cn = None
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    cn = value
        sans = cert.get("subjectAltName", ())
        return cls(
            common_name=cn,
            dns_names=tuple(v for k, v in sans if k == "DNS"),
            ip_addresses=tuple(v.strip() for k, v in sans if k == "IP Address"),
            address=address,
        )


# ---------------------------------------------------------------- socket options


def set_nodelay(sock: Any) -> None:
    """Frames are written whole; never let Nagle hold a small REQ_PAGES back."""
    sock.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NODELAY, 1)


def set_keepalive(
    sock: Any,
    idle_s: float = 5.0,
    interval_s: float = 1.0,
    count: int = 3,
    user_timeout_ms: int = 10_000,
) -> None:
    """Notice a dead peer within seconds rather than the kernel's 2 hours.

    Postcopy recovery depends on it: a link that silently dropped must turn
    into a channel error (and postcopy-paused) promptly. TCP_USER_TIMEOUT also
    bounds how long unacknowledged sent data may sit before the connection is
    reset, which keepalive alone does not cover. Works on trio and stdlib
    sockets.
    """
    sol, tcp = stdlib_socket.SOL_SOCKET, stdlib_socket.IPPROTO_TCP
    sock.setsockopt(sol, stdlib_socket.SO_KEEPALIVE, 1)
    sock.setsockopt(tcp, stdlib_socket.TCP_KEEPIDLE, max(1, math.ceil(idle_s)))
    sock.setsockopt(tcp, stdlib_socket.TCP_KEEPINTVL, max(1, math.ceil(interval_s)))
    sock.setsockopt(tcp, stdlib_socket.TCP_KEEPCNT, max(1, int(count)))
    sock.setsockopt(tcp, stdlib_socket.TCP_USER_TIMEOUT, max(0, int(user_timeout_ms)))
    set_nodelay(sock)


def warn_plaintext(where: str, logger: logging.Logger | None = None) -> None:
    """Say loudly that a channel runs without TLS (``--insecure-plaintext``)."""
    (logger or log).warning(
        "INSECURE: %s uses plaintext TCP (--insecure-plaintext): guest memory crosses the "
        "network unencrypted and the peer is NOT authenticated. For benchmarks and unit "
        "tests only.",
        where,
    )


def _address(sock: Any) -> str:
    try:
        addr = sock.getpeername()
    except OSError:
        return "unknown peer"
    if isinstance(addr, tuple):
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(addr)


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLEOFError):
        return "peer closed the connection without close_notify"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    return str(exc) or type(exc).__name__


class _Guard:
    """Refuse two tasks sending (or receiving) on one stream at once, like trio does."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.held = False

    def __enter__(self) -> None:
        if self.held:
            raise trio.BusyResourceError(f"another task is already {self.what} on this stream")
        self.held = True

    def __exit__(self, *exc: object) -> None:
        self.held = False


# ---------------------------------------------------------------- TLS


class TLSStream(trio.abc.Stream):
    """A mutually authenticated TLS 1.3 stream over a trio socket (see module docstring).

    Build one with :meth:`connect` or :meth:`accept`; both return only after
    the handshake. One task may send while another receives.
    """

    def __init__(
        self,
        socket_stream: trio.SocketStream,
        sslobj: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
    ) -> None:
        self.transport = socket_stream
        self._sock = socket_stream.socket
        self._ssl = sslobj
        self._in = incoming
        self._out = outgoing
        self._rbuf = bytearray(RECV_CHUNK)
        self._rview = memoryview(self._rbuf)
        self._send_guard = _Guard("sending")
        self._recv_guard = _Guard("receiving")
        self._closed = False
        self._send_broken = False  # a send was interrupted mid-record
        self._eof = False  # close_notify received
        self._drained = False
        """OpenSSL holds no plaintext and the incoming BIO no ciphertext: reading
        before new bytes arrive would only raise SSLWantReadError — and release
        and retake the GIL, which on the postcopy request path costs a wait
        behind the background stream's threads each time."""
        self._handshaken = False
        self.peer_address = _address(self._sock)
        self._peer: PeerIdentity | None = None
        self.close_timeout = CLOSE_TIMEOUT  # how long aclose may spend on close_notify
        self.bytes_sent = 0  # application bytes
        self.bytes_received = 0
        self.wire_bytes_sent = 0  # TLS bytes on the socket
        self.wire_bytes_received = 0
        self.offload_crypto = False
        """multifd channels: encrypt or decrypt large amounts in a worker thread
        (OpenSSL releases the GIL), so N channels keep N cores busy.  The thread
        belongs to the task that awaits it (``trio.to_thread``, never abandoned:
        a cancel waits for it, so a cancelled receive still delivers nothing
        half-done), and ``_crypto`` keeps the SSL object to one thread at a time."""
        self._crypto = trio.Lock()

    # -- construction ----------------------------------------------------

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        ctx: ssl.SSLContext,
        server_hostname: str | None = None,
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> TLSStream:
        """Dial ``host:port`` and complete the handshake, checking the server's name.

        ``server_hostname`` (default ``host``) must be one of the server
        certificate's DNS or IP SANs.
        """
        try:
            socket_stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise TLSError(f"{host}:{port}", exc.strerror or str(exc), during="connect") from exc
        return await cls._start(
            socket_stream,
            ctx,
            server_side=False,
            hostname=server_hostname or host,
            timeout=handshake_timeout,
        )

    @classmethod
    async def accept(
        cls,
        socket_stream: trio.SocketStream,
        ctx: ssl.SSLContext,
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> TLSStream:
        """Run the server side of the handshake on an accepted connection.

        On failure the connection is closed and :class:`TLSError` names the
        peer and OpenSSL's reason; the listener is untouched and can go on
        serving.
        """
        return await cls._start(
            socket_stream, ctx, server_side=True, hostname=None, timeout=handshake_timeout
        )

    @classmethod
    async def _start(
        cls,
        socket_stream: trio.SocketStream,
        ctx: ssl.SSLContext,
        *,
        server_side: bool,
        hostname: str | None,
        timeout: float,
    ) -> TLSStream:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        try:
            sslobj = ctx.wrap_bio(
                incoming, outgoing, server_side=server_side, server_hostname=hostname
            )
        except (ssl.SSLError, ValueError) as exc:
            socket_stream.socket.close()
            raise TLSError(_address(socket_stream.socket), str(exc), during="setup") from exc
        stream = cls(socket_stream, sslobj, incoming, outgoing)
        try:
            with trio.move_on_after(timeout) as scope:
                await stream._handshake()
            if scope.cancelled_caught:
                raise TLSError(
                    stream.peer_address, f"no handshake within {timeout:g} s", during="handshake"
                )
        except BaseException:
            stream._sock.close()
            stream._closed = True
            raise
        return stream

    async def _handshake(self) -> None:
        while True:
            try:
                self._ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
            except ssl.SSLError as exc:
                # Let the peer read our alert (unknown ca, bad certificate...)
                # so its error says why, but never wait long for it.
                with trio.move_on_after(CLOSE_TIMEOUT):
                    try:
                        await self._flush()
                    except trio.BrokenResourceError:
                        pass
                if isinstance(exc, ssl.SSLEOFError):
                    reason = "peer closed the connection during the handshake"
                else:
                    reason = _ssl_reason(exc)
                raise TLSError(self.peer_address, reason, during="handshake") from exc
        await self._flush()
        self._handshaken = True
        self._peer = PeerIdentity.from_cert(self._ssl.getpeercert(), self.peer_address)

    # -- information -------------------------------------------------------

    @property
    def socket(self) -> Any:
        """The trio socket underneath, for :func:`set_keepalive` and friends."""
        return self._sock

    @property
    def peer_identity(self) -> PeerIdentity:
        assert self._peer is not None
        return self._peer

    @property
    def cipher(self) -> tuple[str, str, int] | None:
        return self._ssl.cipher()

    @property
    def version(self) -> str | None:
        return self._ssl.version()

    # -- raw socket I/O ------------------------------------------------------

    async def _fill(self) -> None:
        """Handshake: wait for what the socket has (up to RECV_CHUNK), into the BIO."""
        try:
            n = await self._sock.recv_into(self._rview)
        except OSError as exc:
            raise self._broken(exc) from exc
        self._into_bio(n)

    def _into_bio(self, n: int) -> None:
        """``n`` bytes just read into ``_rview`` go to OpenSSL (0: the socket's EOF).
        The one place the incoming BIO is fed, so OpenSSL is never thought
        drained while it has bytes to decrypt."""
        if n:
            self._in.write(self._rview[:n])
            self.wire_bytes_received += n
        else:
            self._in.write_eof()
        self._drained = False

    async def _flush(self) -> None:
        """Send everything OpenSSL has queued; a half-sent record breaks sending.

        Writes straight to the socket and waits (a trio checkpoint) only when
        the kernel's buffer is full: callers checkpoint once per operation,
        not once per write.
        """
        if not self._out.pending:
            return
        data = memoryview(self._out.read())
        fd = self._sock.fileno()
        self._send_broken = True
        try:
            while data:
                try:
                    sent = os.write(fd, data)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(fd)
                    continue
                self.wire_bytes_sent += sent
                data = data[sent:]
        except OSError as exc:
            raise self._broken(exc) from exc
        self._send_broken = False

    def _broken(self, exc: OSError) -> Exception:
        if self._closed:
            return trio.ClosedResourceError("this TLS stream was closed")
        return TLSError(self.peer_address, exc.strerror or str(exc))

    def _check_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this TLS stream was closed")
        if self._send_broken:
            raise trio.BrokenResourceError(
                f"TLS stream to {self.peer_address}: an earlier send was interrupted mid-record"
            )

    def _encrypt(self, data: Buffer) -> None:
        try:
            self._ssl.write(data)
        except ssl.SSLError as exc:
            raise TLSError(self.peer_address, _ssl_reason(exc)) from exc

    # -- sending -------------------------------------------------------------

    async def send_all(self, data: Buffer) -> None:
        await self.send_many([data])

    async def send_many(self, buffers: Sequence[Buffer]) -> None:
        """Send buffers back to back, as if joined, without joining them.

        Small leading pieces (a frame header) ride in the same TLS record as
        the start of what follows: at most one record (16 KiB) is copied.
        """
        with self._send_guard:
            self._check_send()
            await trio.lowlevel.checkpoint_if_cancelled()
            pieces, total = _plaintext_pieces(buffers)
            if self.offload_crypto and total >= OFFLOAD_MIN:
                async with self._crypto:
                    await trio.to_thread.run_sync(self._encrypt_all, pieces)
            else:
                for piece in pieces:
                    self._encrypt(piece)
                    if self._out.pending >= SEND_CHUNK:
                        await self._flush()
            await self._flush()
            await trio.lowlevel.cancel_shielded_checkpoint()
            self.bytes_sent += total

    def _encrypt_all(self, pieces: list[Buffer]) -> None:
        for piece in pieces:
            self._encrypt(piece)

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_guard:
            self._check_send()
            await self._sock.wait_writable()

    # -- receiving -------------------------------------------------------------

    def _decrypt_into(self, view: memoryview) -> int:
        """Decrypt every complete record the BIO holds, up to len(view) bytes."""
        got, want = 0, len(view)
        while got < want and not self._drained:
            try:
                n = cast(int, self._ssl.read(want - got, view[got:]))
            except ssl.SSLWantReadError:
                self._drained = True
                break
            except ssl.SSLZeroReturnError:
                self._eof = True
                break
            except ssl.SSLError as exc:
                raise TLSError(self.peer_address, _ssl_reason(exc)) from exc
            if not n:
                # CPython returns 0 (not SSLZeroReturnError) for the peer's close_notify.
                self._eof = True
                break
            got += n
            if got < want and not self._in.pending:
                # Less than asked and no ciphertext left: that record was the last
                # whole one (OpenSSL reads one record at a time; read-ahead is off).
                self._drained = True
        return got

    @property
    def has_buffered(self) -> bool:
        """Bytes may be readable without the socket: poll(2) would not see them."""
        return not self._drained or bool(self._in.pending)

    async def receive_into(self, buffer: Buffer) -> int:
        """Fill ``buffer`` with what has arrived (at least 1 byte); 0 means the peer closed.

        Cancellation leaves the stream usable: nothing is consumed unless it
        is delivered.
        """
        with self._recv_guard:
            if self._closed:
                raise trio.ClosedResourceError("this TLS stream was closed")
            view = memoryview(buffer).cast("B")
            if not view:
                await trio.lowlevel.checkpoint()
                return 0
            await trio.lowlevel.checkpoint_if_cancelled()
            blocked = False
            got, want = 0, len(view)
            while not self._eof:
                if (
                    self.offload_crypto
                    and not got
                    and self._in.pending >= OFFLOAD_MIN
                    and want >= OFFLOAD_MIN
                ):
                    # Only while nothing is decrypted yet, and then return: a
                    # thread hop is a checkpoint, and a cancel there must not
                    # lose bytes already in the caller's buffer.
                    async with self._crypto:
                        got = await trio.to_thread.run_sync(self._decrypt_into, view)
                    if got:
                        break
                else:
                    got += self._decrypt_into(view[got:])
                if got == want or self._eof:
                    break
                # No complete record left: take what the socket holds now, and
                # wait for it only while there is nothing to deliver.
                n = _read_some(self._sock.fileno(), self._rview, None, self._broken)
                if n is None:
                    if got:
                        break
                    blocked = True
                    await trio.lowlevel.wait_readable(self._sock.fileno())
                elif n or not got:  # at EOF, deliver first: the socket says EOF again
                    self._into_bio(n)
                else:
                    break
            if not blocked:
                await trio.lowlevel.cancel_shielded_checkpoint()
            self.bytes_received += got
            return got

    async def receive_some(self, max_bytes: int | None = None) -> bytearray:
        buf = bytearray(max_bytes or DEFAULT_RECEIVE)
        n = await self.receive_into(buf)
        del buf[n:]
        return buf

    # -- from a thread that owns the stream (agents/threads.py) ----------------

    def thread_send_many(self, buffers: Sequence[Buffer], wait: WaitFn) -> None:
        """:meth:`send_many` for the thread that owns this stream: blocks in ``wait``."""
        with self._send_guard:
            self._check_send()
            pieces, total = _plaintext_pieces(buffers)
            self._encrypt_all(pieces)
            data = memoryview(self._out.read())
            self._send_broken = True
            _write_all(self._sock.fileno(), [data], wait, self._broken)
            self._send_broken = False
            self.wire_bytes_sent += len(data)
            self.bytes_sent += total

    def thread_receive_into(self, view: memoryview, wait: WaitFn, *, block: bool) -> int | None:
        """:meth:`receive_into` for the owning thread; None when nothing has
        arrived and ``block`` is false."""
        with self._recv_guard:
            if self._closed:
                raise trio.ClosedResourceError("this TLS stream was closed")
            while True:
                n = 0 if self._eof else self._decrypt_into(view)
                if n or self._eof:
                    self.bytes_received += n
                    return n
                if block:
                    wait(self._sock.fileno(), select.POLLIN)  # then one read, not EAGAIN first
                got = _read_some(
                    self._sock.fileno(), self._rview, wait if block else None, self._broken
                )
                if got is None:
                    return None
                self._into_bio(got)

    # -- handing the connection over ---------------------------------------------

    async def handover(self) -> tuple[int, bytes]:
        """End TLS on this connection cleanly and give its TCP socket away.

        Both peers send close_notify and read the other's; the connection must
        be quiet (nothing in flight either way), and the peer must not speak
        again until told to (agents/preempt.py sends a go-ahead byte).  Returns
        a duplicate of the socket's fd, the caller's to close, and the bytes
        that came in after the peer's close_notify with it (the go-ahead, if it
        was quick); this stream is closed.  It moves a channel into a worker process, which runs a new
        handshake on the same connection: TLS state cannot cross processes.
        """
        with self._send_guard, self._recv_guard:
            if self._closed:
                raise trio.ClosedResourceError("this TLS stream was closed")
            done = self._unwrap_step()
            await self._flush()
            while not done:
                await self._fill()
                done = self._unwrap_step()
            trailing = self._in.read() if self._in.pending else b""
            fd = os.dup(self._sock.fileno())
            self._closed = True
            self._sock.close()
            return fd, trailing

    def _unwrap_step(self) -> bool:
        try:
            self._ssl.unwrap()
            return True
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError as exc:
            raise TLSError(self.peer_address, _ssl_reason(exc), during="handover") from exc

    # -- closing ---------------------------------------------------------------

    async def aclose(self) -> None:
        """Close: send close_notify if we can within CLOSE_TIMEOUT, then close the socket.

        Never waits for the peer's close_notify, so a dead or stuck peer costs
        at most ``close_timeout`` (default CLOSE_TIMEOUT). A task blocked on this stream gets
        ``trio.ClosedResourceError``.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            if (
                self._handshaken
                and not self._send_guard.held
                and not self._send_broken
                and not self._crypto.locked()  # a worker thread holds the SSL object
            ):
                try:
                    self._ssl.unwrap()
                except (ssl.SSLWantReadError, ssl.SSLError):
                    pass
                with trio.move_on_after(self.close_timeout):
                    try:
                        await self._flush()
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
        finally:
            self._sock.close()
        await trio.lowlevel.checkpoint()


def _plaintext_pieces(buffers: Sequence[Buffer]) -> tuple[list[Buffer], int]:
    """Cut buffers into what to encrypt: small leading pieces (a frame header)
    joined with the start of what follows into one record, the rest in
    SEND_CHUNK slices of the caller's memory (no copy)."""
    pieces: list[Buffer] = []
    head = bytearray()
    total = 0
    for buf in buffers:
        view = memoryview(buf).cast("B")
        total += len(view)
        if len(head) + len(view) <= RECORD:
            head += view
            continue
        if head:
            take = RECORD - len(head)
            head += view[:take]
            view = view[take:]
            pieces.append(head)
            head = bytearray()
        pieces.extend(view[off : off + SEND_CHUNK] for off in range(0, len(view), SEND_CHUNK))
    if head:
        pieces.append(head)
    return pieces, total


WaitFn = Callable[[int, int], None]
"""``OwnedThread.wait``: block until the fd is ready for the poll events."""


def _write_all(
    fd: int, views: list[memoryview], wait: WaitFn, broken: Callable[[OSError], Exception]
) -> None:
    """Gather-write every view (one syscall when the socket has room)."""
    views = [v for v in views if v]
    while views:
        try:
            n = os.writev(fd, views[:1024])
        except BlockingIOError:
            wait(fd, select.POLLOUT)
            continue
        except OSError as exc:
            raise broken(exc) from exc
        _advance(views, n)


def _advance(views: list[memoryview], sent: int) -> None:
    """Drop ``sent`` bytes from the front of a gather list, in place."""
    while sent and views:
        if sent >= len(views[0]):
            sent -= len(views.pop(0))
        else:
            views[0] = views[0][sent:]
            sent = 0


def _read_some(
    fd: int, buffer: memoryview, wait: WaitFn | None, broken: Callable[[OSError], Exception]
) -> int | None:
    """One read into ``buffer``: bytes read (0 at EOF), or None if it would block
    and ``wait`` is None."""
    while True:
        try:
            return os.readv(fd, [buffer])
        except BlockingIOError:
            if wait is None:
                return None
            wait(fd, select.POLLIN)
        except OSError as exc:
            raise broken(exc) from exc


# ---------------------------------------------------------------- plaintext


class PlainStream(trio.abc.Stream):
    """TCP without TLS, with TLSStream's interface, for ``--insecure-plaintext`` only."""

    def __init__(self, socket_stream: trio.SocketStream) -> None:
        self.transport = socket_stream
        self._sock = socket_stream.socket
        self._send_guard = _Guard("sending")
        self._recv_guard = _Guard("receiving")
        self._closed = False
        self.peer_address = _address(self._sock)
        self.peer_identity = PeerIdentity(None, (), (), self.peer_address)
        self.cipher = None
        self.version = None
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def wire_bytes_sent(self) -> int:
        return self.bytes_sent

    @property
    def wire_bytes_received(self) -> int:
        return self.bytes_received

    @property
    def socket(self) -> Any:
        return self._sock

    @classmethod
    async def connect(
        cls, host: str, port: int, ctx: object = None, server_hostname: str | None = None
    ) -> PlainStream:
        """Dial ``host:port``; ``ctx`` and ``server_hostname`` are accepted and ignored."""
        try:
            return cls(await trio.open_tcp_stream(host, port))
        except OSError as exc:
            raise trio.BrokenResourceError(
                f"TCP connect to {host}:{port} failed: {exc.strerror or exc}"
            ) from exc

    @classmethod
    async def accept(cls, socket_stream: trio.SocketStream, ctx: object = None) -> PlainStream:
        await trio.lowlevel.checkpoint()
        return cls(socket_stream)

    def _error(self, exc: OSError) -> Exception:
        if self._closed:
            return trio.ClosedResourceError("this stream was closed")
        return trio.BrokenResourceError(
            f"TCP connection with {self.peer_address} failed: {exc.strerror or exc}"
        )

    async def send_all(self, data: Buffer) -> None:
        await self.send_many([data])

    async def send_many(self, buffers: Sequence[Buffer]) -> None:
        """Gather-write with sendmsg: header and payload leave in one syscall."""
        with self._send_guard:
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed")
            views = [v for v in (memoryview(b).cast("B") for b in buffers) if v]
            if not views:
                await trio.lowlevel.checkpoint()
                return
            try:
                while views:
                    sent = await self._sock.sendmsg(views[:1024])
                    self.bytes_sent += sent
                    _advance(views, sent)
            except OSError as exc:
                raise self._error(exc) from exc

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_guard:
            await self._sock.wait_writable()

    async def receive_into(self, buffer: Buffer) -> int:
        with self._recv_guard:
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed")
            try:
                n: int = await self._sock.recv_into(buffer)
            except OSError as exc:
                raise self._error(exc) from exc
            self.bytes_received += n
            return n

    async def receive_some(self, max_bytes: int | None = None) -> bytearray:
        buf = bytearray(max_bytes or DEFAULT_RECEIVE)
        n = await self.receive_into(buf)
        del buf[n:]
        return buf

    def thread_send_many(self, buffers: Sequence[Buffer], wait: WaitFn) -> None:
        with self._send_guard:
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed")
            views = [memoryview(b).cast("B") for b in buffers]
            _write_all(self._sock.fileno(), views, wait, self._error)
            self.bytes_sent += sum(len(v) for v in views)

    async def handover(self) -> tuple[int, bytes]:
        """:meth:`TLSStream.handover` without a session to end: the socket, given away."""
        with self._send_guard, self._recv_guard:
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed")
            fd = os.dup(self._sock.fileno())
            self._closed = True
            self._sock.close()
            await trio.lowlevel.checkpoint()
            return fd, b""

    has_buffered = False
    """Reads go straight from the socket to the caller: poll(2) sees everything."""

    def thread_receive_into(self, view: memoryview, wait: WaitFn, *, block: bool) -> int | None:
        with self._recv_guard:
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed")
            n = _read_some(self._sock.fileno(), view, wait if block else None, self._error)
            if n:
                self.bytes_received += n
            return n

    async def aclose(self) -> None:
        self._closed = True
        self._sock.close()
        await trio.lowlevel.checkpoint()
