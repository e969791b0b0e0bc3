"""The source side of a migration (QEMU's migration_thread and friends).

Theory of operation
-------------------
An :class:`OutgoingMigration` runs as one task with its own nursery, owned
by the agent.  It dials main and return, sends CONFIG, turns on dirty
logging in the guest and moves to ``active``.  Then it sends passes:

* the bulk pass — every page once (zero pages as ZERO runs);
* dirty passes — sync the dirty log (PAGEMAP_SCAN get-and-clear), send what
  was written since, measure bandwidth and dirty rate, and compute the
  expected downtime = remaining bytes / bandwidth;

until the expected downtime fits ``downtime-limit``; then the switchover:
[pre-switchover pause] → stop the vCPUs (downtime starts) → ``device`` →
final sync and send → device sections → VMDESC → COMPLETE → wait for the
destination's SHUT, which it sends once its guest runs (downtime ends).

Nothing is lost on any failure path.  Until COMPLETE is sent, the guest on
the source is the only complete copy and is resumed (``cont``) whatever
happened.  After COMPLETE but before SHUT the destination may already run
it, so the source keeps its guest *paused* and says so in ``error-desc``
(resuming could run the guest twice; libvirt faces the same choice).  Only
a SHUT releases the source guest.
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
    Error,
    PassEnd,
    Pong,
    RamBlockInfo,
    Shut,
    SwitchoverStart,
)
from protocol.states import MigrationStatus, Role, is_terminal
from protocol.uri import MigrationURI

from . import savevm
from .channel import Channel, ChannelClosed, PeerError
from .migration import MigrationState
from .ram import BandwidthMeter, RamSender
from .transport import open_channel

if TYPE_CHECKING:
    from .daemon import Agent, GuestEntry
    from .vm.guest import Guest

log = logging.getLogger("godwit.source")
S = MigrationStatus

PROGRESS_INTERVAL = 0.25
"""MIGRATION_PROGRESS events at most four times a second."""
SHUT_TIMEOUT = 30.0


class MigrationFailed(Exception):
    pass


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
        self.cancel_scope = trio.CancelScope()
        self.main: Channel | None = None
        self.ret: Channel | None = None
        self.ram: RamSender | None = None
        self.meter = BandwidthMeter()
        self.continue_event = trio.Event()
        self.shut_received = trio.Event()
        self.shut_reason = ""
        self.guest_stopped = False
        self.complete_sent = False
        self.cancel_requested = False
        self.done = trio.Event()
        self._last_progress = 0.0
        self._pass = 0

    # -- control -------------------------------------------------------------

    def cancel(self) -> None:
        if is_terminal(self.state.status):
            return
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

    # -- the task ------------------------------------------------------------

    async def run(self) -> None:
        """The whole migration; never raises (the outcome is in ``self.state``)."""
        try:
            with self.cancel_scope:
                async with trio.open_nursery() as nursery:
                    await self._setup(nursery)
                    await self._precopy()
                    await self._switchover()
                    nursery.cancel_scope.cancel()
        except Exception as exc:
            leaf = first_error(exc)
            if not isinstance(leaf, EXPECTED_ERRORS):
                log.error("migration of %s crashed", self.entry.name, exc_info=leaf)
            await self._failed(_describe(leaf))
        finally:
            with trio.CancelScope(shield=True):
                await self._finish()

    async def _setup(self, nursery: trio.Nursery) -> None:
        st = self.state
        st.set_status(S.SETUP)
        keepalive_ms = int(self.parameters.get("keepalive-ms", 0))
        self.main = await open_channel(
            self.agent.transport,
            self.uri,
            st.id,
            ChannelKind.MAIN,
            stats=st.channel("main"),
            keepalive_ms=keepalive_ms,
        )
        self.ret = await open_channel(
            self.agent.transport,
            self.uri,
            st.id,
            ChannelKind.RETURN,
            stats=st.channel("return"),
            keepalive_ms=keepalive_ms,
        )
        blocks = self.guest.blocks
        await self.main.send(
            Config(
                ramblocks=tuple(RamBlockInfo(b.name, b.size, b.page_size) for b in blocks),
                capabilities=self.capabilities,
                parameters=self.parameters,
                guest=self.entry.describe_for_destination(),
            )
        )
        nursery.start_soon(self._return_path)
        self.ram = RamSender(
            blocks,
            st.ram,
            detect_zero=self.parameters.get("zero-page-detection", "legacy") != "none",
        )
        self.ram.limiter.rate = float(self.parameters.get("max-bandwidth", 0))
        await self.guest.start_dirty_log()
        st.set_status(S.ACTIVE)

    async def _send(self, message: Any) -> int:
        assert self.main is not None
        return await self.main.send(message)

    async def _checkpoint(self) -> None:
        """Between batches: progress figures and events, at most a few times a second."""
        now = time.monotonic()
        self.meter.update(self.state.ram.transferred, now)
        if now - self._last_progress >= PROGRESS_INTERVAL:
            self._last_progress = now
            st = self.state
            st.ram.mbps = self.meter.rate * 8 / 1e6
            st.ram.pages_per_second = self.meter.rate / max(st.ram.page_size, 1)
            if self.meter.rate > 0 and self.ram is not None:
                st.expected_downtime_ms = self.ram.pending_bytes() / self.meter.rate * 1000
            self.agent.events.emit("MIGRATION_PROGRESS", {"guest": st.guest, "info": st.info()})
        await trio.lowlevel.checkpoint()

    async def _sync_dirty(self) -> int:
        """Get-and-clear the guest's dirty log into ``to_send``; returns pages newly dirty."""
        assert self.ram is not None
        assert self.guest.dirty_log is not None, "dirty logging was started in setup"
        dirty = await self.guest.dirty_log.get_and_clear_async()
        count = 0
        for index, block in enumerate(self.guest.blocks):
            count += self.ram.add_dirty(
                index, np.asarray(dirty.get(block.name, ()), dtype=np.uint64)
            )
        self.state.ram.dirty_sync_count += 1
        self.ram.update_remaining()
        return count

    async def _precopy(self) -> None:
        assert self.ram is not None
        st, ram = self.state, self.ram
        limit_ms = float(self.parameters.get("downtime-limit", 300))
        auto_converge = bool(self.capabilities.get("auto-converge"))
        high_dirty_passes = 0
        last_sync = time.monotonic()
        pass_started = time.monotonic()
        bytes_at_pass_start = st.ram.transferred
        while True:
            self._pass += 1
            self.agent.events.emit("MIGRATION_PASS", {"pass": self._pass, "guest": st.guest})
            await ram.send_pass(self._send, checkpoint=self._checkpoint)
            await self._send(PassEnd(self._pass, {"transferred": st.ram.transferred}))
            now = time.monotonic()
            pass_bytes = st.ram.transferred - bytes_at_pass_start
            pass_time = max(now - pass_started, 1e-6)
            bandwidth = max(
                self.meter.update(st.ram.transferred, now),
                pass_bytes / pass_time if pass_bytes > 1 << 20 else 0.0,
            )
            dirty = await self._sync_dirty()
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
            if bandwidth > 0 and remaining / bandwidth * 1000 <= limit_ms:
                return
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

    async def _switchover(self) -> None:
        assert self.ram is not None and self.main is not None
        st = self.state
        if self.capabilities.get("pause-before-switchover"):
            st.set_status(S.PRE_SWITCHOVER)
            await self.continue_event.wait()
        stop_at = time.monotonic()
        await self.guest.stop()
        self.guest_stopped = True
        self.agent.events.emit("STOP", {"guest": st.guest})
        st.set_status(S.DEVICE)
        await self._send(SwitchoverStart())
        await self._sync_dirty()
        await self.ram.send_pass(self._send, phase="downtime")
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
        st.expected_downtime_ms = None
        st.ram.remaining = 0
        if self.capabilities.get("x-switchover-digest"):
            from .daemon import ram_digest

            st.switchover_digest = await ram_digest(self.guest)  # still stopped: RAM as it was sent
        st.set_status(S.COMPLETED)

    async def _return_path(self) -> None:
        """Everything the destination says: SHUT, PONG, ERROR (raised by receive)."""
        assert self.ret is not None
        while True:
            msg = await self.ret.receive()
            if isinstance(msg, Shut):
                self.shut_reason = msg.reason
                self.shut_received.set()
                return
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
        if self.complete_sent:
            desc += (
                " — the destination may already run the guest, so the source guest stays paused;"
                " check the destination, then `cont` here only if it is not running there"
            )
        if not is_terminal(st.status):
            st.error_desc = desc
            st.set_status(S.FAILED)

    async def _finish(self) -> None:
        st = self.state
        with trio.move_on_after(10):
            for channel in (self.main, self.ret):
                if channel is None:
                    continue
                if st.status != S.COMPLETED:
                    await channel.send_error(
                        "cancelled" if self.cancel_requested else "failed",
                        st.error_desc or "migration cancelled by the source",
                    )
                await channel.aclose()
            if st.status == S.COMPLETED:
                await self.entry.release_after_migration()
            else:
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
        self.done.set()


EXPECTED_ERRORS = (
    ProtocolError,
    PeerError,
    ChannelClosed,
    MigrationFailed,
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    ValueError,
)
"""Failures that come from the world (network, peer, guest), not from bugs: no traceback."""


def first_error(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups from nurseries."""
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        exc = (inner or list(exc.exceptions))[0]
    return exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, PeerError):
        return f"destination: {exc.message}"
    if isinstance(exc, trio.TooSlowError):
        return "timed out waiting for the destination"
    return str(exc) or exc.__class__.__name__


__all__ = ["Error", "OutgoingMigration"]
