"""Network multifd: precopy pages over several TLS channels, with sync points.

The hazard multifd brings is ordering: a page re-sent in a later pass on
another channel must never be overtaken by its older copy.  The stories
below move guests that keep rewriting their RAM, over 2 and 3 channels, and
check their memory exactly (counter check, RAM digest at switchover).
"""

from __future__ import annotations

import os

import pytest
import trio

from agents.channel import Channel
from agents.multifd import MultifdReceiver
from protocol.errors import ProtocolError
from protocol.messages import MultifdSync, Pages

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (userfaultfd, PAGEMAP_SCAN)")


async def _multifd(client, channels: int, **caps: bool) -> None:
    await client.execute(
        "migrate-set-capabilities",
        {
            "guest": "vm1",
            "capabilities": [
                {"capability": k, "state": v} for k, v in {"multifd": True, **caps}.items()
            ],
        },
    )
    await client.execute("migrate-set-parameters", {"guest": "vm1", "multifd-channels": channels})


@pytest.mark.parametrize("channels", [2, 3])
async def test_counter_guest_migrates_over_multifd_and_the_check_holds(pair, channels):
    src, dst = pair
    await src.client.execute(
        "guest-start", {"name": "vm1", "memory": "64M", "workload": "counter", "fill": "mixed:50%"}
    )
    await src.client.execute("migrate-set-parameters", {"guest": "vm1", "downtime-limit": 20_000})
    await _multifd(src.client, channels)
    await src.client.execute("migrate", {"guest": "vm1", "uri": dst.uri})
    info = await src.client.wait_status("vm1", {"completed", "failed"}, timeout=240)
    assert info["status"] == "completed", info.get("error-desc")
    assert info["ram"]["dirty-sync-count"] >= 2  # pages were re-sent: ordering mattered
    by_name = {c["name"]: c for c in info["channels"]}
    for index in range(channels):
        # Page data really went over every multifd channel, not main.
        assert by_name[f"multifd-{index}"]["bytes-sent"] > 4 << 20, by_name
    assert by_name["main"]["bytes-sent"] < 1 << 20
    assert info["ram"]["multifd-bytes"] > 8 << 20
    check = await dst.client.execute("guest-verify", {"guest": "vm1", "method": "counter"})
    assert check["verified"], check


async def test_rewritten_memory_equals_the_source_at_switchover(pair):
    src, dst = pair
    await dst.client.execute("migrate-incoming", {"uri": "defer", "autostart": False})
    await src.client.execute(
        "guest-start",
        {
            "name": "vm1",
            "memory": "96M",
            "workload": "stress:rate=80M,wss=48M,mode=write",
            "fill": "random",
        },
    )
    await src.client.execute("migrate-set-parameters", {"guest": "vm1", "downtime-limit": 20_000})
    await _multifd(src.client, 2, **{"x-switchover-digest": True})
    await src.client.execute("migrate", {"guest": "vm1", "uri": dst.uri})
    info = await src.client.wait_status("vm1", {"completed", "failed"}, timeout=240)
    assert info["status"] == "completed", info.get("error-desc")
    assert info["ram"]["dirty-sync-count"] >= 2
    check = await dst.client.execute(
        "guest-verify", {"guest": "vm1", "method": "digest", "expect": info["switchover-digest"]}
    )
    assert check["verified"], check


async def test_multifd_then_postcopy_keeps_the_counter_whole(pair):
    """Precopy on multifd, then the switch: every multifd page lands before DISCARD."""
    src, dst = pair
    await src.client.execute(
        "guest-start", {"name": "vm1", "memory": "48M", "workload": "counter:rate=16M"}
    )
    await src.client.execute("migrate-set-parameters", {"guest": "vm1", "max-bandwidth": 24 << 20})
    await _multifd(src.client, 2, **{"postcopy-ram": True})
    await src.client.execute("migrate", {"guest": "vm1", "uri": dst.uri})
    with trio.fail_after(60):
        while (await src.client.execute("query-migrate", {"guest": "vm1"}))["ram"][
            "dirty-sync-count"
        ] < 1:
            await trio.sleep(0.01)
    await src.client.execute("migrate-start-postcopy", {"guest": "vm1"})
    info = await src.client.wait_status(
        "vm1", {"completed", "failed", "postcopy-paused"}, timeout=120
    )
    assert info["status"] == "completed", info.get("error-desc")
    check = await dst.client.execute("guest-verify", {"guest": "vm1", "method": "counter"})
    assert check["verified"], check


async def test_more_channels_than_an_agent_allows_is_refused(pair):
    src, _dst = pair
    await src.client.execute("guest-start", {"name": "vm1", "memory": "16M", "workload": "idle"})
    await _multifd(src.client, 40)
    from agents.client import CommandFailed

    with pytest.raises(CommandFailed, match="at most 16"):
        await src.client.execute("migrate", {"guest": "vm1", "uri": "tls:127.0.0.1:1"})


# -- the sync barrier, with in-memory channels --------------------------------


async def _until(condition) -> None:
    """Readers store in worker threads, which trio's "all tasks blocked" cannot see."""
    with trio.fail_after(5):
        while not condition():
            await trio.sleep(0.001)


async def test_a_reader_waits_at_a_sync_for_the_slower_channel():
    """Channel 0 reaches sync 1 and has pass-2 data queued; it must not apply
    it before channel 1 has applied its pass-1 data."""
    a_send, a_recv = trio.testing.memory_stream_pair()
    b_send, b_recv = trio.testing.memory_stream_pair()
    receiver = MultifdReceiver(2)
    assert receiver.attach(0, Channel("multifd-0", a_recv)) is None
    assert receiver.attach(1, Channel("multifd-1", b_recv)) is None
    assert receiver.attach(1, Channel("multifd-1", b_recv)) is not None  # twice: refused
    assert "0..1" in receiver.attach(5, Channel("multifd-5", b_recv))
    applied: list[tuple[int, int]] = []  # (page, pass that sent it)

    def record(msg):
        applied.append((msg.first_page, msg.data[0]))

    def page(pass_no):
        return bytes([pass_no]) * 4096

    sender_a, sender_b = Channel("a", a_send), Channel("b", b_send)
    with pytest.raises(BaseExceptionGroup) as failure:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver.read, 0, lambda msg: None, record)
            nursery.start_soon(receiver.read, 1, lambda msg: None, record)
            await sender_a.send(Pages(0, 1, 1, page(1)))
            await sender_a.send(MultifdSync(1))
            await sender_a.send(Pages(0, 2, 1, page(2)))  # pass 2 re-sends page 2
            await _until(lambda: applied == [(1, 1)])
            await trio.sleep(0.1)
            assert applied == [(1, 1)]  # channel 0 waits at sync 1
            await sender_b.send(Pages(0, 2, 1, page(1)))  # pass 1's older copy of page 2
            await sender_b.send(MultifdSync(1))
            with trio.fail_after(5):
                await receiver.wait(1)
            await _until(lambda: len(applied) == 3)
            assert applied == [(1, 1), (2, 1), (2, 2)]  # older copy first, newer last
            await sender_a.send(MultifdSync(2))
            await sender_b.send(MultifdSync(3))  # skipped 2: refused, naming the channel
            await trio.sleep_forever()
    [error] = failure.value.exceptions
    assert isinstance(error, ProtocolError) and error.channel == "multifd-1"
    assert "multifd sync 3 after 1" in str(error)
