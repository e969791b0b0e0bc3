"""The agent daemon (``godwit agent``): guests, migrations, listeners, control.

One trio nursery for the agent holds the control server(s), the migration
listener and one task per migration (each migration owns a nursery of its
own inside that task).  Command handlers are the ``qmp_*`` methods, named as
QEMU names its (``qmp_migrate``, ``qmp_query_migrate`` …).

Guests belong to the agent, not to a migration: the destination creates an
*incoming* guest when CONFIG arrives and only keeps it if the migration
completes; the source releases its guest only when the destination says the
guest runs there.  SIGTERM/SIGINT stop the agent cleanly — outgoing
migrations are cancelled (so the source guests run on), incoming ones fail
(their half-built guests are removed) — and running guests keep running:
each guest process holds its own memory, and outlives the agent.
"""

from __future__ import annotations

import logging
import signal
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from protocol import PROTOCOL_VERSION, qapi
from protocol.control import DEVICE_NOT_FOUND, QmpError
from protocol.messages import Config, Hello
from protocol.options import CAPABILITIES, PARAMETERS, validate_capabilities, validate_parameters
from protocol.qapi import parse_size
from protocol.states import (
    MigrationStatus,
    Role,
    allowed_commands,
    is_active,
    is_paused,
    is_terminal,
)
from protocol.uri import parse_uri

from . import version
from .channel import Channel
from .control_server import ControlServer
from .destination import IncomingMigration
from .events import EventBus
from .sched import check_cpus, parse_cpu_list
from .source import OutgoingMigration
from .transport import Transport, pki_identity, serve_migrations
from .vm import verify
from .vm.guest import Guest, GuestSpec
from .vm.prealloc import PreallocPool
from .vm.ramblock import RamBlock, ram_path_mount
from .vm.spares import SparePool

log = logging.getLogger("godwit.agent")
S = MigrationStatus


@dataclass
class AgentConfig:
    name: str = "agent"
    listen: str | None = None  # HOST:PORT for migrations
    control: Path | None = None  # Unix socket
    control_tls: str | None = None  # HOST:PORT
    pki: Path | None = None
    state_dir: Path | None = None
    insecure_plaintext: bool = False
    spare_guests: int = 1
    """Guest processes started ahead (vm/spares.py): a restore's or an incoming guest's
    process is ready in a few ms instead of ~150 ms of interpreter start."""
    ram_path: Path | None = None
    """A tmpfs directory for guest RAM (QEMU's ``-mem-path``) instead of memfds;
    mounted with ``huge=within_size`` it gives guests transparent huge pages."""
    pm_qos: bool = True
    """While a migration streams pages, ask the kernel for zero CPU wake-up latency
    (agents/pmqos.py): faster page faults and a faster precopy stream, idle CPUs
    polling meanwhile."""
    incoming_prealloc: int = 0
    """Bytes of RAM kept allocated and touched for the next incoming guest
    (vm/prealloc.py, QEMU's prealloc=on); 0: none."""
    preempt_cpus: frozenset[int] | None = None
    """CPUs the postcopy preempt worker is pinned to (agents/preempt.py); None: any
    CPU the agent may use.  A wake-up on the CPU a task already shares costs no
    inter-processor interrupt, which a VM pays for with an exit."""

    @classmethod
    def from_toml(cls, path: Path) -> AgentConfig:
        """Keys as the command-line flags (``listen``, ``control``, ``control-tls`` …)."""
        with open(path, "rb") as f:
            data = tomllib.load(f)
        known = {
            "name",
            "listen",
            "control",
            "control-tls",
            "pki",
            "state-dir",
            "insecure-plaintext",
            "spare-guests",
            "ram-path",
            "pm-qos",
            "preempt-cpus",
            "incoming-prealloc",
        }
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"{path}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}"
            )
        config = cls()
        for key, value in data.items():
            attr = key.replace("-", "_")
            if attr in ("control", "pki", "state_dir", "ram_path"):
                value = Path(value)
            elif attr == "incoming_prealloc":
                try:
                    value = parse_size(value)
                except ValueError as exc:
                    raise ValueError(f"{path}: incoming-prealloc: {exc}") from None
            elif attr == "preempt_cpus":
                try:
                    value = parse_cpu_list(value)
                except ValueError as exc:
                    raise ValueError(f"{path}: preempt-cpus: {exc}") from None
            setattr(config, attr, value)
        return config


