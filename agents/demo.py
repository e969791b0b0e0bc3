"""``godwit demo``: the whole story on one machine, for real.

A fresh PKI in a temporary directory, two ``godwit agent`` processes on
loopback (source and destination, mutual TLS), a guest with a workload on
the source, a migration, and a verification of the guest's memory where it
ends up.  Nothing here is simulated: every figure comes from the agents'
``query-migrate``.  Scenarios:

``precopy``     a counter guest moved by precopy; the counter check on the destination
``postcopy``    switched to postcopy right away; faults served over the return path
``preempt``     the same with the postcopy preempt channel
``recovery``    postcopy through a fault proxy that cuts the link; both sides pause,
                the demo recovers (migrate-recover / migrate resume=true), completes
``mapped-ram``  a running guest saved live with multifd to a file, restored lazily
``full``        a 1 GiB stress guest: precopy → postcopy with preempt → a cut
                mid-postcopy → recover → complete → RAM digest checked against the
                source's at switchover (the default; the TUI watches on a terminal)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from . import pki
from .cli import summarize, wait_with_progress
from .client import ControlClient, open_client
from .faults import FaultProxy

SCENARIOS = ("full", "precopy", "postcopy", "preempt", "recovery", "mapped-ram")


@asynccontextmanager
async def agent_process(
    workdir: Path, name: str, *, listen: bool, extra: list[str] | None = None
) -> AsyncIterator[ControlClient]:
    """Run ``godwit agent`` as a child process and yield a control client to it."""
    sock = workdir / f"{name}.sock"
    cmd = [
        sys.executable,
        "-m",
        "agents.cli",
        "agent",
        "--name",
        name,
        "--pki",
        str(workdir / "pki"),
        "--control",
        str(sock),
        "--log-level",
        "warning",
    ]
    if listen:
        cmd += ["--listen", "127.0.0.1:0"]
    cmd += extra or []
    log = (workdir / f"{name}.log").open("wb")
    proc = await trio.lowlevel.open_process(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        with trio.fail_after(20):
            while not sock.exists():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"agent {name} exited: {(workdir / f'{name}.log').read_text()[-2000:]}"
                    )
                await trio.sleep(0.05)
        async with open_client(sock) as client:
            yield client
    finally:
        with trio.CancelScope(shield=True):
            proc.terminate()
            with trio.move_on_after(15):
                await proc.wait()
            if proc.poll() is None:
                proc.kill()
                await proc.wait()
            log.close()


def make_pki(workdir: Path) -> None:
    d = workdir / "pki"
    pki.init_ca(d)
    for name in ("source", "destination"):
        pki.issue_cert(d, name, dns=["localhost"], ips=["127.0.0.1"])


class Demo:
    """One scenario: two agents, a guest, the steps, and the summary they produce."""

    def __init__(
        self,
        args: argparse.Namespace,
        workdir: Path,
        src: ControlClient,
        dst: ControlClient,
        port: int,
    ) -> None:
        self.args = args
        self.workdir = workdir
        self.src = src
        self.dst = dst
        self.port = port
        self.quiet = bool(args.json) or bool(getattr(args, "tui_running", False))
        self.summary: dict[str, Any] = {"scenario": args.scenario}

    @property
    def dst_uri(self) -> str:
        return f"tls:127.0.0.1:{self.port}"

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr)

    async def caps(self, **caps: bool) -> None:
        await self.src.execute(
            "migrate-set-capabilities",
            {
                "guest": "demo",
                "capabilities": [{"capability": k, "state": v} for k, v in caps.items()],
            },
        )

    async def params(self, **params: Any) -> None:
        await self.src.execute(
            "migrate-set-parameters",
            {"guest": "demo", **{k.replace("_", "-"): v for k, v in params.items()}},
        )

    async def start_guest(self, memory: str, workload: str, fill: str = "mixed:70%") -> None:
        info = await self.src.execute(
            "guest-start", {"name": "demo", "memory": memory, "workload": workload, "fill": fill}
        )
        self.say(
            f"guest 'demo' running on the source: {info['memory'] >> 20} MiB, workload {workload}"
        )
        await trio.sleep(0.5)

    async def wait(
        self, client: ControlClient, statuses: set[str], timeout: float = 600
    ) -> dict[str, Any]:
        return await wait_with_progress(
            client, "demo", json_output=self.quiet, timeout=timeout, stop_at=statuses
        )

    def record(self, info: dict[str, Any], started: float) -> None:
        ram = info.get("ram", {})
        elapsed = time.monotonic() - started
        self.summary.update(
            {
                "status": info["status"],
                "total_time_ms": info.get("total-time"),
                "downtime_ms": info.get("downtime"),
                "transferred_bytes": ram.get("transferred"),
                "throughput_MBps": round(ram.get("transferred", 0) / max(elapsed, 1e-6) / 1e6, 1),
                "passes": ram.get("dirty-sync-count"),
            }
        )
        if "error-desc" in info:
            self.summary["error"] = info["error-desc"]

    async def record_postcopy(self) -> None:
        info = await self.dst.execute("query-migrate", {"guest": "demo"})
        src = await self.src.execute("query-migrate", {"guest": "demo"})
        self.summary["postcopy"] = {
            "requests": src.get("ram", {}).get("postcopy-requests"),
            "postcopy_bytes": src.get("ram", {}).get("postcopy-bytes"),
            "blocktime_ms": info.get("postcopy-blocktime"),
            "latency_avg_us": round(info.get("postcopy-latency", 0) / 1000, 1),
            "latency_dist_us": info.get("postcopy-latency-dist"),
            "latency_percentiles_us": info.get("x-postcopy-latency-percentiles"),
            "channels": [c["name"] for c in src.get("channels", [])],
        }
        self.summary["pauses"] = src.get("pauses", 0)
        self.summary["recoveries"] = src.get("recoveries", 0)

    async def verify(self, client: ControlClient, method: str, expect: str | None = None) -> None:
        args: dict[str, Any] = {"guest": "demo", "method": method}
        if expect:
            args["expect"] = expect
        check = await client.execute("guest-verify", args)
        self.summary["verified"] = bool(check["verified"])
        self.summary["verify_method"] = method
        self.summary["verify_detail"] = check.get("detail")
        self.say(
            f"verification ({method}): {'OK' if check['verified'] else 'FAILED'} — {check.get('detail')}"
        )

    # -- scenarios ----------------------------------------------------------------

    async def precopy(self) -> None:
        await self.start_guest(self.args.memory or "256M", self.args.workload or "counter")
        # The counter rewrites all its RAM continuously; auto-converge throttles it
        # if the link cannot keep up — what an admin would turn on.
        await self.caps(**{"auto-converge": True})
        started = time.monotonic()
        await self.src.execute("migrate", {"guest": "demo", "uri": self.dst_uri})
        info = await self.wait(self.src, {"completed", "failed"})
        self.record(info, started)
        if info["status"] == "completed":
            self.say(summarize(info))
            await self.verify(self.dst, "counter")

    async def postcopy(self, *, preempt: bool) -> None:
        await self.start_guest(self.args.memory or "256M", self.args.workload or "counter")
        await self.caps(**{"postcopy-ram": True, "postcopy-preempt": preempt})
        await self.params(max_bandwidth=64 << 20)  # a slow precopy: postcopy has the work to do
        started = time.monotonic()
        await self.src.execute("migrate", {"guest": "demo", "uri": self.dst_uri})
        await self.wait(self.src, {"active", "failed"}, timeout=60)
        await self.src.execute("migrate-start-postcopy", {"guest": "demo"})
        self.say("switched to postcopy: the guest runs on the destination, missing pages fault")
        info = await self.wait(self.src, {"completed", "failed", "postcopy-paused"})
        self.record(info, started)
        await self.record_postcopy()
        if info["status"] == "completed":
            self.say(summarize(info))
            await self.verify(self.dst, "counter")

    async def recovery(self, *, memory: str, workload: str, digest: bool) -> None:
        await self.start_guest(memory, workload)
        await self.caps(
            **{"postcopy-ram": True, "postcopy-preempt": True, "x-switchover-digest": digest}
        )
        await self.params(max_bandwidth=64 << 20, max_postcopy_bandwidth=48 << 20, keepalive_ms=500)
        async with FaultProxy(target_port=self.port) as proxy:
            via = f"tls:127.0.0.1:{proxy.port}"
            self.say(f"migrating through a fault proxy at {via} (it will cut the link)")
            started = time.monotonic()
            await self.src.execute("migrate", {"guest": "demo", "uri": via})
            await self.wait(self.src, {"active", "failed"}, timeout=60)
            await trio.sleep(1.0)
            await self.src.execute("migrate-start-postcopy", {"guest": "demo"})
            await self.wait(self.src, {"postcopy-active", "failed", "completed"}, timeout=60)
            await trio.sleep(1.0)
            cut_at = time.monotonic()
            proxy.cut()
            self.say("link cut mid-postcopy")
            await self.wait(self.src, {"postcopy-paused", "completed", "failed"}, timeout=60)
            await self.wait(self.dst, {"postcopy-paused", "completed", "failed"}, timeout=60)
            self.summary["pause_detected_ms"] = round((time.monotonic() - cut_at) * 1000)
            self.say(
                "both sides paused; recovering: migrate-recover on the destination, resume on the source"
            )
            proxy.heal()
            await self.dst.execute("migrate-recover", {"guest": "demo", "uri": self.dst_uri})
            resumed_at = time.monotonic()
            await self.src.execute("migrate", {"guest": "demo", "uri": via, "resume": True})
            await self.wait(
                self.src, {"postcopy-active", "completed", "postcopy-paused"}, timeout=60
            )
            self.summary["resume_to_active_ms"] = round((time.monotonic() - resumed_at) * 1000)
            await self.params(max_postcopy_bandwidth=0)
            info = await self.wait(self.src, {"completed", "failed"})
        self.record(info, started)
        await self.record_postcopy()
        if info["status"] == "completed":
            self.say(summarize(info))
            if digest:
                await self.verify(self.dst, "digest", info.get("switchover-digest"))
            else:
                await self.verify(self.dst, "counter")

    async def mapped_ram(self) -> None:
        await self.start_guest(self.args.memory or "256M", self.args.workload or "counter")
        path = self.workdir / "demo.gwmr"
        await self.caps(**{"mapped-ram": True, "multifd": True})
        await self.params(multifd_channels=2)
        started = time.monotonic()
        self.say(f"saving the running guest live with 2 writers to {path}")
        await self.src.execute("migrate", {"guest": "demo", "uri": f"file:{path}"})
        info = await self.wait(self.src, {"completed", "failed"})
        self.record(info, started)
        if info["status"] != "completed":
            return
        self.summary["file_bytes"] = path.stat().st_size
        await self.src.execute("guest-stop", {"guest": "demo"})
        restored_at = time.monotonic()
        await self.dst.execute(
            "migrate-incoming", {"uri": f"file:{path}", "guest": "demo", "lazy": True}
        )
        restore = await self.wait(self.dst, {"completed", "failed"})
        self.summary["restore_ms"] = round((time.monotonic() - restored_at) * 1000)
        self.summary["restore_status"] = restore["status"]
        if restore["status"] == "completed":
            self.say(f"restored lazily on the destination in {self.summary['restore_ms']} ms")
            await self.verify(self.dst, "counter")

    async def run(self) -> dict[str, Any]:
        self.summary.update({"verified": False, "verify_method": None})
        scenario = self.args.scenario
        if scenario == "precopy":
            await self.precopy()
        elif scenario in ("postcopy", "preempt"):
            await self.postcopy(preempt=scenario == "preempt")
        elif scenario == "recovery":
            await self.recovery(
                memory=self.args.memory or "256M",
                workload=self.args.workload or "counter",
                digest=False,
            )
        elif scenario == "mapped-ram":
            await self.mapped_ram()
        else:
            await self.recovery(
                memory=self.args.memory or "1G",
                workload=self.args.workload or "stress:rate=100M,wss=1G,mode=read",
                digest=True,
            )
        return self.summary


async def run_demo(
    args: argparse.Namespace, workdir: Path, on_agents: Callable[[Path, Path], Any] | None = None
) -> dict[str, Any]:
    make_pki(workdir)
    async with (
        agent_process(workdir, "source", listen=False) as src,
        agent_process(workdir, "destination", listen=True) as dst,
    ):
        port = (await dst.execute("migrate-incoming", {"uri": "defer"}))["port"]
        demo = Demo(args, workdir, src, dst, port)
        demo.say(f"agents up: source, destination (TLS on 127.0.0.1:{port}); work dir {workdir}")
        async with trio.open_nursery() as nursery:
            if on_agents is not None:
                nursery.start_soon(on_agents, workdir / "source.sock", workdir / "destination.sock")
            summary = await demo.run()
            if summary.get("status") == "completed" and args.scenario != "mapped-ram":
                await dst.execute("guest-stop", {"guest": "demo"})
        return summary


async def _with_tui(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Run the scenario while the TUI (a child on this terminal) watches both agents."""

    async def tui(source: Path, destination: Path) -> None:
        await trio.run_process(
            [
                sys.executable,
                "-m",
                "agents.cli",
                "tui",
                "--agent",
                f"source={source}",
                "--agent",
                f"destination={destination}",
            ],
            check=False,
        )

    return await run_demo(args, workdir, tui)


def main(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="godwit-demo-"))
    use_tui = not args.json and not args.no_tui and sys.stdin.isatty() and sys.stdout.isatty()
    args.tui_running = use_tui
    try:
        if use_tui:
            print(
                "The TUI watches the demo; press q in it when the migration has completed.",
                file=sys.stderr,
            )
            summary = trio.run(_with_tui, args, workdir)
        else:
            summary = trio.run(run_demo, args, workdir)
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(summary, indent=None if args.json else 2))
    return 0 if summary.get("verified") else 1
