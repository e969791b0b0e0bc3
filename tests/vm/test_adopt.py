"""A guest outlives its agent: when the agent goes, the guest keeps counting (or stays
stopped), waits on a 0600 socket, and a new agent adopts it with its memory intact.
One agent at a time, our uid only; without a state dir a guest still exits on EOF."""

import ctypes
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import trio

from agents.vm.errors import GuestAttached, GuestCommandError, GuestGone
from agents.vm.guest import Guest, GuestSpec, find_orphans
from agents.vm.verify import counter_check

pytestmark = pytest.mark.root
PR_SET_CHILD_SUBREAPER = 36


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


def proc_state(pid: int) -> str | None:
    """'R', 'S', 'Z'... or None when the pid is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return text[text.rindex(")") + 2]


def reap_as_parent(pid: int) -> int:
    """We are the guest's parent in these tests (its agent "died" inside this process, or
    we are the subreaper): reap it as init would, and return its exit code."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


async def wait_for(cond, timeout=10.0):
    with trio.fail_after(timeout):
        while not await cond():
            await trio.sleep(0.02)


async def orphaned(state_dir: Path, name: str):
    async def cond():
        return any(r.name == name for r in find_orphans(state_dir))

    await wait_for(cond)
    return next(r for r in find_orphans(state_dir) if r.name == name)


async def pages(g: Guest) -> int:
    return (await g.stats())["counter"]["pages"]


async def advances(g: Guest) -> None:
    start = await pages(g)

    async def cond():
        return await pages(g) > start

    await wait_for(cond)


@pytest.fixture
def state_dir(tmp_path):
    d = tmp_path / "state"
    yield d
    # A failed test may leave guests waiting for an agent that never comes: end them.
    for rec in find_orphans(d, include_attached=True):
        os.kill(rec.pid, signal.SIGKILL)
        try:
            os.waitpid(rec.pid, 0)
        except ChildProcessError:
            pass  # not ours (reparented): init reaps it


