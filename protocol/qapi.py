"""The control API's schema: every command, its arguments and every event.

Like QEMU's ``qapi/*.json``, this one table serves everyone: the agent's
control server validates arguments with it (QEMU's error texts, so QMP tools
read them), the client and the TUI know what exists, and the API reference
in docs/ is generated from it, so the documentation cannot drift from the
code.  Command and field names are QEMU's where QEMU has the concept; godwit's
own additions (``guest-*``, ``query-guests``) follow the same style.  Every
migration command takes a ``guest`` argument beside QEMU's, because an agent
hosts several guests; it may be left out when the agent has exactly one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# Argument types, QAPI style.
STR, INT, BOOL, NUMBER, SIZE, OBJECT, ARRAY = (
    "str",
    "int",
    "bool",
    "number",
    "size",
    "object",
    "array",
)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*$")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: int | str) -> int:
    """Sizes as QEMU takes them on its command line: ``1073741824``, ``1G``, ``512M``."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative: {value}")
        return value
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"not a size: {value!r} (use bytes, or a number with K, M, G or T)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


@dataclass(frozen=True)
class Arg:
    name: str
    type: str
    doc: str
    required: bool = False
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class CommandSpec:
    name: str
    doc: str
    args: tuple[Arg, ...] = ()
    returns: str = "{}"
    extra_args_allowed: bool = False
    """migrate-set-parameters takes the parameters themselves as arguments."""

    def arg(self, name: str) -> Arg | None:
        for a in self.args:
            if a.name == name:
                return a
        return None


@dataclass(frozen=True)
class EventSpec:
    name: str
    doc: str
    data: tuple[Arg, ...] = field(default_factory=tuple)


GUEST = Arg("guest", STR, "name of the guest (may be left out when the agent has exactly one)")

COMMANDS: dict[str, CommandSpec] = {
    c.name: c
    for c in (
        CommandSpec(
            "qmp_capabilities",
            "Leave capabilities negotiation mode (QMP).",
            (Arg("enable", ARRAY, "QMP capabilities to enable (none are offered)"),),
        ),
        CommandSpec("query-version", "The agent's version, QEMU-shaped.", returns="VersionInfo"),
        CommandSpec("query-commands", "Every command this agent accepts.", returns="[{name}]"),
        CommandSpec(
            "query-status",
            "Run state of a guest's vCPUs.",
            (GUEST,),
            returns="{running, status, guest}",
        ),
        CommandSpec(
            "query-migrate",
            "Status and statistics of a guest's migration (QEMU's MigrationInfo).",
            (GUEST,),
            returns="MigrationInfo",
        ),
        CommandSpec(
            "query-migrate-capabilities",
            "Migration capabilities of a guest.",
            (GUEST,),
            returns="[{capability, state}]",
        ),
        CommandSpec(
            "query-migrate-parameters",
            "Migration parameters of a guest.",
            (GUEST,),
            returns="MigrationParameters",
        ),
        CommandSpec(
            "migrate-set-capabilities",
            "Enable or disable migration capabilities.",
            (Arg("capabilities", ARRAY, "list of {capability, state}", required=True), GUEST),
        ),
        CommandSpec(
            "migrate-set-parameters",
            "Set migration parameters; each parameter is an argument (downtime-limit=…).",
            (GUEST,),
            extra_args_allowed=True,
        ),
        CommandSpec(
            "migrate",
            "Start migrating a guest to a destination agent, or resume a paused postcopy.",
            (
                Arg(
                    "uri",
                    STR,
                    "tls:HOST:PORT (or tcp:HOST:PORT with --insecure-plaintext, file:PATH)",
                    required=True,
                ),
                Arg("resume", BOOL, "resume a paused postcopy migration over a new connection"),
                GUEST,
            ),
        ),
        CommandSpec(
            "migrate-incoming",
            "Prepare to receive a guest (the agent's listener already accepts).",
            (
                Arg("uri", STR, "tls:HOST:PORT to listen on, or 'defer' for the agent's listener"),
                Arg(
                    "autostart",
                    BOOL,
                    "run incoming guests once they arrive (default true); false leaves them "
                    "paused for inspection, like QEMU's -S",
                ),
                Arg("lazy", BOOL, "file: restore lazily, serving page faults from the file"),
                Arg("multifd-channels", INT, "file: parallel readers for the restore"),
                GUEST,
            ),
            returns="{port}",
        ),
        CommandSpec(
            "migrate-cancel",
            "Cancel an outgoing migration (refused in postcopy: no host has the whole guest).",
            (GUEST,),
        ),
        CommandSpec(
            "migrate-continue",
            "Continue from the pre-switchover pause.",
            (Arg("state", STR, "the state being left: pre-switchover", required=True), GUEST),
        ),
        CommandSpec(
            "migrate-start-postcopy", "Switch a running precopy migration to postcopy.", (GUEST,)
        ),
        CommandSpec("migrate-pause", "Force a postcopy migration into postcopy-paused.", (GUEST,)),
        CommandSpec(
            "migrate-recover",
            "On the destination: listen again to recover a paused postcopy.",
            (Arg("uri", STR, "tls:HOST:PORT to listen on", required=True), GUEST),
        ),
        CommandSpec("stop", "Pause a guest's vCPUs.", (GUEST,)),
        CommandSpec("cont", "Resume a guest's vCPUs.", (GUEST,)),
        CommandSpec(
            "guest-start",
            "Create a guest: RAM on memfd, a guest process running a workload.",
            (
                Arg("name", STR, "guest name, unique on this agent", required=True),
                Arg("memory", SIZE, "RAM size, e.g. 1G (default 256M)"),
                Arg(
                    "workload", STR, "counter | stress:rate=200M,wss=512M,mode=write|read|rw | idle"
                ),
                Arg("fill", STR, "zero | random | mixed:P%"),
                Arg("seed", INT, "seed for the fill and the workload"),
                Arg("hugetlb", BOOL, "back RAM with 2 MiB huge pages"),
                Arg("paused", BOOL, "create the guest with its vCPUs stopped"),
            ),
            returns="GuestInfo",
        ),
        CommandSpec("guest-stop", "Terminate a guest and free its memory.", (GUEST,)),
        CommandSpec(
            "guest-verify",
            "Check a guest's memory (vCPUs are paused for the check).",
            (
                GUEST,
                Arg("method", STR, "counter | digest", choices=("counter", "digest")),
                Arg("expect", STR, "with digest: the digest the RAM must have (switchover-digest)"),
            ),
            returns="{verified, method, detail, digest}",
        ),
        CommandSpec("query-guests", "Every guest on this agent.", returns="[GuestInfo]"),
        CommandSpec(
            "query-incoming-prealloc",
            "The RAM kept allocated for the next incoming guest (incoming-prealloc).",
            returns="{size, ready, taken}",
        ),
    )
}

