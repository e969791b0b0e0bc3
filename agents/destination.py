"""The destination side of a migration (QEMU's process_incoming_migration & loadvm).

An :class:`IncomingMigration` begins when a main channel says HELLO with a
migration id the agent has not seen.  It reads CONFIG, makes the RAM blocks
(memfd) and starts the guest process *incoming* (vCPUs not running), then
applies what main carries: pages (pwrite/mapped writes in precopy), device
sections, VMDESC, and COMPLETE, upon which it loads the devices, starts the
vCPUs and says SHUT on the return path — the source's signal that it may
let its own copy go.  The return channel is attached by the listener when
it arrives (same migration id).

On any failure before the guest runs here, the incoming guest and its memory
are destroyed — the source still has the whole guest — and the source is
told why with an ERROR frame.  Nothing is left behind: no guest process, no
memfd, no channel.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from protocol.errors import ProtocolError
from protocol.messages import (
    Complete,
    Config,
    DeviceState,
    Hello,
    PageBatch,
    Pages,
    PassEnd,
    Ping,
    Pong,
    Shut,
    SwitchoverStart,
    Vmdesc,
    Zero,
    ZeroBatch,
)
from protocol.states import MigrationStatus, Role, is_terminal

from . import savevm
from .channel import Channel
from .migration import MigrationState
from .ram import RamReceiver
from .source import EXPECTED_ERRORS, first_error
from .vm.devices import DeviceSection

if TYPE_CHECKING:
    from .daemon import Agent, GuestEntry
    from .vm.guest import Guest

log = logging.getLogger("godwit.destination")
S = MigrationStatus

CONFIG_TIMEOUT = 30.0
RETURN_PATH_TIMEOUT = 30.0


class IncomingMigration:
    def __init__(self, agent: Agent, hello: Hello, main: Channel, peer: str) -> None:
        self.agent = agent
        self.hello = hello
        self.main = main
        self.peer = peer
        self.ret: Channel | None = None
        self.return_attached = trio.Event()
        self.state = MigrationState(Role.DESTINATION, "?", agent.events, hello.migration_id)
        self.state.channels["main"] = main.stats
        self.state.uri = f"from {peer}"
        self.entry: GuestEntry | None = None
        self.ram: RamReceiver | None = None
        self.config: Config | None = None
        self.sections: list[DeviceSection] = []
        self.vmdesc: dict[str, Any] | None = None
        self.guest_running = False
        self.cancel_scope = trio.CancelScope()
        self.done = trio.Event()

    def attach(self, hello: Hello, channel: Channel) -> str | None:
        """A secondary channel arrived for this migration; returns a refusal reason or None."""
        if hello.channel.value == "return":
            if self.ret is not None:
                return "this migration already has a return path"
            self.ret = channel
            self.state.channels["return"] = channel.stats
            self.return_attached.set()
            return None
        return f"channel kind {hello.channel.value} is not supported in this migration"

    def _guest(self) -> Guest:
        assert self.entry is not None and self.entry.guest is not None, (
            "the guest exists after CONFIG"
        )
        return self.entry.guest

    async def run(self) -> None:
        try:
            with self.cancel_scope:
                self.state.set_status(S.SETUP)
                await self._setup()
                await self._load()
        except Exception as exc:
            leaf = first_error(exc)
            if not isinstance(leaf, EXPECTED_ERRORS):
                log.error("incoming migration crashed", exc_info=leaf)
            await self._failed(str(leaf) or leaf.__class__.__name__)
        finally:
            with trio.CancelScope(shield=True):
                await self._finish()

    async def _setup(self) -> None:
        with trio.fail_after(CONFIG_TIMEOUT):
            config = await self.main.receive()
        if not isinstance(config, Config):
            raise ProtocolError(
                f"expected CONFIG after HELLO, got {type(config).__name__}", channel="main"
            )
        self.config = config
        self.entry = await self.agent.create_incoming_guest(self, config)
        self.state.guest = self.entry.name
        self.ram = RamReceiver(self._guest().blocks)
        self.state.ram.page_size = config.ramblocks[0].page_size if config.ramblocks else 4096
        self.state.ram.total = sum(b.size for b in config.ramblocks)
        self.state.set_status(S.ACTIVE)
        with trio.fail_after(RETURN_PATH_TIMEOUT):
            await self.return_attached.wait()

    async def _load(self) -> None:
        assert self.ram is not None and self.entry is not None
        st, ram = self.state, self.ram
        while True:
            msg = await self.main.receive()
            if isinstance(msg, Pages):
                ram.apply_pages(msg)
                st.ram.normal += msg.count
                st.ram.transferred += msg.count * st.ram.page_size
            elif isinstance(msg, PageBatch):
                ram.apply_page_batch(msg)
                st.ram.normal += len(msg.pages)
                st.ram.transferred += len(msg.pages) * st.ram.page_size
            elif isinstance(msg, Zero):
                ram.apply_zero(msg)
                st.ram.duplicate += msg.count
            elif isinstance(msg, ZeroBatch):
                ram.apply_zero_batch(msg)
                st.ram.duplicate += len(msg.pages)
            elif isinstance(msg, PassEnd):
                st.ram.dirty_sync_count = msg.pass_no
            elif isinstance(msg, SwitchoverStart):
                pass
            elif isinstance(msg, DeviceState):
                self.sections.append(savevm.section_from_message(msg))
            elif isinstance(msg, Vmdesc):
                self.vmdesc = msg.description
            elif isinstance(msg, Ping):
                assert self.ret is not None
                await self.ret.send(Pong(msg.seq, msg.sent_ns))
            elif isinstance(msg, Complete):
                await self._complete()
                return
            else:
                raise ProtocolError(
                    f"unexpected {type(msg).__name__} on main in state {st.status}", channel="main"
                )

    async def _complete(self) -> None:
        assert self.ram is not None and self.entry is not None and self.ret is not None
        if not self.ram.complete():
            missing = sum(r.npages - r.count() for r in self.ram.received)
            raise ProtocolError(f"COMPLETE with {missing} pages never received", channel="main")
        if self.vmdesc is not None:
            savevm.check_vmdesc(self.vmdesc, self._guest().blocks, self.sections)
        guest = self._guest()
        await guest.load_devices(self.sections)
        self.guest_running = True  # from here on the guest is ours to keep, running or not
        if self.agent.incoming_autostart:
            await guest.cont()
            self.entry.status = "running"
            self.agent.events.emit("RESUME", {"guest": self.entry.name})
        else:
            self.entry.status = "paused"
        await self.ret.send(Shut("completed"))
        self.state.ram.remaining = 0
        self.state.set_status(S.COMPLETED)

    async def _failed(self, desc: str) -> None:
        st = self.state
        log.warning("incoming migration %s from %s failed: %s", st.guest, self.peer, desc)
        if not is_terminal(st.status):
            st.error_desc = desc
            if st.status == S.NONE:
                st.set_status(S.SETUP)
            st.set_status(S.FAILED)
        for channel in (self.main, self.ret):
            if channel is not None and not channel.closed:
                await channel.send_error("failed", desc)

    async def _finish(self) -> None:
        with trio.move_on_after(10):
            for channel in (self.main, self.ret):
                if channel is not None:
                    await channel.aclose()
            if not self.guest_running and self.entry is not None:
                await self.agent.destroy_guest(
                    self.entry, reason=f"incoming migration {self.state.status}"
                )
        self.done.set()
