"""The source side of a migration (QEMU's migration_thread and friends).

Theory of operation
-------------------
An :class:`OutgoingMigration` runs as one task owned by the agent.  It dials
main and return (and preempt when ``postcopy-preempt`` is on), sends CONFIG
(and POSTCOPY_ADVISE), turns on dirty logging in the guest and moves to
``active``.  Then it sends passes:

* the bulk pass — every page once (zero pages as ZERO runs);
* dirty passes — sync the dirty log (PAGEMAP_SCAN get-and-clear), send what
  was written since, measure bandwidth and dirty rate, and compute the
  expected downtime = remaining bytes / bandwidth;

until the expected downtime fits ``downtime-limit`` (precopy switchover) or
postcopy is asked for (``migrate-start-postcopy``).

Precopy switchover: [pre-switchover pause] → stop the vCPUs (downtime
starts) → ``device`` → final sync and send → device sections → VMDESC →
COMPLETE → the destination's SHUT, sent once its guest runs (downtime ends).

Postcopy: stop → ``device`` → final sync → DISCARD of every page dirtied
since it was sent → device sections → LISTEN → RUN → ``postcopy-device``
until POSTCOPY_RUN_ACK (the guest runs there) → ``postcopy-active``: every
page the destination lacks streams in the background on main while page
requests are served first: on main between background pieces, or, with
preempt, by the request worker (agents/preempt.py), a process of its own
that owns the preempt connection and maps the stopped guest's RAM.

Nothing is lost on any failure path.  Until COMPLETE (precopy) or
POSTCOPY_RUN_ACK (postcopy) the source guest is the only complete copy and is
resumed whatever happened.  After COMPLETE but before SHUT the destination
may already run it, so the source keeps its guest paused and says so in
``error-desc``.  In postcopy no host has the whole guest, so a broken or hung
link *pauses* the migration (``postcopy-paused``) with everything kept, until
``migrate resume=true`` reconnects, reconciles with the destination's
received bitmaps and carries on.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from protocol.errors import ProtocolError
from protocol.messages import (
    ChannelKind,
    Complete,
    Config,
    PassEnd,
    Ping,
    Pong,
    PostcopyAdvise,
    PostcopyListen,
    PostcopyRun,
    PostcopyRunAck,
    RamBlockInfo,
    RecvBitmap,
    RecvBitmapRequest,
    ReqPages,
    Resume,
    ResumeAck,
    Shut,
    SwitchoverStart,
    channel_name,
)
from protocol.states import MigrationStatus, Role, is_terminal
from protocol.uri import MigrationURI

from . import savevm
from .channel import Channel, ChannelClosed, PeerError
from .migration import MigrationState, first_error, now_ms
from .multifd import MultifdSender, offload_crypto
from .pmqos import cpu_latency
from .postcopy import Liveness, PausePostcopy, close_channels, discard_messages, watch_pause
from .preempt import PreemptWorker
from .ram import BandwidthMeter, RamSender
from .threads import OwnedThread
from .tls import TLSStream
from .transport import open_channel

if TYPE_CHECKING:
    from .daemon import Agent, GuestEntry
    from .vm.guest import Guest

log = logging.getLogger("godwit.source")
S = MigrationStatus

PROGRESS_INTERVAL = 0.25
"""MIGRATION_PROGRESS events at most four times a second."""
SHUT_TIMEOUT = 30.0
RUN_ACK_TIMEOUT = 30.0
WORKER_LINK_TIMEOUT = 60.0
"""How long the preempt workers may take to start and link up (agents/preempt.py)."""
RECOVER_TIMEOUT = 30.0


class OutgoingMigration:
    def __init__(self, agent: Agent, entry: GuestEntry, uri: MigrationURI) -> None:
        self.agent = agent
        self.entry = entry
        if entry.guest is None:
            raise ValueError(f"guest '{entry.name}' has no running process to migrate")
        self.guest: Guest = entry.guest
        self.uri = uri
        self.capabilities = dict(entry.capabilities)
        self.parameters = dict(entry.parameters)
        self.state = MigrationState(Role.SOURCE, entry.name, agent.events)
        self.state.uri = str(uri)
        self.state.postcopy_enabled = bool(self.capabilities.get("postcopy-ram"))
        self.cancel_scope = trio.CancelScope()
        self.main: Channel | None = None
        self.ret: Channel | None = None
        self.preempt: Channel | None = None
        self.worker: PreemptWorker | None = None
        """With postcopy-preempt: requests served in a process of its own (agents/preempt.py)."""
        self._workers: trio.Nursery | None = None
        self._worker_linked = trio.Event()
        """The request worker runs and holds the preempt connection: the switch to
        postcopy waits for it, so its start never counts as downtime."""
        self.multifd: MultifdSender | None = None
        self.ram: RamSender | None = None
        self.meter = BandwidthMeter()
        self.continue_event = trio.Event()
        self.shut_received = trio.Event()
        self.run_ack = trio.Event()
        self.postcopy_requested = False
        self.pause_requested = trio.Event()
        self.resume_requested = trio.Event()
        self.shut_reason = ""
        self.shut_seen = False
        self.guest_stopped = False
        self.complete_sent = False
        self.run_acked = False
        self.cancel_requested = False
        self.outcome: MigrationStatus | None = None
        """COMPLETED or FAILED once decided; the status says so only when _finish has
        released or resumed the guest."""
        self.done = trio.Event()
        self._last_progress = 0.0
        self._pass = 0
        # Page requests can arrive before POSTCOPY_RUN_ACK (the guest runs, then
        # the ack is sent): one queue for the whole migration keeps them all.
        self._requests_in, self._requests = trio.open_memory_channel[ReqPages](4096)

    # -- control (from QMP handlers) -------------------------------------------

    def cancel(self) -> None:
        if is_terminal(self.state.status) or self.outcome is not None:
            return  # over, or finishing: the outcome is decided
        if self.state.status not in (S.SETUP, S.ACTIVE, S.PRE_SWITCHOVER, S.DEVICE):
            raise ValueError(f"migrate-cancel is not possible in state {self.state.status}")
        self.cancel_requested = True
        self.state.set_status(S.CANCELLING)
        self.cancel_scope.cancel()

    def migrate_continue(self) -> None:
        if self.state.status != S.PRE_SWITCHOVER:
            raise ValueError(
                f"migrate-continue: migration is {self.state.status}, not pre-switchover"
            )
        self.continue_event.set()

    def start_postcopy(self) -> None:
        if not self.capabilities.get("postcopy-ram"):
            raise ValueError(
                "migrate-start-postcopy needs the postcopy-ram capability (set it before migrate)"
            )
        self.postcopy_requested = True

    def pause(self) -> None:
        self.pause_requested.set()

    def resume(self, uri: MigrationURI) -> None:
        if self.state.status != S.POSTCOPY_PAUSED:
            raise ValueError(
                f"migrate resume=true: migration is {self.state.status}, not postcopy-paused"
            )
        self.uri = uri
        self.state.uri = str(uri)
        self.resume_requested.set()

    # -- the task ------------------------------------------------------------

    async def run(self) -> None:
        """The whole migration; never raises (the outcome is in ``self.state``)."""
        try:
            with self.cancel_scope:
                # The preempt worker outlives the setup nursery: it serves postcopy.
                async with trio.open_nursery() as self._workers:
                    with cpu_latency(enabled=self.agent.config.pm_qos):
                        async with trio.open_nursery() as nursery:
                            await self._setup(nursery)
                            await self._precopy()
                            if self.postcopy_requested:
                                await self._start_postcopy()
                            else:
                                await self._switchover()
                            nursery.cancel_scope.cancel()
                    if self.state.status == S.POSTCOPY_ACTIVE:
                        await self._postcopy()
                    self._workers.cancel_scope.cancel()
        except Exception as exc:
            leaf = first_error(exc)
            if not isinstance(leaf, EXPECTED_ERRORS):
                log.error("migration of %s crashed", self.entry.name, exc_info=leaf)
            await self._failed(_describe(leaf))
        finally:
            with trio.CancelScope(shield=True):
                await self._finish()

    async def _open(self, kind: ChannelKind, *, index: int = 0, resume: bool = False) -> Channel:
        return await open_channel(
            self.agent.transport,
            self.uri,
            self.state.id,
            kind,
            index=index,
            resume=resume,
            stats=self.state.channel(channel_name(kind, index)),
            keepalive_ms=int(self.parameters.get("keepalive-ms", 0)),
        )

    async def _setup(self, nursery: trio.Nursery) -> None:
        st = self.state
        st.set_status(S.SETUP)
        self.main = await self._open(ChannelKind.MAIN)
        self.ret = await self._open(ChannelKind.RETURN)
        blocks = self.guest.blocks
        if self.capabilities.get("postcopy-preempt"):
            self.preempt = await self._open(ChannelKind.PREEMPT)
            if self.capabilities.get("postcopy-ram"):
                # The worker's interpreter starts while precopy runs, not before it.
                assert self._workers is not None
                self._workers.start_soon(self._start_worker, blocks)
        await self.main.send(
            Config(
                ramblocks=tuple(RamBlockInfo(b.name, b.size, b.page_size) for b in blocks),
                capabilities=self.capabilities,
                parameters=self.parameters,
                guest=self.entry.describe_for_destination(),
            )
        )
        if self.capabilities.get("postcopy-ram"):
            await self.main.send(PostcopyAdvise(tuple(b.page_size for b in blocks)))
        nursery.start_soon(self._return_path)
        if self.capabilities.get("multifd"):
            channels = []
            for index in range(int(self.parameters.get("multifd-channels", 2))):
                channels.append(await self._open(ChannelKind.MULTIFD, index=index))
                offload_crypto(channels[-1])
            self.multifd = MultifdSender(channels)
            nursery.start_soon(self.multifd.run)
        self.ram = RamSender(
            blocks,
            st.ram,
            detect_zero=self.parameters.get("zero-page-detection", "legacy") != "none",
        )
        self.ram.limiter.rate = float(self.parameters.get("max-bandwidth", 0))
        await self.guest.start_dirty_log()
        st.set_status(S.ACTIVE)

    async def _start_worker(self, blocks: Any) -> None:
        """Start the request worker and hand it the preempt connection."""
        st = self.state
        worker = PreemptWorker("source", f"{st.guest}/preempt", self._worker_stats, st.channels)
        worker.survivable = self.run_acked  # a restart in postcopy
        setup = {
            **self.agent.worker_setup(),
            "page_size": max(b.page_size for b in blocks),
            "detect_zero": self.parameters.get("zero-page-detection", "legacy") != "none",
            "blocks": [{"name": b.name, "size": b.size, "page_size": b.page_size} for b in blocks],
        }
        assert self._workers is not None
        await self._workers.start(worker.run, setup, [b.fd for b in blocks])
        self.worker = worker
        await self._hand_over_preempt()
        with trio.fail_after(WORKER_LINK_TIMEOUT):
            await worker.connected.wait()
        self._worker_linked.set()

    async def _watch_worker(self, worker: PreemptWorker) -> None:
        await worker.dead.wait()
        raise PausePostcopy(f"the request worker failed: {worker.failure}")

    async def _hand_over_preempt(self) -> None:
        """End TLS on the preempt connection; the worker handshakes anew on it."""
        assert self.preempt is not None and self.worker is not None
        tls = isinstance(self.preempt.stream, TLSStream)
        fd, early = await self.preempt.stream.handover()
        await self.preempt.aclose()
        await self.worker.connect(fd, early, tls=tls, server_hostname=self.uri.host)

    def _worker_stats(self, msg: dict[str, Any]) -> None:
        """The request worker's figures since its last message (trio thread)."""
        if self.ram is not None and self.worker is not None:
            # Served on a link a recovery has replaced: the destination's RECV_BITMAP
            # decided whether those pages arrived; the background resends the rest.
            epoch = self.worker.epoch
            served = [s[:4] for s in msg.get("served", ()) if s[4] == epoch]
            self.ram.account_served(served, int(msg.get("sent", 0)))

    async def _send(self, message: Any) -> int:
        assert self.main is not None
        return await self.main.send(message)

    async def _send_page(self, message: Any) -> int:
        """Precopy page frames: on the multifd channels when there are any, else main."""
        if self.multifd is not None and not self.multifd.closed:
            size = await self.multifd.send(message)
            self.state.ram.multifd_bytes += size
            return size
        return await self._send(message)

    async def _multifd_sync(self, *, last: bool = False) -> None:
        """End a round of multifd pages (see agents/multifd.py); ``last`` closes them."""
        if self.multifd is None or self.multifd.closed:
            return
        await self.multifd.sync(self._send)
        if last:
            await self.multifd.close()

    async def _checkpoint(self) -> None:
        """Between batches: progress figures and events, at most a few times a second."""
        now = time.monotonic()
        self.meter.update(self.state.ram.transferred, now)
        if now - self._last_progress >= PROGRESS_INTERVAL:
            self._last_progress = now
            st = self.state
            st.ram.mbps = self.meter.rate * 8 / 1e6
            st.ram.pages_per_second = self.meter.rate / max(st.ram.page_size, 1)
            if st.status == S.ACTIVE and self.meter.rate > 0 and self.ram is not None:
                st.expected_downtime_ms = self.ram.pending_bytes() / self.meter.rate * 1000
            self.agent.events.emit("MIGRATION_PROGRESS", {"guest": st.guest, "info": st.info()})
        await trio.lowlevel.checkpoint()

    async def _precopy_checkpoint(self) -> None:
        await self._checkpoint()
        if self.postcopy_requested:
            raise _SwitchNow()

    async def _sync_dirty(self) -> dict[int, np.ndarray]:
        """Get-and-clear the guest's dirty log into ``to_send``; returns the new dirty pages."""
        assert self.ram is not None and self.guest.dirty_log is not None
        dirty = await self.guest.dirty_log.get_and_clear_async()
        out: dict[int, np.ndarray] = {}
        for index, block in enumerate(self.guest.blocks):
            pages = np.asarray(dirty.get(block.name, ()), dtype=np.uint64)
            self.ram.add_dirty(index, pages)
            out[index] = pages
        self.state.ram.dirty_sync_count += 1
        self.ram.update_remaining()
        return out

    async def _precopy(self) -> None:
        assert self.ram is not None
        st, ram = self.state, self.ram
        limit_ms = float(self.parameters.get("downtime-limit", 300))
        auto_converge = bool(self.capabilities.get("auto-converge"))
        high_dirty_passes = 0
        extra_passes = 0
        last_remaining: int | None = ram.pending_bytes()  # the bulk pass starts with all of RAM
        last_sync = time.monotonic()
        pass_started = time.monotonic()
        bytes_at_pass_start = st.ram.transferred
        while True:
            self._pass += 1
            self.agent.events.emit("MIGRATION_PASS", {"pass": self._pass, "guest": st.guest})
            try:
                await ram.send_pass(self._send_page, checkpoint=self._precopy_checkpoint)
            except _SwitchNow:
                return
            await self._multifd_sync()
            await self._send(PassEnd(self._pass, {"transferred": st.ram.transferred}))
            now = time.monotonic()
            pass_bytes = st.ram.transferred - bytes_at_pass_start
            pass_time = max(now - pass_started, 1e-6)
            rate = self.meter.update(st.ram.transferred, now)
            bandwidth = max(rate, pass_bytes / pass_time if pass_bytes > 1 << 20 else 0.0)
            dirty = sum(len(p) for p in (await self._sync_dirty()).values())
            sync_now = time.monotonic()
            st.ram.dirty_pages_rate = dirty / max(sync_now - last_sync, 1e-6)
            last_sync = sync_now
            remaining = ram.pending_bytes()
            if bandwidth > 0:
                st.expected_downtime_ms = remaining / bandwidth * 1000
            log.info(
                "pass %d: sent %d bytes in %.3f s, %d pages dirty, expected downtime %.1f ms",
                self._pass,
                pass_bytes,
                pass_time,
                dirty,
                st.expected_downtime_ms or -1,
            )
            if self.postcopy_requested:
                return
            if bandwidth > 0 and remaining / bandwidth * 1000 <= limit_ms:
                if not _another_pass_pays(
                    remaining, last_remaining, bandwidth, limit_ms, extra_passes
                ):
                    st.expected_at_switchover_ms = st.expected_downtime_ms
                    return
                extra_passes += 1
            last_remaining = remaining
            # Auto-converge, as QEMU: dirtying more than half of what we send,
            # twice in a row, means passes will not shrink — throttle the guest.
            if auto_converge and dirty * st.ram.page_size > pass_bytes * 0.5:
                high_dirty_passes += 1
                if high_dirty_passes >= 2:
                    await self._throttle_up()
                    high_dirty_passes = 0
            pass_started, bytes_at_pass_start = time.monotonic(), st.ram.transferred

    async def _throttle_up(self) -> None:
        st = self.state
        initial = int(self.parameters.get("cpu-throttle-initial", 20))
        step = int(self.parameters.get("cpu-throttle-increment", 10))
        ceiling = int(self.parameters.get("max-cpu-throttle", 99))
        st.throttle_percent = (
            initial if st.throttle_percent == 0 else min(ceiling, st.throttle_percent + step)
        )
        await self.guest.throttle(st.throttle_percent)
        log.info("auto-converge: guest throttled to %d%%", st.throttle_percent)

    async def _stop_guest(self) -> float:
        stop_at = time.monotonic()
        await self.guest.stop()
        self.guest_stopped = True
        self.agent.events.emit("STOP", {"guest": self.state.guest})
        return stop_at

    async def _switchover(self) -> None:
        assert self.ram is not None and self.main is not None
        st = self.state
        if self.capabilities.get("pause-before-switchover"):
            st.set_status(S.PRE_SWITCHOVER)
            await self.continue_event.wait()
        stop_at = await self._stop_guest()
        st.set_status(S.DEVICE)
        await self._send(SwitchoverStart())
        await self._sync_dirty()
        await self.ram.send_pass(self._send_page, phase="downtime")
        await self._multifd_sync(last=True)
        await self.guest.stop_dirty_log()
        sections = await self.guest.save_devices()
        await savevm.send_devices(self._send, sections)
        if not self.capabilities.get("suppress-vmdesc"):
            await savevm.send_vmdesc(self._send, self.guest, sections)
        await self._send(Complete())
        self.complete_sent = True
        with trio.fail_after(SHUT_TIMEOUT):
            await self.shut_received.wait()
        st.downtime_ms = (time.monotonic() - stop_at) * 1000
        await self._completed()

    async def _completed(self) -> None:
        st = self.state
        # The migration ends here, as QEMU's total-time does: the destination
        # runs the guest.  Releasing our copy (the guest process exits and its
        # RAM is freed: 0.15-0.2 s per GiB here) comes after, before the status
        # says completed, and is not counted.
        st.end_ms = now_ms()
        st.expected_downtime_ms = None
        st.ram.remaining = 0
        if self.capabilities.get("x-switchover-digest"):
            from .daemon import ram_digest

            st.switchover_digest = await ram_digest(self.guest)  # still stopped: RAM as it was sent
        self.outcome = S.COMPLETED  # published by _finish, once the guest is released

    # -- postcopy --------------------------------------------------------------

    async def _start_postcopy(self) -> None:
        """Stop, DISCARD what changed since it was sent, devices, LISTEN, RUN, wait for the ack."""
        assert self.ram is not None and self.main is not None
        st, ram = self.state, self.ram
        if self.capabilities.get("postcopy-preempt"):
            with trio.fail_after(WORKER_LINK_TIMEOUT):
                await self._worker_linked.wait()  # the guest still runs here
        stop_at = await self._stop_guest()
        st.set_status(S.DEVICE)
        await self._send(SwitchoverStart())
        await self._multifd_sync(last=True)  # every multifd page lands before DISCARD
        await self._sync_dirty()
        await self.guest.stop_dirty_log()
        # Every page still to send that the destination holds a copy of is stale —
        # dirtied since the last sync *or before it* and not re-sent yet (QEMU
        # discards its whole dirty bitmap after the final sync, for that reason).
        for index, pending in enumerate(ram.to_send):
            stale = (pending & ram.sent_once[index]).indices()
            for message in discard_messages(index, stale):
                await self._send(message)
        sections = await self.guest.save_devices()
        await savevm.send_devices(self._send, sections)  # no VMDESC in postcopy, as QEMU
        await self._send(PostcopyListen())
        await self._send(PostcopyRun())
        st.set_status(S.POSTCOPY_DEVICE)
        with trio.fail_after(RUN_ACK_TIMEOUT):
            await self.run_ack.wait()
        self.run_acked = True
        if self.worker is not None:
            self.worker.survivable = True  # from here a failed worker pauses postcopy
        st.downtime_ms = (time.monotonic() - stop_at) * 1000
        st.expected_downtime_ms = None
        st.set_status(S.POSTCOPY_ACTIVE)

    async def _postcopy(self) -> None:
        """Background stream + request service until SHUT; pause and recover on failures."""
        st = self.state
        self.ram.limiter.rate = float(self.parameters.get("max-postcopy-bandwidth", 0))  # type: ignore[union-attr]
        while True:
            try:
                await self._postcopy_round()
                await self._completed()
                return
            except Exception as exc:
                leaf = first_error(exc)
                if self.shut_seen:
                    # SHUT means the destination holds every page and let go of
                    # the uffd: a send failing after it (a PING into the closing
                    # link) cannot make the migration any less complete.
                    log.info("postcopy of %s: %s after SHUT, ignored", st.guest, leaf)
                    await self._completed()
                    return
                if not isinstance(leaf, (*EXPECTED_ERRORS, PausePostcopy)):
                    log.error("postcopy of %s: unexpected error, pausing", st.guest, exc_info=leaf)
                await self._pause(_describe(leaf))
            await self._recover()

    async def _postcopy_round(self) -> None:
        assert self.ram is not None and self.main is not None
        offload_crypto(self.main)  # background crypto off the trio thread
        self.liveness = Liveness(int(self.parameters.get("keepalive-ms", 2000)), "destination")
        return_path = OwnedThread("postcopy/return", realtime=True)
        with cpu_latency(enabled=self.agent.config.pm_qos):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(return_path.run, self._return_path_thread, return_path, nursery)
                nursery.start_soon(self._serve_requests, self._requests)
                nursery.start_soon(self.liveness.run, self._send)
                nursery.start_soon(watch_pause, self.pause_requested)
                if self.worker is not None:
                    nursery.start_soon(self._watch_worker, self.worker)
                if self.ram.pending_pages():
                    await self.ram.send_background(self._send, checkpoint=self._checkpoint)
                if not self.complete_sent:
                    await self._send(Complete())
                    self.complete_sent = True
                    await self._late_duplicate_hook()
                await self.shut_received.wait()
                if self.worker is not None and not self.worker.dead.is_set():
                    await self.worker.stop()  # its last figures
                nursery.cancel_scope.cancel()

    async def _late_duplicate_hook(self) -> None:
        """Test hook ``late-duplicate`` (seconds): after COMPLETE, send the first pages
        of block 0 again, as a page both requested and streamed can arrive late."""
        delay = self.agent.test_hooks.pop("late-duplicate", None)
        if delay is not None and self.ram is not None:
            await trio.sleep(delay)
            pages = np.arange(min(256, self.ram.blocks[0].npages), dtype=np.uint64)
            await self.ram.send_batch(self._send, 0, pages, "postcopy")

    async def _serve_requests(self, requests: trio.MemoryReceiveChannel[ReqPages]) -> None:
        assert self.ram is not None
        assert self.main is not None  # requests on the return path are answered on main
        async for req in requests:
            await self.ram.send_requested(
                self.main.send, req.block, req.first_page, req.count, req.request_id
            )

    def _return_path_thread(self, thread: OwnedThread, nursery: trio.Nursery) -> None:
        """QEMU's return-path thread: read the destination's messages.

        Page requests come here only without preempt (with it, the preempt
        workers carry them, agents/preempt.py); they are queued for
        ``_serve_requests``, which sends them on main between background pieces.
        """
        assert self.ret is not None
        ret = self.ret
        while not thread.should_stop():
            msg = ret.thread_receive(thread.wait)
            if isinstance(msg, ReqPages):
                trio.from_thread.run(self._requests_in.send, msg, trio_token=thread.token)
            elif isinstance(msg, Pong):
                thread.call_soon(self.liveness.pong)
            elif isinstance(msg, Ping):
                thread.call_soon(nursery.start_soon, self._send, Pong(msg.seq, msg.sent_ns))
            elif isinstance(msg, Shut):
                self.shut_reason = msg.reason
                self.shut_seen = True  # at once: the trio thread may see an error first
                thread.call_soon(self.shut_received.set)
                return
            else:
                raise ProtocolError(
                    f"unexpected {type(msg).__name__} on the return path in postcopy",
                    channel="return",
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
        self.resume_requested = trio.Event()
        st.set_status(S.POSTCOPY_PAUSED)

    async def _recover(self) -> None:
        """Wait for ``migrate resume=true``, reconnect and reconcile; retry on failure."""
        st = self.state
        while True:
            await self.resume_requested.wait()
            self.resume_requested = trio.Event()
            st.set_status(S.POSTCOPY_RECOVER_SETUP)
            try:
                with trio.fail_after(RECOVER_TIMEOUT):
                    await self._recover_handshake()
            except Exception as exc:
                leaf = first_error(exc)
                reason = _describe(leaf)
                log.warning("recovery of %s failed: %s", st.guest, reason)
                await self._close_channels()
                st.error_desc = f"recovery failed: {reason}"
                st.set_status(S.POSTCOPY_PAUSED)
                continue
            st.recoveries += 1
            st.error_desc = None
            st.set_status(S.POSTCOPY_ACTIVE)
            return

    async def _recover_handshake(self) -> None:
        """Main (resume HELLO), return, preempt; RECV_BITMAP per block; RESUME/RESUME_ACK."""
        assert self.ram is not None
        st, ram = self.state, self.ram
        self.main = await self._open(ChannelKind.MAIN, resume=True)
        self.ret = await self._open(ChannelKind.RETURN, resume=True)
        st.set_status(S.POSTCOPY_RECOVER)
        if self.capabilities.get("postcopy-preempt"):
            self.preempt = await self._open(ChannelKind.PREEMPT, resume=True)  # after main, as QEMU
            if self.worker is None or self.worker.dead.is_set():
                await self._start_worker(self.guest.blocks)  # the last one failed
            else:
                await self._hand_over_preempt()
        for index in range(len(ram.blocks)):
            await self.main.send(RecvBitmapRequest(index))
        for index in range(len(ram.blocks)):
            msg = await self.ret.receive()
            if not isinstance(msg, RecvBitmap) or msg.block != index:
                raise ProtocolError(
                    f"expected RECV_BITMAP for block {index}, got {msg!r:.80}", channel="return"
                )
            if msg.bitmap.npages != ram.blocks[index].npages:
                raise ProtocolError(
                    f"RECV_BITMAP for block {index} has {msg.bitmap.npages} pages, not {ram.blocks[index].npages}",
                    channel="return",
                )
            ram.to_send[index] = msg.bitmap.complement()  # everything the destination lacks
        ram.update_remaining()
        self.complete_sent = False
        await self.main.send(Resume())
        msg = await self.ret.receive()
        if not isinstance(msg, ResumeAck):
            raise ProtocolError(f"expected RESUME_ACK, got {type(msg).__name__}", channel="return")

    # -- precopy return path ---------------------------------------------------

    async def _return_path(self) -> None:
        """What the destination says before postcopy: SHUT, RUN_ACK, PONG; ERROR raises."""
        assert self.ret is not None
        while True:
            msg = await self.ret.receive()
            if isinstance(msg, Shut):
                self.shut_reason = msg.reason
                self.shut_received.set()
                return
            if isinstance(msg, PostcopyRunAck):
                self.run_ack.set()
                return
            if isinstance(msg, ReqPages) and self.state.status == S.POSTCOPY_DEVICE:
                await self._requests_in.send(msg)
                continue
            if isinstance(msg, Pong):
                continue
            raise ProtocolError(
                f"unexpected {type(msg).__name__} on the return path", channel="return"
            )

    # -- endings -------------------------------------------------------------

    async def _failed(self, desc: str) -> None:
        st = self.state
        if self.cancel_requested and st.status == S.CANCELLING:
            return
        log.warning("migration of %s failed: %s", st.guest, desc)
        if self.complete_sent and not self.run_acked:
            desc += (
                " — the destination may already run the guest, so the source guest stays paused;"
                " check the destination, then `cont` here only if it is not running there"
            )
        if st.status in (S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_RECOVER):
            # No host holds the whole guest: never give up on our half of it.
            st.error_desc = f"postcopy stays paused after an internal error: {desc}"
            return
        if not is_terminal(st.status):
            st.error_desc = desc
            self.outcome = S.FAILED  # published by _finish, once the guest runs again

    async def _finish(self) -> None:
        """Close the channels, then release the guest (completed) or resume it, and
        only then say ``completed`` / ``failed``: a client that sees the status
        also sees the guest as it will stay."""
        try:
            await self._finish_guest()
        finally:
            if self.outcome is not None and not is_terminal(self.state.status):
                self.state.set_status(self.outcome)
            self.done.set()

    async def _finish_guest(self) -> None:
        st = self.state
        multifd = self.multifd.channels if self.multifd is not None else []
        with trio.move_on_after(10):
            for channel in (self.main, self.ret, self.preempt, *multifd):
                if channel is None or channel.closed:
                    continue
                if self.outcome != S.COMPLETED:
                    await channel.send_error(
                        "cancelled" if self.cancel_requested else "failed",
                        st.error_desc or "migration cancelled by the source",
                    )
                await channel.aclose()
            if self.outcome == S.COMPLETED:
                await self.entry.release_after_migration()
            elif not self.run_acked:
                try:
                    await self.guest.stop_dirty_log()
                except Exception as exc:  # the guest may be gone; report, do not mask
                    log.warning("stopping the dirty log failed: %s", exc)
                if self.state.throttle_percent:
                    await self.guest.throttle(0)
                if self.guest_stopped and not self.complete_sent:
                    await self.guest.cont()
                    self.agent.events.emit("RESUME", {"guest": st.guest})
            if self.cancel_requested and st.status == S.CANCELLING:
                st.set_status(S.CANCELLED)


MAX_EXTRA_PASSES = 3
"""Passes beyond the point where the downtime limit is met (see _another_pass_pays)."""


def _another_pass_pays(
    remaining: int, last_remaining: int | None, bandwidth: float, limit_ms: float, extra_passes: int
) -> bool:
    """Whether to keep iterating although the expected downtime already fits the limit.

    QEMU switches over as soon as it fits; with the default 300 ms that can mean
    stopping the guest for ~150 ms when one more pass of ~150 ms would have left
    a tenth of it.  godwit takes that pass while passes still halve what is left,
    the expected downtime is not already tiny (a tenth of the limit), and at most
    MAX_EXTRA_PASSES times — the guest keeps running meanwhile, so it only costs
    total time, never downtime.
    """
    expected_ms = remaining / bandwidth * 1000
    shrinking = last_remaining is not None and remaining * 2 <= last_remaining
    return shrinking and expected_ms > limit_ms / 10 and extra_passes < MAX_EXTRA_PASSES


class _SwitchNow(Exception):
    """Raised between batches to leave a pass when postcopy is requested."""


EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    ProtocolError,
    PeerError,
    ChannelClosed,
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    ValueError,
)
"""Failures that come from the world (network, peer, guest), not from bugs: no traceback."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, PeerError):
        return f"destination: {exc.message}"
    if isinstance(exc, trio.TooSlowError):
        return "timed out waiting for the destination"
    return str(exc) or exc.__class__.__name__
