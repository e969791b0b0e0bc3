"""Spare guest processes started ahead, so a guest that must run *now* need not wait for Python.

A guest process is ``python -m agents.vm.guest_main``: starting one costs
120–180 ms here before it can run an instruction (the interpreter, numpy and
godwit's imports), most of a lazy restore's time to first instruction.  A
``SparePool`` keeps ``size`` of them started and waiting (``--spare`` mode:
imports done, no RAM, no name, no state), each on its own SOCK_SEQPACKET
control socket.  ``Guest.start_incoming(..., spares=pool)`` takes one and
sends it the guest it is to become — the same config a cold start puts on
the command line, with the memfds over SCM_RIGHTS — and from there on it is
the same guest in every way: the agent's child (``wait`` reaps it), the
same hello, and, with a state dir, the same adoption socket and record (the
spare calls setsid(2) then, as a cold start's ``start_new_session`` does),
so it outlives the agent and is adopted like any other.  Only its command
line differs (``--spare``, no config): find guests by their records.

A spare whose agent goes away before it was given a guest exits (EOF on
its socket), so spares never outlive the pool's owner.  The pool task
replaces a taken spare ``refill_delay`` seconds later, so the replacement's
interpreter start does not compete for CPU with the guest that just took
the spare, and not while ``busy()`` says a migration is running: starting
an interpreter takes ~0.3 s of CPU, which on a small host a precopy's
stream or a postcopy's page requests would otherwise pay for.  Each spare
costs one idle interpreter (~30 MB resident).
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import trio

from agents.vm import ctl
from agents.vm.errors import GuestCommandError, GuestGone

log = logging.getLogger("godwit.spares")

HELLO_TIMEOUT = 30.0
RETRY_AFTER = 5.0
"""A spare that failed to start is tried again this much later (not in a tight loop)."""


async def spawn_guest_process(
    args: list[str], pass_fds: Sequence[int] = (), *, start_new_session: bool = False
) -> tuple[trio.Process, trio.socket.SocketType]:
    """Start ``python -m agents.vm.guest_main --ctl FD *args`` and return it with the
    agent's end of its control socket: how every guest process starts, cold
    (``Guest``) or ahead (a spare)."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (parent, child):
        ctl.set_buffers(s)
    try:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "agents.vm.guest_main", "--ctl", str(child.fileno()), *args],
            pass_fds=[child.fileno(), *pass_fds],
            stdin=subprocess.DEVNULL,
            start_new_session=start_new_session,
        )
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    return process, trio.socket.from_stdlib_socket(parent)


class Spare:
    """One started, waiting guest process and the agent's end of its control socket."""

    def __init__(self, process: trio.Process, sock: trio.socket.SocketType) -> None:
        self.process = process
        self.sock = sock

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def start(cls) -> Spare:
        """Spawn a spare and wait until it says it is ready (its imports are done)."""
        process, sock = await spawn_guest_process(["--spare"])
        spare = cls(process, sock)
        try:
            with trio.fail_after(HELLO_TIMEOUT):
                data = await spare.sock.recv(ctl.MAX_MESSAGE)
            if not data:
                raise GuestGone(
                    f"spare guest pid {process.pid} exited with status {await process.wait()} "
                    "before it was ready"
                )
            msg = ctl.decode(data)
            if msg.get("event") != "spare":
                raise GuestCommandError(
                    f"spare guest pid {process.pid}: expected 'spare', got {msg!r:.120}"
                )
        except BaseException:
            with trio.CancelScope(shield=True):
                await spare.close()
            raise
        return spare

    def alive(self) -> bool:
        """Still waiting for a guest: the process runs and has not hung up its socket."""
        if self.process.poll() is not None:
            return False
        return not _hung_up(self.sock)

    async def become(self, config: dict[str, Any], fds: list[int]) -> None:
        """Hand the spare its guest: ``config`` as a cold start gets it, ``fds`` (the memfds)
        in block order over SCM_RIGHTS.  GuestGone if the spare is gone."""
        data = ctl.encode({"cmd": "become", "config": config})
        try:
            await self.sock.sendmsg(
                [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, np.array(fds, np.int32).tobytes())]
            )
        except OSError as e:
            raise GuestGone(f"spare guest pid {self.pid}: {e.strerror}") from e

    async def close(self) -> None:
        """End an unused spare: hang up (it exits on EOF), reap it, SIGKILL if it lingers."""
        self.sock.close()
        with trio.move_on_after(2):
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


def _hung_up(sock: trio.socket.SocketType) -> bool:
    import select

    p = select.poll()
    p.register(sock.fileno(), select.POLLIN | select.POLLRDHUP)
    return any(ev & (select.POLLHUP | select.POLLRDHUP | select.POLLERR) for _, ev in p.poll(0))


class SparePool:
    """Keeps ``size`` spare guest processes ready while ``run`` runs (in its owner's nursery)."""

    def __init__(
        self,
        size: int = 1,
        *,
        refill_delay: float = 1.0,
        busy: Callable[[], bool] = lambda: False,
    ) -> None:
        if size < 0:
            raise ValueError(f"spare guests: {size} is not a count")
        self.size = size
        self.refill_delay = refill_delay
        self.busy = busy
        """True while a refill should wait (the agent: a migration is running)."""
        self._spares: list[Spare] = []
        self._changed = trio.Event()
        self._taken_at = -1e9
        self._running = False

    def __len__(self) -> int:
        return len(self._spares)

    def take(self) -> Spare | None:
        """A ready spare (now, never waiting), or None: the caller starts a guest cold."""
        while self._spares:
            spare = self._spares.pop(0)
            self._taken_at = trio.current_time()
            self._changed.set()
            if spare.alive():
                return spare
            log.warning("spare guest pid %s died while waiting; dropped", spare.pid)
            spare.sock.close()
        return None

    async def ready(self) -> None:
        """Wait until a spare is ready (for benches and tests; restores never wait)."""
        if not self._running and self.size:
            raise RuntimeError("SparePool.ready(): the pool's run() task is not running")
        while not self._spares and self.size:
            await self._changed.wait()

    async def run(
        self, *, task_status: trio.TaskStatus[SparePool] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Start spares and replace taken ones until cancelled; then end the unused ones."""
        self._running = True
        task_status.started(self)
        try:
            while True:
                if len(self._spares) >= self.size:
                    await self._changed.wait()
                    self._changed = trio.Event()
                    continue
                wait = self._taken_at + self.refill_delay - trio.current_time()
                if wait > 0:
                    await trio.sleep(wait)
                    continue
                if self.busy():
                    self._taken_at = trio.current_time()  # again refill_delay after it ends
                    await trio.sleep(self.refill_delay / 4)
                    continue
                try:
                    spare = await Spare.start()
                except (OSError, GuestGone, GuestCommandError, trio.TooSlowError) as e:
                    log.warning(
                        "starting a spare guest failed: %s; again in %.0f s", e, RETRY_AFTER
                    )
                    await trio.sleep(RETRY_AFTER)
                    continue
                self._spares.append(spare)
                changed, self._changed = self._changed, trio.Event()
                changed.set()
        finally:
            self._running = False
            spares, self._spares = self._spares, []
            with trio.CancelScope(shield=True):
                for spare in spares:
                    await spare.close()