async def test_guest_outlives_its_agent_and_is_adopted(state_dir):
    before = memfd_fds()
    g = await Guest.start(
        GuestSpec(name="web1", ram_size=4 << 20, workload="counter", fill="random"),
        state_dir=state_dir,
    )
    pid = g.pid
    sock_path = state_dir / "guests" / "web1.sock"
    record_path = state_dir / "guests" / "web1.json"
    st = os.stat(sock_path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    assert stat.S_IMODE(os.stat(state_dir / "guests").st_mode) == 0o700
    assert os.getsid(pid) == pid  # its own session: ^C to the agent's group misses it
    await advances(g)

    # The agent dies: its control socket closes and its handle is dropped, no quit.
    g.detach()
    del g
    assert memfd_fds() == before  # this "agent" let go of the RAM; the guest still holds it

    rec = await orphaned(state_dir, "web1")
    assert (rec.pid, rec.socket, rec.record) == (pid, sock_path, record_path)
    assert rec.blocks == [("ram", 4 << 20, 4096)] and rec.spec["workload"] == "counter"
    assert rec.attached_pid is None
    assert proc_state(pid) in ("R", "S")  # alive, not a zombie

    a = await Guest.adopt(rec.socket)
    assert (a.pid, a.adopted, a.state, a.spec.name) == (pid, True, "running", "web1")
    assert [(b.name, b.size) for b in a.blocks] == [("ram", 4 << 20)]
    await advances(a)  # it kept counting, and still does
    assert json.loads(record_path.read_text())["attached_pid"] == os.getpid()

    with pytest.raises(GuestAttached, match=rf"pid {pid} is attached to agent pid {os.getpid()}"):
        await Guest.adopt(rec.socket)
    assert find_orphans(state_dir) == []  # attached to a live agent: not an orphan

    await a.stop()
    state = (await a.stats())["counter"]
    res = counter_check(a.blocks[0], state)  # through our mapping of the adopted memfd
    assert res, res.explanation
    assert state["pages"] > 1024  # it walked the whole block at least once
    await trio.sleep(0.1)
    assert (await a.stats())["counter"] == state

    exit = await a.quit()
    assert exit.clean and exit.reason == "quit", exit
    assert proc_state(pid) == "Z"  # ended, and the adopter did not reap what is not its child
    assert reap_as_parent(pid) == 0
    assert proc_state(pid) is None
    assert not sock_path.exists() and not record_path.exists()
    assert memfd_fds() == before
    assert "memfd:godwit" not in own_maps()


async def test_a_stopped_guest_stays_stopped_when_its_agent_dies(state_dir):
    g = await Guest.start(
        GuestSpec(name="paused", ram_size=2 << 20, workload="counter"), state_dir=state_dir
    )
    pid = g.pid
    await advances(g)
    await g.stop()  # as for switchover, mid-migration
    frozen = (await g.stats())["counter"]
    g.detach()

    rec = await orphaned(state_dir, "paused")
    await trio.sleep(0.1)
    a = await Guest.adopt(rec.socket)
    try:
        assert a.state == "stopped"
        assert (await a.stats())["counter"] == frozen  # nothing ran while nobody watched
        assert counter_check(a.blocks[0], frozen)
        await a.cont()  # the adopting agent decides
        await advances(a)
    finally:
        await a.quit()
        reap_as_parent(pid)


async def test_orphan_listing_drops_dead_guests(state_dir):
    a = await Guest.start(GuestSpec(name="a", ram_size=1 << 20), state_dir=state_dir)
    b = await Guest.start(GuestSpec(name="b", ram_size=1 << 20), state_dir=state_dir)
    c = await Guest.start(GuestSpec(name="c", ram_size=1 << 20), state_dir=state_dir)
    try:
        pids = {"a": a.pid, "b": b.pid}
        a.detach()
        b.detach()
        await orphaned(state_dir, "a")
        await orphaned(state_dir, "b")
        assert [r.name for r in find_orphans(state_dir)] == ["a", "b"]  # c has its agent
        assert [r.name for r in find_orphans(state_dir, include_attached=True)] == ["a", "b", "c"]

        os.kill(pids["a"], signal.SIGKILL)  # killed outright: no chance to remove its files
        assert reap_as_parent(pids["a"]) == -signal.SIGKILL
        assert (state_dir / "guests" / "a.sock").exists()
        assert [r.name for r in find_orphans(state_dir)] == ["b"]
        assert not (state_dir / "guests" / "a.sock").exists()
        assert not (state_dir / "guests" / "a.json").exists()
        with pytest.raises(GuestGone, match=r"no guest listens at .*a\.sock"):
            await Guest.adopt(state_dir / "guests" / "a.sock")

        # A live guest's name is taken; a dead one's is free again.
        with pytest.raises(GuestCommandError, match=rf"'b' already runs as pid {pids['b']}"):
            await Guest.start(GuestSpec(name="b", ram_size=1 << 20), state_dir=state_dir)
        a2 = await Guest.start(GuestSpec(name="a", ram_size=1 << 20), state_dir=state_dir)
        await a2.quit()

        adopted = await Guest.adopt(find_orphans(state_dir)[0].socket)
        exit = await adopted.quit()
        assert exit.clean
        reap_as_parent(pids["b"])
    finally:
        await c.quit()
    assert find_orphans(state_dir, include_attached=True) == []
    assert sorted(p.name for p in (state_dir / "guests").iterdir()) == []


async def test_the_agent_that_started_it_keeps_it(state_dir):
    g = await Guest.start(GuestSpec(name="held", ram_size=1 << 20), state_dir=state_dir)
    try:
        with pytest.raises(GuestAttached, match="one agent at a time"):
            await Guest.adopt(state_dir / "guests" / "held.sock")
        await g.ping()  # the refused attempt did not disturb the agent in charge
    finally:
        await g.quit()


def connect_as(uid: int, sock_path: Path) -> str:
    """First message a process of ``uid`` gets from the adoption socket (forked child).

    The child enters the socket's directory as root before dropping to ``uid``,
    so only the socket's own mode (opened up by the test) and the guest's
    SO_PEERCRED check stand between it and the guest.
    """
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.chdir(sock_path.parent)
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(sock_path.name)
            os.write(w, s.recv(65536))
        except BaseException as e:
            os.write(w, f"child failed: {e!r}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(child, 0)
    return out


async def test_only_our_uid_may_adopt(state_dir):
    g = await Guest.start(GuestSpec(name="private", ram_size=1 << 20), state_dir=state_dir)
    pid = g.pid
    g.detach()
    rec = await orphaned(state_dir, "private")
    # Let uid 65534 reach the socket: the guest's SO_PEERCRED check must still refuse.
    os.chmod(rec.socket, 0o666)
    os.chmod(rec.socket.parent, 0o711)
    out = await trio.to_thread.run_sync(connect_as, 65534, rec.socket)
    reply = json.loads(out)
    assert reply["event"] == "refused", out
    assert "refusing adoption by uid 65534" in reply["reason"]
    with pytest.raises(GuestCommandError, match="mode 0666, expected uid 0 mode 0600"):
        await Guest.adopt(rec.socket)  # nor do we trust a socket others could reach
    os.chmod(rec.socket, 0o600)
    a = await Guest.adopt(rec.socket)  # still waiting for us
    await a.quit()
    reap_as_parent(pid)


async def test_without_a_state_dir_the_guest_exits_when_its_agent_goes():
    g = await Guest.start(GuestSpec(ram_size=1 << 20, workload="counter"))
    proc = g.process
    assert proc is not None
    g.detach()
    with trio.fail_after(10):
        assert await proc.wait() == 0


AGENT = textwrap.dedent(
    """
    import sys, trio
    from agents.vm.guest import Guest, GuestSpec

    async def main():
        spec = GuestSpec(name="survivor", ram_size=2 << 20, workload="counter")
        g = await Guest.start(spec, state_dir=sys.argv[1])
        print(g.pid, flush=True)
        await trio.sleep_forever()

    trio.run(main)
    """
)


async def test_guest_survives_sigkill_of_its_agent_process(state_dir):
    """The real thing: the agent is a process, and it is SIGKILLed."""
    libc = ctypes.CDLL(None, use_errno=True)
    # Become the subreaper, so the orphaned guest is reparented to us and we can
    # reap it at the end (init does that on a host; here it may not).
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        agent = await trio.lowlevel.open_process(
            [sys.executable, "-c", AGENT, str(state_dir)], stdout=subprocess.PIPE
        )
        assert agent.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                line += await agent.stdout.receive_some()
        pid = int(line)
        agent.kill()
        await agent.wait()
        await agent.stdout.aclose()
        rec = await orphaned(state_dir, "survivor")
        assert rec.pid == pid
        a = await Guest.adopt(rec.socket)
        try:
            await advances(a)
            await a.stop()
            assert counter_check(a.blocks[0], (await a.stats())["counter"])
        finally:
            exit = await a.quit()
        assert exit.clean and exit.reason == "quit"
        assert reap_as_parent(pid) == 0
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    assert find_orphans(state_dir, include_attached=True) == []


async def test_postcopy_guest_is_adopted_mid_fault(state_dir):
    """The agent dies while a vCPU sleeps on a missing page: the new agent gets the uffd
    with the RAM and serves the fault; the dirty log of the dead migration is gone."""
    g = await Guest.start_incoming(
        GuestSpec(name="pc", ram_size=1 << 20, workload="stress:rate=4M,mode=read"),
        postcopy=True,
        state_dir=state_dir,
    )
    pid = g.pid
    await g.cont()
    with trio.fail_after(10):
        await trio.lowlevel.wait_readable(g.placer().fileno())
    g.detach()  # our copy of the uffd goes with it; the guest keeps its own

    a = await Guest.adopt((await orphaned(state_dir, "pc")).socket)
    try:
        assert a.uffd is not None and a.state == "running"
        st = await a.stats()
        assert st["postcopy"] and st["stress"]["bursts"] == 0  # still asleep on that page
        placer = a.placer()
        with trio.fail_after(10):
            while (await a.stats())["stress"]["bursts"] == 0:
                await trio.lowlevel.wait_readable(placer.fileno())
                for b, p in np.unique(placer.read_faults(), axis=0).tolist():
                    placer.zeropage(b, p, 1)
        assert placer.placed >= 1
    finally:
        await a.quit()
    reap_as_parent(pid)


async def test_the_dirty_log_ends_with_its_agent(state_dir):
    g = await Guest.start(
        GuestSpec(name="dl", ram_size=1 << 20, workload="counter"), state_dir=state_dir
    )
    pid = g.pid
    await g.start_dirty_log()
    assert (await g.stats())["dirty_log"]
    g.detach()
    a = await Guest.adopt((await orphaned(state_dir, "dl")).socket)
    try:
        assert not (await a.stats())["dirty_log"]  # a new migration starts a new one
        log = await a.start_dirty_log()
        await advances(a)
        assert sum(len(v) for v in (await log.get_and_clear_async()).values()) > 0
    finally:
        await a.quit()
    reap_as_parent(pid)
