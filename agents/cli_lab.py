"""``godwit lab …`` and ``godwit proxy …``: the fault-injection verbs, beside their code.

``agents.cli`` finds this module and calls ``add_parsers`` and ``run``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

LAB_ACTIONS = {
    "up": "two network namespaces, a veth between them, an agent in each (root)",
    "down": "stop the agents, delete the namespaces (works from a half-built state)",
    "status": "namespaces, addresses, link, nftables rules, agents, control sockets",
    "cut": "take the link down (--reset: also abort established connections)",
    "blackhole": "drop every packet on the link (nftables); nothing errors, everything hangs",
    "heal": "undo cut and blackhole",
}


def add_parsers(sub: Any) -> None:
    from .lab import DEFAULT_DIR

    p = sub.add_parser("lab", help="the two-host network-namespace lab and its faults (root)")
    lab_sub = p.add_subparsers(dest="lab_command", metavar="ACTION", required=True)
    for action, text in LAB_ACTIONS.items():
        q = lab_sub.add_parser(action, help=text)
        q.add_argument(
            "--dir",
            type=Path,
            default=DEFAULT_DIR,
            help="lab directory: PKI, control sockets, pids, logs (default %(default)s)",
        )
        q.add_argument(
            "--prefix",
            default="gw",
            help="names: namespaces PREFIX-src/PREFIX-dst, veth PREFIX-src0/PREFIX-dst0",
        )
        q.add_argument("--json", action="store_true", help="machine-readable output")
        if action == "cut":
            q.add_argument(
                "--reset",
                action="store_true",
                help="also abort established sockets between the hosts (ss -K): errors now",
            )

    p = sub.add_parser(
        "proxy", help="a fault-injecting TCP proxy (cut, blackhole, throttle, heal) for scripts"
    )
    p.add_argument("--listen", metavar="HOST:PORT", help="accept here (port 0: any free port)")
    p.add_argument("--target", metavar="HOST:PORT", help="forward to here")
    p.add_argument(
        "--control",
        type=Path,
        metavar="SOCK",
        required=True,
        help="Unix socket for one-line commands: cut | blackhole | heal | throttle N | "
        "cut-after N | blackhole-after N | status",
    )
    p.add_argument(
        "--send",
        metavar="COMMAND",
        help="instead of running a proxy, send COMMAND to the one on --control and print the reply",
    )


def run(args: argparse.Namespace) -> int | None:
    if args.command == "lab":
        import trio

        return int(trio.run(_lab, args))
    if args.command == "proxy":
        import trio

        return int(trio.run(_proxy, args))
    return None


async def _lab(args: argparse.Namespace) -> int:
    from .lab import Lab, LabError, format_status

    lab = Lab(args.dir, prefix=args.prefix)
    action = args.lab_command
    result: dict[str, Any] = {"action": action}
    try:
        if action == "up":
            await lab.up()
            result.update(
                source_control=str(lab.source_control),
                destination_control=str(lab.destination_control),
                destination_uri=lab.destination_uri,
                source_uri=lab.source_uri,
                pki=str(lab.pki_dir),
            )
            human = (
                f"lab up in {lab.directory}\n"
                f"  source:      netns {lab.source.namespace}, {lab.source.address}, "
                f"control {lab.source_control}\n"
                f"  destination: netns {lab.destination.namespace}, {lab.destination.address}, "
                f"control {lab.destination_control}\n"
                f"try: godwit vm start vm1 --memory 256M -a {lab.source_control}\n"
                f"     godwit migrate vm1 {lab.destination_uri} --wait -a {lab.source_control}"
            )
        elif action == "down":
            result["done"] = await lab.down()
            human = "lab down" + "".join(f"\n  {line}" for line in result["done"])
        elif action == "status":
            result = await lab.status()
            human = format_status(result)
        elif action == "cut":
            await lab.cut(reset=args.reset)
            human = "link cut" + (" (established connections reset)" if args.reset else "")
        elif action == "blackhole":
            await lab.blackhole()
            human = "link blackholed (nftables drop in both namespaces)"
        else:
            await lab.heal()
            human = "link healed"
    except LabError as exc:
        print(f"godwit: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result) if args.json else human)
    return 0 if action != "status" or result.get("up") else 3


async def _proxy(args: argparse.Namespace) -> int:
    import trio

    from .daemon import split_host_port
    from .faults import FaultProxy, proxy_command, serve_control

    if args.send:
        reply = await proxy_command(args.control, args.send)
        print(reply)
        return 1 if reply.startswith("error") else 0
    if not args.listen or not args.target:
        print("godwit proxy: --listen and --target are needed to run a proxy", file=sys.stderr)
        return 2
    listen_host, listen_port = split_host_port(args.listen)
    target_host, target_port = split_host_port(args.target)
    proxy = FaultProxy(listen_host, listen_port, target_host, target_port)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.run)
        await nursery.start(serve_control, proxy, args.control)
        print(
            f"proxy {listen_host}:{port} -> {target_host}:{target_port}; control {args.control}",
            flush=True,
        )
    return 0
