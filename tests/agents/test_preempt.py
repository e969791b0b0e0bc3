"""The preempt workers (agents/preempt.py, agents/preempt_worker.py): their process, control
socket and link checks.

Migrations through them are in test_postcopy_migration.py and test_recovery.py
(every preempt case there runs the workers)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from conftest import running_agent, start_postcopy_migration

from agents.preempt import PreemptWorker
from agents.preempt_worker import GO, Connection
from agents.sched import format_cpu_list
from agents.vm import ctl
from protocol.errors import ProtocolError
from protocol.messages import Error, Pages, Ping
from protocol.preempt import PAGES, REQ_PAGES, ZERO, request_frame, zero_frame


def _memfd(size: int) -> int:
    fd = os.memfd_create("test-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


async def test_a_worker_starts_says_ready_and_is_reaped_when_its_owner_is_cancelled() -> None:
    fd = _memfd(1 << 20)
    worker = PreemptWorker("source", "test/preempt", lambda msg: None, {})
    setup = {"identity": None, "blocks": [{"name": "ram0", "size": 1 << 20, "page_size": 4096}]}
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run, setup, [fd])
            assert worker.process is not None and worker.process.returncode is None
            nursery.cancel_scope.cancel()
    finally:
        os.close(fd)
    assert worker.process.returncode is not None


async def test_stop_sends_the_last_statistics_and_ends_run() -> None:
    fd = _memfd(1 << 20)
    seen: list[dict] = []
    worker = PreemptWorker("source", "test/preempt", seen.append, {})
    setup = {"identity": None, "blocks": [{"name": "ram0", "size": 1 << 20, "page_size": 4096}]}
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run, setup, [fd])
            await worker.stop()
            assert worker.stopped.is_set()
    finally:
        os.close(fd)
    assert worker.process is not None and worker.process.returncode == 0


def test_a_worker_exits_by_itself_when_its_agent_hangs_up() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = _memfd(1 << 20)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agents.preempt_worker", str(theirs.fileno())],
        pass_fds=[theirs.fileno()],
    )
    theirs.close()
    try:
        setup = {
            "role": "source",
            "identity": None,
            "blocks": [{"name": "ram0", "size": 1 << 20, "page_size": 4096}],
        }
        socket.send_fds(ours, [ctl.encode({"op": "setup", **setup})], [fd])
        ours.settimeout(30)
        assert ctl.decode(ours.recv(1 << 16))["op"] == "ready"
        ours.close()  # the agent is gone
        assert proc.wait(timeout=10) == 0
    finally:
        os.close(fd)
        if proc.poll() is None:
            proc.kill()


@pytest.fixture
def link() -> Iterator[tuple[int, socket.socket]]:
    """A connected pair: an fd for Connection.open to own, and the peer's end."""
    ours, peer = socket.socketpair()
    with ours, peer:
        yield os.dup(ours.fileno()), peer


@pytest.mark.parametrize(
    ("role", "early"), [("source", b"GX"), ("source", b"X"), ("destination", GO)]
)
def test_stray_bytes_at_handover_are_refused(link, role: str, early: bytes) -> None:
    fd, _peer = link
    with pytest.raises(ProtocolError, match="stray bytes"):
        Connection.open(fd, role, None, None, early)


def test_the_source_end_takes_the_go_ahead_and_nothing_more(link) -> None:
    fd, peer = link
    peer.sendall(GO + b"payload")
    conn = Connection.open(fd, "source", None, None, b"")
    assert conn.sock.recv(7) == b"payload"
    conn.close()


def test_anything_but_the_go_ahead_is_refused(link) -> None:
    fd, peer = link
    peer.sendall(b"X")
    with pytest.raises(ProtocolError, match="no go-ahead"):
        Connection.open(fd, "source", None, None, b"")


@contextlib.contextmanager
def _connections(page_size: int) -> Iterator[tuple[Connection, Connection]]:
    """Two worker connections joined by a socket pair: (destination end, source end)."""
    a, b = socket.socketpair()
    dst, src = Connection(a, page_size), Connection(b, page_size)
    try:
        yield dst, src
    finally:
        dst.close()
        src.close()


def _receive_all(conn: Connection, n: int) -> list[tuple]:
    out: list[tuple] = []
    while len(out) < n:
        for kind, block, first, count, number, data in conn.receive():
            out.append((kind, block, first, count, number, bytes(data) if kind == PAGES else data))
    return out


