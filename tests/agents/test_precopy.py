"""Precopy live migration between two real agents over mutual TLS, and how it fails.

Each story starts two agents on loopback, a real guest process on the
source, and checks the guest's memory where it ends up.
"""

from __future__ import annotations

import json
import os
import ssl

import pytest
import trio
from conftest import running_agent

from agents import pki
from agents.client import CommandFailed, open_client
from agents.tls import TLSStream, client_context
from protocol import PROTOCOL_VERSION
from protocol.frames import FrameDecoder
from protocol.messages import ChannelKind, Error, Hello, decode_message

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (userfaultfd, PAGEMAP_SCAN)")


async def _start_guest(
    client, name="vm1", memory="64M", workload="counter", converge=True, **extra
):
    """A guest, with a downtime limit a counter guest can meet on a loaded 2-core machine.

    The counter rewrites all its RAM in well under a second, faster than one
    Python process can move it through TLS twice, so — as QEMU's migration-test
    does — tests that are not about convergence raise the downtime limit.
    """
    info = await client.execute(
        "guest-start",
        {"name": name, "memory": memory, "workload": workload, "fill": "mixed:50%", **extra},
    )
    if converge:
        await client.execute("migrate-set-parameters", {"guest": name, "downtime-limit": 20_000})
    return info


async def test_counter_guest_migrates_and_the_counter_check_holds_on_the_destination(pair):
    src, dst = pair
    await _start_guest(src.client)
    await trio.sleep(0.3)
    await src.client.execute("migrate", {"guest": "vm1", "uri": dst.uri})
    info = await src.client.wait_status("vm1", {"completed", "failed"}, timeout=240)
    assert info["status"] == "completed", info.get("error-desc")
    assert info["downtime"] > 0 and info["total-time"] >= info["setup-time"]
    assert info["ram"]["total"] == 64 << 20
    dinfo = await dst.client.execute("query-migrate", {"guest": "vm1"})
    assert dinfo["status"] == "completed" and dinfo["role"] == "destination"
    # The guest runs on the destination and its counter walk is intact there.
    [guest] = await dst.client.execute("query-guests")
    assert guest["status"] == "running"
    await trio.sleep(0.2)
    check = await dst.client.execute("guest-verify", {"guest": "vm1", "method": "counter"})
    assert check["verified"], check
    # The source let its copy go only after the destination confirmed.
    [old] = await src.client.execute("query-guests")
    assert old["status"] == "migrated"
    events = [e.name for e in src.client.events]
    assert "MIGRATION_PASS" in events and "MIGRATION" in events


async def test_auto_converge_throttles_a_guest_that_dirties_faster_than_the_link(pair):
    src, dst = pair
    await _start_guest(
        src.client, memory="64M", workload="stress:rate=64M,wss=32M,mode=write", converge=False
    )
    await src.client.execute(
        "migrate-set-parameters", {"guest": "vm1", "max-bandwidth": 16 << 20, "downtime-limit": 100}
    )
    await src.client.execute(
        "migrate-set-capabilities",
        {"guest": "vm1", "capabilities": [{"capability": "auto-converge", "state": True}]},
    )
    await src.client.execute("migrate", {"guest": "vm1", "uri": dst.uri})
    info = await src.client.wait_status("vm1", {"completed", "failed"}, timeout=240)
    assert info["status"] == "completed", info.get("error-desc")
    # 64 MB/s of writes over a 16 MB/s link cannot converge unthrottled.
    assert info["cpu-throttle-percentage"] >= 20
    assert info["ram"]["dirty-sync-count"] >= 3


async def test_stress_guest_memory_equals_the_source_at_switchover(pair):
    src, dst = pair
    await dst.client.execute("migrate-incoming", {"uri": "defer", "autostart": False})
    await _start_guest(src.client, memory="128M", workload="stress:rate=50M,wss=64M,mode=write")
    await src.client.execute(
        "migrate-set-capabilities",
        {"guest": "vm1", "capabilities": [{"capability": "x-switchover-digest", "state": True}]},
    )
    await trio.sleep(0.3)
    await src.client.execute("migrate", {"guest": "vm1", "uri": dst.uri})
    info = await src.client.wait_status("vm1", {"completed", "failed"}, timeout=120)
    assert info["status"] == "completed", info.get("error-desc")
    assert info["ram"]["dirty-sync-count"] >= 2  # the workload dirtied pages during the bulk pass
    assert (
        info["ram"]["duplicate"] > 0 and info["ram"]["normal"] > 0
    )  # untouched zero pages went as ZERO
    [guest] = await dst.client.execute("query-guests")
    assert guest["status"] == "paused"  # autostart off: RAM is exactly what arrived
    check = await dst.client.execute("guest-verify", {"guest": "vm1", "method": "digest"})
    assert check["digest"] == info["switchover-digest"]


