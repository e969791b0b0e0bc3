"""The control-socket codec: QMP's wire shape, sans-IO, for both ends.

Theory of operation
-------------------
The control socket speaks QEMU's QMP (docs/interop/qmp-spec.rst): one JSON
object per line.  The server greets, the client negotiates with
``qmp_capabilities``, then sends ``{"execute": NAME, "arguments": {...},
"id": ANY}``; the server answers ``{"return": VALUE, "id": ANY}`` or
``{"error": {"class": CLASS, "desc": TEXT}, "id": ANY}`` and, at any time,
emits events ``{"event": NAME, "data": {...}, "timestamp": {"seconds": S,
"microseconds": US}}``.  A client written for QEMU can therefore drive a
godwit agent, and godwit's client can read a QEMU monitor.

:class:`ServerConnection` and :class:`ClientConnection` follow h11's shape:
``receive_data(bytes)`` feeds input, ``next_event()`` returns what it means,
and methods that build output return the bytes to write.  The server side
enforces the protocol's own rules itself — capabilities negotiation first,
malformed input answered with an error, ids echoed — and queues those
replies in :meth:`ServerConnection.data_to_send`, so an agent only ever sees
well-formed :class:`Command` events.  Nothing the peer sends can make the
codec raise: bad input becomes an error reply and the connection goes on.
Unknown top-level keys are ignored, as the QMP spec asks of both sides.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

MAX_LINE = 1 << 20
"""Longest accepted input line.  Control input is tiny; a megabyte without a
newline is a confused peer, answered with an error rather than buffered."""

GREETING_CAPABILITIES: tuple[str, ...] = ()

GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_FOUND = "DeviceNotFound"


@dataclass(frozen=True, slots=True)
class Greeting:
    """The server's first line: versions and the QMP capabilities it offers."""

    version: dict[str, Any]
    capabilities: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Command:
    """A command the client asked for, already checked for shape."""

    name: str
    arguments: dict[str, Any]
    id: Any = None


@dataclass(frozen=True, slots=True)
class Return:
    """A successful reply, carrying the client's id back."""

    value: Any
    id: Any = None


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A failed reply: QMP's error class (``GenericError`` …) and a human text."""

    error_class: str
    desc: str
    id: Any = None


@dataclass(frozen=True, slots=True)
class Event:
    """An asynchronous event with the server's wall-clock timestamp (seconds)."""

    name: str
    data: dict[str, Any]
    timestamp: float


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """Client side: a line from the server that is not QMP.  Reported, not raised."""

    desc: str
    line: bytes


class QmpError(Exception):
    """Raised by handlers to produce an ``error`` reply with a given class."""

    def __init__(self, desc: str, error_class: str = GENERIC_ERROR) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\r\n"


def encode_timestamp(when: float) -> dict[str, int]:
    seconds = int(when)
    return {"seconds": seconds, "microseconds": round((when - seconds) * 1e6) % 1_000_000}


def decode_timestamp(stamp: Any) -> float:
    if not isinstance(stamp, dict):
        return 0.0
    seconds = stamp.get("seconds", 0)
    micros = stamp.get("microseconds", 0)
    if not isinstance(seconds, int | float) or not isinstance(micros, int | float):
        return 0.0
    return float(seconds) + float(micros) / 1e6