def split_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{text!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass
class GuestEntry:
    """A guest this agent hosts, and its migration settings and history."""

    name: str
    spec: GuestSpec
    guest: Guest | None
    status: str = "running"
    capabilities: dict[str, bool] = field(
        default_factory=lambda: {k: v.default for k, v in CAPABILITIES.items()}
    )
    parameters: dict[str, Any] = field(
        default_factory=lambda: {k: v.default for k, v in PARAMETERS.items()}
    )
    migration: OutgoingMigration | IncomingMigration | None = None

    def describe_for_destination(self) -> dict[str, Any]:
        return self.spec.to_json()

    async def release_after_migration(self) -> None:
        """The destination runs the guest now: end our copy, keep the record."""
        if self.guest is not None:
            await self.guest.quit()
        self.status = "migrated"

    def info(self) -> dict[str, Any]:
        g = self.guest
        out: dict[str, Any] = {
            "name": self.name,
            "memory": sum(size for _, size in self.spec.layout()),
            "page-size": g.blocks[0].page_size if g and g.blocks else 4096,
            "workload": self.spec.workload,
            "status": self.status,
            "pid": g.pid if g else None,
            "migration": None,
        }
        if self.migration is not None:
            out["migration"] = {
                "role": str(self.migration.state.role),
                "status": str(self.migration.state.status),
            }
        return out


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        if config.ram_path is not None:
            point, options = ram_path_mount(config.ram_path)  # refused here, not at a guest
            huge = [o for o in options.split(",") if o.startswith("huge=")]
            log.info(
                "guest RAM on %s (tmpfs at %s, %s)", config.ram_path, point, huge or "huge=never"
            )
            if not huge or huge == ["huge=never"]:
                log.warning(
                    "ram-path %s: tmpfs without huge pages; mount it with huge=within_size "
                    "for transparent huge pages",
                    config.ram_path,
                )
        if config.preempt_cpus is not None:
            check_cpus(config.preempt_cpus, "preempt-cpus")  # refused here, not at a migration
        identity = pki_identity(config.pki, config.name) if config.pki else None
        self.transport = Transport(identity, config.insecure_plaintext)
        self.events = EventBus()
        self.guests: dict[str, GuestEntry] = {}
        self.incoming: dict[bytes, IncomingMigration] = {}
        self.listen_port: int | None = None
        self.incoming_autostart = True
        self.extra_listeners: set[tuple[str, int]] = set()
        self.test_hooks: dict[str, Any] = {}
        """Faults tests inject on purpose (never reachable from the control socket):
        ``fail-device-load`` makes device loading fail; ``drop-page`` = (block, page)
        loses that page after it arrives, so tests can show verification catches it."""
        """migrate-incoming autostart=false leaves arriving guests paused (QEMU's -S)."""
        self.control_tls_port: int | None = None
        self.spares = SparePool(config.spare_guests, busy=self.migrating)
        self.prealloc = PreallocPool(
            config.incoming_prealloc, directory=config.ram_path, busy=self.migrating
        )
        self._nursery: trio.Nursery | None = None
        self.control = ControlServer(self._handlers(), self.events, self._qmp_version())

    def migrating(self) -> bool:
        """A migration is moving pages in either direction (not paused, not finished)."""
        return any(
            e.migration is not None
            and is_active(e.migration.state.status)
            and not is_paused(e.migration.state.status)
            for e in self.guests.values()
        )

    # -- lifecycle -------------------------------------------------------------

    def worker_setup(self) -> dict[str, Any]:
        """What a preempt worker (agents/preempt.py) takes from this agent: its TLS
        material to load, and the CPUs to run on."""
        ident = self.transport.identity
        cpus = self.config.preempt_cpus
        return {
            "identity": None
            if ident is None
            else {
                "name": ident.name,
                "ca": str(ident.ca_path),
                "cert": str(ident.cert_path),
                "key": str(ident.key_path),
            },
            "cpus": None if cpus is None else sorted(cpus),
        }

    async def run(self, *, task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            # Before the control socket exists (its existence means "ready"), so no
            # client ever sees an agent that has not yet taken back its guests.
            await self.adopt_orphans()
            if self.spares.size:
                await nursery.start(self.spares.run)
            if self.prealloc.size:
                await nursery.start(self.prealloc.run)
            if self.config.control:
                await nursery.start(self.control.serve_unix, self.config.control)
            if self.config.control_tls:
                if self.transport.identity is None:
                    raise ValueError("--control-tls needs --pki and --name")
                host, port = split_host_port(self.config.control_tls)
                self.control_tls_port = await nursery.start(
                    self.control.serve_tls, host, port, self.transport._server_ctx
                )
            if self.config.listen:
                host, port = split_host_port(self.config.listen)
                listeners = await nursery.start(
                    serve_migrations, self.transport, host, port, self._on_channel
                )
                self.listen_port = listeners[0].socket.getsockname()[1]
            log.info(
                "agent %s ready: control %s, migrations on port %s",
                self.config.name,
                self.config.control,
                self.listen_port,
            )
            task_status.started(self)
            await trio.sleep_forever()

    async def shutdown(self) -> None:
        """Cancel what is in flight (guests keep running) and stop the agent."""
        for entry in self.guests.values():
            mig = entry.migration
            if isinstance(mig, OutgoingMigration) and not is_terminal(mig.state.status):
                if mig.state.status in (S.SETUP, S.ACTIVE, S.PRE_SWITCHOVER, S.DEVICE):
                    mig.cancel()
            elif isinstance(mig, IncomingMigration) and not is_terminal(mig.state.status):
                mig.cancel_scope.cancel()
            elif mig is not None and hasattr(mig, "cancel") and not is_terminal(mig.state.status):
                mig.cancel()  # file migrations
        with trio.move_on_after(15):
            for entry in list(self.guests.values()):
                if entry.migration is not None:
                    await entry.migration.done.wait()
        # Guests keep running without us (with a state dir they wait to be adopted).
        for entry in self.guests.values():
            if entry.guest is not None and self.config.state_dir is not None:
                entry.guest.detach()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def adopt_orphans(self) -> None:
        """Take over guests a previous agent left running (they wait in the state dir)."""
        if self.config.state_dir is None:
            return
        from .vm.errors import GuestAttached, GuestGone
        from .vm.orphans import find_orphans

        orphans = find_orphans(self.config.state_dir)
        log.debug("orphans in %s: %s", self.config.state_dir, [o.name for o in orphans])
        for record in orphans:
            try:
                guest = await Guest.adopt(record.socket)
            except (GuestAttached, GuestGone, OSError) as exc:
                log.warning("guest %s (pid %s) not adopted: %s", record.name, record.pid, exc)
                continue
            if guest.state == "stopped":
                # Stopped by a migration that died with the old agent, or by an admin:
                # stay stopped — only a person can know which copy should run.
                log.warning(
                    "adopted guest %s is stopped; `godwit ctl` cont it once you know "
                    "it does not run elsewhere",
                    record.name,
                )
            await guest.throttle(0)
            status = {"running": "running", "stopped": "paused", "incoming": "incoming"}.get(
                guest.state, "paused"
            )
            self.guests[record.name] = GuestEntry(record.name, guest.spec, guest, status=status)
            self.events.emit("GUEST_STARTED", {"guest": record.name, "adopted": True})
            log.info("adopted guest %s (pid %s, %s)", record.name, guest.pid, status)

    def summary(self) -> str:
        """One line for systemd's STATUS=: guests and migrations in flight."""
        active = [
            f"{e.name} {e.migration.state.status}"
            for e in self.guests.values()
            if e.migration is not None and not is_terminal(e.migration.state.status)
        ]
        text = f"{len(self.guests)} guests, {len(active)} migrations"
        if active:
            text += " (" + ", ".join(active) + ")"
        if self.listen_port:
            text += f"; migrations on port {self.listen_port}"
        return text

    # -- guests ----------------------------------------------------------------

    def entry(self, args: dict[str, Any]) -> GuestEntry:
        name = args.get("guest")
        if name is None:
            if len(self.guests) == 1:
                return next(iter(self.guests.values()))
            raise QmpError(
                f"say which guest (argument 'guest'); this agent has {len(self.guests)}: "
                + (", ".join(sorted(self.guests)) or "none"),
            )
        if name not in self.guests:
            raise QmpError(f"no guest named '{name}' on agent {self.config.name}", DEVICE_NOT_FOUND)
        return self.guests[name]

    def _running_guest(self, entry: GuestEntry) -> Guest:
        if entry.guest is None or entry.status in ("migrated", "exited"):
            raise QmpError(f"guest '{entry.name}' is {entry.status} on this agent")
        return entry.guest

    def _incoming_blocks(self, config: Config) -> list[RamBlock]:
        """Fresh RAM blocks for an incoming guest; the largest takes the preallocated
        memfd when there is one and no postcopy will need its pages missing."""
        specs = list(config.ramblocks)
        pooled = None
        if not config.capabilities.get("postcopy-ram"):
            small = [b for b in specs if b.page_size == 4096]
            if small:
                pooled = max(small, key=lambda b: b.size)
        blocks: list[RamBlock] = []
        try:
            for b in specs:
                fd = self.prealloc.take(b.size) if b is pooled else None
                if fd is not None:
                    log.info("incoming RAM block %s: %d MiB preallocated", b.name, b.size >> 20)
                    blocks.append(RamBlock.from_fd(b.name, b.size, b.page_size, fd))
                else:
                    blocks.append(
                        RamBlock.create(
                            b.name,
                            b.size,
                            hugetlb=b.page_size > 4096,
                            directory=self.config.ram_path,
                        )
                    )
        except BaseException:
            for block in blocks:
                block.close()
            raise
        return blocks

    async def create_incoming_guest(
        self, incoming: IncomingMigration, config: Config
    ) -> GuestEntry:
        spec = GuestSpec.from_json(config.guest)
        existing = self.guests.get(spec.name)
        if existing is not None and existing.status not in ("migrated", "exited"):
            raise ValueError(f"a guest named '{spec.name}' already exists on {self.config.name}")
        blocks = self._incoming_blocks(config)
        try:
            guest = await Guest.start_incoming(
                spec,
                blocks,
                postcopy=bool(config.capabilities.get("postcopy-ram")),
                state_dir=self.config.state_dir,
                spares=self.spares,
            )
        except BaseException:
            for b in blocks:
                b.close()
            raise
        entry = GuestEntry(
            spec.name,
            spec,
            guest,
            status="incoming",
            capabilities=dict(config.capabilities),
            parameters=dict(config.parameters),
        )
        entry.migration = incoming
        self.guests[spec.name] = entry
        return entry

    async def destroy_guest(self, entry: GuestEntry, *, reason: str) -> None:
        if entry.guest is not None:
            await entry.guest.quit()
            entry.guest = None
        if self.guests.get(entry.name) is entry:
            del self.guests[entry.name]
        self.events.emit("GUEST_EXITED", {"guest": entry.name, "reason": reason})

    # -- migration channels ------------------------------------------------------

    async def _on_channel(self, hello: Hello, channel: Channel, peer: str) -> None:
        if hello.channel.value == "main" and not hello.resume:
            if hello.migration_id in self.incoming:
                await channel.send_error(
                    "duplicate", "a migration with this id is already running here"
                )
                await channel.aclose()
                return
            mig = IncomingMigration(self, hello, channel, peer)
            self.incoming[hello.migration_id] = mig
            try:
                await mig.run()
            finally:
                if is_terminal(mig.state.status):
                    self.incoming.pop(hello.migration_id, None)
            return
        existing = self.incoming.get(hello.migration_id)
        reason = "unknown migration id" if existing is None else existing.attach(hello, channel)
        if reason is not None:
            log.warning(
                "refused %s channel from %s: %s (%s)",
                hello.channel.value,
                peer,
                reason,
                hello.migration_id.hex(),
            )
            await channel.send_error("unknown-migration", f"{reason} {hello.migration_id.hex()}")
            await channel.aclose()

    # -- QMP handlers ---------------------------------------------------------

    def _qmp_version(self) -> dict[str, Any]:
        major, minor, micro = (
            [*(int(x) for x in version().split(".")[:3] if x.isdigit()), 0, 0, 0]
        )[:3]
        return {
            "qemu": {"major": major, "minor": minor, "micro": micro},
            "package": f"godwit {self.config.name}",
        }

    def _handlers(self) -> dict[str, Any]:
        handlers = {}
        for name in qapi.COMMANDS:
            method = getattr(self, "qmp_" + name.replace("-", "_"), None)
            if method is not None:
                handlers[name] = method
        return handlers

    async def qmp_query_version(self, args: dict[str, Any]) -> Any:
        return {**self._qmp_version(), "protocol": list(PROTOCOL_VERSION)}

    async def qmp_query_commands(self, args: dict[str, Any]) -> Any:
        return [{"name": n} for n in sorted(self.control.handlers)]

    async def qmp_query_guests(self, args: dict[str, Any]) -> Any:
        return [e.info() for e in self.guests.values()]

    async def qmp_query_incoming_prealloc(self, args: dict[str, Any]) -> Any:
        return self.prealloc.info()

    async def qmp_query_status(self, args: dict[str, Any]) -> Any:
        entry = self.entry(args)
        running = entry.guest is not None and entry.guest.state == "running"
        status = (
            "running"
            if running
            else {"incoming": "inmigrate", "migrated": "postmigrate"}.get(entry.status, "paused")
        )
        return {"running": running, "status": status, "guest": entry.name}

    async def qmp_guest_start(self, args: dict[str, Any]) -> Any:
        name = args["name"]
        if name in self.guests and self.guests[name].status not in ("migrated", "exited"):
            raise QmpError(f"a guest named '{name}' already exists on agent {self.config.name}")
        spec = GuestSpec(
            name=name,
            ram_size=args.get("memory", 256 << 20),
            workload=args.get("workload", "counter"),
            fill=args.get("fill", "random"),
            seed=args.get("seed", 1),
            hugetlb=args.get("hugetlb", False),
        )
        guest = await Guest.start(
            spec, state_dir=self.config.state_dir, spares=self.spares, ram_path=self.config.ram_path
        )
        if args.get("paused"):
            await guest.stop()
        entry = GuestEntry(name, spec, guest, status="paused" if args.get("paused") else "running")
        self.guests[name] = entry
        self.events.emit("GUEST_STARTED", {"guest": name})
        return entry.info()

    async def qmp_guest_stop(self, args: dict[str, Any]) -> Any:
        entry = self.entry(args)
        mig = entry.migration
        if mig is not None and not is_terminal(mig.state.status):
            raise QmpError(
                f"guest '{entry.name}' is migrating ({mig.state.status}); cancel the migration first"
            )
        await self.destroy_guest(entry, reason="guest-stop")
        return {}

    async def qmp_stop(self, args: dict[str, Any]) -> Any:
        entry = self.entry(args)
        await self._running_guest(entry).stop()
        entry.status = "paused"
        self.events.emit("STOP", {"guest": entry.name})
        return {}

    async def qmp_cont(self, args: dict[str, Any]) -> Any:
        entry = self.entry(args)
        mig = entry.migration
        if mig is not None and not is_terminal(mig.state.status):
            raise QmpError(
                f"guest '{entry.name}' is migrating ({mig.state.status}): the migration decides when it runs"
            )
        await self._running_guest(entry).cont()
        entry.status = "running"
        self.events.emit("RESUME", {"guest": entry.name})
        return {}

    async def qmp_guest_verify(self, args: dict[str, Any]) -> Any:
        entry = self.entry(args)
        guest = self._running_guest(entry)
        counter = entry.spec.workload.partition(":")[0] == "counter"  # counter or counter:rate=…
        method = args.get("method") or ("counter" if counter else "digest")
        if method == "counter" and not counter:
            raise QmpError(
                f"the counter check needs the counter workload; guest '{entry.name}' runs {entry.spec.workload}"
            )
        was_running = guest.state == "running"
        if was_running:
            await guest.stop()
        try:
            return await verify_guest(guest, method, args.get("expect"))
        finally:
            if was_running:
                await guest.cont()

    async def qmp_query_migrate(self, args: dict[str, Any]) -> Any:
        if args.get("guest") is None and not self.guests:
            return {"status": "none"}
        entry = self.entry(args)
        if entry.migration is None:
            return {"status": "none", "guest": entry.name}
        return entry.migration.state.info()

    async def qmp_query_migrate_capabilities(self, args: dict[str, Any]) -> Any:
        entry = self.entry(args)
        return [{"capability": k, "state": v} for k, v in entry.capabilities.items()]

    async def qmp_query_migrate_parameters(self, args: dict[str, Any]) -> Any:
        return dict(self.entry(args).parameters)

    def _not_migrating(self, entry: GuestEntry, what: str) -> None:
        mig = entry.migration
        if mig is not None and not is_terminal(mig.state.status):
            raise QmpError(f"{what}: guest '{entry.name}' is migrating ({mig.state.status})")

    async def qmp_migrate_set_capabilities(self, args: dict[str, Any]) -> Any:
        entry = self.entry(args)
        self._not_migrating(entry, "migrate-set-capabilities")
        wanted = {}
        for item in args["capabilities"]:
            if not isinstance(item, dict) or "capability" not in item or "state" not in item:
                raise QmpError('each capability is {"capability": NAME, "state": BOOL}')
            wanted[item["capability"]] = item["state"]
        entry.capabilities = validate_capabilities({**entry.capabilities, **wanted})
        return {}

    async def qmp_migrate_set_parameters(self, args: dict[str, Any]) -> Any:
        entry = self.entry(args)
        params = {k: v for k, v in args.items() if k != "guest"}
        entry.parameters = validate_parameters({**entry.parameters, **params})
        mig = entry.migration
        if isinstance(mig, OutgoingMigration) and not is_terminal(mig.state.status):
            mig.parameters.update(params)
            if mig.ram is not None:
                # The limiter in force is precopy's or postcopy's cap, by phase.
                key = (
                    "max-postcopy-bandwidth"
                    if mig.state.status.startswith("postcopy")
                    else "max-bandwidth"
                )
                if key in params:
                    mig.ram.limiter.rate = float(params[key])
        return {}

    def _check_allowed(self, entry: GuestEntry, command: str, role: Role) -> None:
        mig = entry.migration
        status = mig.state.status if mig is not None else S.NONE
        if mig is not None and mig.state.role != role and not is_terminal(status):
            raise QmpError(
                f"{command}: guest '{entry.name}' is the {mig.state.role} of a migration here"
            )
        if command not in allowed_commands(role, status):
            raise QmpError(
                f"{command} is not possible while the migration of '{entry.name}' is {status}"
            )

    async def qmp_migrate(self, args: dict[str, Any]) -> Any:
        entry = self.entry(args)
        uri = parse_uri(args["uri"])
        if args.get("resume"):
            self._check_allowed(entry, "migrate-resume", Role.SOURCE)
            assert isinstance(entry.migration, OutgoingMigration)
            self.transport.check_uri(uri)
            entry.migration.resume(uri)
            return {}
        self._check_allowed(entry, "migrate", Role.SOURCE)
        self._running_guest(entry)
        if uri.scheme == "file":
            from .mapped_ram import qmp_file_migrate

            return await qmp_file_migrate(self, entry, uri.path)
        self.transport.check_uri(uri)
        if entry.capabilities.get("multifd"):
            from .multifd import MAX_CHANNELS

            if int(entry.parameters.get("multifd-channels", 2)) > MAX_CHANNELS:
                raise QmpError(
                    f"multifd-channels {entry.parameters['multifd-channels']}: at most {MAX_CHANNELS} for network migrations"
                )
        mig = OutgoingMigration(self, entry, uri)
        entry.migration = mig
        assert self._nursery is not None
        self._nursery.start_soon(mig.run)
        return {}

    async def qmp_migrate_start_postcopy(self, args: dict[str, Any]) -> Any:
        entry = self.entry(args)
        self._check_allowed(entry, "migrate-start-postcopy", Role.SOURCE)
        assert isinstance(entry.migration, OutgoingMigration)
        entry.migration.start_postcopy()
        return {}

    async def qmp_migrate_pause(self, args: dict[str, Any]) -> Any:
        entry = self.entry(args)
        mig = entry.migration
        if mig is None:
            raise QmpError(f"guest '{entry.name}' is not migrating")
        self._check_allowed(entry, "migrate-pause", mig.state.role)
        mig.pause()
        return {}

    async def qmp_migrate_recover(self, args: dict[str, Any]) -> Any:
        """Destination: accept the source's resume channels (on a new address if asked)."""
        entry = self.entry(args)
        self._check_allowed(entry, "migrate-recover", Role.DESTINATION)
        mig = entry.migration
        assert isinstance(mig, IncomingMigration)
        uri = parse_uri(args["uri"])
        self.transport.check_uri(uri)
        await self.ensure_listener(uri.host, uri.port)
        mig.arm_recovery()
        return {}

    async def ensure_listener(self, host: str, port: int) -> None:
        """Listen for migrations on host:port too, unless the agent already does there."""
        if self.config.listen:
            own_host, _own_port = split_host_port(self.config.listen)
            if port == self.listen_port and own_host in (host, "0.0.0.0", "::", ""):
                return
        if (host, port) in self.extra_listeners:
            return
        assert self._nursery is not None
        try:
            await self._nursery.start(
                serve_migrations, self.transport, host, port, self._on_channel
            )
        except OSError as exc:
            raise QmpError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.extra_listeners.add((host, port))

    async def qmp_migrate_incoming(self, args: dict[str, Any]) -> Any:
        if str(args.get("uri", "")).startswith("file:"):
            from .mapped_ram import qmp_file_restore

            return await qmp_file_restore(self, args)
        if self.listen_port is None:
            raise QmpError(
                "this agent has no migration listener (start it with --listen HOST:PORT)"
            )
        if args.get("uri", "defer") != "defer":
            raise QmpError(
                "migrate-incoming: godwit agents accept on their --listen address; use 'defer'"
            )
        if "autostart" in args:
            self.incoming_autostart = bool(args["autostart"])
        return {"port": self.listen_port}

    async def qmp_migrate_cancel(self, args: dict[str, Any]) -> Any:
        entry = self.entry(args)
        mig = entry.migration
        if mig is None or is_terminal(mig.state.status):
            return {}
        if isinstance(mig, IncomingMigration):
            raise QmpError("migrate-cancel is for the source; the destination follows it")
        self._check_allowed(entry, "migrate-cancel", Role.SOURCE)
        mig.cancel()
        return {}

    async def qmp_migrate_continue(self, args: dict[str, Any]) -> Any:
        entry = self.entry(args)
        if args["state"] != "pre-switchover":
            raise QmpError(
                f"migrate-continue: state must be 'pre-switchover', not '{args['state']}'"
            )
        self._check_allowed(entry, "migrate-continue", Role.SOURCE)
        assert isinstance(entry.migration, OutgoingMigration)
        entry.migration.migrate_continue()
        return {}


async def ram_digest(guest: Guest) -> str:
    """SHA-256 over every RAM block in order (digests of the blocks, hashed together)."""
    import hashlib

    digests = await trio.to_thread.run_sync(lambda: [verify.ram_digest(b)[0] for b in guest.blocks])
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(digests).encode()).hexdigest()


async def verify_guest(guest: Guest, method: str, expect: str | None = None) -> dict[str, Any]:
    """The counter check (QEMU's migration-test) or a RAM digest, with vCPUs stopped."""
    if method == "counter":
        stats = await guest.stats()
        state = stats.get("counter")
        results = [verify.counter_check(b, state) for b in guest.blocks]
        return {
            "verified": all(r.ok for r in results),
            "method": "counter",
            "detail": "; ".join(r.explanation for r in results),
        }
    digest = await ram_digest(guest)
    out: dict[str, Any] = {"method": "digest", "digest": digest}
    if expect is None:
        out["verified"] = None
        out["detail"] = "digest taken; pass 'expect' to compare it"
    else:
        out["verified"] = digest == expect
        out["detail"] = (
            "RAM digest matches"
            if digest == expect
            else f"RAM digest {digest} != expected {expect}"
        )
    return out


def configure_logging(level: str = "info") -> None:
    """journald-friendly: no timestamps (the journal has them), a level prefix
    (``<3>`` …) under systemd so each line is filed at its own priority."""
    from .sdnotify import JournalFormatter, stderr_is_journal

    fmt = "%(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler()
    handler.setFormatter(JournalFormatter(fmt) if stderr_is_journal() else logging.Formatter(fmt))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


async def run_agent(
    config: AgentConfig, *, task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run an agent until SIGTERM/SIGINT, then shut down cleanly; speaks sd_notify under systemd."""
    from .sdnotify import Notifier, watchdog_task

    # Taken out of the environment so guest processes do not inherit it.
    notifier = Notifier(unset_environment=True)
    agent = Agent(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(watchdog_task, notifier)
        await nursery.start(agent.run)
        notifier.ready(status=agent.summary())

        def on_change(event_name: str) -> None:
            if event_name in ("MIGRATION", "GUEST_STARTED", "GUEST_EXITED"):
                notifier.status(agent.summary())

        agent.events.listeners.append(on_change)

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("%s: shutting down (guests keep running)", signal.Signals(signum).name)
                    notifier.stopping(
                        status=f"{signal.Signals(signum).name}: cancelling migrations; guests keep running"
                    )
                    await agent.shutdown()
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(on_signals)
        task_status.started(agent)