async def _wait_guest_running(client, name="vm1"):
    status = await client.execute("query-status", {"guest": name})
    assert status["running"], status


async def test_cancel_while_active_leaves_the_source_guest_running_and_whole(pair):
    src, dst = pair
    await _start_guest(src.client, memory="256M")
    await src.client.execute("migrate-set-parameters", {"guest": "vm1", "max-bandwidth": 20 << 20})
    await src.client.execute("migrate", {"guest": "vm1", "uri": dst.uri})
    await src.client.wait_status("vm1", {"active"}, timeout=30, poll=0.02)
    await src.client.execute("migrate-cancel", {"guest": "vm1"})
    info = await src.client.wait_status("vm1", {"cancelled", "failed"}, timeout=30)
    assert info["status"] == "cancelled"
    await _wait_guest_running(src.client)
    check = await src.client.execute("guest-verify", {"guest": "vm1", "method": "counter"})
    assert check["verified"], check
    with trio.fail_after(10):  # the destination threw its half-built guest away
        while await dst.client.execute("query-guests"):
            await trio.sleep(0.05)


async def test_cancel_in_pre_switchover_resumes_the_source(pair):
    src, dst = pair
    await _start_guest(src.client)
    await src.client.execute(
        "migrate-set-capabilities",
        {
            "guest": "vm1",
            "capabilities": [{"capability": "pause-before-switchover", "state": True}],
        },
    )
    await src.client.execute("migrate", {"guest": "vm1", "uri": dst.uri})
    await src.client.wait_status("vm1", {"pre-switchover"}, timeout=60)
    with pytest.raises(CommandFailed, match="not possible"):
        await src.client.execute("migrate", {"guest": "vm1", "uri": dst.uri})
    await src.client.execute("migrate-cancel", {"guest": "vm1"})
    info = await src.client.wait_status("vm1", {"cancelled", "failed"}, timeout=30)
    assert info["status"] == "cancelled"
    await _wait_guest_running(src.client)
    assert (await src.client.execute("guest-verify", {"guest": "vm1"}))["verified"]


async def test_pre_switchover_then_continue_completes(pair):
    src, dst = pair
    await _start_guest(src.client)
    await src.client.execute(
        "migrate-set-capabilities",
        {
            "guest": "vm1",
            "capabilities": [{"capability": "pause-before-switchover", "state": True}],
        },
    )
    await src.client.execute("migrate", {"guest": "vm1", "uri": dst.uri})
    await src.client.wait_status("vm1", {"pre-switchover"}, timeout=60)
    await src.client.execute("migrate-continue", {"guest": "vm1", "state": "pre-switchover"})
    info = await src.client.wait_status("vm1", {"completed", "failed"}, timeout=60)
    assert info["status"] == "completed", info.get("error-desc")
    assert (await dst.client.execute("guest-verify", {"guest": "vm1"}))["verified"]


async def _hold_forever(stream):
    await trio.sleep_forever()


