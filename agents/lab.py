"""The network-namespace lab: two hosts on one machine, a real link between them, faults on that link.

``godwit lab up`` makes two network namespaces (``gw-src`` and ``gw-dst``)
joined by a veth pair, 10.77.0.1/24 and 10.77.0.2/24, and starts one
``godwit agent`` in each with a certificate from one lab CA (the hosts' IPs
as SANs), control sockets in the lab directory.  Migrations between them
cross a real kernel link, so faults are real too:

- ``cut``: both ends of the veth go down.  New connections fail at once
  (no route); established ones see nothing until their own timeouts, as on
  a real unplugged cable.  ``cut --reset`` also aborts the established
  sockets between the two addresses (``ss -K``) so both agents see an error
  now — the proxy's cut, on the real link.
- ``blackhole``: an nftables table in each namespace drops every packet on
  the veth.  Links stay up, nothing errors, everything hangs.
- ``heal``: links up, tables gone.

Everything lives inside namespaces the lab creates (addresses, routes,
nftables tables), so no packet goes anywhere else.  ``down`` removes all
of it — agents and whatever they started in the namespaces, the namespaces
(and with them the veth and the tables) — from any half-built state; the
lab directory keeps the PKI and the agents' logs for a post-mortem.

Python API for tests: ``Lab(dir)``, ``await lab.up()``, ``lab.destination_uri``,
``lab.source_control``, ``await lab.cut()`` … ``await lab.down()``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from . import pki

__all__ = ["DEFAULT_DIR", "NFT_TABLE", "Lab", "LabError", "LabHost"]

DEFAULT_DIR = Path("/run/godwit-lab")
NFT_TABLE = "godwit_lab"
AGENT_PORT = 4444
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class LabError(Exception):
    """The lab cannot do what was asked; the message says what to do instead."""


@dataclass(frozen=True)
class LabHost:
    """One side of the lab: its namespace, its end of the veth, its address and agent."""

    role: str  # "source" | "destination"
    namespace: str
    interface: str
    address: str
    prefix_len: int
    directory: Path
    port: int

    @property
    def control(self) -> Path:
        return self.directory / f"{self.role}.sock"

    @property
    def pidfile(self) -> Path:
        return self.directory / f"{self.role}.pid"

    @property
    def logfile(self) -> Path:
        return self.directory / f"{self.role}.log"

    @property
    def uri(self) -> str:
        return f"tls:{self.address}:{self.port}"


def _alive(pid: int) -> bool:
    """A pid that exists and is not a zombie (a killed child not yet reaped is gone for us)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _is_our_agent(pid: int, host: LabHost) -> bool:
    """Guard against a recycled pid: the process must be this lab's agent."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"agents.cli" in cmdline and str(host.control).encode() in cmdline


class Lab:
    """The two-namespace lab rooted at ``directory``.

    ``prefix`` names the namespaces (``PREFIX-src``, ``PREFIX-dst``) and the veth
    ends (``PREFIX-src0``, ``PREFIX-dst0``), so a test lab does not collide with
    one a person brought up by hand.
    """

    def __init__(
        self,
        directory: Path = DEFAULT_DIR,
        *,
        prefix: str = "gw",
        subnet: str = "10.77.0",
        port: int = AGENT_PORT,
        python: str = sys.executable,
        log_level: str = "info",
    ) -> None:
        if len(f"{prefix}-src0") > 15:
            raise LabError(f"lab prefix {prefix!r} too long: interface names are at most 15 bytes")
        self.directory = Path(directory)
        self.prefix = prefix
        self.python = python
        self.log_level = log_level
        self.source = LabHost(
            "source", f"{prefix}-src", f"{prefix}-src0", f"{subnet}.1", 24, self.directory, port
        )
        self.destination = LabHost(
            "destination",
            f"{prefix}-dst",
            f"{prefix}-dst0",
            f"{subnet}.2",
            24,
            self.directory,
            port,
        )
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def hosts(self) -> tuple[LabHost, LabHost]:
        return (self.source, self.destination)

    @property
    def pki_dir(self) -> Path:
        return self.directory / "pki"

    @property
    def source_control(self) -> Path:
        return self.source.control

    @property
    def destination_control(self) -> Path:
        return self.destination.control

    @property
    def destination_uri(self) -> str:
        return self.destination.uri

    @property
    def source_uri(self) -> str:
        """The source agent listens too, so a guest can be migrated back."""
        return self.source.uri

    # -- commands ------------------------------------------------------------------

    async def _run(
        self, *argv: str, check: bool = True, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        try:
            result = await trio.run_process(
                list(argv), stdin=input, capture_stdout=True, capture_stderr=True, check=False
            )
        except FileNotFoundError as exc:
            raise LabError(f"{argv[0]} not found: {exc}") from exc
        if check and result.returncode != 0:
            raise LabError(
                f"lab: `{' '.join(argv)}` failed ({result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        return result

    def _require(self, *, nft: bool = False) -> None:
        if os.geteuid() != 0:
            raise LabError(
                "godwit lab needs root: it creates network namespaces, a veth pair and "
                "nftables rules (run it with sudo)"
            )
        if shutil.which("ip") is None:
            raise LabError("godwit lab needs `ip` (iproute2): apt-get install iproute2")
        if nft and shutil.which("nft") is None:
            raise LabError("lab blackhole needs `nft`: apt-get install nftables")

    async def namespaces(self) -> set[str]:
        """Which of the lab's namespaces exist now."""
        result = await self._run("ip", "-json", "netns", "list", check=False)
        text = result.stdout.decode().strip()
        names = {entry["name"] for entry in json.loads(text)} if text else set()
        return names & {h.namespace for h in self.hosts}

    def _pid(self, host: LabHost) -> int | None:
        try:
            pid = int(host.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) and _is_our_agent(pid, host) else None

    async def _agent_answers(self, host: LabHost, timeout: float = 2) -> bool:
        from .client import AgentGone, open_client

        if not host.control.exists():
            return False
        try:
            async with open_client(host.control, timeout=timeout) as client:
                await client.execute("query-guests", timeout=timeout)
            return True
        except (AgentGone, OSError, trio.TooSlowError):
            return False

    # -- up ------------------------------------------------------------------------

    async def up(self) -> None:
        """Build the lab; a no-op if it is fully up, an error if it is half up."""
        self._require()
        present = await self.namespaces()
        pids = {h.role: self._pid(h) for h in self.hosts}
        if present or any(pids.values()):
            fully_up = len(present) == 2 and all(pids.values())
            if fully_up and all([await self._agent_answers(h) for h in self.hosts]):
                return  # already up
            raise LabError(
                f"lab {self.prefix} is half up (namespaces: {', '.join(sorted(present)) or 'none'}; "
                f"agents: {', '.join(f'{r} pid {p}' for r, p in pids.items() if p) or 'none'}): "
                f"run `godwit lab down{self._dir_flag()}` first"
            )
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._make_pki()
        try:
            await self._make_network()
            for host in self.hosts:
                self._start_agent(host)
            for host in self.hosts:
                await self._wait_agent(host)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.down()
            raise

    def _dir_flag(self) -> str:
        flags = "" if self.directory == DEFAULT_DIR else f" --dir {self.directory}"
        return flags + ("" if self.prefix == "gw" else f" --prefix {self.prefix}")

    def _make_pki(self) -> None:
        if not (self.pki_dir / pki.CA_CERT).exists():
            pki.init_ca(self.pki_dir, common_name="godwit lab CA")
        for host in self.hosts:
            if not (self.pki_dir / f"{host.role}.pem").exists():
                pki.issue_cert(self.pki_dir, host.role, dns=[host.role], ips=[host.address])

    async def _make_network(self) -> None:
        src, dst = self.hosts
        for host in self.hosts:
            await self._run("ip", "netns", "add", host.namespace)
        await self._run(
            "ip", "link", "add", src.interface, "netns", src.namespace,
            "type", "veth", "peer", "name", dst.interface, "netns", dst.namespace,
        )  # fmt: skip
        for host in self.hosts:
            ns = host.namespace
            await self._run("ip", "-n", ns, "link", "set", "dev", "lo", "up")
            await self._run(
                "ip", "-n", ns, "addr", "add", f"{host.address}/{host.prefix_len}",
                "dev", host.interface,
            )  # fmt: skip
            await self._run("ip", "-n", ns, "link", "set", "dev", host.interface, "up")

    def _start_agent(self, host: LabHost) -> None:
        host.control.unlink(missing_ok=True)
        cmd = [
            "ip", "netns", "exec", host.namespace,
            self.python, "-m", "agents.cli", "agent",
            "--name", host.role,
            "--pki", str(self.pki_dir),
            "--control", str(host.control),
            "--listen", f"{host.address}:{host.port}",
            "--log-level", self.log_level,
        ]  # fmt: skip
        with host.logfile.open("ab") as log:
            # `ip netns exec` execs the command: the pid is the agent's own.  A new session
            # so the agent outlives `godwit lab up` and a Ctrl-C in that terminal.
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._procs[host.role] = proc
        host.pidfile.write_text(f"{proc.pid}\n")

    async def _wait_agent(self, host: LabHost) -> None:
        proc = self._procs[host.role]
        with trio.move_on_after(START_TIMEOUT):
            while True:
                if proc.poll() is not None:
                    raise LabError(
                        f"lab: {host.role} agent in {host.namespace} exited ({proc.returncode}); "
                        f"its log {host.logfile} ends:\n{self._log_tail(host)}"
                    )
                if await self._agent_answers(host, timeout=1):
                    return
                await trio.sleep(0.05)
        raise LabError(
            f"lab: {host.role} agent in {host.namespace} did not answer on {host.control} "
            f"within {START_TIMEOUT:.0f} s; its log ends:\n{self._log_tail(host)}"
        )

    def _log_tail(self, host: LabHost, lines: int = 20) -> str:
        try:
            return "\n".join(host.logfile.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    # -- down ----------------------------------------------------------------------

    async def down(self) -> list[str]:
        """Remove everything the lab made, from any state; return what was done."""
        self._require()
        done: list[str] = []
        problems: list[str] = []
        for host in self.hosts:
            pid = self._pid(host)
            if pid is not None:
                await self._stop(pid)
                done.append(f"stopped {host.role} agent (pid {pid})")
            proc = self._procs.pop(host.role, None)
            if proc is not None and proc.poll() is None:
                await self._stop(proc.pid)
            if proc is not None:
                proc.wait()  # reap; the process is gone by now
        present = await self.namespaces()
        for host in self.hosts:
            if host.namespace not in present:
                continue
            # Guests the agents started live in the namespace too: end them by pid.
            result = await self._run("ip", "netns", "pids", host.namespace, check=False)
            pids = [int(p) for p in result.stdout.split()]
            for pid in pids:
                await self._stop(pid)
            if pids:
                done.append(f"stopped {len(pids)} process(es) in {host.namespace}")
            try:
                # The veth and any nftables table go with the namespace.
                await self._run("ip", "netns", "del", host.namespace)
                done.append(f"deleted namespace {host.namespace}")
            except LabError as exc:
                problems.append(str(exc))
        for host in self.hosts:
            host.pidfile.unlink(missing_ok=True)
            host.control.unlink(missing_ok=True)
        if problems:
            raise LabError("lab down left something behind: " + "; ".join(problems))
        return done

    async def _stop(self, pid: int) -> None:
        """SIGTERM, then SIGKILL if it is still there after STOP_TIMEOUT."""
        for sig, grace in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, STOP_TIMEOUT)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            with trio.move_on_after(grace):
                while _alive(pid):
                    self._reap(pid)
                    await trio.sleep(0.05)
            if not _alive(pid):
                return

    def _reap(self, pid: int) -> None:
        for proc in self._procs.values():
            if proc.pid == pid:
                proc.poll()

    # -- faults --------------------------------------------------------------------

    async def cut(self, *, reset: bool = False) -> None:
        """Take both ends of the link down; with ``reset`` also abort established sockets."""
        self._require()
        await self._check_up()
        if reset:
            for host, peer in ((self.source, self.destination), (self.destination, self.source)):
                await self._run(
                    "ip", "netns", "exec", host.namespace, "ss", "-K", "dst", peer.address,
                    check=False,
                )  # fmt: skip
        for host in self.hosts:
            await self._run(
                "ip", "-n", host.namespace, "link", "set", "dev", host.interface, "down"
            )

    async def blackhole(self) -> None:
        """Drop every packet on the veth in both namespaces (nftables); links stay up."""
        self._require(nft=True)
        await self._check_up()
        for host in self.hosts:
            if await self._nft_table(host) is not None:
                continue
            rules = (
                f"table inet {NFT_TABLE} {{\n"
                f"  chain input {{ type filter hook input priority -300; policy accept; "
                f'iifname "{host.interface}" counter drop; }}\n'
                f"  chain output {{ type filter hook output priority -300; policy accept; "
                f'oifname "{host.interface}" counter drop; }}\n'
                f"}}\n"
            )
            await self._run(
                "ip", "netns", "exec", host.namespace, "nft", "-f", "-", input=rules.encode()
            )

    async def heal(self) -> None:
        """Undo cut and blackhole: links up, nftables tables gone."""
        self._require()
        await self._check_up()
        for host in self.hosts:
            if shutil.which("nft") and await self._nft_table(host) is not None:
                await self._run(
                    "ip", "netns", "exec", host.namespace, "nft", "delete", "table", "inet", NFT_TABLE
                )  # fmt: skip
            await self._run("ip", "-n", host.namespace, "link", "set", "dev", host.interface, "up")
        # The veth carrier comes back when both ends are up; wait for it so the next
        # connection does not race the link.
        with trio.move_on_after(5):
            while not all([(await self._link(h)).get("operstate") == "UP" for h in self.hosts]):
                await trio.sleep(0.02)

    async def _check_up(self) -> None:
        present = await self.namespaces()
        if len(present) != 2:
            raise LabError(
                f"lab {self.prefix} is not up (namespaces present: "
                f"{', '.join(sorted(present)) or 'none'}): run `godwit lab up{self._dir_flag()}`"
            )

    async def _nft_table(self, host: LabHost) -> str | None:
        result = await self._run(
            "ip", "netns", "exec", host.namespace, "nft", "list", "table", "inet", NFT_TABLE,
            check=False,
        )  # fmt: skip
        return result.stdout.decode() if result.returncode == 0 else None

    async def _link(self, host: LabHost) -> dict[str, Any]:
        result = await self._run(
            "ip", "-n", host.namespace, "-json", "addr", "show", "dev", host.interface, check=False
        )
        if result.returncode != 0 or not result.stdout.strip():
            return {}
        [info] = json.loads(result.stdout)
        return dict(info)

    async def reachable(self, timeout: float = 1.0) -> bool:
        """Can the source open a TCP connection to the destination agent's port now?"""
        probe = (
            "import socket,sys\n"
            "try:\n"
            f"    socket.create_connection(({self.destination.address!r}, "
            f"{self.destination.port}), timeout={timeout}).close()\n"
            "except OSError:\n"
            "    sys.exit(1)\n"
        )
        result = await self._run(
            "ip", "netns", "exec", self.source.namespace, self.python, "-c", probe, check=False
        )
        return result.returncode == 0

    # -- status --------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """Namespaces, addresses, link state, nftables rules, agents, control sockets."""
        self._require()
        present = await self.namespaces()
        hosts = []
        for host in self.hosts:
            entry: dict[str, Any] = {
                "role": host.role,
                "namespace": host.namespace,
                "namespace_exists": host.namespace in present,
                "interface": host.interface,
                "address": None,
                "link": None,
                "nft": None,
                "agent_pid": self._pid(host),
                "control": str(host.control),
                "control_answers": await self._agent_answers(host, timeout=1),
                "uri": host.uri,
                "log": str(host.logfile),
            }
            if host.namespace in present:
                link = await self._link(host)
                addrs = [
                    f"{a['local']}/{a['prefixlen']}"
                    for a in link.get("addr_info", [])
                    if a.get("family") == "inet"
                ]
                entry["address"] = ", ".join(addrs) or None
                if link:
                    flags = link.get("flags", [])
                    admin = "up" if "UP" in flags else "down"
                    entry["link"] = f"{admin} (oper {link.get('operstate', '?')})"
                if shutil.which("nft"):
                    entry["nft"] = await self._nft_table(host)
            hosts.append(entry)
        up = len(present) == 2
        return {
            "directory": str(self.directory),
            "up": up and all(h["agent_pid"] for h in hosts),
            "reachable": await self.reachable() if up else False,
            "pki": str(self.pki_dir),
            "hosts": hosts,
        }


def format_status(status: dict[str, Any]) -> str:
    """``godwit lab status`` for a person."""
    lines = [
        f"lab {status['directory']}: {'up' if status['up'] else 'DOWN or half up'}; "
        f"source → destination {'reachable' if status['reachable'] else 'NOT reachable'}"
    ]
    for h in status["hosts"]:
        ns = h["namespace"] + ("" if h["namespace_exists"] else " (missing)")
        lines.append(f"  {h['role']:<11} netns {ns}")
        lines.append(
            f"    {h['interface']}: {h['address'] or '-'}  link {h['link'] or '-'}  "
            f"nft {'drop table ' + NFT_TABLE if h['nft'] else 'none'}"
        )
        pid = h["agent_pid"]
        lines.append(
            f"    agent {'pid ' + str(pid) if pid else 'not running'}; control {h['control']} "
            f"({'answers' if h['control_answers'] else 'no answer'}); migrations {h['uri']}"
        )
        if h["nft"]:
            lines.extend("      " + line for line in h["nft"].strip().splitlines())
    return "\n".join(lines)
