"""The ``godwit`` command line: a person's verbs over the agents' control socket.

Verbs follow virsh where virsh has one (``migrate``, ``vm start|stop|list``)
and QEMU's names otherwise.  Every verb that talks to an agent takes
``--agent`` (a Unix socket path or ``tls:HOST:PORT`` with ``--pki``/``--name``),
defaulting to ``$GODWIT_AGENT`` or /run/godwit/control.sock.  ``--json``
prints machine-readable output for scripts; without it, output is for people,
with a live progress line on a terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from agents import version

DEFAULT_AGENT = os.environ.get("GODWIT_AGENT", "/run/godwit/control.sock")

EXTENSIONS = ("agents.cli_lab", "agents.cli_file", "agents.cli_service")
"""Modules that add verbs: each has ``add_parsers(subparsers)`` and ``run(args) -> int | None``
(None: not one of its verbs).  Keeps each concern's CLI next to its code."""


def _cpu_list(text: str) -> frozenset[int]:
    from .sched import parse_cpu_list

    try:
        return parse_cpu_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size_arg(text: str) -> int:
    from protocol.qapi import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _extensions() -> list[Any]:
    import importlib

    found = []
    for name in EXTENSIONS:
        try:
            found.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    return found


def add_agent_options(p: argparse.ArgumentParser, *, cert_flag: str = "--name") -> None:
    """The options every verb that talks to an agent takes (also used by cli_file)."""
    p.add_argument(
        "--agent",
        "-a",
        default=DEFAULT_AGENT,
        help="control socket path or tls:HOST:PORT (default: $GODWIT_AGENT or %(default)s)",
    )
    p.add_argument("--pki", type=Path, help="PKI directory, for a tls: control connection")
    p.add_argument(
        cert_flag, dest="cert_name", help="certificate name in --pki, for a tls: control connection"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="godwit",
        description="Live-migrate running guests between hosts (precopy, postcopy, "
        "preempt, recovery, mapped-ram) over mutually authenticated TLS.",
    )
    parser.add_argument("--version", action="version", version=f"godwit {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("agent", help="run an agent daemon (systemd runs this)")
    p.add_argument("--name", help="this agent's name = its certificate NAME in --pki")
    p.add_argument("--listen", metavar="HOST:PORT", help="accept migrations here")
    p.add_argument("--control", type=Path, metavar="PATH", help="control Unix socket (mode 0600)")
    p.add_argument("--control-tls", metavar="HOST:PORT", help="also serve control over mutual TLS")
    p.add_argument("--pki", type=Path, metavar="DIR", help="PKI directory (godwit pki init/issue)")
    p.add_argument("--state-dir", type=Path, metavar="DIR", help="where the agent keeps state")
    p.add_argument(
        "--spare-guests",
        type=int,
        metavar="N",
        help="guest processes kept started ahead, so a restore or an incoming guest "
        "runs without waiting for Python to start (default 1; 0 for none)",
    )
    p.add_argument(
        "--ram-path",
        type=Path,
        metavar="DIR",
        help="guest RAM as files on this tmpfs instead of memfds (QEMU's -mem-path); "
        "mounted with huge=within_size, guests get transparent huge pages",
    )
    p.add_argument(
        "--incoming-prealloc",
        type=_size_arg,
        metavar="SIZE",
        help="keep SIZE of RAM (e.g. 4G) allocated and touched for the next incoming "
        "guest, as QEMU's prealloc=on: its largest RAM block takes it, so a precopy "
        "writes into memory the host has already backed (default 0: none; not used "
        "by postcopy migrations)",
    )
    p.add_argument(
        "--pm-qos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="while a migration streams pages, ask the kernel for zero CPU wake-up "
        "latency (/dev/cpu_dma_latency), so page faults and frames never wait for an "
        "idle CPU to wake (default on)",
    )
    p.add_argument(
        "--preempt-cpus",
        type=_cpu_list,
        metavar="LIST",
        help="pin the postcopy preempt worker to these CPUs (1, 0-3,8: as taskset); "
        "with both agents on one host, the same CPU for both makes every page "
        "request's wake-up local (default: any CPU)",
    )
    p.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML file with the same keys; flags win"
    )
    p.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="plain TCP between agents: benchmarks and unit tests ONLY, never on a network",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    p = sub.add_parser("pki", help="make the private CA and host certificates")
    pki_sub = p.add_subparsers(dest="pki_command", metavar="ACTION", required=True)
    q = pki_sub.add_parser("init", help="create a CA in DIR")
    q.add_argument("dir", type=Path)
    q.add_argument(
        "--force", action="store_true", help="replace an existing CA (orphans its certificates)"
    )
    q = pki_sub.add_parser("issue", help="issue a host certificate NAME signed by the CA in DIR")
    q.add_argument("dir", type=Path)
    q.add_argument("name")
    q.add_argument("--dns", action="append", default=[], help="DNS name (repeatable)")
    q.add_argument("--ip", action="append", default=[], help="IP address (repeatable)")
    q.add_argument("--force", action="store_true")
    q = pki_sub.add_parser("list", help="certificates in DIR")
    q.add_argument("dir", type=Path)

    p = sub.add_parser("vm", help="guests on an agent: start, stop, list, verify")
    vm_sub = p.add_subparsers(dest="vm_command", metavar="ACTION", required=True)
    q = vm_sub.add_parser("start", help="start a guest")
    q.add_argument("guest")
    q.add_argument("--memory", default="256M", help="RAM size (default %(default)s)")
    q.add_argument(
        "--workload", default="counter", help="counter | stress:rate=…,wss=…,mode=… | idle"
    )
    q.add_argument("--fill", default="random", help="zero | random | mixed:P%%")
    q.add_argument("--seed", type=int, default=1)
    q.add_argument("--paused", action="store_true", help="create with vCPUs stopped")
    add_agent_options(q)
    for action, text in (("stop", "terminate a guest"), ("verify", "check a guest's memory")):
        q = vm_sub.add_parser(action, help=text)
        q.add_argument("guest")
        if action == "verify":
            q.add_argument("--method", choices=["counter", "digest"])
        add_agent_options(q)
    q = vm_sub.add_parser("list", help="guests on the agent")
    add_agent_options(q)

    p = sub.add_parser("migrate", help="migrate a guest to another agent")
    p.add_argument("guest")
    p.add_argument("uri", help="tls:HOST:PORT of the destination agent")
    p.add_argument("--wait", action="store_true", help="wait for the end (progress on a terminal)")
    p.add_argument("--downtime-limit", type=int, metavar="MS")
    p.add_argument("--max-bandwidth", metavar="BYTES/S", help="e.g. 500M")
    p.add_argument("--auto-converge", action="store_true")
    p.add_argument("--pause-before-switchover", action="store_true")
    p.add_argument(
        "--multifd",
        type=int,
        metavar="N",
        help="precopy pages over N TLS channels (capability multifd, multifd-channels N)",
    )
    p.add_argument(
        "--postcopy",
        action="store_true",
        help="enable postcopy (switch with `godwit migrate-postcopy VM`, or --postcopy-after-precopy)",
    )
    p.add_argument(
        "--postcopy-after-precopy",
        action="store_true",
        help="switch to postcopy once the first precopy pass is done (as virsh does)",
    )
    p.add_argument(
        "--preempt", action="store_true", help="serve page requests on their own channel"
    )
    p.add_argument(
        "--postcopy-bandwidth", metavar="BYTES/S", help="cap the postcopy background stream"
    )
    p.add_argument(
        "--timeout", type=float, default=3600, help="with --wait: give up waiting after S seconds"
    )
    add_agent_options(p)

    for verb, text in (
        ("migrate-cancel", "cancel an outgoing migration"),
        ("migrate-continue", "continue from pre-switchover"),
        ("migrate-postcopy", "switch a running migration to postcopy"),
        ("pause", "force a postcopy migration into postcopy-paused"),
    ):
        p = sub.add_parser(verb, help=text)
        p.add_argument("guest")
        p.add_argument("--wait", action="store_true", help="wait for the resulting state")
        p.add_argument("--timeout", type=float, default=120)
        add_agent_options(p)
    for verb, text in (
        ("recover", "destination: accept the source again after a postcopy pause"),
        ("resume", "source: reconnect a paused postcopy to URI"),
    ):
        p = sub.add_parser(verb, help=text)
        p.add_argument("guest")
        p.add_argument("uri", help="tls:HOST:PORT (the destination's address to listen on / dial)")
        p.add_argument("--wait", action="store_true", help="wait for the resulting state")
        p.add_argument("--timeout", type=float, default=120)
        add_agent_options(p)

    p = sub.add_parser("status", help="guests and migrations on an agent")
    add_agent_options(p)

    p = sub.add_parser("ctl", help='send one raw QMP command, e.g. \'{"execute": "query-guests"}\'')
    p.add_argument("command_json")
    add_agent_options(p)

    p = sub.add_parser("tui", help="watch and steer migrations in a terminal (Textual)")
    from tui.app import add_arguments as add_tui_arguments

    add_tui_arguments(p)

    for extension in _extensions():
        extension.add_parsers(sub)

    p = sub.add_parser("demo", help="two agents, fresh PKI, a guest, a migration, a verification")
    p.add_argument("--json", action="store_true", help="print only the JSON summary")
    p.add_argument(
        "--scenario",
        default="full",
        choices=["full", "precopy", "postcopy", "preempt", "recovery", "mapped-ram"],
        help="what to demonstrate (default: %(default)s — precopy, postcopy with preempt, "
        "a cut link, recovery)",
    )
    p.add_argument("--memory", help="guest RAM (default 1G for full, 256M otherwise)")
    p.add_argument("--workload", help="guest workload (default: counter; full: a read-only stress)")
    p.add_argument("--no-tui", action="store_true", help="plain progress even on a terminal")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory and print it")
    return parser