class _LineSplitter:
    """Cuts a byte stream into lines, refusing to buffer an endless one."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._buffer = bytearray()
        self._max_line = max_line
        self._discarding = False

    def feed(self, data: bytes) -> list[bytes | None]:
        """Return complete lines; ``None`` stands for a line that was too long."""
        self._buffer += data
        out: list[bytes | None] = []
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                if len(self._buffer) > self._max_line:
                    if not self._discarding:
                        out.append(None)
                    self._discarding = True
                    self._buffer.clear()
                return out
            line = bytes(self._buffer[:newline]).strip()
            del self._buffer[: newline + 1]
            if self._discarding:
                self._discarding = False
                continue
            if line:
                out.append(line)


class ServerConnection:
    """The agent's end of one control connection."""

    def __init__(
        self,
        version: dict[str, Any],
        capabilities: tuple[str, ...] = GREETING_CAPABILITIES,
        *,
        max_line: int = MAX_LINE,
    ) -> None:
        self._version = version
        self._capabilities = capabilities
        self._lines = _LineSplitter(max_line)
        self._events: deque[Command] = deque()
        self._outbox = bytearray()
        self.negotiated = False

    def greeting(self) -> bytes:
        return _encode(
            {"QMP": {"version": self._version, "capabilities": list(self._capabilities)}}
        )

    def receive_data(self, data: bytes) -> None:
        for line in self._lines.feed(data):
            if line is None:
                self._outbox += self.error(f"QMP input line longer than {MAX_LINE} bytes")
                continue
            self._handle_line(line)

    def next_event(self) -> Command | None:
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> bytes:
        """Replies the codec made on its own (negotiation, malformed input)."""
        out = bytes(self._outbox)
        self._outbox.clear()
        return out

    def reply(self, value: Any, id: Any = None) -> bytes:
        msg: dict[str, Any] = {"return": {} if value is None else value}
        if id is not None:
            msg["id"] = id
        return _encode(msg)

    def error(self, desc: str, error_class: str = GENERIC_ERROR, id: Any = None) -> bytes:
        msg: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
        if id is not None:
            msg["id"] = id
        return _encode(msg)

    def event(
        self, name: str, data: dict[str, Any] | None = None, when: float | None = None
    ) -> bytes:
        msg: dict[str, Any] = {
            "event": name,
            "timestamp": encode_timestamp(time.time() if when is None else when),
        }
        if data is not None:
            msg["data"] = data
        return _encode(msg)

    def _handle_line(self, line: bytes) -> None:
        try:
            obj = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            self._outbox += self.error(f"JSON parse error, {exc}")
            return
        if not isinstance(obj, dict):
            self._outbox += self.error("QMP input must be a JSON object")
            return
        ident = obj.get("id")
        name = obj.get("execute", obj.get("exec-oob"))
        if name is None:
            self._outbox += self.error("QMP input lacks member 'execute'", id=ident)
            return
        if not isinstance(name, str):
            self._outbox += self.error("QMP input member 'execute' must be a string", id=ident)
            return
        arguments = obj.get("arguments", {})
        if not isinstance(arguments, dict):
            self._outbox += self.error("QMP input member 'arguments' must be an object", id=ident)
            return
        if name == "qmp_capabilities":
            self._negotiate(arguments, ident)
            return
        if not self.negotiated:
            self._outbox += self.error(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
                COMMAND_NOT_FOUND,
                id=ident,
            )
            return
        self._events.append(Command(name, arguments, ident))

    def _negotiate(self, arguments: dict[str, Any], ident: Any) -> None:
        if self.negotiated:
            self._outbox += self.error(
                "Capabilities negotiation is already complete, command ignored",
                COMMAND_NOT_FOUND,
                id=ident,
            )
            return
        enable = arguments.get("enable", [])
        unknown = (
            [c for c in enable if c not in self._capabilities]
            if isinstance(enable, list)
            else [enable]
        )
        if unknown:
            self._outbox += self.error(f"Capability '{unknown[0]}' not available", id=ident)
            return
        self.negotiated = True
        self._outbox += self.reply({}, ident)


ClientEvent = Greeting | Return | ErrorReply | Event | ProtocolViolation


@dataclass
class ClientConnection:
    """A client's end: builds commands with fresh ids, parses replies and events."""

    _lines: _LineSplitter = field(default_factory=_LineSplitter)
    _events: deque[ClientEvent] = field(default_factory=deque)
    _next_id: int = 1

    def command(
        self, name: str, arguments: dict[str, Any] | None = None, id: Any = None
    ) -> tuple[Any, bytes]:
        """Return ``(id, bytes)`` for a command; an id is made when none is given."""
        if id is None:
            id = self._next_id
            self._next_id += 1
        msg: dict[str, Any] = {"execute": name, "id": id}
        if arguments:
            msg["arguments"] = arguments
        return id, _encode(msg)

    def receive_data(self, data: bytes) -> None:
        for line in self._lines.feed(data):
            if line is None:
                self._events.append(ProtocolViolation("line too long", b""))
            else:
                self._events.append(parse_server_line(line))

    def next_event(self) -> ClientEvent | None:
        return self._events.popleft() if self._events else None


def parse_server_line(line: bytes) -> ClientEvent:
    """Interpret one line from a QMP server; anything else is a ProtocolViolation."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        return ProtocolViolation(f"not JSON: {exc}", line)
    if not isinstance(obj, dict):
        return ProtocolViolation("not a JSON object", line)
    if "QMP" in obj:
        qmp = obj["QMP"]
        if not isinstance(qmp, dict):
            return ProtocolViolation("greeting 'QMP' is not an object", line)
        caps = qmp.get("capabilities", [])
        version = qmp.get("version", {})
        return Greeting(
            version if isinstance(version, dict) else {},
            tuple(c for c in caps if isinstance(c, str)) if isinstance(caps, list) else (),
        )
    if "return" in obj:
        return Return(obj["return"], obj.get("id"))
    if "error" in obj:
        err = obj["error"]
        if not isinstance(err, dict):
            return ProtocolViolation("'error' is not an object", line)
        return ErrorReply(
            str(err.get("class", GENERIC_ERROR)), str(err.get("desc", "")), obj.get("id")
        )
    if "event" in obj:
        data = obj.get("data", {})
        return Event(
            str(obj["event"]),
            data if isinstance(data, dict) else {"value": data},
            decode_timestamp(obj.get("timestamp")),
        )
    return ProtocolViolation("neither greeting, return, error nor event", line)
