"""The agent's handle on a guest process (trio): start, control, stats, devices, teardown.

``Guest.start`` creates the RAM blocks, fills them, spawns
``python -m agents.vm.guest_main`` with the memfds and one end of a
SOCK_SEQPACKET socketpair (``pass_fds``), and waits for its hello.
``Guest.start_incoming`` does the same for a destination: RAM arrives later
(the agent writes the RamBlocks), vCPUs wait for ``cont``, and with
``postcopy=True`` the guest registers its mapping MISSING before any vCPU
can run and hands the uffd over (``guest.uffd``, or ``guest.placer()``).

Control is request/response over the socket (see ctl.py).  There is no
background task: whichever coroutine is waiting for a message reads the
socket and files what it reads (replies by id, job results, heartbeats),
so several tasks may call the guest at once and nothing is read by nobody
for long.  ``wait()`` learns how the process ended.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from agents.vm import ctl
from agents.vm.devices import DeviceSection
from agents.vm.dirty import DirtyLog
from agents.vm.errors import GuestCommandError, GuestGone
from agents.vm.fill import fill_block, parse_fill
from agents.vm.postcopy import UffdPlacer
from agents.vm.ramblock import RamBlock
from agents.vm.workloads import parse_size, parse_workload

HELLO_TIMEOUT = 30.0


@dataclass
class GuestSpec:
    """What to run: RAM layout, workload spec string, initial fill."""

    name: str = "guest"
    ram_size: int | str | list[tuple[str, int]] = 64 << 20
    workload: str = "idle"
    fill: str = "zero"
    seed: int = 0
    hugetlb: bool = False
    vcpus: int = 1
    heartbeat_ms: int = 250

    def layout(self) -> list[tuple[str, int]]:
        """(block name, size) pairs; a plain size means one block named "ram"."""
        if isinstance(self.ram_size, (int, str)):
            size = (
                parse_size(self.ram_size, "ram_size")
                if isinstance(self.ram_size, str)
                else self.ram_size
            )
            return [("ram", size)]
        return [
            (n, parse_size(s, "ram_size") if isinstance(s, str) else int(s))
            for n, s in self.ram_size
        ]

    def validate(self) -> None:
        parse_workload(self.workload)
        parse_fill(self.fill)
        if self.vcpus < 1:
            raise ValueError(f"guest {self.name!r}: vcpus must be ≥ 1")
        names = [n for n, _ in self.layout()]
        if len(set(names)) != len(names):
            raise ValueError(f"guest {self.name!r}: duplicate RAM block names {names}")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ram_size": self.ram_size
            if not isinstance(self.ram_size, list)
            else [list(x) for x in self.ram_size],
            "workload": self.workload,
            "fill": self.fill,
            "seed": self.seed,
            "hugetlb": self.hugetlb,
            "vcpus": self.vcpus,
            "heartbeat_ms": self.heartbeat_ms,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> GuestSpec:
        ram = obj.get("ram_size", 64 << 20)
        if isinstance(ram, list):
            ram = [(str(n), int(s)) for n, s in ram]
        known = {k: v for k, v in obj.items() if k in cls.__dataclass_fields__ and k != "ram_size"}
        return cls(ram_size=ram, **known)


@dataclass
class GuestMapping:
    """Where a block sits in the guest's address space (for PAGEMAP_SCAN and UFFDIO_*)."""

    name: str
    addr: int
    size: int
    page_size: int

    @property
    def npages(self) -> int:
        return self.size // self.page_size


@dataclass
class GuestExit:
    """How the guest process ended."""

    returncode: int
    reason: str
    trace: str = ""

    @property
    def clean(self) -> bool:
        return self.returncode == 0


@dataclass
class _Mailbox:
    replies: dict[int, dict[str, Any]] = field(default_factory=dict)
    jobs: dict[int, dict[str, Any]] = field(default_factory=dict)


