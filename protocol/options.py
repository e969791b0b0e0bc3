"""Migration capabilities and parameters: names, defaults, ranges and the rules between them.

This is godwit's ``migration/options.c``.  Capabilities are booleans that
change *how* a migration runs and are fixed while it runs; parameters are
tunables that may change at any time.  Names are QEMU's where QEMU has the
concept; godwit's own additions are marked as such.  The control server
validates ``migrate-set-capabilities`` / ``migrate-set-parameters`` here, the
source agent checks :func:`check_capability_dependencies` before it starts,
and both sides compare capabilities through
:func:`protocol.messages.negotiate_capabilities` when CONFIG arrives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CAPABILITIES",
    "PARAMETERS",
    "CapabilitySpec",
    "ParameterSpec",
    "check_capability_dependencies",
    "default_capabilities",
    "default_parameters",
    "needs_return_path",
    "validate_capabilities",
    "validate_parameters",
]


@dataclass(frozen=True, slots=True)
class CapabilitySpec:
    default: bool
    description: str
    both_sides: bool = False
    """QEMU requires it on both hosts (the wire format or channel set changes)."""


@dataclass(frozen=True, slots=True)
class ParameterSpec:
    type: type
    default: int | float | str | bool
    description: str
    minimum: int | float | None = None
    maximum: int | float | None = None
    choices: tuple[str, ...] = ()
    unit: str = ""


CAPABILITIES: dict[str, CapabilitySpec] = {
    "auto-converge": CapabilitySpec(
        False, "Throttle the guest's vCPUs when precopy passes do not shrink."
    ),
    "postcopy-ram": CapabilitySpec(
        False,
        "Allow switching to postcopy: the destination runs the guest and pulls missing pages.",
        both_sides=True,
    ),
    "postcopy-preempt": CapabilitySpec(
        False,
        "Serve postcopy page requests on their own channel so they never queue behind "
        "background pages.",
        both_sides=True,
    ),
    "postcopy-blocktime": CapabilitySpec(
        False, "Measure how long vCPUs wait on missing pages in postcopy (destination)."
    ),
    "pause-before-switchover": CapabilitySpec(
        False, "Stop in pre-switchover before device state moves, until migrate-continue."
    ),
    "multifd": CapabilitySpec(
        False, "Send page payload over several channels in parallel.", both_sides=True
    ),
    "mapped-ram": CapabilitySpec(
        False,
        "File migration with each page at a fixed offset (a region and bitmap per ramblock).",
        both_sides=True,
    ),
    "return-path": CapabilitySpec(
        False,
        "Open the destination-to-source channel in precopy too (postcopy always has it).",
        both_sides=True,
    ),
    "switchover-ack": CapabilitySpec(
        False,
        "Do not switch over before the destination says it is ready (SWITCHOVER_ACK).",
        both_sides=True,
    ),
    "events": CapabilitySpec(False, "Emit MIGRATION_PASS events for every precopy pass."),
    "suppress-vmdesc": CapabilitySpec(
        False, "godwit: do not send the VMDESC JSON at the end of precopy."
    ),
    "x-switchover-digest": CapabilitySpec(
        False,
        "godwit, for verification: after the destination confirms, digest the source's "
        "(stopped) RAM and report it as query-migrate's switchover-digest before releasing it.",
    ),
}
"""Every capability godwit implements, by QEMU name."""

_MAX_DOWNTIME_MS = 2_000_000  # QEMU's MAX_MIGRATE_DOWNTIME (2000 s), in ms
_U64 = (1 << 64) - 1

PARAMETERS: dict[str, ParameterSpec] = {
    "downtime-limit": ParameterSpec(
        int, 300, "Largest tolerated guest stop at switchover.", 0, _MAX_DOWNTIME_MS, unit="ms"
    ),
    "max-bandwidth": ParameterSpec(
        int, 0, "Precopy bandwidth cap; 0 = unlimited.", 0, _U64, unit="bytes/s"
    ),
    "max-postcopy-bandwidth": ParameterSpec(
        int,
        0,
        "Background bandwidth cap in postcopy (requested pages are never capped); 0 = unlimited.",
        0,
        _U64,
        unit="bytes/s",
    ),
    "cpu-throttle-initial": ParameterSpec(
        int, 20, "First throttle step of auto-converge.", 1, 99, unit="%"
    ),
    "cpu-throttle-increment": ParameterSpec(
        int, 10, "Throttle added each time a pass does not shrink.", 1, 99, unit="%"
    ),
    "max-cpu-throttle": ParameterSpec(int, 99, "Highest throttle auto-converge applies.", 1, 99),
    "multifd-channels": ParameterSpec(
        int, 2, "Number of multifd channels (or parallel writers for mapped-ram).", 1, 255
    ),
    "zero-page-detection": ParameterSpec(
        str,
        "legacy",
        "Where zero pages are found: 'legacy' scans in the sender and sends ZERO runs, "
        "'none' sends them as data.",
        choices=("none", "legacy"),
    ),
    "direct-io": ParameterSpec(
        bool, False, "Write mapped-ram files with O_DIRECT (needs mapped-ram)."
    ),
    "keepalive-ms": ParameterSpec(
        int,
        2000,
        "godwit: PING interval on the return path; a PONG missing for three intervals "
        "pauses postcopy.",
        100,
        600_000,
        unit="ms",
    ),
    "max-frame-payload": ParameterSpec(
        int,
        16 << 20,
        "godwit: largest frame payload a receiver accepts (negotiated in CONFIG).",
        64 << 10,
        (1 << 32) - 1,
        unit="bytes",
    ),
}
"""Every parameter godwit implements, by QEMU name (type, default, range)."""


def default_capabilities() -> dict[str, bool]:
    return {name: spec.default for name, spec in CAPABILITIES.items()}


def default_parameters() -> dict[str, int | float | str | bool]:
    return {name: spec.default for name, spec in PARAMETERS.items()}


def _unknown(kind: str, key: object, known: Mapping[str, object]) -> ValueError:
    return ValueError(f"unknown {kind} {key!r}; known: {', '.join(sorted(known))}")


def validate_capabilities(caps: Mapping[str, Any]) -> dict[str, bool]:
    """Check names and values of a capability update; return it as ``{name: bool}``.

    Only the keys given are returned, so the caller merges them into what
    is set already.  Raises ``ValueError`` naming the key at fault.
    """
    out: dict[str, bool] = {}
    for key, value in caps.items():
        if key not in CAPABILITIES:
            raise _unknown("capability", key, CAPABILITIES)
        if not isinstance(value, bool):
            raise ValueError(f"capability {key!r} must be true or false, not {value!r}")
        out[key] = value
    return out


def _check_one(key: str, value: Any) -> int | float | str | bool:
    spec = PARAMETERS[key]
    if spec.type is bool:
        if not isinstance(value, bool):
            raise ValueError(f"parameter {key!r} must be true or false, not {value!r}")
        return value
    if spec.type is str:
        if not isinstance(value, str) or (spec.choices and value not in spec.choices):
            raise ValueError(
                f"parameter {key!r} must be one of {', '.join(spec.choices)}, not {value!r}"
            )
        return value
    if spec.type is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"parameter {key!r} must be an integer, not {value!r}")
    elif spec.type is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"parameter {key!r} must be a number, not {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"parameter {key!r} must be finite, not {value!r}")
    lo, hi = spec.minimum, spec.maximum
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        unit = f" {spec.unit}" if spec.unit else ""
        raise ValueError(f"parameter {key!r} must be in [{lo}, {hi}]{unit}, not {value!r}")
    assert isinstance(value, int | float)
    return value


def validate_parameters(params: Mapping[str, Any]) -> dict[str, int | float | str | bool]:
    """Check names, types and ranges of a parameter update; return it normalised.

    Integral floats become ints (JSON clients send ``300.0``).  Only the keys
    given are returned.  Raises ``ValueError`` naming the key and what is
    allowed.
    """
    out: dict[str, int | float | str | bool] = {}
    for key, value in params.items():
        if key not in PARAMETERS:
            raise _unknown("parameter", key, PARAMETERS)
        out[key] = _check_one(key, value)
    return out


def check_capability_dependencies(
    caps: Mapping[str, bool], params: Mapping[str, Any] | None = None
) -> None:
    """Refuse combinations QEMU refuses (``migrate_caps_check``), before a migration starts.

    ``caps`` may be partial; missing names count as their default.  Raises
    ``ValueError`` saying which capability needs or excludes which.
    """
    full = default_capabilities()
    full.update(validate_capabilities(caps))
    on = {name for name, value in full.items() if value}
    if "postcopy-preempt" in on and "postcopy-ram" not in on:
        raise ValueError("capability 'postcopy-preempt' requires capability 'postcopy-ram'")
    if "switchover-ack" in on and "return-path" not in on:
        raise ValueError("capability 'switchover-ack' requires capability 'return-path'")
    if "mapped-ram" in on and "postcopy-ram" in on:
        raise ValueError("capability 'mapped-ram' is incompatible with 'postcopy-ram'")
    if "postcopy-blocktime" in on and "postcopy-ram" not in on:
        raise ValueError("capability 'postcopy-blocktime' requires capability 'postcopy-ram'")
    if params is not None and params.get("direct-io") and "mapped-ram" not in on:
        raise ValueError("parameter 'direct-io' requires capability 'mapped-ram'")


def needs_return_path(caps: Mapping[str, bool]) -> bool:
    """Whether the return channel is opened: with return-path, and always for postcopy."""
    return bool(caps.get("return-path") or caps.get("postcopy-ram"))