def _print(args: argparse.Namespace, value: Any, human: str | None = None) -> None:
    if args.json or human is None:
        print(json.dumps(value, indent=None if args.json else 2))
    else:
        print(human)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "agent":
            return _cmd_agent(args)
        if args.command == "pki":
            return _cmd_pki(args)
        if args.command == "tui":
            from tui.app import run as run_tui

            return run_tui(args.agent, pki=args.pki, name=args.name)
        for extension in _extensions():
            status = extension.run(args)
            if status is not None:
                return int(status)
        if args.command == "demo":
            from .demo import main as demo_main

            return demo_main(args)
        import trio

        return trio.run(_run_control_command, args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a person gets one line, not a traceback
        from .client import AgentGone, CommandFailed

        if isinstance(
            exc,
            CommandFailed | AgentGone | ValueError | FileExistsError | FileNotFoundError | OSError,
        ):
            print(f"godwit: {exc}", file=sys.stderr)
            return 1
        raise


def _cmd_agent(args: argparse.Namespace) -> int:
    import trio

    from .daemon import AgentConfig, configure_logging, run_agent

    configure_logging(args.log_level)
    config = AgentConfig.from_toml(args.config) if args.config else AgentConfig()
    for key in (
        "name",
        "listen",
        "control",
        "control_tls",
        "pki",
        "state_dir",
        "spare_guests",
        "ram_path",
        "pm_qos",
        "preempt_cpus",
        "incoming_prealloc",
    ):
        value = getattr(args, key)
        if value is not None:
            setattr(config, key, value)
    config.insecure_plaintext = config.insecure_plaintext or args.insecure_plaintext
    if config.insecure_plaintext:
        print(
            "godwit: WARNING: --insecure-plaintext: migration traffic is NOT encrypted or "
            "authenticated. For benchmarks and unit tests only.",
            file=sys.stderr,
        )
    if config.control is None and config.control_tls is None:
        config.control = Path(DEFAULT_AGENT)
    try:
        if config.ram_path is not None:
            from .vm.ramblock import ram_path_mount

            ram_path_mount(config.ram_path)
        if config.preempt_cpus is not None:
            from .sched import check_cpus

            check_cpus(config.preempt_cpus, "preempt-cpus")
    except ValueError as exc:
        print(f"godwit agent: {exc}", file=sys.stderr)
        return 2
    trio.run(run_agent, config)
    return 0


def _cmd_pki(args: argparse.Namespace) -> int:
    from . import pki

    if args.pki_command == "init":
        path = pki.init_ca(args.dir, force=args.force)
        print(f"CA created: {path}")
    elif args.pki_command == "issue":
        cert, key = pki.issue_cert(args.dir, args.name, dns=args.dns, ips=args.ip, force=args.force)
        print(f"certificate: {cert}\nkey:         {key}")
    else:
        for info in pki.describe(args.dir):
            print(info)
    return 0


async def _run_control_command(args: argparse.Namespace) -> int:
    from .client import open_client

    async with open_client(args.agent, pki=args.pki, name=args.cert_name) as agent:
        cmd = args.command
        if cmd == "vm":
            return await _cmd_vm(args, agent)
        if cmd == "migrate":
            return await _cmd_migrate(args, agent)
        if cmd == "migrate-cancel":
            await agent.execute("migrate-cancel", {"guest": args.guest})
            return 0
        if cmd in ("migrate-postcopy", "pause", "recover", "resume"):
            return await _cmd_postcopy_control(args, agent)
        if cmd == "migrate-continue":
            await agent.execute(
                "migrate-continue", {"guest": args.guest, "state": "pre-switchover"}
            )
            return 0
        if cmd == "status":
            return await _cmd_status(args, agent)
        if cmd == "ctl":
            return await _cmd_ctl(args, agent)
    raise AssertionError(cmd)


async def _cmd_vm(args: argparse.Namespace, agent: Any) -> int:
    action = args.vm_command
    if action == "start":
        info = await agent.execute(
            "guest-start",
            {
                "name": args.guest,
                "memory": args.memory,
                "workload": args.workload,
                "fill": args.fill,
                "seed": args.seed,
                "paused": args.paused,
            },
        )
        _print(
            args,
            info,
            f"guest {info['name']} started (pid {info['pid']}, {info['memory'] >> 20} MiB)",
        )
    elif action == "stop":
        await agent.execute("guest-stop", {"guest": args.guest})
        _print(args, {}, f"guest {args.guest} stopped")
    elif action == "list":
        guests = await agent.execute("query-guests")
        lines = [f"{'NAME':<16} {'STATUS':<10} {'MEMORY':>8} {'PID':>8}  MIGRATION"]
        for g in guests:
            mig = g.get("migration") or {}
            lines.append(
                f"{g['name']:<16} {g['status']:<10} {g['memory'] >> 20:>6}Mi {g.get('pid') or '-':>8}  "
                f"{mig.get('role', '')} {mig.get('status', '')}"
            )
        _print(args, guests, "\n".join(lines))
    elif action == "verify":
        arguments = {"guest": args.guest}
        if args.method:
            arguments["method"] = args.method
        result = await agent.execute("guest-verify", arguments)
        _print(
            args,
            result,
            f"{'verified' if result['verified'] else 'FAILED'} ({result['method']}): "
            f"{result.get('detail', '')}",
        )
        return 0 if result["verified"] else 1
    return 0


async def _cmd_migrate(args: argparse.Namespace, agent: Any) -> int:
    guest = args.guest
    params: dict[str, Any] = {}
    if args.downtime_limit is not None:
        params["downtime-limit"] = args.downtime_limit
    if args.max_bandwidth is not None:
        from protocol.qapi import parse_size

        params["max-bandwidth"] = parse_size(args.max_bandwidth)
    if args.multifd is not None:
        params["multifd-channels"] = args.multifd
    if params:
        await agent.execute("migrate-set-parameters", {"guest": guest, **params})
    if args.postcopy_bandwidth is not None:
        from protocol.qapi import parse_size

        await agent.execute(
            "migrate-set-parameters",
            {"guest": guest, "max-postcopy-bandwidth": parse_size(args.postcopy_bandwidth)},
        )
    postcopy = args.postcopy or args.postcopy_after_precopy or args.preempt
    caps = [
        {"capability": name, "state": True}
        for name, on in (
            ("auto-converge", args.auto_converge),
            ("multifd", args.multifd is not None),
            ("pause-before-switchover", args.pause_before_switchover),
            ("postcopy-ram", postcopy),
            ("postcopy-preempt", args.preempt),
        )
        if on
    ]
    if caps:
        await agent.execute("migrate-set-capabilities", {"guest": guest, "capabilities": caps})
    await agent.execute("migrate", {"guest": guest, "uri": args.uri})
    if args.postcopy_after_precopy:
        await switch_after_first_pass(agent, guest, timeout=args.timeout)
    if not args.wait:
        _print(
            args,
            {"guest": guest, "status": "started"},
            f"migration of {guest} to {args.uri} started",
        )
        return 0
    info = await wait_with_progress(agent, guest, json_output=args.json, timeout=args.timeout)
    _print(args, info, summarize(info))
    return 0 if info["status"] == "completed" else 1


TERMINAL = {"completed", "failed", "cancelled"}
RESULTING_STATE = {
    "migrate-postcopy": {"postcopy-active", "completed", "failed", "postcopy-paused"},
    "pause": {"postcopy-paused"},
    "recover": {"postcopy-active", "postcopy-recover", "completed"},
    "resume": {"postcopy-active", "completed", "postcopy-paused"},
}
SUCCESS_STATE = {
    "migrate-postcopy": {"postcopy-active", "completed"},
    "pause": {"postcopy-paused"},
    "recover": {"postcopy-active", "postcopy-recover", "completed"},
    "resume": {"postcopy-active", "completed"},
}


async def switch_after_first_pass(agent: Any, guest: str, *, timeout: float) -> None:
    """virsh's --postcopy-after-precopy: switch once the bulk pass is done."""
    import trio

    with trio.fail_after(timeout):
        while True:
            info = await agent.execute("query-migrate", {"guest": guest})
            done = info.get("ram", {}).get("dirty-sync-count", 0) >= 1
            if info.get("status") in TERMINAL or done:
                break
            await trio.sleep(0.05)
    if info.get("status") == "active":
        await agent.execute("migrate-start-postcopy", {"guest": guest})


async def _cmd_postcopy_control(args: argparse.Namespace, agent: Any) -> int:
    cmd, guest = args.command, args.guest
    if cmd == "migrate-postcopy":
        await agent.execute("migrate-start-postcopy", {"guest": guest})
    elif cmd == "pause":
        await agent.execute("migrate-pause", {"guest": guest})
    elif cmd == "recover":
        await agent.execute("migrate-recover", {"guest": guest, "uri": args.uri})
    else:
        await agent.execute("migrate", {"guest": guest, "uri": args.uri, "resume": True})
    if not args.wait:
        _print(args, {"guest": guest, "requested": cmd}, f"{cmd}: requested for {guest}")
        return 0
    info = await wait_with_progress(
        agent, guest, json_output=args.json, timeout=args.timeout, stop_at=RESULTING_STATE[cmd]
    )
    _print(args, info, summarize(info))
    return 0 if info["status"] in SUCCESS_STATE[cmd] else 1


async def wait_with_progress(
    agent: Any, guest: str, *, json_output: bool, timeout: float, stop_at: set[str] = TERMINAL
) -> dict[str, Any]:
    """Poll query-migrate; on a terminal draw one live progress line."""
    import trio

    live = sys.stderr.isatty() and not json_output
    with trio.fail_after(timeout):
        while True:
            info = await agent.execute("query-migrate", {"guest": guest})
            if live:
                sys.stderr.write("\r\x1b[K" + progress_line(info))
                sys.stderr.flush()
            if info.get("status") in stop_at:
                if live:
                    sys.stderr.write("\n")
                return dict(info)
            await trio.sleep(0.2)


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.0f} MiB"