async def test_cancel_during_setup(short_tmp, pki_dir):
    """A destination that accepts TCP but never answers TLS keeps us in setup; cancel works there."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with (
        running_agent(short_tmp, pki_dir, "source", listen=False) as src,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(trio.serve_listeners, _hold_forever, listeners)
        await _start_guest(src.client)
        await src.client.execute("migrate", {"guest": "vm1", "uri": f"tls:127.0.0.1:{port}"})
        await src.client.wait_status("vm1", {"setup"}, timeout=10, poll=0.01)
        await src.client.execute("migrate-cancel", {"guest": "vm1"})
        info = await src.client.wait_status("vm1", {"cancelled"}, timeout=30)
        assert info["status"] == "cancelled"
        await _wait_guest_running(src.client)
        nursery.cancel_scope.cancel()


async def test_connection_lost_mid_precopy_fails_and_keeps_the_source_whole(short_tmp, pki_dir):
    async with running_agent(short_tmp, pki_dir, "source", listen=False) as src:
        async with running_agent(short_tmp, pki_dir, "destination") as dst:
            await _start_guest(src.client, memory="256M")
            await src.client.execute(
                "migrate-set-parameters", {"guest": "vm1", "max-bandwidth": 20 << 20}
            )
            await src.client.execute("migrate", {"guest": "vm1", "uri": dst.uri})
            await src.client.wait_status("vm1", {"active"}, timeout=30, poll=0.02)
            await trio.sleep(0.3)
            await dst.stop()  # the destination host goes away
        info = await src.client.wait_status("vm1", {"failed", "completed"}, timeout=60)
        assert info["status"] == "failed"
        assert info["error-desc"]
        await _wait_guest_running(src.client)
        assert (await src.client.execute("guest-verify", {"guest": "vm1", "method": "counter"}))[
            "verified"
        ]


async def test_a_source_with_a_certificate_from_another_ca_is_refused(pair, pki_dir, rogue_pki_dir):
    """A client that trusts our CA but shows a certificate from another CA is refused
    at the handshake, and a real migration afterwards is not disturbed."""
    src, dst = pair
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(pki_dir / "ca.pem")
    ctx.load_cert_chain(rogue_pki_dir / "source.pem", rogue_pki_dir / "source.key")
    with pytest.raises((trio.BrokenResourceError, ssl.SSLError, OSError)):
        stream = await TLSStream.connect("127.0.0.1", dst.agent.listen_port, ctx, "127.0.0.1")
        # TLS 1.3 sends the client certificate last: the refusal shows on first use.
        for part in Hello(PROTOCOL_VERSION, os.urandom(16), ChannelKind.MAIN).encode():
            await stream.send_all(part)
        with trio.fail_after(10):
            assert not await stream.receive_some(65536)
    assert await dst.client.execute("query-guests") == []
    await _start_guest(src.client)
    await src.client.execute("migrate", {"guest": "vm1", "uri": dst.uri})
    info = await src.client.wait_status("vm1", {"completed", "failed"}, timeout=120)
    assert info["status"] == "completed", info.get("error-desc")


async def test_unknown_migration_id_is_refused_while_another_migration_runs(pair, pki_dir):
    src, dst = pair
    await _start_guest(src.client, memory="128M")
    await src.client.execute("migrate-set-parameters", {"guest": "vm1", "max-bandwidth": 60 << 20})
    await src.client.execute("migrate", {"guest": "vm1", "uri": dst.uri})
    await src.client.wait_status("vm1", {"active"}, timeout=30, poll=0.02)
    ctx = client_context(pki.load_identity(pki_dir, "third"))
    stream = await TLSStream.connect("127.0.0.1", dst.agent.listen_port, ctx, "127.0.0.1")
    for part in Hello(PROTOCOL_VERSION, os.urandom(16), ChannelKind.RETURN).encode():
        await stream.send_all(part)
    decoder = FrameDecoder(channel="test")
    with trio.fail_after(10):
        while (frame := decoder.next_frame()) is None:
            decoder.feed(await stream.receive_some(65536))
    reply = decode_message(frame)
    assert isinstance(reply, Error) and "unknown migration id" in reply.message
    await stream.aclose()
    await src.client.execute("migrate-set-parameters", {"guest": "vm1", "max-bandwidth": 0})
    info = await src.client.wait_status("vm1", {"completed", "failed"}, timeout=120)
    assert info["status"] == "completed", info.get("error-desc")
    assert (await dst.client.execute("guest-verify", {"guest": "vm1"}))["verified"]


async def test_bad_control_input_gets_errors_and_the_agent_keeps_serving(pair):
    src, _dst = pair
    await _start_guest(src.client, memory="16M", workload="idle")
    stream = await trio.open_unix_socket(str(src.socket))
    buffer = b""

    async def line():
        nonlocal buffer
        with trio.fail_after(5):
            while b"\n" not in buffer:
                buffer += await stream.receive_some(65536)
        first, _, buffer = buffer.partition(b"\n")
        return json.loads(first)

    assert "QMP" in await line()
    await stream.send_all(b'{"execute": "qmp_capabilities"}\n')
    assert await line() == {"return": {}}
    for bad, needle in [
        (b"this is not json\n", "JSON parse error"),
        (b'{"execute": "no-such-command", "id": 1}\n', "has not been found"),
        (
            b'{"execute": "migrate", "arguments": {"guest": "x"}, "id": 2}\n',
            "Parameter 'uri' is missing",
        ),
        (
            b'{"execute": "migrate", "arguments": {"guest": "nope", "uri": "tls:a:1"}, "id": 3}\n',
            "no guest",
        ),
        (
            b'{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": -5}, "id": 4}\n',
            "downtime-limit",
        ),
        (
            b'{"execute": "guest-start", "arguments": {"name": "g", "memory": "lots"}, "id": 5}\n',
            "size",
        ),
    ]:
        await stream.send_all(bad)
        reply = await line()
        assert needle in reply["error"]["desc"], (bad, reply)
    await stream.aclose()
    async with open_client(src.socket) as again:
        [guest] = await again.execute("query-guests")
        assert guest["name"] == "vm1" and guest["status"] == "running"
