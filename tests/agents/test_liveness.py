"""Postcopy hang detection: PING/PONG deadline, on trio's virtual clock (no wall time)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from agents.postcopy import Liveness, PausePostcopy


async def test_a_slow_ping_is_never_cancelled_half_way_while_pongs_arrive(autojump_clock):
    """A send slower than the interval (a busy link) must finish: cancelling it
    mid-record would corrupt the TLS stream.  PONGs keep the link alive."""
    liveness = Liveness(100, "destination")
    started = finished = 0

    async def slow_send(ping):
        nonlocal started, finished
        started += 1
        await trio.sleep(0.25)  # 2.5 intervals
        finished += 1

    async def pongs():
        while True:
            await trio.sleep(0.1)
            liveness.pong()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pongs)
        nursery.start_soon(liveness.run, slow_send)
        await trio.sleep(3)
        nursery.cancel_scope.cancel()
    assert finished >= 5
    assert started - finished <= 1  # only the send in flight at the very end was cut short


async def test_silence_pauses_at_three_intervals(autojump_clock):
    liveness = Liveness(100, "source")
    sent = []

    async def send(ping):
        sent.append(ping.seq)

    start = trio.current_time()
    with pytest.raises(PausePostcopy, match=r"no PONG from the source for 0\.3 s"):
        await liveness.run(send)
    waited = trio.current_time() - start
    assert 0.3 < waited <= 0.3 + 0.1 / 4 + 1e-9  # checked four times an interval
    assert sent == [1, 2, 3]


async def test_a_ping_stuck_behind_a_hung_link_does_not_delay_the_deadline(autojump_clock):
    liveness = Liveness(100, "destination")

    async def hung_send(ping):
        await trio.sleep_forever()

    start = trio.current_time()
    with pytest.raises(PausePostcopy):
        await liveness.run(hung_send)
    assert trio.current_time() - start <= 0.3 + 0.1 / 4 + 1e-9
