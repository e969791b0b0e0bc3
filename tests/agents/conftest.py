"""Fixtures for agent tests: a PKI made once, and pairs of real agents on loopback.

Agents run in the test's trio nursery (same process, real TLS, real guest
processes); ``tests/agents/test_demo.py`` covers agents as separate processes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from agents import pki
from agents.client import ControlClient, open_client
from agents.daemon import Agent, AgentConfig


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    pki.init_ca(d)
    for name in ("source", "destination", "third"):
        pki.issue_cert(d, name, dns=["localhost"], ips=["127.0.0.1"])
    return d


@pytest.fixture(scope="session")
def rogue_pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another CA, with a host certificate that carries the right names."""
    d = tmp_path_factory.mktemp("rogue")
    pki.init_ca(d, common_name="rogue CA")
    pki.issue_cert(d, "source", dns=["localhost"], ips=["127.0.0.1"])
    return d


@dataclass
class RunningAgent:
    agent: Agent
    client: ControlClient
    socket: Path
    scope: trio.CancelScope

    @property
    def uri(self) -> str:
        return f"tls:127.0.0.1:{self.agent.listen_port}"

    async def stop(self) -> None:
        """Stop the agent abruptly (its connections break), as a crash or kill would."""
        self.scope.cancel()


@asynccontextmanager
async def running_agent(
    tmp: Path,
    pki_dir: Path,
    name: str,
    *,
    listen: bool = True,
    ram_path: Path | None = None,
    pm_qos: bool = True,
    preempt_cpus: frozenset[int] | None = None,
    incoming_prealloc: int = 0,
) -> AsyncIterator[RunningAgent]:
    sock = tmp / f"{name}.sock"
    config = AgentConfig(
        name=name,
        control=sock,
        pki=pki_dir,
        listen="127.0.0.1:0" if listen else None,
        ram_path=ram_path,
        pm_qos=pm_qos,
        preempt_cpus=preempt_cpus,
        incoming_prealloc=incoming_prealloc,
    )
    agent = Agent(config)
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await agent.run(task_status=task_status)

        await nursery.start(run)
        try:
            async with open_client(sock) as client:
                yield RunningAgent(agent, client, sock, scope)
        finally:
            with trio.CancelScope(shield=True):
                for entry in list(agent.guests.values()):
                    if entry.guest is not None:
                        await entry.guest.quit()
            nursery.cancel_scope.cancel()


@pytest.fixture
def short_tmp() -> AsyncIterator[Path]:
    """Unix socket paths must be short (108 bytes): pytest's tmp_path can be too long."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="gw-"))
    yield d  # type: ignore[misc]
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def pair(short_tmp: Path, pki_dir: Path) -> AsyncIterator[tuple[RunningAgent, RunningAgent]]:
    async with (
        running_agent(short_tmp, pki_dir, "source", listen=False) as src,
        running_agent(short_tmp, pki_dir, "destination") as dst,
    ):
        yield src, dst


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (userfaultfd on shmem, PAGEMAP_SCAN of another process)")


async def set_caps(client, **caps):
    await client.execute(
        "migrate-set-capabilities",
        {"guest": "vm1", "capabilities": [{"capability": k, "state": v} for k, v in caps.items()]},
    )


async def start_postcopy_migration(
    src, dst, *, memory="64M", workload="counter", preempt=False, hugetlb=False, **caps
):
    """guest-start vm1 on ``src``, a slow precopy to ``dst``, then the switch to postcopy."""
    args = {"name": "vm1", "memory": memory, "workload": workload, "fill": "mixed:60%"}
    if hugetlb:
        args["hugetlb"] = True
    await src.client.execute("guest-start", args)
    await set_caps(src.client, **{"postcopy-ram": True, "postcopy-preempt": preempt, **caps})
    # Slow precopy so that postcopy has most of the work to do.
    await src.client.execute("migrate-set-parameters", {"guest": "vm1", "max-bandwidth": 8 << 20})
    await src.client.execute("migrate", {"guest": "vm1", "uri": dst.uri})
    await src.client.wait_status("vm1", {"active"}, timeout=30, poll=0.02)
    await trio.sleep(0.3)
    await src.client.execute("migrate-start-postcopy", {"guest": "vm1"})


@contextmanager
def huge_tmpfs(d: Path) -> Iterator[Path]:
    d.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount(8) here: apt-get install mount")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "huge=within_size,size=512M,mode=0700", "tmpfs", d],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", d], check=False)