EVENTS: dict[str, EventSpec] = {
    e.name: e
    for e in (
        EventSpec(
            "MIGRATION",
            "A migration changed state (QEMU).",
            (Arg("status", STR, "the new state"), GUEST),
        ),
        EventSpec(
            "MIGRATION_PASS",
            "A new dirty-page pass began (QEMU).",
            (Arg("pass", INT, "pass number"), GUEST),
        ),
        EventSpec(
            "MIGRATION_PROGRESS",
            "godwit: query-migrate's figures, a few times a second at most.",
            (GUEST, Arg("info", OBJECT, "MigrationInfo")),
        ),
        EventSpec("STOP", "A guest's vCPUs stopped (QEMU).", (GUEST,)),
        EventSpec("RESUME", "A guest's vCPUs run again (QEMU).", (GUEST,)),
        EventSpec("GUEST_STARTED", "godwit: a guest process started.", (GUEST,)),
        EventSpec(
            "GUEST_EXITED", "godwit: a guest process ended.", (GUEST, Arg("reason", STR, "why"))
        ),
    )
}

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    STR: (str,),
    INT: (int,),
    BOOL: (bool,),
    NUMBER: (int, float),
    SIZE: (int, str),
    OBJECT: (dict,),
    ARRAY: (list,),
}

_TYPE_NAMES = {
    STR: "string",
    INT: "integer",
    BOOL: "boolean",
    NUMBER: "number",
    SIZE: "size",
    OBJECT: "object",
    ARRAY: "array",
}


class ArgumentError(ValueError):
    """A command's arguments do not fit its schema; the text is QEMU's wording."""


def validate_arguments(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """Check arguments against the schema; sizes come back as ints.

    Raises KeyError for an unknown command and ArgumentError for bad
    arguments, with the texts QEMU uses so QMP tooling recognises them.
    """
    spec = COMMANDS[name]
    out: dict[str, Any] = {}
    for key, value in arguments.items():
        arg = spec.arg(key)
        if arg is None:
            if spec.extra_args_allowed:
                out[key] = value
                continue
            raise ArgumentError(f"Parameter '{key}' is unexpected")
        expected = _JSON_TYPES[arg.type]
        if not isinstance(value, expected) or (arg.type != BOOL and isinstance(value, bool)):
            raise ArgumentError(
                f"Invalid parameter type for '{key}', expected: {_TYPE_NAMES[arg.type]}"
            )
        if arg.type == SIZE:
            try:
                value = parse_size(value)  # type: ignore[arg-type]  # isinstance-checked above
            except ValueError as exc:
                raise ArgumentError(f"Parameter '{key}' expects a size: {exc}") from None
        if arg.choices and value not in arg.choices:
            raise ArgumentError(
                f"Parameter '{key}' does not accept value '{value}' "
                f"(one of: {', '.join(arg.choices)})"
            )
        out[key] = value
    for arg in spec.args:
        if arg.required and arg.name not in out:
            raise ArgumentError(f"Parameter '{arg.name}' is missing")
    return out
