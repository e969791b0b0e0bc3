"""Guest device state: a small vmstate-like model (typed, versioned fields → sections).

Like QEMU's VMStateDescription, a device declares its fields once; the same
declaration serialises the state (DEVICE_STATE payload), loads it back and
describes the layout as JSON (the VMDESC).  A field carries the version that
introduced it, so a newer runtime loads older sections (the missing fields
keep their defaults); a section newer than this runtime is refused by name.

Devices here: ``vcpu`` (the workload loop's position, which is not in RAM,
and the throttle), ``clock`` (guest time, frozen while stopped, continuing
across migration) and ``console`` (a ring of the guest's recent log lines).
"""

from __future__ import annotations

import base64
import collections
import json
import struct
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from agents.vm.errors import DeviceVersionError

_FIXED = {
    "u8": "<B",
    "u16": "<H",
    "u32": "<I",
    "u64": "<Q",
    "i64": "<q",
    "f64": "<d",
    "bool": "<?",
}
_VARIABLE = ("str", "bytes", "strlist")


@dataclass(frozen=True)
class Field:
    """One typed field; ``since`` is the device version that added it."""

    name: str
    type: str
    default: Any = 0
    since: int = 1

    def __post_init__(self) -> None:
        if self.type not in _FIXED and self.type not in _VARIABLE:
            raise ValueError(f"field {self.name!r}: unknown type {self.type!r}")


@dataclass
class DeviceSection:
    """A device's saved state as it crosses the wire (DEVICE_STATE)."""

    name: str
    instance: int
    version: int
    data: bytes
    fields: list[dict[str, Any]] | None = field(default=None, compare=False)
    """The field layout (for VMDESC); not part of the section's bytes."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "instance": self.instance,
            "version": self.version,
            "data": base64.b64encode(self.data).decode(),
        }
        if self.fields is not None:
            out["fields"] = self.fields
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DeviceSection:
        return cls(
            obj["name"],
            int(obj["instance"]),
            int(obj["version"]),
            base64.b64decode(obj["data"]),
            obj.get("fields"),
        )


class Device:
    """A device with declared fields; subclasses set NAME, VERSION and FIELDS."""

    NAME: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    FIELDS: ClassVar[tuple[Field, ...]] = ()

    def __init__(self, instance: int = 0) -> None:
        self.instance = instance
        self.values: dict[str, Any] = {
            f.name: (list(f.default) if f.type == "strlist" else f.default) for f in self.FIELDS
        }

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def __setitem__(self, name: str, value: Any) -> None:
        if name not in self.values:
            raise KeyError(f"device {self.NAME!r} has no field {name!r}")
        self.values[name] = value

    def _where(self) -> str:
        return f"device {self.NAME!r} instance {self.instance}"

    def pre_save(self) -> None:
        """Hook: refresh values from live state before serialising."""

    def post_load(self) -> None:
        """Hook: push loaded values into live state."""

    def save(self) -> DeviceSection:
        self.pre_save()
        out = bytearray()
        for f in self.FIELDS:
            v = self.values[f.name]
            try:
                if f.type in _FIXED:
                    out += struct.pack(_FIXED[f.type], v)
                elif f.type == "str":
                    b = str(v).encode()
                    out += struct.pack("<I", len(b)) + b
                elif f.type == "bytes":
                    out += struct.pack("<I", len(v)) + bytes(v)
                else:
                    out += struct.pack("<I", len(v))
                    for s in v:
                        b = str(s).encode()
                        out += struct.pack("<I", len(b)) + b
            except (struct.error, TypeError) as e:
                raise ValueError(
                    f"{self._where()}: field {f.name!r} ({f.type}) = {v!r}: {e}"
                ) from e
        return DeviceSection(
            self.NAME, self.instance, self.VERSION, bytes(out), self.describe()["fields"]
        )

    def load(self, section: DeviceSection) -> None:
        where = self._where()
        if section.name != self.NAME or section.instance != self.instance:
            raise DeviceVersionError(
                f"{where}: got section for {section.name!r} instance {section.instance}"
            )
        if section.version > self.VERSION:
            raise DeviceVersionError(
                f"{where}: section version {section.version} is newer than this runtime "
                f"knows (up to {self.VERSION}); upgrade the destination"
            )
        if section.version < 1:
            raise DeviceVersionError(f"{where}: section version {section.version} is invalid")
        data = section.data
        pos = 0
        values = dict(self.values)

        def take(n: int, fname: str) -> bytes:
            nonlocal pos
            if pos + n > len(data):
                raise DeviceVersionError(
                    f"{where} v{section.version}: field {fname!r} runs past the end "
                    f"({len(data)} bytes) at byte {pos}"
                )
            b = data[pos : pos + n]
            pos += n
            return b

        for f in self.FIELDS:
            if f.since > section.version:
                continue  # added later than the sender's version: keep the default
            if f.type in _FIXED:
                fmt = _FIXED[f.type]
                values[f.name] = struct.unpack(fmt, take(struct.calcsize(fmt), f.name))[0]
            elif f.type in ("str", "bytes"):
                (n,) = struct.unpack("<I", take(4, f.name))
                raw = take(n, f.name)
                values[f.name] = raw.decode() if f.type == "str" else raw
            else:
                (count,) = struct.unpack("<I", take(4, f.name))
                items = []
                for _ in range(count):
                    (n,) = struct.unpack("<I", take(4, f.name))
                    items.append(take(n, f.name).decode())
                values[f.name] = items
        if pos != len(data):
            raise DeviceVersionError(
                f"{where} v{section.version}: {len(data) - pos} trailing bytes after the last field"
            )
        self.values = values
        self.post_load()

    def describe(self) -> dict[str, Any]:
        """This device's entry in the VMDESC JSON."""
        return {
            "name": self.NAME,
            "instance_id": self.instance,
            "version": self.VERSION,
            "fields": [
                {
                    "name": f.name,
                    "type": f.type,
                    **({"size": struct.calcsize(_FIXED[f.type])} if f.type in _FIXED else {}),
                    **({"since": f.since} if f.since > 1 else {}),
                }
                for f in self.FIELDS
            ],
        }


