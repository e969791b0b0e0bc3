"""The control server survives clients that vanish, and answers QMP from any client."""

from __future__ import annotations

import json

import trio
from conftest import running_agent

from agents.client import open_client


async def test_a_client_that_disconnects_while_events_flow_does_not_kill_the_agent(
    short_tmp, pki_dir
):
    async with running_agent(short_tmp, pki_dir, "third", listen=False) as agent:
        for _ in range(5):
            stream = await trio.open_unix_socket(str(agent.socket))
            await stream.send_all(b'{"execute": "qmp_capabilities"}\n')
            with trio.fail_after(5):
                while b'"return"' not in await stream.receive_some(65536):
                    pass
            await stream.aclose()
            for n in range(50):  # events race with the server noticing the close
                agent.agent.events.emit("MIGRATION_PASS", {"pass": n, "guest": "x"})
            await trio.sleep(0.01)
        async with open_client(agent.socket) as again:
            assert await again.execute("query-guests") == []
            assert any(c["name"] == "query-migrate" for c in await again.execute("query-commands"))


async def test_events_reach_every_negotiated_client(short_tmp, pki_dir):
    async with running_agent(short_tmp, pki_dir, "third", listen=False) as agent:
        async with open_client(agent.socket) as a, open_client(agent.socket) as b:
            agent.agent.events.emit("MIGRATION", {"status": "active", "guest": "g"})
            for client in (a, b):
                event = await client.wait_event("MIGRATION", timeout=5)
                assert event.data == {"status": "active", "guest": "g"}
                assert event.timestamp > 0
        raw = await trio.open_unix_socket(str(agent.socket))
        greeting = json.loads((await raw.receive_some(65536)).splitlines()[0])
        assert greeting["QMP"]["version"]["package"].startswith("godwit")
        await raw.aclose()


async def test_an_event_write_to_a_half_closed_client_ends_only_that_connection():
    """Deterministic form of the race: the client stops reading (SHUT_RD) but keeps
    its write side open, so the server's reader stays blocked while an event write
    fails with EPIPE inside the connection's nursery."""
    import socket

    from agents.control_server import ControlServer
    from agents.events import EventBus

    events = EventBus()
    server = ControlServer(
        {}, events, {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "godwit"}
    )
    ours, theirs = trio.socket.socketpair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_connection, trio.SocketStream(ours))
        peer = trio.SocketStream(theirs)
        await peer.receive_some(65536)  # greeting
        await peer.send_all(b'{"execute": "qmp_capabilities"}\n')
        await peer.receive_some(65536)
        theirs.shutdown(socket.SHUT_RD)
        with trio.fail_after(5):
            while server.connections:
                events.emit("MIGRATION", {"status": "active", "guest": "g"})
                await trio.sleep(0.01)
    await peer.aclose()
