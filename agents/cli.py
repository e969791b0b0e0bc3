"""The ``godwit`` command line: a person's verbs over the agents' control socket."""

from __future__ import annotations

import argparse
import sys
from importlib import metadata


def _version() -> str:
    try:
        return metadata.version("godwit")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="godwit",
        description="Live-migrate running guests between hosts (precopy, postcopy, "
        "preempt, recovery, mapped-ram) over mutually authenticated TLS.",
    )
    parser.add_argument("--version", action="version", version=f"godwit {_version()}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