def progress_line(info: dict[str, Any]) -> str:
    ram = info.get("ram", {})
    total = ram.get("total") or 0
    remaining = ram.get("remaining", 0)
    done = 1 - remaining / total if total else 0
    width = 24
    bar = "#" * int(done * width) + "-" * (width - int(done * width))
    parts = [
        f"{info.get('status', '?'):<16}",
        f"[{bar}] {done * 100:5.1f}%",
        f"remaining {_mib(remaining)}",
        f"{ram.get('mbps', 0) / 8:,.0f} MB/s",
        f"pass {ram.get('dirty-sync-count', 0)}",
    ]
    if "expected-downtime" in info:
        parts.append(f"expected downtime {info['expected-downtime']} ms")
    return "  ".join(parts)


def summarize(info: dict[str, Any]) -> str:
    ram = info.get("ram", {})
    lines = [f"status: {info.get('status')}"]
    if "error-desc" in info:
        lines.append(f"error: {info['error-desc']}")
    for key, label in (
        ("total-time", "total time"),
        ("setup-time", "setup time"),
        ("downtime", "downtime"),
    ):
        if key in info:
            lines.append(f"{label}: {info[key]} ms")
    if ram:
        lines.append(
            f"transferred: {_mib(ram.get('transferred', 0))} of {_mib(ram.get('total', 0))} RAM "
            f"({ram.get('duplicate', 0)} zero pages, {ram.get('dirty-sync-count', 0)} passes)"
        )
    return "\n".join(lines)


