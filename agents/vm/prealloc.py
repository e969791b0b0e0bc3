"""RAM for the next incoming guest, allocated and touched before it arrives.

An incoming precopy writes every page of the guest into fresh memory, and
fresh memory is where a receiving host spends its time: the kernel allocates
each page as the stream lands in it, and on a host that is itself a VM the
hypervisor backs each guest-physical page on first touch.  On the 2-vCPU VM
godwit is developed on, filling 1 GiB of fresh memfd costs 0.37 s of system
time while the guest kernel hands out memory it touched recently, and
2.9-3.4 s per GiB beyond the ~1.3 GiB it keeps warm (``pwrite`` of 4 MiB
pieces, one process).  That is the difference between a 1 GiB precopy of
1.0-1.3 s and one of 2-2.7 s.

QEMU's answer is ``prealloc=on`` on the destination's memory backend: the
memory is allocated when the destination starts, before ``migrate`` is
issued, and the migration then writes over it.  godwit's destination learns
the guest's layout from CONFIG, at the start of the migration, so an agent
given ``incoming-prealloc = SIZE`` keeps one memfd of SIZE bytes allocated
and touched (``MADV_POPULATE_WRITE``) *between* migrations, and an incoming
guest's largest RAM block takes it, cut to its size, instead of a fresh
one.  The pool fills again once no migration is moving pages on this agent
(as vm/spares.py waits), a chunk at a time in a worker thread owned by
the pool's task, so refilling never competes with a stream for CPU.

Only migrations without ``postcopy-ram`` use it: postcopy needs the pages it
has not received to be *missing*, so that a guest touching one faults
(userfaultfd), and a touched memfd has none missing.  A pool memfd has never
held a guest's data: its pages are the kernel's zeroed pages, which
RamReceiver relies on (a ZERO frame for a page never received writes
nothing).  The memory is the agent's while it waits: SIZE bytes of resident
shmem, counted in the agent's cgroup.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Callable

import trio

from agents.vm.ramblock import ram_file

log = logging.getLogger("godwit.prealloc")

MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
"""Linux >= 5.14: fault every page of a range in for writing, in one call."""

CHUNK = 64 << 20
"""Bytes populated per worker-thread call: between two calls the task sees a
cancellation or a migration that started, so neither waits more than one chunk
(~20 ms of warm memory, ~200 ms of memory the hypervisor has to back)."""

RETRY_AFTER = 30.0
"""A fill that failed (no memory, no MADV_POPULATE_WRITE) is tried again this much later."""


class PreallocPool:
    """One allocated, touched memfd of ``size`` bytes, for the next incoming guest.

    ``busy`` says whether a migration is moving pages on this agent; the pool
    neither starts nor goes on filling while it does.  ``directory``: the
    agent's ``ram-path`` (the memfd is then an unnamed file on that tmpfs, as
    the guests' RAM is).
    """

    def __init__(
        self,
        size: int,
        *,
        directory: str | os.PathLike[str] | None = None,
        busy: Callable[[], bool] = lambda: False,
        idle_poll: float = 0.25,
    ) -> None:
        self.size = size
        self.directory = directory
        self.busy = busy
        self.idle_poll = idle_poll
        self._fd: int | None = None
        self._taken = trio.Event()
        self.ready = trio.Event()
        """Set while a filled memfd waits to be taken."""
        self.taken = 0
        """Memfds handed to incoming guests so far (query-incoming-prealloc)."""

    def info(self) -> dict[str, int | bool]:
        return {"size": self.size, "ready": self._fd is not None, "taken": self.taken}

    def take(self, size: int) -> int | None:
        """The filled memfd, cut to ``size`` bytes (the caller owns it), or None if
        none is ready or it is smaller than ``size``."""
        if self._fd is None or size > self.size:
            return None
        fd, self._fd = self._fd, None
        self.ready = trio.Event()
        try:
            os.ftruncate(fd, size)  # frees the pages past the block, if any
        except OSError:
            os.close(fd)
            raise
        self.taken += 1
        self._taken.set()
        return fd

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a memfd filled until cancelled; then close the one not taken."""
        task_status.started()
        try:
            while True:
                if self._fd is not None:
                    await self._taken.wait()
                    self._taken = trio.Event()
                    continue
                try:
                    self._fd = await self._fill()
                except OSError as exc:
                    log.warning(
                        "incoming-prealloc: filling %d MiB failed: %s; again in %.0f s",
                        self.size >> 20,
                        exc.strerror or exc,
                        RETRY_AFTER,
                    )
                    await trio.sleep(RETRY_AFTER)
                    continue
                log.info("incoming-prealloc: %d MiB ready for an incoming guest", self.size >> 20)
                self.ready.set()
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    async def _idle(self) -> None:
        while self.busy():
            await trio.sleep(self.idle_poll)

    async def _fill(self) -> int:
        fd = ram_file("incoming-prealloc", self.directory)
        try:
            os.ftruncate(fd, self.size)
            with mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED) as mapping:
                for start in range(0, self.size, CHUNK):
                    await self._idle()
                    length = min(CHUNK, self.size - start)
                    await trio.to_thread.run_sync(
                        mapping.madvise, MADV_POPULATE_WRITE, start, length
                    )
        except BaseException:
            os.close(fd)
            raise
        return fd
