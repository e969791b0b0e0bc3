"""The agent's handle on a guest process (trio): start, control, stats, devices, teardown.

``Guest.start`` creates the RAM blocks, fills them, spawns
``python -m agents.vm.guest_main`` with the memfds and one end of a
SOCK_SEQPACKET socketpair (``pass_fds``), and waits for its hello — or,
given a ``SparePool`` with a spare ready (spares.py), hands that
already-started process the same config and memfds instead, which saves
the interpreter's 120–180 ms of start-up.
``Guest.start_incoming`` does the same for a destination: RAM arrives later
(the agent writes the RamBlocks), vCPUs wait for ``cont``, and with
``postcopy=True`` the guest registers its mapping MISSING before any vCPU
can run and hands the uffd over (``guest.uffd``, or ``guest.placer()``).

Control is request/response over the socket (see ctl.py).  There is no
background task: whichever coroutine is waiting for a message reads the
socket and files what it reads (replies by id, job results, heartbeats),
so several tasks may call the guest at once and nothing is read by nobody
for long.  ``wait()`` learns how the process ended.

Guests outlive their agent when started with a ``state_dir``: closing the
control socket (agent death, or ``detach()`` at shutdown) leaves the guest
running — or stopped, if it was stopped; a source stopped for switchover
when its agent died does *not* resume by itself, the agent that adopts it
decides — and listening on ``<state_dir>/guests/<name>.sock`` (orphans.py).
A restarted agent lists them with ``find_orphans(state_dir)`` and takes one
over with ``Guest.adopt(record.socket)``: the memfds (and the postcopy uffd)
arrive over SCM_RIGHTS and the handle works as if the guest were started
here.  An adopted guest is not our child: ``wait()`` watches a pidfd and
never reaps (its parent, or init, does).  Without a ``state_dir`` a guest
still exits when its control socket closes.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import stat
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio

from agents.vm import ctl
from agents.vm.devices import DeviceSection
from agents.vm.dirty import DirtyLog
from agents.vm.errors import GuestAttached, GuestCommandError, GuestGone
from agents.vm.fill import fill_block, parse_fill
from agents.vm.orphans import (
    OrphanRecord,
    find_orphans,
    guest_paths,
    make_guests_dir,
    proc_exit_code,
    record_alive,
    remove_files,
)
from agents.vm.postcopy import UffdPlacer
from agents.vm.ramblock import RamBlock
from agents.vm.spares import SparePool, spawn_guest_process
from agents.vm.workloads import parse_size, parse_workload

HELLO_TIMEOUT = 30.0
SCM_MAX_FD = 253  # the kernel's limit on fds in one SCM_RIGHTS message
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

__all__ = [
    "Guest",
    "GuestExit",
    "GuestMapping",
    "GuestSpec",
    "OrphanRecord",
    "find_orphans",
]


async def _recv_with_fds(sock: trio.socket.SocketType, what: str) -> tuple[bytes, list[int]]:
    """One message and the fds attached to it (made non-inheritable)."""
    anc = socket.CMSG_SPACE(4 * SCM_MAX_FD)
    data, ancdata, flags, _addr = await sock.recvmsg(ctl.MAX_MESSAGE, anc)
    fds: list[int] = []
    for level, typ, payload in ancdata:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(np.frombuffer(payload[:usable], dtype=np.int32).tolist())
    for fd in fds:
        os.set_inheritable(fd, False)
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise GuestCommandError(f"{what}: file descriptors truncated (MSG_CTRUNC)")
    return data, fds


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
        self._buf = ctl.receive_buffer()
        self._send_lock = trio.Lock()
        self._placer: UffdPlacer | None = None
        self.adopted = False  # taken over from another agent: not our child
        self.socket_path: Path | None = None  # adoption socket, if it outlives us
        self.record_path: Path | None = None
        self._pidfd: int | None = None  # adopted guests: how we learn that they ended
        self._quit_acked = False

    def __repr__(self) -> str:
        return f"Guest({self.spec.name!r}, pid={self.pid}, state={self.state})"

    # -- starting ------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        spec: GuestSpec,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        spares: SparePool | None = None,
        ram_path: str | os.PathLike[str] | None = None,
    ) -> Guest:
        """A fresh guest: new RAM blocks, filled per spec, vCPUs running.

        With ``state_dir`` the guest outlives this agent (see the module
        docstring); a live guest of the same name there is refused.  With
        ``spares`` a ready spare process becomes the guest (spares.py), if
        the pool has one; otherwise the process is started here.  With
        ``ram_path`` its RAM lives on that tmpfs (RamBlock.create).
        """
        spec.validate()
        paths = cls._claim_paths(spec, state_dir)
        blocks = cls._create_blocks(spec, ram_path)
        try:
            await trio.to_thread.run_sync(cls._fill, spec, blocks)
            guest = cls(spec, blocks)
            await guest._spawn("fresh", paths, spares)
        except BaseException:
            for b in blocks:
                b.close()
            raise
        return guest

    @classmethod
    async def start_incoming(
        cls,
        spec: GuestSpec,
        blocks: list[RamBlock] | None = None,
        postcopy: bool = False,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        spares: SparePool | None = None,
        ram_path: str | os.PathLike[str] | None = None,
    ) -> Guest:
        """A destination guest: RAM arrives later, vCPUs wait for ``cont``.

        ``blocks`` are the RamBlocks the agent made from CONFIG (made from the
        spec's layout if None); the Guest owns them from here on and closes
        them in ``quit``.  ``state_dir`` and ``spares`` as for ``start``.
        """
        spec.validate()
        paths = cls._claim_paths(spec, state_dir)
        own = blocks is None
        blocks = cls._create_blocks(spec, ram_path) if blocks is None else blocks
        guest = cls(spec, blocks)
        try:
            await guest._spawn("postcopy" if postcopy else "incoming", paths, spares)
        except BaseException:
            if own:
                for b in blocks:
                    b.close()
            raise
        return guest

    @staticmethod
    def _claim_paths(
        spec: GuestSpec, state_dir: str | os.PathLike[str] | None
    ) -> tuple[Path, Path] | None:
        """The adoption socket and record paths for a new guest, clearing stale ones."""
        if state_dir is None:
            return None
        sock, rec_path = guest_paths(state_dir, spec.name)
        make_guests_dir(state_dir)
        rec, alive = record_alive(rec_path)
        if alive:
            assert rec is not None
            raise GuestCommandError(
                f"guest {spec.name!r} already runs as pid {rec.pid} (record {rec_path}); "
                "adopt it or quit it before starting another of that name"
            )
        for p in (sock, rec_path):
            p.unlink(missing_ok=True)  # left by a guest that was killed
        return sock, rec_path

    @staticmethod
    def _create_blocks(spec: GuestSpec, ram_path: str | os.PathLike[str] | None) -> list[RamBlock]:
        blocks: list[RamBlock] = []
        try:
            for name, size in spec.layout():
                blocks.append(RamBlock.create(name, size, hugetlb=spec.hugetlb, directory=ram_path))
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

    async def _spawn(
        self, mode: str, paths: tuple[Path, Path] | None = None, spares: SparePool | None = None
    ) -> None:
        if paths is not None:
            self.socket_path, self.record_path = paths
        config = {
            **self.spec.to_json(),
            "spec": self.spec.to_json(),
            "adopt": {"socket": str(paths[0]), "record": str(paths[1])} if paths else None,
            "mode": mode,
            "blocks": [
                {"name": b.name, "size": b.size, "page_size": b.page_size, "fd": b.fd}
                for b in self.blocks
            ],
        }
        spare = spares.take() if spares is not None else None
        if spare is not None:
            try:
                await spare.become(config, [b.fd for b in self.blocks])
            except BaseException as e:
                with trio.CancelScope(shield=True):
                    await spare.close()
                if not isinstance(e, GuestGone):
                    raise
                spare = None  # it died waiting: start one here after all
        if spare is not None:
            self.process, self._sock = spare.process, spare.sock
        else:
            await self._spawn_cold(config, start_new_session=paths is not None)
        assert self.process is not None
        self.pid = self.process.pid
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

    async def _spawn_cold(self, config: dict[str, Any], *, start_new_session: bool) -> None:
        """Start ``python -m agents.vm.guest_main`` for this guest (120–180 ms of imports)."""
        self.process, self._sock = await spawn_guest_process(
            ["--config", json.dumps(config)],
            [b.fd for b in self.blocks],
            # A guest that outlives us must not get the signals a terminal sends our group.
            start_new_session=start_new_session,
        )

    async def _recv_hello(self) -> tuple[dict[str, Any], list[int]]:
        assert self._sock is not None
        data, fds = await _recv_with_fds(self._sock, f"guest {self.spec.name!r} hello")
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

    @classmethod
    async def adopt(
        cls, socket_path: str | os.PathLike[str], *, timeout: float = HELLO_TIMEOUT
    ) -> Guest:
        """Take over a guest whose agent is gone, from its adoption socket.

        Receives the memfds (and the postcopy uffd, if RAM is still
        registered MISSING) over SCM_RIGHTS, maps the blocks here and
        returns a handle in the guest's current state (running, stopped or
        incoming: nothing is resumed).  Raises GuestAttached if another
        agent holds the guest, GuestGone if nothing listens there any more,
        GuestCommandError if the socket file is not ours alone (owner our
        uid, mode 0600) or its peer is not our uid (SO_PEERCRED) — the
        guest checks ours the same way.
        """
        path = Path(socket_path)
        cls._check_socket_file(path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pidfd: int | None = None
        pending: list[int] = []
        blocks: list[RamBlock] = []
        try:
            ctl.set_buffers(sock)
            try:
                await sock.connect(str(path))
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise GuestGone(
                    f"no guest listens at {path} ({e.strerror}): it quit or was killed "
                    "(find_orphans removes stale records)"
                ) from e
            pid, uid, _gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            if uid != os.geteuid():
                raise GuestCommandError(
                    f"refusing to adopt from {path}: it is held by uid {uid} (pid {pid}), "
                    f"not uid {os.geteuid()}"
                )
            pidfd = os.pidfd_open(pid)
            with trio.fail_after(timeout):
                data, pending = await _recv_with_fds(sock, f"adopting {path}")
            if not data:
                raise GuestGone(f"adopting {path}: guest pid {pid} hung up without a hello")
            msg = ctl.decode(data)
            if msg.get("event") == "refused":
                raise GuestAttached(f"adopting {path}: {msg.get('reason')}")
            if msg.get("event") != "hello" or not msg.get("adopted"):
                raise GuestCommandError(f"adopting {path}: expected hello, got {msg!r:.120}")
            layout = msg["blocks"]
            want = len(layout) + (1 if msg.get("uffd") else 0)
            if len(pending) != want:
                raise GuestCommandError(
                    f"adopting {path}: guest pid {pid} sent {len(pending)} fds for "
                    f"{len(layout)} RAM blocks{' and a uffd' if msg.get('uffd') else ''}"
                )
            for b in layout:
                fd = pending.pop(0)  # from_fd owns it from here, also on failure
                blocks.append(RamBlock.from_fd(b["name"], int(b["size"]), int(b["page_size"]), fd))
            spec = GuestSpec.from_json(msg["spec"])
        except BaseException:
            for fd in pending:
                os.close(fd)
            for blk in blocks:
                blk.close()
            if pidfd is not None:
                os.close(pidfd)
            sock.close()
            raise
        guest = cls(spec, blocks)
        guest.adopted = True
        guest.pid = pid
        guest._pidfd = pidfd
        guest._sock = sock
        guest.uffd = pending.pop() if pending else None
        guest.socket_path, guest.record_path = path, path.with_suffix(".json")
        guest.mappings = [
            GuestMapping(m["name"], int(m["addr"]), int(m["size"]), int(m["page_size"]))
            for m in msg["mappings"]
        ]
        guest.state = str(msg["state"])
        try:
            # Answered after pidfd_open: the pidfd is this very guest, not a recycled pid.
            with trio.fail_after(timeout):
                await guest.ping()
        except BaseException:
            guest.close()
            raise
        return guest

    @staticmethod
    def _check_socket_file(path: Path) -> None:
        """Refuse a socket someone else could have put there or could reach."""
        try:
            st = os.lstat(path)
        except FileNotFoundError as e:
            raise GuestGone(
                f"no guest listens at {path} (no such file): it quit or was killed"
            ) from e
        if not stat.S_ISSOCK(st.st_mode):
            raise GuestCommandError(f"refusing to adopt from {path}: not a socket")
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise GuestCommandError(
                f"refusing to adopt from {path}: owner uid {st.st_uid} mode "
                f"{stat.S_IMODE(st.st_mode):04o}, expected uid {os.geteuid()} mode 0600"
            )

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
        """Wait for the process to end; says why (quit, fatal reason, signal).

        An adopted guest is not our child: we watch its pidfd and never reap
        it.  Its exit status is read from /proc while it is a zombie (its
        parent has not reaped it yet); once reaped it is unknown, and the
        exit says so (returncode -1) unless it acknowledged a quit (0).
        """
        if self.exit is not None:
            return self.exit
        code: int | None
        if self.process is not None:
            code = await self.process.wait()
        else:
            assert self._pidfd is not None, "wait() on a guest that was never started"
            await trio.lowlevel.wait_readable(self._pidfd)
            code = self._non_child_status()
        # The process is gone, so the socket ends after what it queued: read it
        # all, to pick up a parting "fatal" message.
        with trio.move_on_after(2):
            await self._drain()
        unknown = code is None
        if code is None:
            code = 0 if self._quit_acked and not self._fatal else -1
        if self._fatal:
            reason = str(self._fatal.get("reason"))
        elif unknown and code < 0:
            reason = "ended; not a child of this agent and already reaped, so how is unknown"
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

    def _non_child_status(self) -> int | None:
        """The ended guest's exit code from /proc/PID/stat if it is still a zombie, else None."""
        st = proc_exit_code(self.pid)
        if st is None or st[0] != "Z":
            return None
        assert self._pidfd is not None
        try:
            signal.pidfd_send_signal(self._pidfd, 0)  # still unreaped: the stat was our guest's
        except ProcessLookupError:
            return None
        return os.waitstatus_to_exitcode(st[1])

    def _alive(self) -> bool:
        if self.process is not None:
            return self.process.returncode is None
        if self._pidfd is None:
            return False
        p = select.poll()
        p.register(self._pidfd, select.POLLIN)
        return not p.poll(0)

    async def _wait_gone(self) -> None:
        if self.process is not None:
            await self.process.wait()
        elif self._pidfd is not None:
            await trio.lowlevel.wait_readable(self._pidfd)

    async def _reap(self, kill: bool) -> None:
        if self.process is None:
            return
        if kill and self.process.returncode is None:
            self.process.kill()
        with trio.CancelScope(shield=True):
            await self.process.wait()

    async def quit(self, timeout: float = 5.0) -> GuestExit:
        """End the guest: process gone (reaped if it is our child), adoption socket and
        record removed, sockets, uffd, dirty log and memfds closed."""
        started = self.process is not None or self._pidfd is not None
        try:
            if started and self.exit is None and self._alive():
                self.state = "quitting"
                with trio.move_on_after(timeout):
                    try:
                        await self.request("quit")
                        self._quit_acked = True
                    except GuestGone:
                        pass
                    await self._wait_gone()
                if self._alive():
                    self.kill()
            with trio.CancelScope(shield=True):
                if started:
                    result = await self.wait()
                else:
                    result = self.exit or GuestExit(0, "never started")
        finally:
            self.close()
        return result

    def kill(self) -> None:
        """SIGKILL the guest (through its pidfd if adopted: never a recycled pid)."""
        if self.process is not None:
            if self.process.returncode is None:
                self.process.kill()
        elif self._pidfd is not None and self._alive():
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def detach(self) -> None:
        """Let go of the guest without ending it: what an agent does when it shuts down.

        The same as the agent dying, done on purpose: the control socket
        closes, and a guest started with a ``state_dir`` carries on (running
        or stopped as it is) until another agent adopts it; one without
        exits.  This handle is finished afterwards (state "detached"); it
        never reaps the process.
        """
        self.close()
        self.process = None  # not ours to reap any more
        self.state = "detached"

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
        if self.socket_path is not None and self.record_path is not None and self.exit is not None:
            # The guest removes them when it quits; not when it is killed.
            remove_files(self.socket_path, self.record_path, self.pid)
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
