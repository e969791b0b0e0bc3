"""godwit's sans-IO protocol: frames, messages, migration states, page bitmaps,
the mapped-ram file layout and the QMP-shaped control codec.

Nothing in this package does I/O: bytes go in, events come out.  Both agents
and the TUI build on it, so every rule of the wire lives here exactly once.
"""

PROTOCOL_VERSION = (1, 0)
"""(major, minor) of the migration wire protocol.  A peer with another major is refused."""