class Guest:
    """A running (or incoming) guest process and its RAM blocks."""

    def __init__(self, spec: GuestSpec, blocks: list[RamBlock]) -> None:
        self.spec = spec
        self.blocks = blocks
        self.process: trio.Process | None = None
        self.pid = 0
        self.state = "starting"
        self.mappings: list[GuestMapping] = []
        self.uffd: int | None = None
        self.dirty_log: DirtyLog | None = None
        self.heartbeat: dict[str, Any] | None = None
        self.heartbeat_at = 0.0
        self.exit: GuestExit | None = None
        self._sock: trio.socket.SocketType | None = None
        self._next_id = 0
        self._box = _Mailbox()
        self._reading = False
        self._arrived = trio.Event()
        self._eof = False
        self._fatal: dict[str, Any] | None = None
        self._buf = bytearray(ctl.MAX_MESSAGE)
        self._send_lock = trio.Lock()
        self._placer: UffdPlacer | None = None

    def __repr__(self) -> str:
        return f"Guest({self.spec.name!r}, pid={self.pid}, state={self.state})"

    # -- starting ------------------------------------------------------------

    @classmethod
    async def start(cls, spec: GuestSpec) -> Guest:
        """A fresh guest: new RAM blocks, filled per spec, vCPUs running."""
        spec.validate()
        blocks = cls._create_blocks(spec)
        try:
            await trio.to_thread.run_sync(cls._fill, spec, blocks)
            guest = cls(spec, blocks)
            await guest._spawn("fresh")
        except BaseException:
            for b in blocks:
                b.close()
            raise
        return guest

    @classmethod
    async def start_incoming(
        cls, spec: GuestSpec, blocks: list[RamBlock] | None = None, postcopy: bool = False
    ) -> Guest:
        """A destination guest: RAM arrives later, vCPUs wait for ``cont``.

        ``blocks`` are the RamBlocks the agent made from CONFIG (made from the
        spec's layout if None); the Guest owns them from here on and closes
        them in ``quit``.
        """
        spec.validate()
        own = blocks is None
        blocks = cls._create_blocks(spec) if blocks is None else blocks
        guest = cls(spec, blocks)
        try:
            await guest._spawn("postcopy" if postcopy else "incoming")
        except BaseException:
            if own:
                for b in blocks:
                    b.close()
            raise
        return guest

    @staticmethod
    def _create_blocks(spec: GuestSpec) -> list[RamBlock]:
        blocks: list[RamBlock] = []
        try:
            for name, size in spec.layout():
                blocks.append(RamBlock.create(name, size, hugetlb=spec.hugetlb))
        except BaseException:
            for b in blocks:
                b.close()
            raise
        return blocks

    @staticmethod
    def _fill(spec: GuestSpec, blocks: list[RamBlock]) -> None:
        for i, b in enumerate(blocks):
            fill_block(b, spec.fill, spec.seed, i)
            if parse_workload(spec.workload).kind == "counter":
                b.array[:: b.page_size] = 0  # the counter check needs equal first bytes

    async def _spawn(self, mode: str) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (parent, child):
            for opt, force in ((socket.SO_SNDBUF, 32), (socket.SO_RCVBUF, 33)):  # *BUFFORCE as root
                try:
                    s.setsockopt(socket.SOL_SOCKET, force, ctl.SNDBUF)
                except OSError:
                    s.setsockopt(socket.SOL_SOCKET, opt, ctl.SNDBUF)
        config = {
            **self.spec.to_json(),
            "mode": mode,
            "blocks": [
                {"name": b.name, "size": b.size, "page_size": b.page_size, "fd": b.fd}
                for b in self.blocks
            ],
        }
        try:
            self.process = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-m",
                    "agents.vm.guest_main",
                    "--ctl",
                    str(child.fileno()),
                    "--config",
                    json.dumps(config),
                ],
                pass_fds=[child.fileno(), *(b.fd for b in self.blocks)],
                stdin=subprocess.DEVNULL,
            )
        finally:
            child.close()
        self.pid = self.process.pid
        self._sock = trio.socket.from_stdlib_socket(parent)
        try:
            with trio.fail_after(HELLO_TIMEOUT):
                hello, fds = await self._recv_hello()
        except BaseException:
            await self._reap(kill=True)
            raise
        self.mappings = [
            GuestMapping(m["name"], int(m["addr"]), int(m["size"]), int(m["page_size"]))
            for m in hello["mappings"]
        ]
        if fds:
            self.uffd = fds[0]
            for extra in fds[1:]:
                os.close(extra)
        self.state = "running" if mode == "fresh" else "incoming"

    async def _recv_hello(self) -> tuple[dict[str, Any], list[int]]:
        assert self._sock is not None
        anc = socket.CMSG_SPACE(4 * 4)
        data, ancdata, _flags, _addr = await self._sock.recvmsg(ctl.MAX_MESSAGE, anc)
        fds: list[int] = []
        for level, typ, payload in ancdata:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds.extend(np.frombuffer(payload[:usable], dtype=np.int32).tolist())
        for fd in fds:
            os.set_inheritable(fd, False)
        if not data:
            code = await self.process.wait() if self.process else -1
            raise GuestGone(
                f"guest {self.spec.name!r} exited with status {code} before saying hello"
            )
        msg = ctl.decode(data)
        if msg.get("event") == "fatal":
            await self._reap(kill=False)
            raise GuestCommandError(f"guest {self.spec.name!r}: {msg.get('reason')}")
        if msg.get("event") != "hello":
            raise GuestCommandError(f"guest {self.spec.name!r}: expected hello, got {msg!r:.120}")
        return msg, fds

    # -- messaging -----------------------------------------------------------

    async def _recv_one(self) -> None:
        assert self._sock is not None
        try:
            n = await self._sock.recv_into(self._buf)
        except OSError:
            n = 0
        if n == 0:
            self._eof = True
            return
        msg = ctl.decode(memoryview(self._buf)[:n])
        ev = msg.get("event")
        if ev is None:
            self._box.replies[int(msg["id"])] = msg
        elif ev == "heartbeat":
            self.heartbeat = msg
            self.heartbeat_at = time.monotonic()
        elif ev == "job_done":
            self._box.jobs[int(msg["job"])] = msg
        elif ev == "fatal":
            self._fatal = msg

    async def _await(self, box: dict[int, dict[str, Any]], key: int, what: str) -> dict[str, Any]:
        while True:
            if key in box:
                return box.pop(key)
            if self._eof:
                raise GuestGone(
                    f"guest {self.spec.name!r} pid {self.pid}: control socket closed while waiting for {what}"
                    + self._fatal_suffix()
                )
            if self._reading:
                ev = self._arrived
                await ev.wait()
                continue
            self._reading = True
            try:
                await self._recv_one()
            finally:
                self._reading = False
                ev, self._arrived = self._arrived, trio.Event()
                ev.set()

    async def _drain(self) -> None:
        while self._sock is not None and not self._eof:
            if self._reading:
                await self._arrived.wait()
                continue
            self._reading = True
            try:
                await self._recv_one()
            finally:
                self._reading = False
                ev, self._arrived = self._arrived, trio.Event()
                ev.set()

    def _fatal_suffix(self) -> str:
        return f" ({self._fatal['reason']})" if self._fatal else ""

    async def _send(self, msg: dict[str, Any]) -> int:
        if self._sock is None or self._eof:
            raise GuestGone(
                f"guest {self.spec.name!r} pid {self.pid} is gone" + self._fatal_suffix()
            )
        self._next_id += 1
        mid = self._next_id
        msg["id"] = mid
        data = ctl.encode(msg)
        async with self._send_lock:
            try:
                await self._sock.send(data)
            except OSError as e:
                self._eof = True
                raise GuestGone(
                    f"guest {self.spec.name!r} pid {self.pid}: sending {msg['cmd']}: {e.strerror}"
                    + self._fatal_suffix()
                ) from e
        return mid

    async def request(self, cmd: str, **args: Any) -> Any:
        """Send one command and return its result (GuestCommandError if refused)."""
        mid = await self._send({"cmd": cmd, **args})
        reply = await self._await(self._box.replies, mid, cmd)
        if not reply.get("ok"):
            raise GuestCommandError(f"guest {self.spec.name!r} {cmd}: {reply.get('error')}")
        return reply.get("result")

    async def job(self, kind: str, block: str, pages: np.ndarray, **args: Any) -> dict[str, Any]:
        """Run a RAM access in the guest's job thread and wait for its result."""
        res = await self.request(
            "job",
            kind=kind,
            block=block,
            pages=ctl.pack_array(np.asarray(pages, dtype=np.int64)),
            **args,
        )
        done = await self._await(self._box.jobs, int(res["job"]), f"job {kind}")
        if not done.get("ok"):
            raise GuestCommandError(f"guest {self.spec.name!r} job {kind}: {done.get('error')}")
        out: dict[str, Any] = done["result"]
        for k, v in list(out.items()):
            if isinstance(v, dict) and "b64" in v:
                out[k] = ctl.unpack_array(v)
        return out

    # -- control -------------------------------------------------------------

    async def stop(self, timeout: float = 10.0) -> float:
        """Park every vCPU at a safe point; returns the guest-side stop time in µs."""
        res = await self.request("stop", timeout=timeout)
        self.state = "stopped"
        return float(res["stop_us"])

    async def cont(self) -> None:
        await self.request("cont")
        self.state = "running"

    async def throttle(self, percent: int) -> None:
        """Sleep vCPUs ``percent``% of the time (auto-converge)."""
        await self.request("throttle", percent=int(percent))

    async def ping(self) -> float:
        t0 = time.perf_counter()
        await self.request("ping")
        return time.perf_counter() - t0

    async def stats(self, record: bool = False) -> dict[str, Any]:
        """Workload statistics plus the latest heartbeat; ``record`` adds stress records."""
        st: dict[str, Any] = await self.request("stats", record=record)
        if "record" in st:
            for rec in st["record"].values():
                for k, v in list(rec.items()):
                    rec[k] = ctl.unpack_array(v)
        st["last_heartbeat"] = self.heartbeat
        return st

    async def save_devices(self) -> list[DeviceSection]:
        res = await self.request("save_devices")
        return [DeviceSection.from_json(s) for s in res]

    async def load_devices(self, sections: list[DeviceSection]) -> None:
        await self.request("load_devices", sections=[s.to_json() for s in sections])

    async def describe_devices(self) -> list[dict[str, Any]]:
        res: list[dict[str, Any]] = await self.request("describe_devices")
        return res

    async def start_dirty_log(self) -> DirtyLog:
        """Write-protect all RAM (WP async) in the guest and open the pagemap scanner."""
        if self.dirty_log is not None:
            return self.dirty_log
        await self.request("dirty_log_start")
        self.dirty_log = DirtyLog(self.pid, self.mappings)
        return self.dirty_log

    async def stop_dirty_log(self) -> None:
        log, self.dirty_log = self.dirty_log, None
        if log is not None:
            log.close()
            await self.request("dirty_log_stop")

    def placer(self) -> UffdPlacer:
        """The UffdPlacer on the postcopy uffd (one per guest)."""
        if self.uffd is None:
            raise GuestCommandError(f"guest {self.spec.name!r} was not started with postcopy=True")
        if self._placer is None:
            self._placer = UffdPlacer(self.uffd, self.mappings)
        return self._placer

    async def postcopy_end(self) -> None:
        """All pages are present: the guest unregisters MISSING, we close our uffd."""
        await self.request("postcopy_end")
        self._close_uffd()

    def _close_uffd(self) -> None:
        if self._placer is not None:
            self._placer.close()
            self._placer = None
        elif self.uffd is not None:
            os.close(self.uffd)
        self.uffd = None

    # -- ending --------------------------------------------------------------

    async def wait(self) -> GuestExit:
        """Wait for the process to end; says why (quit, fatal reason, signal)."""
        if self.exit is not None:
            return self.exit
        assert self.process is not None
        code = await self.process.wait()
        # The process is gone, so the socket ends after what it queued: read it
        # all, to pick up a parting "fatal" message.
        with trio.move_on_after(2):
            await self._drain()
        if self._fatal:
            reason = str(self._fatal.get("reason"))
        elif code < 0:
            reason = f"killed by {signal.Signals(-code).name}"
        elif code == 0:
            reason = "quit" if self.state == "quitting" else "exited"
        else:
            reason = f"exited with status {code}"
        self.exit = GuestExit(
            code, reason, str(self._fatal.get("trace", "")) if self._fatal else ""
        )
        self.state = "exited"
        return self.exit

    async def _reap(self, kill: bool) -> None:
        if self.process is None:
            return
        if kill and self.process.returncode is None:
            self.process.kill()
        with trio.CancelScope(shield=True):
            await self.process.wait()

    async def quit(self, timeout: float = 5.0) -> GuestExit:
        """End the guest: process reaped, sockets, uffd, dirty log and memfds closed."""
        try:
            if self.process is not None and self.process.returncode is None:
                self.state = "quitting"
                with trio.move_on_after(timeout):
                    try:
                        await self.request("quit")
                    except GuestGone:
                        pass
                    await self.process.wait()
                if self.process.returncode is None:
                    self.process.kill()
            with trio.CancelScope(shield=True):
                result = (
                    await self.wait() if self.process is not None else GuestExit(0, "never started")
                )
        finally:
            self.close()
        return result

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()

    def close(self) -> None:
        """Release the agent-side resources (the process must be gone or going)."""
        if self.dirty_log is not None:
            self.dirty_log.close()
            self.dirty_log = None
        self._close_uffd()
        if self._sock is not None:
            self._sock.close()
            self._eof = True
        for b in self.blocks:
            b.close()
