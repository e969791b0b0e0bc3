"""Workload specs parse as documented, and a counter with a rate walks no faster than it."""

import pytest
import trio

from agents.vm.workloads import COUNTER_SLICE_S, parse_workload


def test_counter_alone_is_unlimited_and_a_rate_parses():
    plain = parse_workload("counter")
    assert (plain.kind, plain.rate, str(plain)) == ("counter", 0, "counter")
    paced = parse_workload("counter:rate=64M")
    assert (paced.kind, paced.rate) == ("counter", 64 << 20)
    assert parse_workload(str(paced)).rate == 64 << 20  # the spec string round-trips


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("counter:wss=4M", "counter takes only rate"),
        ("counter:rate", "counter takes only rate"),
        ("counter:rate=0", "rate must be positive"),
        ("counter:rate=fast", "counter rate 'fast'"),
        ("idle:rate=1M", "idle takes no parameters"),
    ],
)
def test_bad_counter_specs_are_refused(text, error):
    with pytest.raises(ValueError, match=error):
        parse_workload(text)


@pytest.mark.root
async def test_a_paced_counter_keeps_to_its_rate(guests):
    rate = 1 << 20  # 256 pages of 4 KiB per second
    g = await guests.start(ram_size=4 << 20, workload="counter:rate=1M")
    await trio.sleep(0.05)
    a = await g.stats()
    await trio.sleep(0.5)
    b = await g.stats()
    walked = b["counter"]["pages"] - a["counter"]["pages"]
    elapsed = b["mono"] - a["mono"]  # the guest's own clock, read beside each count
    # The schedule allows at most the rate over the interval, plus one step and the
    # 0.1 s a late walker may catch up; unpaced, this guest walks thousands of pages
    # per millisecond.
    step = max(1, round(rate * COUNTER_SLICE_S / 4096))
    assert 0 < walked <= rate * (elapsed + 0.1) / 4096 + step, (walked, elapsed)
    assert b["spec"] == "counter:rate=1M"
