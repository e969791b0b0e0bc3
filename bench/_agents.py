"""Shared helpers for the migration benches: two real agent processes, guests, timings.

The benches run the deployment shape: a source and a destination ``godwit
agent``, each its own process (so each can have a core of this 2-core
machine), talking mutual TLS over loopback, driven through their control
sockets exactly as an operator's script would.  Every figure comes from the
agents' ``query-migrate`` or from their MIGRATION events, whose timestamps
are the agent's wall clock at the state change (the bench process reads the
same clock, so "fault injected at t, paused at t'" needs no polling
granularity).  Polling is still used where the figure only exists in
``query-migrate`` (expected downtime before switchover).

Cleanup matters on a shared machine: an agent that exits leaves its guests
running by design, so every guest is stopped through the agent first, and
any guest process still alive afterwards is killed by its pid.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents import pki
from agents.client import AgentGone as AgentGone
from agents.client import CommandFailed as CommandFailed
from agents.client import ControlClient, open_client

GIB = 1 << 30
MIB = 1 << 20


# ---------------------------------------------------------------- the machine


def other_guests() -> int:
    """godwit guest processes on this machine that are not ours (noise for every figure)."""
    mine = {os.getpid()}
    n = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"agents.vm.guest_main" in cmd and int(entry.name) not in mine:
            n += 1
    return n


def machine() -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"machine: {os.cpu_count()} cores (nproc), load average {load}, "
        f"kernel {os.uname().release}, Python {sys.version.split()[0]}, "
        f"{other_guests()} godwit guest processes already running (not ours)"
    )


_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far, all its threads (ended ones too)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def machine_cpu() -> dict[str, float]:
    """CPU seconds the whole machine spent per state so far (/proc/stat's cpu line)."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    values = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return {n: int(v) / _TICK for n, v in zip(names, values, strict=False)}


class CpuMeter:
    """Where the CPU went between :meth:`start` and :meth:`stop`: each process's
    user and system seconds, and the machine's idle seconds out of its total."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def start(self) -> None:
        self._procs = {name: process_cpu(pid) for name, pid in self.pids.items()}
        self._machine = machine_cpu()

    def stop(self) -> str:
        parts = []
        for name, pid in self.pids.items():
            (u0, s0), (u1, s1) = self._procs[name], process_cpu(pid)
            parts.append(f"{name} {u1 - u0:.2f}+{s1 - s0:.2f} s")
        now = machine_cpu()
        spent = {k: now[k] - self._machine[k] for k in now}
        total = sum(spent.values())
        return (
            f"CPU (user+system): {', '.join(parts)}; machine idle "
            f"{spent['idle']:.2f} of {total:.2f} CPU-s ({spent['idle'] / total:.0%})"
        )


def header(title: str, started: float) -> None:
    print(title)
    print(machine())
    print(f"(bench process started {time.strftime('%H:%M:%S', time.localtime(started))})")


# ---------------------------------------------------------------- agents


@dataclass
class Agent:
    name: str
    client: ControlClient
    proc: trio.Process
    log: Path
    guest_pids: set[int] = field(default_factory=set)

    async def q(self, guest: str) -> dict[str, Any]:
        return dict(await self.client.execute("query-migrate", {"guest": guest}))

    def log_tail(self, n: int = 1500) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@asynccontextmanager
async def agent_process(
    workdir: Path, name: str, *, listen: bool, extra: Iterable[str] = ()
) -> AsyncIterator[Agent]:
    """``godwit agent`` as a child process (agents/demo.py's pattern), with its pid and log."""
    sock = workdir / f"{name}.sock"
    cmd = [sys.executable, "-m", "agents.cli", "agent", "--name", name]
    cmd += ["--pki", str(workdir / "pki"), "--control", str(sock), "--log-level", "warning"]
    if listen:
        cmd += ["--listen", "127.0.0.1:0"]
    cmd += list(extra)
    log_path = workdir / f"{name}.log"
    log = log_path.open("wb")
    proc = await trio.lowlevel.open_process(cmd, stdout=log, stderr=subprocess.STDOUT)
    agent: Agent | None = None
    try:
        with trio.fail_after(30):
            while not sock.exists():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"agent {name} exited at start: {log_path.read_text()[-2000:]}"
                    )
                await trio.sleep(0.05)
        async with await _connect_retrying(sock, proc, log_path) as client:
            agent = Agent(name, client, proc, log_path)
            try:
                yield agent
            finally:
                with trio.CancelScope(shield=True):
                    await stop_guests(agent)
    finally:
        with trio.CancelScope(shield=True):
            proc.terminate()
            with trio.move_on_after(20):
                await proc.wait()
            if proc.poll() is None:
                proc.kill()
                await proc.wait()
            log.close()
            if agent is not None:
                for pid in agent.guest_pids:  # only guests this bench started
                    try:
                        os.kill(pid, 9)
                    except ProcessLookupError:
                        pass


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


async def _connect_retrying(sock: Path, proc: trio.Process, log_path: Path) -> Any:
    """The socket file appears at bind(), a moment before listen(): retry a refusal."""
    for _ in range(100):
        try:
            with trio.fail_after(2):
                stream = await trio.open_unix_socket(str(sock))
            await stream.aclose()
            return open_client(sock)
        except (OSError, trio.TooSlowError):
            if proc.poll() is not None:
                raise RuntimeError(f"agent exited at start: {_tail(log_path)}") from None
            await trio.sleep(0.05)
    return open_client(sock)


async def stop_guests(agent: Agent) -> None:
    """Stop every guest the agent hosts; a migrating one is cancelled first if it can be."""
    try:
        with trio.move_on_after(30):
            guests = await agent.client.execute("query-guests")
            for g in guests:
                if g.get("pid"):
                    agent.guest_pids.add(int(g["pid"]))
                for attempt in range(2):
                    try:
                        await agent.client.execute("guest-stop", {"guest": g["name"]}, timeout=20)
                        break
                    except CommandFailed:
                        if attempt == 0:
                            try:
                                await agent.client.execute("migrate-cancel", {"guest": g["name"]})
                            except CommandFailed:
                                pass
                            await trio.sleep(0.5)
    except (AgentGone, trio.TooSlowError):
        pass


def make_pki(workdir: Path) -> None:
    d = workdir / "pki"
    pki.init_ca(d)
    for name in ("source", "destination"):
        pki.issue_cert(d, name, dns=["localhost"], ips=["127.0.0.1"])


@dataclass
class Pair:
    src: Agent
    dst: Agent
    port: int  # the destination's migration listener
    workdir: Path
    back_port: int = 0  # the source's, with both_listen

    def uri_to(self, agent: Agent) -> str:
        return f"tls:127.0.0.1:{self.port if agent is self.dst else self.back_port}"

    @property
    def uri(self) -> str:
        return f"tls:127.0.0.1:{self.port}"


@asynccontextmanager
async def agent_pair(
    prefix: str, *, both_listen: bool = False, extra: Iterable[str] = ()
) -> AsyncIterator[Pair]:
    """A fresh PKI and two agents (source, destination) in a temporary directory.

    ``both_listen``: the source listens too, so a guest can be migrated back
    (a second measurement without paying for a second fill).  ``extra``:
    more ``godwit agent`` flags for both."""
    workdir = Path(tempfile.mkdtemp(prefix=f"godwit-{prefix}-"))
    ok = False
    try:
        make_pki(workdir)
        async with (
            agent_process(workdir, "source", listen=both_listen, extra=extra) as src,
            agent_process(workdir, "destination", listen=True, extra=extra) as dst,
        ):
            port = (await dst.client.execute("migrate-incoming", {"uri": "defer"}))["port"]
            back = 0
            if both_listen:
                back = (await src.client.execute("migrate-incoming", {"uri": "defer"}))["port"]
            pair = Pair(src, dst, int(port), workdir, int(back))
            try:
                yield pair
                ok = True
            finally:
                if not ok:
                    for a in (src, dst):
                        print(f"--- {a.name} agent log (tail) ---\n{a.log_tail()}", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def huge_tmpfs(size: int) -> Iterator[tuple[Path | None, str]]:
    """A private tmpfs mounted with huge=within_size for ``--ram-path`` (needs root):
    (directory, "") or (None, why not)."""
    if os.geteuid() != 0:
        yield None, "not root: cannot mount a tmpfs"
        return
    d = Path(tempfile.mkdtemp(prefix="godwit-bench-ram-"))
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"huge=within_size,size={size},mode=0700", "tmpfs", d],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            yield None, f"mount failed: {done.stderr.strip()}"
            return
        try:
            yield d, ""
        finally:
            subprocess.run(["umount", d], check=False)
    finally:
        d.rmdir()


# ---------------------------------------------------------------- guests and migrations


async def start_guest(
    agent: Agent, name: str, memory: int, workload: str, fill: str
) -> tuple[dict[str, Any], float]:
    """Start a guest; returns its info and the seconds the start (fill included) took."""
    t0 = time.monotonic()
    info = await agent.client.execute(
        "guest-start",
        {"name": name, "memory": str(memory), "workload": workload, "fill": fill},
        timeout=300,
    )
    for g in await agent.client.execute("query-guests"):
        if g.get("name") == name and g.get("pid"):
            agent.guest_pids.add(int(g["pid"]))
    return dict(info), time.monotonic() - t0


async def configure(
    agent: Agent, guest: str, caps: dict[str, bool] | None = None, **params: int
) -> None:
    if caps:
        await agent.client.execute(
            "migrate-set-capabilities",
            {
                "guest": guest,
                "capabilities": [{"capability": k, "state": v} for k, v in caps.items()],
            },
        )
    if params:
        args: dict[str, Any] = {"guest": guest}
        args.update({k.replace("_", "-"): v for k, v in params.items()})
        await agent.client.execute("migrate-set-parameters", args)


async def wait_status(
    agent: Agent, guest: str, wanted: Iterable[str], *, timeout: float, poll: float = 0.005
) -> tuple[dict[str, Any], float]:
    """Poll query-migrate until a wanted status; returns the info and time.time() when seen."""
    want = set(wanted)
    with trio.fail_after(timeout):
        while True:
            info = await agent.q(guest)
            if info.get("status") in want:
                return info, time.time()
            if info.get("status") == "failed" and "failed" not in want:
                raise RuntimeError(
                    f"{agent.name}: migration of {guest} failed: {info.get('error-desc')}"
                )
            await trio.sleep(poll)


async def event_time(agent: Agent, guest: str, status: str, *, since: int, timeout: float) -> float:
    """Wall-clock timestamp (the agent's) of the MIGRATION event for ``status``."""
    ev = await agent.client.wait_event(
        "MIGRATION",
        lambda e: e.data.get("guest") == guest and e.data.get("status") == status,
        since=since,
        timeout=timeout,
    )
    return ev.timestamp


def mark(agent: Agent) -> int:
    """Index for ``event_time(since=...)``: only events after this point count."""
    return len(agent.client.events)


# ---------------------------------------------------------------- figures


def bucket_percentile(dist: list[int], q: float) -> tuple[int, int] | None:
    """The power-of-two µs bucket [2^i, 2^(i+1)) holding the q-th percentile (q in 0..100)."""
    total = sum(dist)
    if total == 0:
        return None
    need = q / 100 * total
    seen = 0
    for i, n in enumerate(dist):
        seen += n
        if n and seen >= need:
            return 1 << i, 1 << (i + 1)
    return None


def bucket_max(dist: list[int]) -> tuple[int, int] | None:
    top = [i for i, n in enumerate(dist) if n]
    return (1 << top[-1], 1 << (top[-1] + 1)) if top else None


def fmt_bucket(b: tuple[int, int] | None) -> str:
    if b is None:
        return "n/a"
    return f"[{_us(b[0])}, {_us(b[1])})"


def _us(v: float) -> str:
    return f"{v / 1000:g} ms" if v >= 1000 else f"{v:g} µs"


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "  n/a"
    return f"x{a / b:.2f}"


def gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")