class VcpuDevice(Device):
    """Workload loop state that is not in RAM: where the walk is, how far it got."""

    NAME = "vcpu"
    VERSION = 1
    FIELDS = (
        Field("workload", "str", ""),
        Field("position", "u64"),
        Field("passes", "u64"),
        Field("steps", "u64"),
        Field("throttle", "u8"),
        Field("bursts", "u64"),
    )


class ClockDevice(Device):
    """Guest time: advances only while the vCPUs run, never jumps back across migration."""

    NAME = "clock"
    VERSION = 1
    FIELDS = (Field("guest_ns", "u64"),)

    def __init__(self, instance: int = 0) -> None:
        super().__init__(instance)
        self._base_ns = 0
        self._running_since: int | None = None

    def now_ns(self) -> int:
        if self._running_since is None:
            return self._base_ns
        return self._base_ns + time.monotonic_ns() - self._running_since

    def resume(self) -> None:
        if self._running_since is None:
            self._running_since = time.monotonic_ns()

    def pause(self) -> None:
        if self._running_since is not None:
            self._base_ns = self.now_ns()
            self._running_since = None

    def pre_save(self) -> None:
        self.values["guest_ns"] = self.now_ns()

    def post_load(self) -> None:
        # Continue from the source's frozen time; never step back from our own.
        running = self._running_since is not None
        self.pause()
        self._base_ns = max(self._base_ns, int(self.values["guest_ns"]))
        if running:
            self.resume()


class ConsoleDevice(Device):
    """The guest's recent log lines, so the destination's console shows its history."""

    NAME = "console"
    VERSION = 1
    CAPACITY = 64
    FIELDS = (Field("lines", "strlist", ()), Field("dropped", "u64"))

    def __init__(self, instance: int = 0) -> None:
        super().__init__(instance)
        self.ring: collections.deque[str] = collections.deque(maxlen=self.CAPACITY)

    def log(self, line: str) -> None:
        if len(self.ring) == self.CAPACITY:
            self.values["dropped"] += 1
        self.ring.append(line)

    def pre_save(self) -> None:
        self.values["lines"] = list(self.ring)

    def post_load(self) -> None:
        self.ring.clear()
        self.ring.extend(self.values["lines"][-self.CAPACITY :])


DEVICE_TYPES: dict[str, type[Device]] = {
    cls.NAME: cls for cls in (VcpuDevice, ClockDevice, ConsoleDevice)
}


def vmdesc(devices: list[Device], blocks: list[dict[str, Any]] | None = None) -> str:
    """The VMDESC JSON: what each section's bytes mean, for tools reading a stream."""
    doc: dict[str, Any] = {"devices": [d.describe() for d in devices]}
    if blocks is not None:
        doc["ramblocks"] = blocks
    return json.dumps(doc, sort_keys=True)


def load_sections(devices: list[Device], sections: list[DeviceSection]) -> None:
    """Load every section into its device; unknown or missing devices are errors."""
    by_key = {(d.NAME, d.instance): d for d in devices}
    for s in sections:
        dev = by_key.get((s.name, s.instance))
        if dev is None:
            known = ", ".join(f"{n}/{i}" for n, i in by_key)
            raise DeviceVersionError(
                f"device section {s.name!r} instance {s.instance} has no device here (known: {known})"
            )
        dev.load(s)
