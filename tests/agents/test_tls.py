"""TLSStream on real loopback sockets: who gets in, what arrives intact, what cancels cleanly."""

from __future__ import annotations

import datetime as dt
import os
import random
import select
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from agents import pki
from agents.tls import (
    PlainStream,
    TLSError,
    TLSStream,
    client_context,
    server_context,
    set_keepalive,
)


@pytest.fixture(scope="module")
def tls_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    pki.init_ca(d)
    pki.issue_cert(d, "server", dns=["localhost"], ips=["127.0.0.1"])
    pki.issue_cert(d, "client")
    # Valid names, signed by our CA, but long expired.
    pki.issue_cert(
        d, "stale", ips=["127.0.0.1"], not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=900)
    )
    return d


@pytest.fixture(scope="module")
def rogue_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another CA whose host certificate carries exactly the names ours would."""
    d = tmp_path_factory.mktemp("rogue")
    pki.init_ca(d, common_name="rogue CA")
    pki.issue_cert(d, "client")
    pki.issue_cert(d, "server", dns=["localhost"], ips=["127.0.0.1"])
    return d


def ctx_for(d: Path, name: str, *, server: bool) -> ssl.SSLContext:
    ident = pki.load_identity(d, name)
    return server_context(ident) if server else client_context(ident)


@dataclass
class Server:
    """A listener that accepts TLS clients one after another, as an agent does."""

    port: int
    accepted: list[TLSStream] = field(default_factory=list)
    refused: list[TLSError] = field(default_factory=list)
    outcome: trio.Event = field(default_factory=trio.Event)

    async def next_outcome(self) -> None:
        await self.outcome.wait()
        self.outcome = trio.Event()


@asynccontextmanager
async def tls_server(
    ctx: ssl.SSLContext, on_accept: Callable[[TLSStream], Any] | None = None
) -> AsyncIterator[Server]:
    async with trio.open_nursery() as nursery:
        server: Server | None = None

        async def handle(sock_stream: trio.SocketStream) -> None:
            assert server is not None
            try:
                stream = await TLSStream.accept(sock_stream, ctx)
            except TLSError as exc:
                server.refused.append(exc)
                server.outcome.set()
                return
            server.accepted.append(stream)
            server.outcome.set()
            if on_accept is not None:
                await on_accept(stream)
            else:
                await trio.sleep_forever()  # serve_tcp closes the socket when we return

        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        server = Server(port=listeners[0].socket.getsockname()[1])
        yield server
        nursery.cancel_scope.cancel()


async def pump(stream: TLSStream | PlainStream, data: bytes, rng: random.Random) -> None:
    """Send ``data`` in random pieces, alternating send_all and send_many."""
    view = memoryview(data)
    off = 0
    while off < len(view):
        n = rng.choice([1, 7, 8, 100, 4096, 16383, 16385, 70_000, 300_000, 1 << 20])
        piece = view[off : off + n]
        if rng.random() < 0.5:
            await stream.send_all(piece)
        else:
            cut = rng.randrange(len(piece) + 1)
            await stream.send_many([piece[:cut], b"", piece[cut:]])
        off += len(piece)


async def drain(stream: TLSStream | PlainStream, size: int, rng: random.Random) -> bytes:
    """Receive exactly ``size`` bytes in random-sized receive_into/receive_some calls."""
    out = bytearray()
    while len(out) < size:
        want = rng.choice([1, 5, 8, 1000, 16384, 65536, 1 << 20])
        if rng.random() < 0.5:
            buf = bytearray(want)
            n = await stream.receive_into(memoryview(buf))
            assert n, f"peer closed after {len(out)} of {size} bytes"
            out += buf[:n]
        else:
            chunk = await stream.receive_some(want)
            assert chunk, f"peer closed after {len(out)} of {size} bytes"
            out += chunk
    return bytes(out)


async def test_mutual_handshake_and_integrity_both_ways(tls_pki: Path) -> None:
    rng = random.Random(4)
    up, down = os.urandom(3 << 20), os.urandom(2 << 20)
    got: dict[str, bytes] = {}
    served = trio.Event()

    async def serve(stream: TLSStream) -> None:
        async with trio.open_nursery() as n:
            n.start_soon(pump, stream, down, random.Random(5))
            got["up"] = await drain(stream, len(up), random.Random(6))
        assert await stream.receive_some() == b""  # client's close_notify
        await stream.aclose()
        served.set()

    async with tls_server(ctx_for(tls_pki, "server", server=True), serve) as server:
        client = await TLSStream.connect(
            "127.0.0.1", server.port, ctx_for(tls_pki, "client", server=False)
        )
        async with trio.open_nursery() as n:
            n.start_soon(pump, client, up, rng)
            got["down"] = await drain(client, len(down), random.Random(7))
        await server.next_outcome()
        srv = server.accepted[0]
        assert client.version == srv.version == "TLSv1.3"
        assert client.cipher is not None and client.cipher[0].startswith("TLS_")
        assert client.peer_identity.name == "server"
        assert "127.0.0.1" in client.peer_identity.ip_addresses
        assert srv.peer_identity.name == "client"
        assert srv.peer_identity.dns_names == ("client",)
        assert srv.peer_identity.address.startswith("127.0.0.1:")
        await client.aclose()
        with trio.fail_after(30):
            await served.wait()  # the server may still be decrypting the last of "up"
    assert got["up"] == up and got["down"] == down
    assert client.bytes_sent == srv.bytes_received == len(up)
    assert srv.bytes_sent == client.bytes_received == len(down)
    assert client.wire_bytes_sent > len(up)  # record overhead: it really was encrypted


async def test_client_from_another_ca_is_refused_and_the_listener_serves_on(
    tls_pki: Path, rogue_pki: Path
) -> None:
    async with tls_server(ctx_for(tls_pki, "server", server=True)) as server:
        rogue = await TLSStream.connect(
            # The rogue client must trust our server to get as far as sending its cert.
            "127.0.0.1",
            server.port,
            _client_trusting(rogue_pki, tls_pki),
        )
        await server.next_outcome()
        (err,) = server.refused
        assert "handshake with 127.0.0.1:" in str(err)
        assert "certificate verify failed" in err.reason
        # TLS 1.3: the client learns on its first receive, from the server's alert.
        with pytest.raises(TLSError, match="alert"):
            await rogue.receive_some()
        await rogue.aclose()

        good = await TLSStream.connect(
            "127.0.0.1", server.port, ctx_for(tls_pki, "client", server=False)
        )
        await server.next_outcome()
        assert [s.peer_identity.name for s in server.accepted] == ["client"]
        await good.aclose()


def _client_trusting(client_dir: Path, ca_dir: Path) -> ssl.SSLContext:
    ident = pki.load_identity(client_dir, "client")
    ctx = client_context(pki.Identity("client", ca_dir / "ca.pem", ident.cert_path, ident.key_path))
    return ctx


async def test_server_from_another_ca_is_refused(tls_pki: Path, rogue_pki: Path) -> None:
    async with tls_server(ctx_for(rogue_pki, "server", server=True)) as server:
        with pytest.raises(TLSError, match="certificate verify failed") as info:
            await TLSStream.connect(
                "127.0.0.1", server.port, ctx_for(tls_pki, "client", server=False)
            )
        assert f"127.0.0.1:{server.port}" in str(info.value)


async def test_wrong_server_host_name_is_refused(tls_pki: Path) -> None:
    async with tls_server(ctx_for(tls_pki, "server", server=True)) as server:
        with pytest.raises(TLSError, match=r"Hostname mismatch.*'elsewhere\.example'"):
            await TLSStream.connect(
                "127.0.0.1",
                server.port,
                ctx_for(tls_pki, "client", server=False),
                server_hostname="elsewhere.example",
            )
        # The name it was issued under works, by DNS SAN as well as by IP SAN.
        ok = await TLSStream.connect(
            "127.0.0.1", server.port, ctx_for(tls_pki, "client", server=False), "localhost"
        )
        await ok.aclose()


async def test_expired_server_certificate_is_refused(tls_pki: Path) -> None:
    async with tls_server(ctx_for(tls_pki, "stale", server=True)) as server:
        with pytest.raises(TLSError, match="certificate has expired"):
            await TLSStream.connect(
                "127.0.0.1", server.port, ctx_for(tls_pki, "client", server=False)
            )


@pytest.mark.parametrize(
    ("junk", "reason"),
    [
        (b"GET / HTTP/1.0\r\n\r\n", "http request"),
        (b"\x16\x03\x01\x00\x05hello-not-really-tls" * 4, ""),
        (b"", "peer closed the connection during the handshake"),
    ],
    ids=["http", "garbage", "connect-and-close"],
)
async def test_plain_tcp_client_gets_a_clean_refusal_and_the_server_serves_on(
    tls_pki: Path, junk: bytes, reason: str
) -> None:
    async with tls_server(ctx_for(tls_pki, "server", server=True)) as server:
        plain = await trio.open_tcp_stream("127.0.0.1", server.port)
        our_port = plain.socket.getsockname()[1]
        if junk:
            await plain.send_all(junk)
        else:
            await plain.aclose()
        await server.next_outcome()
        (err,) = server.refused
        assert isinstance(err, TLSError)
        assert f"with 127.0.0.1:{our_port} failed" in str(err)
        assert reason in err.reason
        if junk:
            # The server closed on it (after an alert), so the plain client sees EOF.
            with trio.fail_after(10):
                while await plain.receive_some():
                    pass
            await plain.aclose()

        good = await TLSStream.connect(
            "127.0.0.1", server.port, ctx_for(tls_pki, "client", server=False)
        )
        await server.next_outcome()
        assert len(server.accepted) == 1
        await good.aclose()


async def _hold(stream: trio.SocketStream) -> None:
    await trio.sleep_forever()


async def test_silent_client_times_out_the_handshake(tls_pki: Path) -> None:
    async with trio.open_nursery() as n:
        listeners = await n.start(partial(trio.serve_tcp, _hold, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with pytest.raises(TLSError, match=r"no handshake within 0\.2 s"):
            await TLSStream._start(
                await trio.open_tcp_stream("127.0.0.1", port),
                ctx_for(tls_pki, "client", server=False),
                server_side=False,
                hostname="127.0.0.1",
                timeout=0.2,
            )
        n.cancel_scope.cancel()


@asynccontextmanager
async def connected_pair(tls_pki: Path) -> AsyncIterator[tuple[TLSStream, TLSStream]]:
    async with tls_server(ctx_for(tls_pki, "server", server=True)) as server:
        client = await TLSStream.connect(
            "127.0.0.1", server.port, ctx_for(tls_pki, "client", server=False)
        )
        await server.next_outcome()
        yield client, server.accepted[0]
        await client.aclose()
        await server.accepted[0].aclose()


async def test_cancelled_receive_leaves_the_stream_usable_and_no_thread_behind(
    tls_pki: Path,
) -> None:
    async with connected_pair(tls_pki) as (client, srv):
        baseline = threading.active_count()
        with trio.CancelScope() as scope:

            async def cancel_when_blocked() -> None:
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()

            async with trio.open_nursery() as n:
                n.start_soon(cancel_when_blocked)
                await client.receive_some()  # nothing will come
                pytest.fail("receive returned without data")
        assert scope.cancelled_caught
        assert threading.active_count() == baseline
        # Nothing was lost or half-consumed: the next message arrives whole.
        await srv.send_all(b"after the cancel")
        assert await drain(client, 16, random.Random(1)) == b"after the cancel"


async def test_offloaded_crypto_keeps_every_byte_in_order_and_cancels_cleanly(
    tls_pki: Path,
) -> None:
    """multifd streams encrypt/decrypt in worker threads: the same bytes arrive,
    in order, and a receive cancelled while a thread decrypts loses nothing."""
    async with connected_pair(tls_pki) as (client, srv):
        client.offload_crypto = srv.offload_crypto = True
        data = os.urandom(6 << 20)
        async with trio.open_nursery() as n:
            n.start_soon(pump, client, data, random.Random(11))
            got = bytearray()
            buf = memoryview(bytearray(1 << 20))
            cancelled = 0
            while len(got) < len(data):
                with trio.move_on_after(0.0003) as scope:  # cancels land mid-decrypt, too
                    k = await srv.receive_into(buf)
                    assert k, "peer closed early"
                    got += buf[:k]
                cancelled += scope.cancelled_caught
        assert bytes(got) == data
        assert srv.bytes_received == client.bytes_sent == len(data)
        assert cancelled > 0


async def test_aclose_wakes_a_blocked_receiver(tls_pki: Path) -> None:
    async with connected_pair(tls_pki) as (client, _srv), trio.open_nursery() as n:

        async def receiver() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await client.receive_some()

        n.start_soon(receiver)
        await trio.testing.wait_all_tasks_blocked()
        await client.aclose()


async def test_aclose_is_bounded_when_the_peer_never_reads(tls_pki: Path) -> None:
    """The peer is alive but stuck: close_notify cannot be delivered, aclose gives up."""
    async with connected_pair(tls_pki) as (client, _srv):
        # Fill every buffer between us and the stuck peer with raw bytes.
        raw = socket.socket(fileno=os.dup(client.socket.fileno()))
        raw.setblocking(False)
        try:
            while True:
                raw.send(b"\0" * 65536)
        except BlockingIOError:
            pass
        finally:
            raw.close()  # the duplicate only
        client.close_timeout = 0.2
        with trio.fail_after(30):  # a hang guard, not a timing assertion
            await client.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await client.send_all(b"x")


async def test_aclose_while_a_send_is_blocked_closes_at_once(tls_pki: Path) -> None:
    async with connected_pair(tls_pki) as (client, _srv):
        errors: list[BaseException] = []

        async def sender() -> None:
            try:
                while True:
                    await client.send_all(b"\1" * (1 << 20))
            except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
                errors.append(exc)

        async with trio.open_nursery() as n:
            n.start_soon(sender)
            await trio.testing.wait_all_tasks_blocked()
            with trio.fail_after(30):
                await client.aclose()
        assert len(errors) == 1


async def test_aclose_on_a_vanished_peer(tls_pki: Path) -> None:
    async with connected_pair(tls_pki) as (client, srv):
        srv.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        srv.socket.close()  # RST, no close_notify
        with pytest.raises(TLSError, match=r"127\.0\.0\.1"):
            await client.receive_some()
        with trio.fail_after(30):
            await client.aclose()


async def test_two_tasks_sending_at_once_is_an_error(tls_pki: Path) -> None:
    async with connected_pair(tls_pki) as (client, _srv):
        with pytest.RaisesGroup(trio.BusyResourceError):
            async with trio.open_nursery() as n:
                n.start_soon(client.send_all, b"\0" * (64 << 20))
                n.start_soon(client.send_all, b"\0")


async def test_plain_stream_has_the_same_interface(tls_pki: Path) -> None:
    data = os.urandom(3 << 20)
    async with trio.open_nursery() as n:
        got: list[bytes] = []

        async def serve(sock_stream: trio.SocketStream) -> None:
            stream = await PlainStream.accept(sock_stream)
            got.append(await drain(stream, len(data), random.Random(2)))
            await stream.aclose()

        listeners = await n.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        client = await PlainStream.connect("127.0.0.1", listeners[0].socket.getsockname()[1])
        await pump(client, data, random.Random(3))
        assert await client.receive_some() == b""
        await client.aclose()
        n.cancel_scope.cancel()
    assert got == [data]
    assert client.bytes_sent == len(data)
    assert client.peer_identity.name.startswith("127.0.0.1:")


async def test_keepalive_options_reach_the_socket(tls_pki: Path) -> None:
    async with connected_pair(tls_pki) as (client, _srv):
        sock = client.socket
        set_keepalive(sock, idle_s=7, interval_s=2, count=4, user_timeout_ms=15_000)
        tcp = socket.IPPROTO_TCP
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(tcp, socket.TCP_KEEPIDLE) == 7
        assert sock.getsockopt(tcp, socket.TCP_KEEPINTVL) == 2
        assert sock.getsockopt(tcp, socket.TCP_KEEPCNT) == 4
        assert sock.getsockopt(tcp, socket.TCP_USER_TIMEOUT) == 15_000
        assert sock.getsockopt(tcp, socket.TCP_NODELAY) == 1


async def test_a_poll_driven_thread_receives_every_byte(tls_pki: Path) -> None:
    """The postcopy request threads' pattern (agents/threads.py): read only when
    poll(2) says the socket is readable or ``has_buffered`` says bytes are already
    in user space, never just to learn there is nothing.  Were ``has_buffered``
    ever to hide bytes OpenSSL or the BIO still held, the poll below would time
    out with the stream incomplete."""
    async with connected_pair(tls_pki) as (client, srv):
        data = os.urandom(4 << 20)
        TAIL = 1000
        rng = random.Random(5)

        def wait(fd: int, events: int) -> None:
            waiter = select.poll()
            waiter.register(fd, events)
            assert waiter.poll(10_000), (
                f"blocked 10 s for bytes that never came, after {srv.bytes_received} "
                f"of {len(data)}: stuck in user space"
            )

        def receive_all() -> bytes:
            got = bytearray()
            buf = memoryview(bytearray(1 << 20))
            poller = select.poll()
            poller.register(srv.socket.fileno(), select.POLLIN)
            readable = True
            while len(got) < len(data):
                while len(got) < len(data) and (readable or srv.has_buffered):
                    readable = False
                    want = rng.choice([1, 100, 4096 + 32, 16384, 65536, 1 << 20])
                    body = len(data) - TAIL
                    # The tail (one record) byte by byte: the rest of it stays in OpenSSL.
                    want = min(want, body - len(got)) if len(got) < body else 1
                    n = srv.thread_receive_into(buf[:want], wait, block=rng.random() < 0.3)
                    if n is None:
                        break
                    assert n, f"peer closed after {len(got)} of {len(data)} bytes"
                    got += buf[:n]
                if len(got) < len(data):
                    assert poller.poll(10_000), (
                        f"{len(data) - len(got)} bytes never signalled: stuck in user space"
                    )
                    readable = True
            # Nothing beyond the data; after one look, the stream knows it holds nothing.
            assert srv.thread_receive_into(buf, wait, block=False) is None
            assert not srv.has_buffered
            return bytes(got)

        async def send() -> None:
            await pump(client, data[:-TAIL], random.Random(12))
            await client.send_all(data[-TAIL:])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            got = await trio.to_thread.run_sync(receive_all)
        assert got == data


async def test_handover_moves_the_connection_to_a_new_handshake(tls_pki: Path) -> None:
    """Both ends hand the TCP socket over; two new TLS endpoints (blocking
    stdlib ssl, as worker processes use) handshake on it and talk."""
    import socket as stdsocket
    import threading

    async with connected_pair(tls_pki) as (client, server):
        await client.send_all(b"before")
        assert await server.receive_some(100) == b"before"
        fds: dict[str, int] = {}

        async def hand(name: str, stream: TLSStream) -> None:
            fds[name], trailing = await stream.handover()
            assert trailing == b""

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hand, "client", client)
            nursery.start_soon(hand, "server", server)
        got: dict[str, bytes] = {}

        def serve() -> None:
            sock = stdsocket.socket(fileno=fds["server"])
            sock.setblocking(True)
            sock.sendall(b"G")  # the go-ahead: the client may start its handshake
            with ctx_for(tls_pki, "server", server=True).wrap_socket(sock, server_side=True) as tls:
                got["server"] = tls.recv(100)
                tls.sendall(b"pong")

        def dial() -> None:
            sock = stdsocket.socket(fileno=fds["client"])
            sock.setblocking(True)
            assert sock.recv(1) == b"G"
            ctx = ctx_for(tls_pki, "client", server=False)
            with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"ping")
                got["client"] = tls.recv(100)

        threads = [threading.Thread(target=serve), threading.Thread(target=dial)]
        await trio.to_thread.run_sync(
            lambda: ([t.start() for t in threads], [t.join(10) for t in threads])
        )
    assert got == {"server": b"ping", "client": b"pong"}
