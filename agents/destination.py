"""The destination side of a migration (QEMU's process_incoming_migration & loadvm).

An :class:`IncomingMigration` begins when a main channel says HELLO with a
migration id the agent has not seen.  It reads CONFIG, makes the RAM blocks
(memfd) and starts the guest process *incoming* (vCPUs not running; with
``postcopy-ram`` its RAM is registered MISSING with userfaultfd from the
start), then applies what main carries:

* precopy: pages written into the memfds, device sections, VMDESC, and
  COMPLETE — load the devices, start the vCPUs, say SHUT on the return path
  (the source may let its copy go);
* postcopy: DISCARD (punch the stale pages out), LISTEN (from now on pages
  are placed with UFFDIO_COPY, and the fault service asks for what the guest
  touches), RUN (load the devices, start the vCPUs, POSTCOPY_RUN_ACK), then
  pages on main until COMPLETE and nothing is missing — unregister, SHUT,
  done.  With preempt, faults and requested pages are the fault worker's
  (agents/preempt.py): the agent hands it the preempt connection and the
  uffd, and learns from it which pages it placed.

Failures before the guest runs here destroy the incoming guest (the source
still has all of it) and tell the source why with an ERROR frame.  In
postcopy, a broken or hung link *pauses*: channels close, the guest keeps
its memory and blocks on what is missing, requests stay pending, and
``migrate-recover`` + the source's resume bring it back (RECV_BITMAP,
RESUME/RESUME_ACK, pending requests re-sent).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from functools import partial
from select import POLLERR, POLLHUP
from typing import TYPE_CHECKING, Any

import trio

from protocol.errors import ProtocolError
from protocol.messages import (
    Complete,
    Config,
    DeviceState,
    Discard,
    Hello,
    MultifdSync,
    PageBatch,
    Pages,
    PassEnd,
    Ping,
    Pong,
    PostcopyAdvise,
    PostcopyListen,
    PostcopyRun,
    PostcopyRunAck,
    RecvBitmap,
    RecvBitmapRequest,
    ReqPages,
    Resume,
    ResumeAck,
    Shut,
    SwitchoverStart,
    Vmdesc,
)
from protocol.states import MigrationStatus, Role, is_terminal

from . import savevm
from .channel import Channel, ChannelClosed
from .migration import MigrationState, first_error
from .multifd import MultifdReceiver, offload_crypto
from .pmqos import cpu_latency
from .postcopy import FaultService, Liveness, PausePostcopy, close_channels, watch_pause
from .preempt import PreemptWorker
from .ram import PAGE_MESSAGES, BandwidthMeter, PageWriter, RamReceiver
from .source import EXPECTED_ERRORS, PROGRESS_INTERVAL
from .threads import READ, OwnedThread
from .tls import TLSStream
from .vm.devices import DeviceSection
from .vm.errors import GuestGone

if TYPE_CHECKING:
    from .daemon import Agent, GuestEntry
    from .vm.guest import Guest

log = logging.getLogger("godwit.destination")
S = MigrationStatus

CONFIG_TIMEOUT = 30.0
CHANNEL_TIMEOUT = 30.0
RECOVER_TIMEOUT = 30.0
DRAIN_TIMEOUT = 60.0
SHUT_LINGER = 2.0


class IncomingMigration:
    def __init__(self, agent: Agent, hello: Hello, main: Channel, peer: str) -> None:
        self.agent = agent
        self.hello = hello
        self.main: Channel | None = main
        self.peer = peer
        self.ret: Channel | None = None
        self.preempt: Channel | None = None
        self.return_attached = trio.Event()
        self.preempt_attached = trio.Event()
        self.multifd: MultifdReceiver | None = None
        self._early_multifd: dict[int, Channel] = {}  # said HELLO before CONFIG was read
        self.state = MigrationState(Role.DESTINATION, "?", agent.events, hello.migration_id)
        self.state.channels["main"] = main.stats
        self.state.uri = f"from {peer}"
        self.entry: GuestEntry | None = None
        self.ram: RamReceiver | None = None
        self.writer: PageWriter | None = None
        self.config: Config | None = None
        self.sections: list[DeviceSection] = []
        self.vmdesc: dict[str, Any] | None = None
        self.guest_running = False
        self.faults: FaultService | None = None
        self.complete_seen = False
        self.shut_sent = False
        self.source_closed = trio.Event()
        self.postcopy_done = trio.Event()
        self.pause_requested = trio.Event()
        self.recover_armed = False
        self.recovery_started = trio.Event()
        self.background_placer: Any = None  # the worker thread's own (ioctl buffers)
        self.placing = trio.Lock()  # held while a worker thread places background pages
        self.ram_lock = threading.Lock()
        """Guards the received/requested bitmaps and the fault bookkeeping, which
        the fault thread and the trio thread both update."""
        self.fault_thread: OwnedThread | None = None
        self.worker: PreemptWorker | None = None
        """With postcopy-preempt: the fault service in a process of its own (agents/preempt.py)."""
        self._preempt_in, self._preempt_out = trio.open_memory_channel[Channel](4)
        self.worker_decided = trio.Event()
        """CONFIG is read and the worker, if preempt wants one, runs."""
        self.cancel_scope = trio.CancelScope()
        self.nursery: trio.Nursery | None = None
        self.done = trio.Event()
        self.meter = BandwidthMeter()
        self._last_progress = 0.0
        self._bytes_at_progress = 0

    # -- channels arriving through the listener ------------------------------------

    def attach(self, hello: Hello, channel: Channel) -> str | None:
        """A further channel for this migration; returns a refusal reason, or None."""
        kind = hello.channel.value
        st = self.state
        if hello.resume:
            if st.status not in (S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER):
                return f"resume channel refused: migration is {st.status}, not postcopy-paused"
            if not self.recover_armed:
                return "resume channel refused: run migrate-recover on the destination first"
            if kind == "main":
                self.main = channel
                st.channels["main"] = channel.stats
                if st.status == S.POSTCOPY_PAUSED:
                    st.set_status(S.POSTCOPY_RECOVER)
                self.recovery_started.set()
                return None
        if kind == "return":
            if self.ret is not None and not self.ret.closed:
                return "this migration already has a return path"
            self.ret = channel
            st.channels["return"] = channel.stats
            self.return_attached.set()
            return None
        if kind == "preempt":
            if self.preempt is not None and not self.preempt.closed:
                return "this migration already has a preempt channel"
            self.preempt = channel
            st.channels["preempt"] = channel.stats
            self._preempt_in.send_nowait(channel)  # handed to the worker by _preempt_links
            return None
        if kind == "multifd" and not hello.resume:
            st.channels[channel.name] = channel.stats
            if self.multifd is not None:
                return self.multifd.attach(hello.index, channel)
            if self.config is not None and not self.config.capabilities.get("multifd"):
                return "multifd channel refused: this migration did not enable multifd"
            if hello.index in self._early_multifd:
                return f"multifd channel {hello.index} is already attached"
            self._early_multifd[hello.index] = channel
            return None
        return f"channel kind {kind} is not supported in this migration"

    # -- control (from QMP handlers) --------------------------------------------------

    def pause(self) -> None:
        self.pause_requested.set()

    def arm_recovery(self) -> None:
        if self.state.status != S.POSTCOPY_PAUSED:
            raise ValueError(
                f"migrate-recover: migration is {self.state.status}, not postcopy-paused"
            )
        self.recover_armed = True

    # -- the task ------------------------------------------------------------

    def _guest(self) -> Guest:
        assert self.entry is not None and self.entry.guest is not None, (
            "the guest exists after CONFIG"
        )
        return self.entry.guest

    async def run(self) -> None:
        try:
            with self.cancel_scope:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    nursery.start_soon(self._preempt_links)
                    self.state.set_status(S.SETUP)
                    with cpu_latency(enabled=self.agent.config.pm_qos):
                        await self._setup()
                        await self._load()
                    if self.state.status == S.POSTCOPY_ACTIVE:
                        await self._postcopy()
                    nursery.cancel_scope.cancel()
        except Exception as exc:
            leaf = first_error(exc)
            if not isinstance(leaf, EXPECTED_ERRORS):
                log.error("incoming migration crashed", exc_info=leaf)
            await self._failed(str(leaf) or leaf.__class__.__name__)
        finally:
            with trio.CancelScope(shield=True):
                await self._finish()

    async def _setup(self) -> None:
        assert self.main is not None
        with trio.fail_after(CONFIG_TIMEOUT):
            config = await self.main.receive()
        if not isinstance(config, Config):
            raise ProtocolError(
                f"expected CONFIG after HELLO, got {type(config).__name__}", channel="main"
            )
        self.config = config
        self.entry = await self.agent.create_incoming_guest(self, config)
        st = self.state
        st.guest = self.entry.name
        st.postcopy_enabled = bool(config.capabilities.get("postcopy-ram"))
        self.ram = RamReceiver(self._guest().blocks)
        self.writer = PageWriter(self.ram.store, partial(self._apply, stored=True))
        assert self.nursery is not None
        self.nursery.start_soon(self.writer.run)
        st.ram.page_size = config.ramblocks[0].page_size if config.ramblocks else 4096
        st.ram.total = sum(b.size for b in config.ramblocks)
        if self._wants_worker():
            await self._start_worker()
        self.worker_decided.set()
        st.set_status(S.ACTIVE)
        with trio.fail_after(CHANNEL_TIMEOUT):
            await self.return_attached.wait()
        await self._setup_multifd(config)

    async def _setup_multifd(self, config: Config) -> None:
        """Wait for the multifd channels CONFIG announces and start their readers."""
        early, self._early_multifd = self._early_multifd, {}
        if not config.capabilities.get("multifd"):
            if early:
                raise ProtocolError("multifd channels arrived, but CONFIG did not enable multifd")
            return
        assert self.ram is not None and self.nursery is not None
        self.multifd = MultifdReceiver(int(config.parameters.get("multifd-channels", 2)))
        for index, channel in early.items():
            reason = self.multifd.attach(index, channel)
            if reason is not None:
                raise ProtocolError(reason, channel=channel.name)
        with trio.fail_after(CHANNEL_TIMEOUT):
            await self.multifd.all_attached.wait()
        for index in range(self.multifd.nchannels):
            self.nursery.start_soon(self.multifd.read, index, self.ram.store, self._apply_stored)

    def _apply_stored(self, msg: Any) -> None:
        """A multifd reader stored the pages in its thread: record them here."""
        if isinstance(msg, (Pages, PageBatch)):
            self.state.ram.multifd_bytes += len(msg.data)
        self._apply(msg, stored=True)

    def _apply(self, msg: Any, *, stored: bool = False) -> None:
        """Apply a page-carrying message (precopy writes, postcopy placement)."""
        assert self.ram is not None
        with self.ram_lock:
            count = self.ram.apply(msg, stored=stored)
        self._account(isinstance(msg, (Pages, PageBatch)), count)

    def _account(self, data: bool, count: int) -> None:
        """Statistics, progress and test hooks for ``count`` pages applied, with
        ``data`` or as zero (trio thread)."""
        assert self.ram is not None
        ram, stats = self.ram, self.state.ram
        if data:
            stats.normal += count
            stats.transferred += count * stats.page_size
        else:
            stats.duplicate += count
        if self.state.status == S.POSTCOPY_ACTIVE:
            stats.postcopy_bytes += stats.transferred - self._bytes_at_progress
        else:
            stats.precopy_bytes += stats.transferred - self._bytes_at_progress
        self._bytes_at_progress = stats.transferred
        self._progress()
        drop = self.agent.test_hooks.get("drop-page")
        if drop is not None and ram.received[drop[0]].test(drop[1]):
            # Lost, yet marked received: in postcopy a later touch reads it as a
            # hole (resolved locally as zero), so either way its data is gone.
            ram.blocks[drop[0]].discard(drop[1], 1)
            del self.agent.test_hooks["drop-page"]
        self._check_postcopy_done()

    def _check_postcopy_done(self) -> None:
        """COMPLETE came and every page is in place: postcopy can finish."""
        assert self.ram is not None
        if self.complete_seen and not self.postcopy_done.is_set() and self.ram.missing() == 0:
            self.postcopy_done.set()

    def _progress(self) -> None:
        """Receive rate, what is still missing, and a progress event a few times a second."""
        now = time.monotonic()
        rate = self.meter.update(self.state.ram.transferred, now)
        if now - self._last_progress < PROGRESS_INTERVAL:
            return
        self._last_progress = now
        st = self.state
        assert self.ram is not None
        st.ram.mbps = rate * 8 / 1e6
        st.ram.pages_per_second = rate / max(st.ram.page_size, 1)
        st.ram.remaining = self.ram.missing() * st.ram.page_size
        self.agent.events.emit("MIGRATION_PROGRESS", {"guest": st.guest, "info": st.info()})

    async def _load(self) -> None:
        """Everything on main up to COMPLETE (precopy) or RUN (postcopy)."""
        assert self.ram is not None and self.main is not None and self.writer is not None
        st = self.state
        while True:
            msg = await self.main.receive()
            if isinstance(msg, PAGE_MESSAGES) and self.ram.placer is None:
                await self.writer.put(msg)
                continue
            if not isinstance(msg, (PassEnd, Ping, DeviceState, Vmdesc, SwitchoverStart)):
                # Whatever follows may read guest RAM or change how pages are
                # placed: the pages before it must be in place first.
                await self.writer.drain()
            if isinstance(msg, PAGE_MESSAGES):
                self._apply(msg)
            elif isinstance(msg, PassEnd):
                st.ram.dirty_sync_count = msg.pass_no
            elif isinstance(msg, MultifdSync):
                if self.multifd is None:
                    raise ProtocolError("MULTIFD_SYNC without multifd channels", channel="main")
                await self.multifd.wait(msg.sync_no)
            elif isinstance(msg, SwitchoverStart):
                pass
            elif isinstance(msg, DeviceState):
                self.sections.append(savevm.section_from_message(msg))
            elif isinstance(msg, Vmdesc):
                self.vmdesc = msg.description
            elif isinstance(msg, Ping):
                assert self.ret is not None
                await self.ret.send(Pong(msg.seq, msg.sent_ns))
            elif isinstance(msg, PostcopyAdvise):
                self._check_advise(msg)
            elif isinstance(msg, Discard):
                self.ram.apply_discard(msg)
            elif isinstance(msg, PostcopyListen):
                await self._listen()
            elif isinstance(msg, PostcopyRun):
                await self._run_guest()
                return
            elif isinstance(msg, Complete):
                await self._complete()
                return
            else:
                raise ProtocolError(
                    f"unexpected {type(msg).__name__} on main in state {st.status}", channel="main"
                )

    def _check_advise(self, msg: PostcopyAdvise) -> None:
        ours = tuple(b.page_size for b in self._guest().blocks)
        if tuple(msg.page_sizes) != ours:
            raise ValueError(
                f"POSTCOPY_ADVISE page sizes {msg.page_sizes} differ from this guest's {ours}"
            )
        if self._guest().uffd is None:
            raise ValueError(
                "postcopy advised but the incoming guest has no userfaultfd registration"
            )

    async def _complete(self) -> None:
        assert self.ram is not None and self.entry is not None and self.ret is not None
        if not self.ram.complete():
            raise ProtocolError(
                f"COMPLETE with {self.ram.missing()} pages never received", channel="main"
            )
        if self.vmdesc is not None:
            savevm.check_vmdesc(self.vmdesc, self._guest().blocks, self.sections)
        if self.state.postcopy_enabled:
            # Registered for postcopy that never came: every page is here, let go of the uffd.
            await self._guest().postcopy_end()
        await self._start_guest()
        await self.ret.send(Shut("completed"))
        self.state.ram.remaining = 0
        self.state.set_status(S.COMPLETED)

    async def _start_guest(self) -> None:
        guest = self._guest()
        assert self.entry is not None
        if self.agent.test_hooks.get("fail-device-load"):
            raise ValueError("loading device state failed (test hook fail-device-load)")
        await guest.load_devices(self.sections)
        self.guest_running = True  # from here on the guest is ours to keep, running or not
        if self.agent.incoming_autostart:
            await guest.cont()
            self.entry.status = "running"
            self.agent.events.emit("RESUME", {"guest": self.entry.name})
        else:
            self.entry.status = "paused"

    # -- postcopy --------------------------------------------------------------

    async def _preempt_links(self) -> None:
        """Each preempt connection, as it arrives (at setup, after every recovery): end
        its TLS session and hand the socket to the worker, which handshakes anew."""
        async for channel in self._preempt_out:
            tls = isinstance(channel.stream, TLSStream)
            fd, early = await channel.stream.handover()
            await channel.aclose()  # the listener's handler lets go of it
            try:
                await self.worker_decided.wait()  # the connection can come before CONFIG
                if self.worker is None:
                    raise ProtocolError(
                        "a preempt channel without postcopy-preempt", channel="preempt"
                    )
                if self.worker.dead.is_set():
                    await self._start_worker()
            except BaseException:
                os.close(fd)
                raise
            if self.worker.stopped.is_set():  # every page is here: a recovery only for SHUT
                os.close(fd)
            else:
                await self.worker.connect(fd, early, tls=tls)
            self.preempt_attached.set()

    async def _start_worker(self) -> None:
        """A fault worker (at setup; again at a recovery if the last one failed)."""
        assert self.nursery is not None
        st = self.state
        worker = PreemptWorker(
            "destination", f"{st.guest}/preempt", self._worker_stats, st.channels
        )
        setup = {
            **self.agent.worker_setup(),
            "page_size": max(b.page_size for b in self._guest().blocks),
        }
        await self.nursery.start(worker.run, setup, [])
        if self.ram is not None and self.ram.placer is not None:  # postcopy is under way
            worker.survivable = True
            await self._give_uffd(worker)
        self.worker = worker  # ready: _preempt_links may hand it the connection

    async def _give_uffd(self, worker: PreemptWorker) -> None:
        guest = self._guest()
        mappings = [
            {"name": m.name, "addr": m.addr, "size": m.size, "page_size": m.page_size}
            for m in guest.mappings
        ]
        await worker.set_uffd(guest.placer().fileno(), mappings)

    async def _watch_worker(self, worker: PreemptWorker) -> None:
        await worker.dead.wait()
        raise PausePostcopy(f"the fault worker failed: {worker.failure}")

    def _wants_worker(self) -> bool:
        caps = self.config.capabilities if self.config is not None else {}
        return bool(caps.get("postcopy-ram") and caps.get("postcopy-preempt"))

    def _worker_stats(self, msg: dict[str, Any]) -> None:
        """The fault worker's figures since its last message (trio thread)."""
        st = self.state
        ram = self.ram
        if ram is not None:
            for block, first, count, data in msg.get("placed", ()):
                with self.ram_lock:
                    ram.received[block].set_range(first, count)
                self._account(bool(data), count)  # and postcopy may be done now
        for latency_ns in msg.get("latencies_ns", ()):
            st.postcopy.record_latency(int(latency_ns))
        blocked = float(msg.get("blocktime_ms", 0.0))
        st.postcopy.blocktime_ms += blocked
        st.postcopy.vcpu_blocktime_ms[0] += blocked

    async def _listen(self) -> None:
        """POSTCOPY_LISTEN: place pages atomically from now on and serve the guest's faults."""
        assert self.ram is not None and self.nursery is not None
        st = self.state
        st.set_status(S.POSTCOPY_DEVICE)
        if self.config is not None and self.config.capabilities.get("postcopy-preempt"):
            with trio.fail_after(CHANNEL_TIMEOUT):
                await self.preempt_attached.wait()
        placer = self._guest().placer()
        if self.worker is not None:
            self.worker.survivable = True  # from here a failed worker pauses postcopy
            await self._give_uffd(self.worker)
        # Each thread places with its own placer (ioctl buffers are per placer).
        self.faults = FaultService(placer.sibling(), self.ram.received, st.postcopy)
        self.ram.placer = placer
        self.background_placer = placer.sibling()
        self.ram.on_arrival = self._arrived

    def _fault_thread(self, thread: OwnedThread) -> None:
        """QEMU's fault thread, for one postcopy round without preempt (with it,
        the fault worker does this in a process of its own: agents/preempt.py).

        Reads the guest's faults off the uffd and sends the requests on the
        return path itself: a request never waits for the trio thread, which is
        busy with the background stream (the pages come back on main).  It owns
        the return path's sending until it stops; the trio side's PINGs and
        PONGs go through it (``_ret_send``).  The request bookkeeping is shared
        with the trio thread under ``ram_lock``.
        """
        assert self.faults is not None and self.ret is not None
        faults, ret = self.faults, self.ret
        placer = faults.placer
        uffd = placer.fileno()
        watch = [(uffd, READ)]
        while not thread.should_stop():
            ready = thread.wait_any(watch)
            if ready.get(uffd, 0) & (POLLERR | POLLHUP):
                raise GuestGone("the guest's userfaultfd hung up: the guest process is gone")
            if uffd in ready:
                with self.ram_lock:
                    requests = faults.take_faults(placer.read_fault_pages())
                for request in requests:
                    ret.thread_send(request, thread.wait)

    async def _stop_fault_thread(self) -> None:
        """Stop this round's fault thread between messages and wait for it."""
        if self.fault_thread is not None:
            self.fault_thread.stop()
            await self.fault_thread.done.wait()
            self.fault_thread = None

    async def _ret_send(self, msg: Any) -> None:
        """Send on the return path: through the fault thread while it owns it."""
        assert self.ret is not None
        thread, ret = self.fault_thread, self.ret
        if thread is not None and thread.running:
            thread.post(partial(ret.thread_send, msg, thread.wait))
            await trio.lowlevel.checkpoint()
        else:
            await ret.send(msg)

    async def _ping(self, ping: Ping) -> None:
        await self._ret_send(ping)

    async def _request(self, req: ReqPages) -> None:
        if self.ret is None or self.ret.closed:
            raise trio.ClosedResourceError("no return path")
        await self.ret.send(req)

    def _arrived(self, block: int, pages: Any) -> None:
        """RamReceiver.on_arrival, called under ``ram_lock`` from either thread."""
        assert self.faults is not None
        self.faults.arrived(block, pages)

    async def _run_guest(self) -> None:
        """POSTCOPY_RUN: the guest runs here from now on, with pages still missing."""
        assert self.ret is not None
        await self._start_guest()
        await self.ret.send(PostcopyRunAck())
        self.state.set_status(S.POSTCOPY_ACTIVE)

    async def _postcopy(self) -> None:
        st = self.state
        while True:
            try:
                await self._postcopy_round()
                break
            except Exception as exc:
                leaf = first_error(exc)
                if self.shut_sent:  # every page is here and the source knows: done
                    log.info("postcopy of %s: %s after SHUT, ignored", st.guest, leaf)
                    break
                if not isinstance(leaf, (*EXPECTED_ERRORS, PausePostcopy)):
                    log.error("postcopy of %s: unexpected error, pausing", st.guest, exc_info=leaf)
                await self._pause(str(leaf) or leaf.__class__.__name__)
            await self._recover()
        if st.status != S.COMPLETED:
            st.ram.remaining = 0
            st.set_status(S.COMPLETED)

    async def _finish_postcopy(self) -> None:
        """Every page is here: let go of the uffd (once) and tell the source (SHUT).

        Inside the pause/recover loop, so a SHUT lost to a broken link leads to a
        pause and a recovery that ends here again, never to a dead migration.
        """
        assert self.ram is not None and self.ret is not None
        with self.ram_lock:
            self.ram.sealed = True  # before any await: the readers still run until SHUT is out
        async with self.placing:  # no placement in flight when the uffd goes
            pass
        await self._stop_fault_thread()
        if self.worker is not None and not self.worker.dead.is_set():
            await self.worker.stop()  # its last figures, and no placement after this
        if self.ram.placer is not None:
            await self._guest().postcopy_end()
            self.ram.placer = None
        if self.ram.late_duplicates:
            log.info("%d late duplicate pages dropped", self.ram.late_duplicates)
        delay = self.agent.test_hooks.get("delay-shut")
        if delay:
            await trio.sleep(delay)
        await self.ret.send(Shut("completed"))
        self.shut_sent = True
        # Completed from here: every page is in place and the source knows.  What
        # follows (waiting for the source to close first) is only tidying up.
        self.state.ram.remaining = 0
        self.state.set_status(S.COMPLETED)

    async def _postcopy_round(self) -> None:
        assert self.main is not None and self.ram is not None
        assert self.config is not None
        self.liveness = Liveness(int(self.config.parameters.get("keepalive-ms", 2000)), "source")
        # The background stream's crypto and placement run in worker threads, so
        # the trio thread is free for faults, requests and preempt pages.
        offload_crypto(self.main)
        thread = None
        if self.worker is None:  # without preempt: requests on return, pages on main
            self.fault_thread = thread = OwnedThread("postcopy/fault", realtime=True)
        with cpu_latency(enabled=self.agent.config.pm_qos):
            async with trio.open_nursery() as nursery:
                if thread is not None:
                    nursery.start_soon(thread.run, self._fault_thread, thread)
                if self.worker is not None:
                    nursery.start_soon(self._watch_worker, self.worker)
                nursery.start_soon(self._postcopy_main)
                nursery.start_soon(self.liveness.run, self._ping)
                nursery.start_soon(watch_pause, self.pause_requested)
                self._check_postcopy_done()
                await self.postcopy_done.wait()
                await self._finish_postcopy()
                # Let the source close first, as it does on SHUT: closing at once can
                # reset the link under a PING the source is still sending.
                with trio.move_on_after(SHUT_LINGER):
                    await self.source_closed.wait()
                nursery.cancel_scope.cancel()
        self.fault_thread = None

    async def _postcopy_main(self) -> None:
        """Main in postcopy: the background stream (placed in a worker thread with
        its own placer), PING/PONG, COMPLETE.  Preempt is the fault thread's."""
        assert self.ram is not None and self.main is not None
        channel = self.main
        while True:
            try:
                msg = await channel.receive()
            except ChannelClosed:
                if not self.shut_sent:
                    raise
                self.source_closed.set()
                return
            if isinstance(msg, PAGE_MESSAGES):
                if not self.ram.sealed:  # sealed: apply only counts a late duplicate
                    async with self.placing:
                        await trio.to_thread.run_sync(self.ram.store, msg, self.background_placer)
                self._apply(msg, stored=True)
            elif isinstance(msg, Ping):
                await self._ret_send(Pong(msg.seq, msg.sent_ns))
            elif isinstance(msg, Pong):
                self.liveness.pong()
            elif isinstance(msg, Complete):
                self.complete_seen = True
                self._check_postcopy_done()
                if not self.postcopy_done.is_set():
                    log.info(
                        "COMPLETE with %d pages still in flight on other channels",
                        self.ram.missing(),
                    )
            else:
                raise ProtocolError(
                    f"unexpected {type(msg).__name__} in postcopy", channel=channel.name
                )

    async def _close_channels(self) -> None:
        await close_channels(self.main, self.ret, self.preempt)

    async def _pause(self, reason: str) -> None:
        st = self.state
        log.warning("postcopy of %s paused: %s", st.guest, reason)
        st.error_desc = f"paused: {reason}"
        await self._close_channels()
        if self.worker is not None:
            await self.worker.disconnect()
        self.pause_requested = trio.Event()
        self.recover_armed = False
        self.recovery_started = trio.Event()
        self.return_attached = trio.Event()
        self.preempt_attached = trio.Event()
        st.set_status(S.POSTCOPY_PAUSED)

    async def _recover(self) -> None:
        """Wait for migrate-recover + the source's resume channels, then reconcile."""
        st = self.state
        while True:
            await self.recovery_started.wait()
            try:
                with trio.fail_after(RECOVER_TIMEOUT):
                    await self._recover_handshake()
            except Exception as exc:
                leaf = first_error(exc)
                log.warning("recovery of %s failed: %s", st.guest, leaf)
                await self._close_channels()
                st.error_desc = f"recovery failed: {leaf}"
                self.recovery_started = trio.Event()
                self.return_attached = trio.Event()
                self.preempt_attached = trio.Event()
                if st.status != S.POSTCOPY_PAUSED:
                    st.set_status(S.POSTCOPY_PAUSED)
                continue
            st.recoveries += 1
            st.error_desc = None
            self.recover_armed = False
            st.set_status(S.POSTCOPY_ACTIVE)
            return

    async def _recover_handshake(self) -> None:
        assert self.ram is not None and self.faults is not None and self.config is not None
        await self.return_attached.wait()
        assert self.main is not None and self.ret is not None
        while True:
            msg = await self.main.receive()
            if isinstance(msg, RecvBitmapRequest):
                if not 0 <= msg.block < len(self.ram.received):
                    raise ProtocolError(
                        f"RECV_BITMAP_REQUEST for block {msg.block} of {len(self.ram.received)}",
                        channel="main",
                    )
                await self.ret.send(RecvBitmap(msg.block, self.ram.received[msg.block].copy()))
            elif isinstance(msg, Resume):
                break
            else:
                raise ProtocolError(
                    f"unexpected {type(msg).__name__} during recovery", channel="main"
                )
        if self.config.capabilities.get("postcopy-preempt"):
            await self.preempt_attached.wait()
        await self.ret.send(ResumeAck())
        self.complete_seen = False
        resent = await self.faults.resend_pending(self._request)  # none with a fault worker
        log.info("recovered %s: %d page requests sent again", self.state.guest, resent)

    # -- endings -------------------------------------------------------------

    async def _failed(self, desc: str) -> None:
        st = self.state
        log.warning("incoming migration %s from %s failed: %s", st.guest, self.peer, desc)
        if st.status in (S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER):
            st.error_desc = f"postcopy stays paused after an internal error: {desc}"
            if st.status == S.POSTCOPY_ACTIVE:
                st.set_status(S.POSTCOPY_PAUSED)
            return
        if not is_terminal(st.status):
            st.error_desc = desc
            if st.status == S.NONE:
                st.set_status(S.SETUP)
            st.set_status(S.FAILED)
        for channel in (self.main, self.ret, self.preempt):
            if channel is not None and not channel.closed:
                await channel.send_error("failed", desc)

    async def _finish(self) -> None:
        multifd = list(self.multifd.channels.values()) if self.multifd is not None else []
        with trio.move_on_after(10):
            for channel in (
                self.main,
                self.ret,
                self.preempt,
                *multifd,
                *self._early_multifd.values(),
            ):
                if channel is not None:
                    await channel.aclose()
            if not self.guest_running and self.entry is not None:
                await self.agent.destroy_guest(
                    self.entry, reason=f"incoming migration {self.state.status}"
                )
        self.done.set()
