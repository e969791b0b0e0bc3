"""``godwit save``, ``godwit restore`` and ``godwit inspect``: mapped-ram files from the command line.

save and restore drive an agent over its control socket with QEMU's
commands — ``migrate-set-capabilities`` (mapped-ram, multifd),
``migrate-set-parameters`` (multifd-channels, direct-io), ``stop`` for a
non-live save, ``migrate`` with a ``file:`` URI, ``migrate-incoming`` with a
``file:`` URI — and follow ``query-migrate`` to the end.  inspect reads the
file locally (no agent): it prints the layout and says whether the file
would be accepted by a restore, and why not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

VERBS = ("save", "restore", "inspect")


def _agent_options(p: argparse.ArgumentParser, *, cert_flag: str = "--name") -> None:
    from .cli import add_agent_options

    add_agent_options(p, cert_flag=cert_flag)
    p.add_argument("--timeout", type=float, default=3600, help="give up waiting after S seconds")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("save", help="save a guest to a mapped-ram file (file:PATH)")
    p.add_argument("guest")
    p.add_argument("uri", metavar="file:PATH", help="where to write the file")
    p.add_argument(
        "--live",
        action="store_true",
        help="keep the guest running while its RAM is written (default: stop it first, fastest)",
    )
    p.add_argument(
        "--multifd", type=int, metavar="N", default=1, help="parallel writer threads (default 1)"
    )
    p.add_argument("--direct-io", action="store_true", help="write pages with O_DIRECT")
    _agent_options(p)

    p = sub.add_parser("restore", help="bring a guest back from a mapped-ram file")
    p.add_argument("uri", metavar="file:PATH")
    p.add_argument(
        "--lazy",
        action="store_true",
        help="run the guest at once and serve its page faults from the file",
    )
    p.add_argument("--name", dest="guest_name", help="name for the restored guest")
    p.add_argument(
        "--readers", type=int, default=2, metavar="N", help="parallel reader threads (default 2)"
    )
    _agent_options(p, cert_flag="--cert-name")

    p = sub.add_parser("inspect", help="print a mapped-ram file's layout and validate it")
    p.add_argument("file", type=Path)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int | None:
    if args.command not in VERBS:
        return None
    if args.command == "inspect":
        return cmd_inspect(args)
    import trio

    return int(trio.run(_run_remote, args))


def _file_uri(text: str) -> str:
    from protocol.uri import parse_uri

    uri = parse_uri(text if ":" in text else f"file:{text}")
    if uri.scheme != "file":
        raise ValueError(f"{text!r}: expected file:PATH")
    return f"file:{Path(uri.path).resolve()}"


async def _run_remote(args: argparse.Namespace) -> int:
    from .client import open_client

    async with open_client(args.agent, pki=args.pki, name=args.cert_name) as agent:
        if args.command == "save":
            return await cmd_save(args, agent)
        return await cmd_restore(args, agent)


async def cmd_save(args: argparse.Namespace, agent: Any) -> int:
    from .cli import summarize, wait_with_progress

    guest = args.guest
    uri = _file_uri(args.uri)
    if args.multifd < 1:
        raise ValueError("--multifd must be at least 1")
    caps = [
        {"capability": "mapped-ram", "state": True},
        {"capability": "multifd", "state": args.multifd > 1},
    ]
    await agent.execute("migrate-set-capabilities", {"guest": guest, "capabilities": caps})
    params: dict[str, Any] = {"guest": guest, "direct-io": bool(args.direct_io)}
    if args.multifd > 1:
        params["multifd-channels"] = args.multifd
    await agent.execute("migrate-set-parameters", params)
    if not args.live:
        status = await agent.execute("query-status", {"guest": guest})
        if status.get("running"):
            await agent.execute("stop", {"guest": guest})
    await agent.execute("migrate", {"guest": guest, "uri": uri})
    info = await wait_with_progress(agent, guest, json_output=args.json, timeout=args.timeout)
    _print(args, info, f"{summarize(info)}\nfile: {uri[5:]}")
    return 0 if info.get("status") == "completed" else 1


async def cmd_restore(args: argparse.Namespace, agent: Any) -> int:
    from .cli import summarize, wait_with_progress

    uri = _file_uri(args.uri)
    arguments: dict[str, Any] = {"uri": uri, "lazy": bool(args.lazy)}
    if args.guest_name:
        arguments["guest"] = args.guest_name
    if args.readers != 2:
        arguments["multifd-channels"] = args.readers
    reply = await agent.execute("migrate-incoming", arguments)
    guest = reply.get("guest", args.guest_name) if isinstance(reply, dict) else args.guest_name
    info = await wait_with_progress(agent, guest, json_output=args.json, timeout=args.timeout)
    info = {**info, "guest": guest}
    _print(args, info, f"guest {guest} restored from {uri[5:]}\n{summarize(info)}")
    return 0 if info.get("status") == "completed" else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from .mapped_ram import inspect_file

    report = inspect_file(args.file)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0 if report["valid"] else 1


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def format_report(report: dict[str, Any]) -> str:
    """The human form of inspect_file's report: layout table, devices, verdict."""
    lines = [f"{report['path']}: {report.get('file-size', '?')} bytes"]
    layout = report.get("layout")
    if layout:
        guest = layout.get("config", {}).get("guest", {})
        lines.append(
            f"mapped-ram version {layout['version']}, "
            f"{'complete' if layout['complete'] else 'INCOMPLETE'}, "
            f"guest {guest.get('name', '?')!r} (workload {guest.get('workload', '?')}), "
            f"saved {'live' if layout.get('config', {}).get('live') else 'stopped'}"
        )
        lines.append(f"{'region':<26} {'offset':>14} {'size':>14}")
        lines.append(f"{'header':<26} {0:>14} {layout['header-size']:>14}")
        for b in layout["blocks"]:
            lines.append(
                f"{'bitmap ' + b['name']:<26} {b['bitmap-offset']:>14} {b['bitmap-size']:>14}"
            )
            pct = b.get("present-percent")
            lines.append(
                f"{'pages ' + b['name']:<26} {b['pages-offset']:>14} {b['size']:>14}"
                f"  {b['pages']} pages of {b['page-size']}, {b['present-pages']} present"
                + (f" ({pct}%)" if pct is not None else "")
            )
        lines.append(
            f"{'devices + vmdesc':<26} {layout['tail-offset']:>14} {layout['tail-size']:>14}"
        )
    for s in report.get("sections", []):
        lines.append(f"  device {s['name']}/{s['instance']} v{s['version']}: {s['size']} bytes")
    if report["valid"]:
        lines.append("valid: yes")
    else:
        lines.append(f"valid: NO — {report['error']}")
    return "\n".join(lines)


def _print(args: argparse.Namespace, value: Any, human: str) -> None:
    if args.json:
        print(json.dumps(value))
    else:
        print(human, file=sys.stdout)