async def _cmd_status(args: argparse.Namespace, agent: Any) -> int:
    guests = await agent.execute("query-guests")
    result = []
    for g in guests:
        info = await agent.execute("query-migrate", {"guest": g["name"]})
        result.append({"guest": g, "migration": info})
    if args.json:
        print(json.dumps(result))
        return 0
    if not result:
        print("no guests")
    for item in result:
        g, info = item["guest"], item["migration"]
        print(f"{g['name']}: {g['status']}, {g['memory'] >> 20} MiB, workload {g['workload']}")
        if info.get("status", "none") != "none":
            print("  " + progress_line(info))
            if "error-desc" in info:
                print(f"  error: {info['error-desc']}")
    return 0


async def _cmd_ctl(args: argparse.Namespace, agent: Any) -> int:
    from .client import CommandFailed

    try:
        request = json.loads(args.command_json)
    except json.JSONDecodeError as exc:
        raise ValueError(f"ctl: not JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("execute"), str):
        raise ValueError('ctl: expected {"execute": NAME, "arguments": {...}}')
    try:
        value = await agent.execute(request["execute"], request.get("arguments"))
    except CommandFailed as exc:
        print(json.dumps({"error": {"class": exc.error_class, "desc": exc.desc}}))
        return 1
    print(json.dumps({"return": value}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