@pytest.mark.parametrize("page_size", [4096, 2 << 20], ids=["4k", "2M"])
def test_requests_and_pages_cross_a_link_whole(page_size: int) -> None:
    with _connections(page_size) as (dst, src):
        page = os.urandom(page_size)
        dst.send(request_frame(1, 7, 1, 42, 123))
        assert _receive_all(src, 1) == [(REQ_PAGES, 1, 7, 1, 42, 123)]
        sent: list[int] = []

        def serve() -> None:  # a 2 MiB page is more than the socket buffers hold
            sent.append(src.send_pages(1, 7, 1, 42, memoryview(page)))
            src.send(zero_frame(1, 8, 1))

        sender = threading.Thread(target=serve)
        sender.start()
        assert _receive_all(dst, 2) == [(PAGES, 1, 7, 1, 42, page), (ZERO, 1, 8, 1, 0, 0)]
        sender.join()
        assert sent == [len(Pages(1, 7, 1, page, 42).to_bytes())]
        assert src.bytes_sent == dst.bytes_received


@pytest.mark.parametrize(
    ("message", "says"),
    [
        (Error("page-gone", "no such page"), "peer error: no such page"),
        (Ping(1, 2), "unexpected Ping on preempt"),
    ],
    ids=["peer-error", "not-a-preempt-frame"],
)
def test_a_peer_error_or_a_stray_frame_ends_the_link_saying_so(message, says: str) -> None:
    with _connections(4096) as (dst, src):
        src.send(message.to_bytes())
        with pytest.raises(ProtocolError, match=says):
            dst.receive()


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "unpinned"])
async def test_a_worker_runs_on_the_cpus_it_is_given(pinned: bool) -> None:
    fd = _memfd(1 << 20)
    ours = os.sched_getaffinity(0)
    cpus = [max(ours)] if pinned else None
    worker = PreemptWorker("source", "test/preempt", lambda msg: None, {})
    setup = {
        "identity": None,
        "cpus": cpus,
        "blocks": [{"name": "ram0", "size": 1 << 20, "page_size": 4096}],
    }
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run, setup, [fd])
            assert worker.process is not None
            affinity = os.sched_getaffinity(worker.process.pid)
            nursery.cancel_scope.cancel()
    finally:
        os.close(fd)
    assert affinity == (set(cpus) if cpus else ours)
    assert worker.cpus == format_cpu_list(affinity)


async def test_agents_pin_their_workers_to_preempt_cpus(short_tmp: Path, pki_dir: Path) -> None:
    """Both agents' workers, on the CPU the configuration names (the same one: the
    single-host layout docs/deployment.md describes)."""
    cpu = max(os.sched_getaffinity(0))
    async with (
        running_agent(
            short_tmp, pki_dir, "source", listen=False, preempt_cpus=frozenset({cpu})
        ) as src,
        running_agent(short_tmp, pki_dir, "destination", preempt_cpus=frozenset({cpu})) as dst,
    ):
        await start_postcopy_migration(src, dst, memory="64M", preempt=True)
        await src.client.execute(
            "migrate-set-parameters", {"guest": "vm1", "max-postcopy-bandwidth": 8 << 20}
        )
        await src.client.wait_status("vm1", {"postcopy-active"}, timeout=30, poll=0.01)
        pids = []
        for agent in (src, dst):
            migration = agent.agent.guests["vm1"].migration
            worker = getattr(migration, "worker", None)
            assert worker is not None and worker.process is not None
            pids.append(worker.process.pid)
        affinities = [os.sched_getaffinity(pid) for pid in pids]
        await src.client.wait_status("vm1", {"completed"}, timeout=120, poll=0.05)
        await dst.client.wait_status("vm1", {"completed"}, timeout=30, poll=0.05)
        check = await dst.client.execute("guest-verify", {"guest": "vm1", "method": "counter"})
        assert check["verified"], check
    assert affinities == [{cpu}, {cpu}]


def test_the_worker_program_starts_without_trio_numpy_or_cryptography() -> None:
    """A switch to postcopy waits for both workers to start: what the worker imports
    is on that path (trio, numpy and cryptography were ~200 ms of its ~300 ms)."""
    probe = (
        "import sys, agents.preempt_worker as w; "
        "print(sorted(m for m in ('trio', 'numpy', 'cryptography') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"
