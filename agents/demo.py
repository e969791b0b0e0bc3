"""``godwit demo``: the whole story on one machine, for real.

A fresh PKI in a temporary directory, two ``godwit agent`` processes on
loopback (source and destination, mutual TLS), a guest with a workload on
the source, a live migration, and a verification of the guest's memory on
the destination.  Prints a summary (``--json`` for scripts).  Nothing here is
simulated: every figure comes from the agents' ``query-migrate``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from . import pki
from .cli import summarize, wait_with_progress
from .client import ControlClient, open_client


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


async def run_precopy(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    make_pki(workdir)
    quiet = args.json

    def say(text: str) -> None:
        if not quiet:
            print(text, file=sys.stderr)

    async with (
        agent_process(workdir, "source", listen=False) as src,
        agent_process(workdir, "destination", listen=True) as dst,
    ):
        port = (await dst.execute("migrate-incoming", {"uri": "defer"}))["port"]
        say(f"agents up: source, destination (TLS on 127.0.0.1:{port}); work dir {workdir}")
        info = await src.execute(
            "guest-start",
            {"name": "demo", "memory": args.memory, "workload": args.workload, "fill": "mixed:70%"},
        )
        say(
            f"guest 'demo' running on the source: {info['memory'] >> 20} MiB, workload {args.workload}"
        )
        await trio.sleep(0.5)
        started = time.monotonic()
        await src.execute("migrate", {"guest": "demo", "uri": f"tls:127.0.0.1:{port}"})
        result = await wait_with_progress(src, "demo", json_output=quiet, timeout=600)
        elapsed = time.monotonic() - started
        summary: dict[str, Any] = {
            "scenario": "precopy",
            "status": result["status"],
            "total_time_ms": result.get("total-time"),
            "downtime_ms": result.get("downtime"),
            "transferred_bytes": result.get("ram", {}).get("transferred"),
            "throughput_MBps": round(
                result.get("ram", {}).get("transferred", 0) / elapsed / 1e6, 1
            ),
            "passes": result.get("ram", {}).get("dirty-sync-count"),
            "verified": False,
            "verify_method": None,
        }
        if result["status"] != "completed":
            summary["error"] = result.get("error-desc")
            return summary
        say(summarize(result))
        method = "counter" if args.workload == "counter" else "digest"
        check = await dst.execute("guest-verify", {"guest": "demo", "method": method})
        summary["verified"] = bool(check["verified"])
        summary["verify_method"] = method
        summary["verify_detail"] = check.get("detail")
        await dst.execute("guest-stop", {"guest": "demo"})
        return summary


def main(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="godwit-demo-"))
    try:
        summary = trio.run(run_precopy, args, workdir)
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(summary, indent=None if args.json else 2))
    return 0 if summary.get("verified") else 1
