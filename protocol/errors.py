"""The exceptions of the migration protocol: bad peer input versus our own bugs.

Two families, because they call for different reactions.  A
:class:`ProtocolError` is what a *peer* sent wrong (or a stream that ended
mid-frame): the agent answers with an ERROR frame, closes that channel and,
in postcopy, pauses.  A :class:`MigrationStateError` is an agent asking for a
status move the table does not allow: that is a bug on this host and must
never be papered over.  Both name what and where, because the person reading
them is fixing a host at 3 a.m.
"""

from __future__ import annotations

__all__ = [
    "CapabilityMismatch",
    "FrameTooLarge",
    "MalformedMessage",
    "MigrationStateError",
    "ProtocolError",
    "ReservedBitsSet",
    "TruncatedStream",
    "UnknownFrameType",
    "VersionMismatch",
]


class ProtocolError(Exception):
    """The peer broke the wire protocol; ``str()`` says what, on which channel, where.

    ``offset`` is the stream byte offset of the frame header concerned (or
    of the end of the stream for :class:`TruncatedStream`).
    """

    code = "protocol-error"
    """The ERROR frame code an agent sends back for this exception."""

    def __init__(self, reason: str, *, channel: str | None = None, offset: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.channel = channel
        self.offset = offset

    def __str__(self) -> str:
        text = self.reason
        if self.channel is not None:
            text += f" on channel {self.channel}"
        if self.offset is not None:
            text += f" at byte {self.offset}"
        return text

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.reason!r}, channel={self.channel!r}, "
            f"offset={self.offset!r})"
        )


class FrameTooLarge(ProtocolError):
    """A header announced a payload above the negotiated maximum (checked before allocating)."""

    code = "frame-too-large"


class UnknownFrameType(ProtocolError):
    """A header carried a frame type this protocol version does not define."""

    code = "unknown-frame-type"


class ReservedBitsSet(ProtocolError):
    """The reserved header field or an undefined flag bit was not zero."""

    code = "reserved-bits-set"


class MalformedMessage(ProtocolError):
    """A frame's payload does not match its message layout."""

    code = "malformed-message"


class VersionMismatch(ProtocolError):
    """The peer speaks another major version of the protocol."""

    code = "version-mismatch"


class CapabilityMismatch(ProtocolError):
    """One side asked for a capability the other has off or does not know."""

    code = "capability-mismatch"


class TruncatedStream(ProtocolError):
    """The stream ended inside a frame."""

    code = "truncated-stream"


class MigrationStateError(Exception):
    """An agent tried a status move that the transition table does not allow: a bug."""

    def __init__(self, role: str, from_status: str, to_status: str):
        self.role = role
        self.from_status = from_status
        self.to_status = to_status
        super().__init__(f"illegal migration state move {from_status} -> {to_status} for {role}")
