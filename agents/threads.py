"""Threads that belong to a trio task: the postcopy request paths.

A postcopy page request is a round trip a vCPU waits for.  On the trio
thread every hop of it (read the fault, send the request; read the request,
send the page; read the page, place it) waits behind whatever else the loop
is doing — with the background stream saturating main, each checkpoint cost
100–300 µs and a fault took ~1 ms.  So, as in QEMU (the destination's fault
and preempt threads, the source's return-path thread that sends requested
pages itself), the request path runs in dedicated threads that block only
in ``poll``, ``read``/``write`` and OpenSSL, all of which release the GIL.

Each thread is *owned*: :meth:`OwnedThread.run` is awaited by a trio task
that starts the thread (``trio.to_thread.run_sync``, never abandoned) and
returns only once the thread has.  The thread polls an eventfd beside its
descriptors, so a cancelled owner wakes it and it leaves at once
(:class:`ThreadAborted` from whatever wait it was in), and ``stop`` asks it
to leave at its next loop turn, between messages, so the channels it used
are left whole for trio to take back.  Work the trio side wants done on a
thread-owned channel (a PING on the return path) is ``post``-ed and runs in
the thread between messages; results go back with the trio token's
``run_sync_soon``.
"""

from __future__ import annotations

import logging
import os
import select
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from .sched import set_realtime

__all__ = ["OwnedThread", "ThreadAborted"]

log = logging.getLogger("godwit.threads")

READ = select.POLLIN


class ThreadAborted(Exception):
    """The owning task was cancelled: the thread leaves from wherever it waits."""


class OwnedThread:
    """One worker thread run by one trio task, wakeable from trio."""

    def __init__(self, name: str, *, realtime: bool = False) -> None:
        self.name = name
        self.realtime = realtime
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._posted: deque[Callable[[], Any]] = deque()
        self.stopping = False
        self.aborting = False
        self.running = False
        self.done = trio.Event()
        """Set once :meth:`run` has returned (the thread is gone)."""
        self._token: trio.lowlevel.TrioToken | None = None
        self._later: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._pollers: dict[tuple[tuple[int, int], ...], select.poll] = {}

    # -- from trio ---------------------------------------------------------------

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in a worker thread owned by the calling task."""
        self._token = trio.lowlevel.current_trio_token()
        self.running = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._abort_on_cancel)
                nursery.start_soon(self._drain_every, LATER_INTERVAL)
                try:
                    result = await trio.to_thread.run_sync(self._body, fn, *args)
                except ThreadAborted:
                    # The owner was cancelled and the thread left: what the owner's
                    # caller sees is that cancellation, not a stray error.
                    await trio.lowlevel.checkpoint()
                    raise
                nursery.cancel_scope.cancel()
            return result
        finally:
            self.drain()  # nothing handed over with later() is lost
            self.running = False
            os.close(self._wake)
            self.done.set()

    def _body(self, fn: Callable[..., Any], *args: Any) -> Any:
        boosted = self.realtime and set_realtime(True, self.name)
        try:
            return fn(*args)
        finally:
            if boosted:  # the worker goes back to trio's thread cache
                set_realtime(False, self.name)

    async def _abort_on_cancel(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self.aborting = True
            self._poke()

    async def _drain_every(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            self.drain()

    def drain(self) -> None:
        """Run what the thread handed over with :meth:`later` (on the trio thread).

        Runs every ``LATER_INTERVAL`` and once more when the thread has ended;
        an owner that needs the results sooner may call it itself.
        """
        while self._later:
            fn, args = self._later.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("%s: work handed to the trio thread failed", self.name)

    def stop(self) -> None:
        """Ask the thread to leave at its next loop turn (see :meth:`should_stop`)."""
        self.stopping = True
        self._poke()

    def wake(self) -> None:
        """Make the thread's current (or next) ``wait_any`` return."""
        self._poke()

    def post(self, work: Callable[[], Any]) -> None:
        """Have the thread run ``work`` between messages (it owns the channels now)."""
        self._posted.append(work)
        self._poke()

    def _poke(self) -> None:
        try:
            os.eventfd_write(self._wake, 1)
        except OSError:  # closed: the thread is gone already
            pass

    # -- in the thread -------------------------------------------------------------

    def should_stop(self) -> bool:
        """At the top of the thread's loop: run posted work; True once asked to stop."""
        while self._posted:
            self._posted.popleft()()
        if self.aborting:
            raise ThreadAborted(self.name)
        return self.stopping

    @property
    def token(self) -> trio.lowlevel.TrioToken:
        """The owning run's token, for ``trio.from_thread`` calls that must wait."""
        assert self._token is not None
        return self._token

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Have the trio thread run ``fn(*args)`` soon, without waiting for it.

        An exception there is logged, never raised: it would crash trio's run
        loop (the callback may run after the owning task has ended)."""
        assert self._token is not None

        def guarded() -> None:
            try:
                fn(*args)
            except Exception:
                log.exception("%s: work handed to the trio thread failed", self.name)

        self._token.run_sync_soon(guarded)

    def later(self, fn: Callable[..., Any], *args: Any) -> None:
        """Have the trio thread run ``fn(*args)`` at its next :meth:`drain`, without
        waking it: for bookkeeping after every page (statistics, bitmaps only trio
        reads).  Waking trio for each costs a wakeup-socket write and a GIL handoff
        in the middle of the next request's round trip; ``call_soon`` is for what
        trio must act on at once."""
        self._later.append((fn, args))

    def wait(self, fd: int, events: int) -> None:
        """Block until ``fd`` is ready for ``events`` (e.g. a socket's send buffer has room)."""
        self.wait_any([(fd, events)])

    def wait_any(self, fds: list[tuple[int, int]]) -> dict[int, int]:
        """Block until some of ``fds`` are ready, or the thread is poked; returns the
        ready ones with their poll events (POLLHUP/POLLERR included).

        A poke returns early (possibly with nothing ready) so the loop can run
        posted work or stop; an abort raises :class:`ThreadAborted`.
        """
        key = tuple(fds)
        poller = self._pollers.get(key)
        if poller is None:  # one poll object per set of fds: a request's path reuses them
            poller = self._pollers[key] = select.poll()
            poller.register(self._wake, READ)
            for fd, events in fds:
                poller.register(fd, events)
        ready: dict[int, int] = {}
        for fd, revents in poller.poll():
            if fd == self._wake:
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
            elif revents:
                ready[fd] = revents
        if self.aborting:
            raise ThreadAborted(self.name)
        return ready


LATER_INTERVAL = 0.02
"""Seconds between the owner's drains of :meth:`OwnedThread.later` work: statistics
in ``query-migrate`` lag the thread by at most this much."""
