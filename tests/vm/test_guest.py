"""A guest is its own process: it stops at a safe point and stays stopped, resumes,
slows down when throttled, says why it died, and leaves nothing behind after quit."""

import os
import signal
from pathlib import Path

import pytest
import trio

from agents.vm.errors import GuestCommandError
from agents.vm.guest import Guest, GuestSpec

pytestmark = pytest.mark.root
PS = 4096


def memfd_fds() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "memfd:" in target:
            out.append(target)
    return out


def own_maps() -> str:
    return Path("/proc/self/maps").read_text()


def leftovers(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return Path(f"/proc/{pid}").exists()
    return True


async def wait_for(cond, what, timeout=10.0):
    with trio.fail_after(timeout):
        while not await cond():
            await trio.sleep(0.02)


async def counter_pages(g: Guest) -> int:
    return (await g.stats())["counter"]["pages"]


async def test_counter_stops_and_continues(guests):
    g = await guests.start(ram_size=4 << 20, workload="counter", fill="random")
    await wait_for(lambda: _gt(counter_pages(g), 0), "counter running")
    await g.stop()
    assert g.state == "stopped"
    before = await g.stats()
    ram = g.blocks[0].array[::PS].copy()
    await trio.sleep(0.2)
    after = await g.stats()
    assert after["counter"] == before["counter"]
    assert (g.blocks[0].array[::PS] == ram).all()
    assert after["guest_ns"] == before["guest_ns"]  # the guest clock is frozen too
    await g.cont()
    await wait_for(lambda: _gt(counter_pages(g), before["counter"]["pages"]), "counter resumed")
    assert (await g.stats())["guest_ns"] > before["guest_ns"]


async def _gt(coro, value):
    return (await coro) > value


async def rate(g: Guest, seconds: float) -> float:
    a = await counter_pages(g)
    t0 = trio.current_time()
    await trio.sleep(seconds)
    b = await counter_pages(g)
    return (b - a) / (trio.current_time() - t0)


async def test_throttle_slows_the_counter(guests):
    g = await guests.start(ram_size=4 << 20, workload="counter")
    await trio.sleep(0.1)
    free = await rate(g, 0.3)
    await g.throttle(90)
    await trio.sleep(0.05)
    slow = await rate(g, 0.3)
    assert (await g.stats())["throttle"] == 90
    assert slow < free * 0.5, (slow, free)
    await g.throttle(0)
    with pytest.raises(GuestCommandError, match=r"must be 0\.\.99"):
        await g.throttle(100)


async def test_quit_leaves_nothing(guests):
    before = memfd_fds()
    g = await guests.start(
        ram_size=[("a", 1 << 20), ("b", 2 << 20)], workload="counter", fill="mixed:50%"
    )
    assert len(memfd_fds()) > len(before)
    pid = g.pid
    exit = await g.quit()
    assert exit.clean and exit.reason == "quit"
    assert not leftovers(pid)  # reaped: not even a zombie
    assert memfd_fds() == before
    assert "memfd:godwit" not in own_maps()
    await g.quit()  # idempotent


async def test_exit_reason_is_reported(guests):
    g = await guests.start(ram_size=1 << 20, workload="idle")
    os.kill(g.pid, signal.SIGKILL)
    exit = await g.wait()
    assert exit.returncode == -signal.SIGKILL
    assert exit.reason == "killed by SIGKILL"


async def test_bad_spec_is_refused_before_spawning():
    with pytest.raises(ValueError, match="unknown kind 'spin'"):
        await Guest.start(GuestSpec(workload="spin"))
    with pytest.raises(ValueError, match="mixed:P%"):
        await Guest.start(GuestSpec(fill="mixed:150%"))


async def test_stress_reports_latency(guests):
    g = await guests.start(
        ram_size=8 << 20, workload="stress:rate=64M,wss=4M,mode=rw", fill="random"
    )
    await trio.sleep(0.3)
    full = await g.stats()
    st = full["stress"]
    assert st["bursts"] > 0 and st["reads"] > 0 and st["writes"] > 0
    assert 0 < st["p50_us"] <= st["p99_us"] <= st["max_us"]
    assert full["last_heartbeat"]["beat"] >= 1  # heartbeats flow while nobody asks
