"""The fault-injecting proxy with real sockets, and precopy migrations through it.

Each story opens a real TCP server behind a FaultProxy, moves data through,
breaks the link one way or another, and checks what each end saw.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest
import trio
from conftest import running_agent

from agents.faults import FaultProxy, proxy_command, serve_control

MiB = 1 << 20
GUARD = 30  # seconds: a hang guard, not a performance bound


class Sink:
    """A TCP server that keeps what it receives per connection and can echo it back."""

    def __init__(self, *, echo: bool = False) -> None:
        self.echo = echo
        self.received: list[bytearray] = []
        self.errors: list[BaseException] = []
        self.ended: list[trio.Event] = []
        self.port = 0
        self.connected = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            while True:
                sock, _ = await listener.accept()
                nursery.start_soon(self._serve, sock)

    async def _serve(self, sock: trio.socket.SocketType) -> None:
        data = bytearray()
        ended = trio.Event()
        self.received.append(data)
        self.ended.append(ended)
        self.connected.set()
        with sock:
            try:
                while True:
                    chunk = await sock.recv(MiB)
                    if not chunk:
                        break
                    data += chunk
                    if self.echo:
                        await _sendall(sock, chunk)
            except OSError as exc:
                self.errors.append(exc)
            finally:
                ended.set()


async def _sendall(sock: trio.socket.SocketType, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]


async def _connect(port: int) -> trio.socket.SocketType:
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    return sock


@pytest.fixture
async def sink(nursery):
    server = Sink()
    await nursery.start(server.run)
    return server


@pytest.fixture
async def echo(nursery):
    server = Sink(echo=True)
    await nursery.start(server.run)
    return server


async def test_data_arrives_intact_both_ways_in_random_splits(echo):
    rng = random.Random(6)
    payload = rng.randbytes(8 * MiB)
    back = bytearray()
    async with FaultProxy(target_port=echo.port) as proxy:
        sock = await _connect(proxy.port)
        with sock, trio.fail_after(GUARD):

            async def send() -> None:
                view = memoryview(payload)
                while view:
                    n = rng.choice([1, 7, 4096, 65537, MiB + 3])
                    await _sendall(sock, view[:n])
                    view = view[n:]
                sock.shutdown(trio.socket.SHUT_WR)

            async def receive() -> None:
                while True:
                    chunk = await sock.recv(rng.choice([1, 100, 70000, 2 * MiB]))
                    if not chunk:
                        return
                    back.extend(chunk)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                nursery.start_soon(receive)
        assert bytes(echo.received[0]) == payload
        assert bytes(back) == payload
        assert proxy.totals == {"up": len(payload), "down": len(payload)}
        assert proxy.accepted == 1


async def test_cut_resets_both_ends_and_new_connections_still_work(sink):
    async with FaultProxy(target_port=sink.port) as proxy:
        sock = await _connect(proxy.port)
        with sock, trio.fail_after(GUARD):
            await _sendall(sock, b"before the cut")
            await proxy.wait_connections(1)
            while proxy.totals["up"] < 14:
                await trio.sleep(0.01)
            assert proxy.cut() == 1
            with pytest.raises(ConnectionResetError):
                await sock.recv(100)
            await sink.ended[0].wait()
            assert [e.errno for e in sink.errors] == [errno.ECONNRESET]
            assert bytes(sink.received[0]) == b"before the cut"
        fresh = await _connect(proxy.port)
        with fresh, trio.fail_after(GUARD):
            await _sendall(fresh, b"after")
            while len(sink.received) < 2 or bytes(sink.received[1]) != b"after":
                await trio.sleep(0.01)
        assert proxy.accepted == 2


async def test_blackhole_holds_data_without_error_and_heal_delivers_it(echo):
    async with FaultProxy(target_port=echo.port) as proxy:
        sock = await _connect(proxy.port)
        with sock:
            await _sendall(sock, b"ping")
            with trio.fail_after(GUARD):
                assert await sock.recv(100) == b"ping"
            proxy.blackhole()
            await _sendall(sock, b"held")
            # Nothing arrives and nothing fails: a hung link.
            with trio.move_on_after(0.5) as waited:
                data = await sock.recv(100)
                pytest.fail(f"data crossed a blackhole: {data!r}")
            assert waited.cancelled_caught
            assert bytes(echo.received[0]) == b"ping" and not echo.errors
            assert [c.state for c in proxy.connections] == ["blackholed"]
            # A new connection is accepted but hangs too: the target never sees it.
            late = await _connect(proxy.port)
            await _sendall(late, b"late")
            await trio.sleep(0.2)
            assert len(echo.received) == 1
            proxy.heal()
            with trio.fail_after(GUARD):
                assert await sock.recv(100) == b"held"
                got = b""
                while got != b"late":
                    got += await late.recv(100)
            late.close()
        assert bytes(echo.received[0]) == b"pingheld"


async def test_throttle_limits_the_rate_and_zero_lifts_it(sink):
    rate = 2 * MiB
    block = bytes(256 * 1024)
    async with FaultProxy(target_port=sink.port) as proxy:
        sock = await _connect(proxy.port)
        with sock:

            async def flood() -> None:
                while True:
                    await _sendall(sock, block)

            async def measure(seconds: float) -> tuple[int, float]:
                before, start = len(sink.received[0]), trio.current_time()
                await trio.sleep(seconds)
                return len(sink.received[0]) - before, trio.current_time() - start

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                await sink.connected.wait()
                proxy.throttle(rate)
                await trio.sleep(0.3)  # let what was already in flight drain
                throttled, elapsed = await measure(1.0)
                proxy.throttle(0)
                free, _ = await measure(1.0)
                nursery.cancel_scope.cancel()
    assert 0 < throttled <= 1.5 * rate * elapsed + MiB, (throttled, elapsed)
    assert free > 2 * throttled, (free, throttled)


async def test_cut_after_breaks_the_stream_at_the_chosen_byte(sink):
    mark = 3 * MiB + 12345
    payload = random.Random(1).randbytes(10 * MiB)
    async with FaultProxy(target_port=sink.port) as proxy:
        fired = proxy.cut_after(mark)
        sock = await _connect(proxy.port)
        with sock, trio.fail_after(GUARD):
            with pytest.raises(OSError) as raised:
                await _sendall(sock, payload)
                await sock.recv(100)  # the reset may arrive after the last send
            assert raised.value.errno in (errno.ECONNRESET, errno.EPIPE)
            await fired.wait()
            await sink.ended[0].wait()
        assert proxy.totals["up"] == mark
        got = bytes(sink.received[0])
        # What the proxy had sent but the kernel had not delivered dies with the reset.
        assert 0 < len(got) <= mark and got == payload[: len(got)]
        assert proxy.connections == []


async def test_blackhole_after_holds_the_rest_until_heal(sink):
    mark = 2 * MiB + 1
    payload = random.Random(2).randbytes(4 * MiB)
    async with FaultProxy(target_port=sink.port) as proxy:
        fired = proxy.blackhole_after(mark)
        sock = await _connect(proxy.port)
        with sock, trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_sendall, sock, payload)
                await fired.wait()
                while len(sink.received[0]) < mark:
                    await trio.sleep(0.01)
                await trio.sleep(0.3)
                assert len(sink.received[0]) == mark and not sink.errors
                proxy.heal()
            sock.shutdown(trio.socket.SHUT_WR)
            await sink.ended[0].wait()
        assert bytes(sink.received[0]) == payload


async def test_control_socket_drives_the_proxy(sink, tmp_path):
    sock_path = Path(tmp_path) / "p.sock"
    async with FaultProxy(target_port=sink.port) as proxy, trio.open_nursery() as nursery:
        await nursery.start(serve_control, proxy, sock_path)
        assert (await proxy_command(sock_path, "throttle 1M")) == "ok throttle 1048576"
        assert proxy.rate == MiB
        assert (await proxy_command(sock_path, "blackhole")) == "ok blackhole"
        assert proxy.blackholed
        assert '"blackholed": true' in await proxy_command(sock_path, "status")
        assert (await proxy_command(sock_path, "heal")) == "ok heal"
        assert not proxy.blackholed and proxy.rate == 0
        assert (await proxy_command(sock_path, "cut")) == "ok cut 0 connection(s)"
        assert (await proxy_command(sock_path, "throttle lots")).startswith(
            "error: 'throttle lots'"
        )
        assert (await proxy_command(sock_path, "explode")).startswith("error: unknown command")
        nursery.cancel_scope.cancel()
    assert not sock_path.exists()


# -- precopy migrations through the proxy ----------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (userfaultfd, PAGEMAP_SCAN)")


async def _start_counter_guest(client, memory: str = "64M") -> None:
    await client.execute(
        "guest-start",
        {"name": "vm1", "memory": memory, "workload": "counter", "fill": "random"},
    )
    await client.execute("migrate-set-parameters", {"guest": "vm1", "downtime-limit": 20_000})


@needs_root
async def test_precopy_through_the_proxy_completes_and_verifies(short_tmp, pki_dir):
    async with (
        running_agent(short_tmp, pki_dir, "source", listen=False) as src,
        running_agent(short_tmp, pki_dir, "destination") as dst,
        FaultProxy(target_port=dst.agent.listen_port) as proxy,
    ):
        await _start_counter_guest(src.client)
        await src.client.execute("migrate", {"guest": "vm1", "uri": f"tls:127.0.0.1:{proxy.port}"})
        info = await src.client.wait_status("vm1", {"completed", "failed"}, timeout=240)
        assert info["status"] == "completed", info.get("error-desc")
        assert proxy.totals["up"] >= 64 * MiB  # random fill: every page crossed the proxy
        check = await dst.client.execute("guest-verify", {"guest": "vm1", "method": "counter"})
        assert check["verified"], check


@needs_root
async def test_a_cut_mid_precopy_fails_the_migration_and_the_guest_keeps_running(
    short_tmp, pki_dir
):
    async with (
        running_agent(short_tmp, pki_dir, "source", listen=False) as src,
        running_agent(short_tmp, pki_dir, "destination") as dst,
        FaultProxy(target_port=dst.agent.listen_port) as proxy,
    ):
        await _start_counter_guest(src.client)
        fired = proxy.cut_after(16 * MiB)
        await src.client.execute("migrate", {"guest": "vm1", "uri": f"tls:127.0.0.1:{proxy.port}"})
        info = await src.client.wait_status("vm1", {"completed", "failed"}, timeout=240)
        assert fired.is_set()
        assert info["status"] == "failed", info
        [guest] = await src.client.execute("query-guests")
        assert guest["status"] == "running"
        status = await src.client.execute("query-status", {"guest": "vm1"})
        assert status["running"] and status["status"] == "running", status
        check = await src.client.execute("guest-verify", {"guest": "vm1", "method": "counter"})
        assert check["verified"], check
