"""The private agent↔guest control protocol: one JSON object per SOCK_SEQPACKET message.

SEQPACKET keeps message boundaries, so the guest can drop a heartbeat when
the agent is not reading (send with MSG_DONTWAIT fails whole, never half),
and a reply is never interleaved with an event.

Agent → guest: ``{"id": N, "cmd": NAME, ...args}``.
Guest → agent: ``{"id": N, "ok": true, "result": ...}`` or
``{"id": N, "ok": false, "error": "..."}``, and events ``{"event": NAME, ...}``:
``hello`` (first, with the postcopy uffd attached over SCM_RIGHTS),
``heartbeat``, ``job_done``, ``fatal``.

A spare guest (spares.py) first says ``{"event": "spare", "pid": N}`` when
its imports are done, then waits for ``{"cmd": "become", "config": ...}``
with the memfds attached in block order; from its hello on it is a guest
like any other.  It has no id and gets no reply: the hello answers it.

The same protocol runs on a guest's adoption socket (orphans.py), where the
first message is either ``refused`` (with a reason; the guest hangs up) or a
``hello`` with ``"adopted": true``, the spec, block layout and state, and
the memfds (then the postcopy uffd, if any) attached in block order.

Numpy arrays travel as ``{"dtype": ..., "b64": ...}``.
"""

from __future__ import annotations

import base64
import json
import mmap
import socket
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

MAX_MESSAGE = 16 << 20
SNDBUF = 16 << 20


def receive_buffer() -> mmap.mmap:
    """A buffer for the largest message: anonymous memory, touched only as far as messages
    reach.  (``bytearray(MAX_MESSAGE)`` zero-fills 16 MiB up front: ~10 ms of fresh pages
    on a VM, on the critical path of every guest start.)"""
    return mmap.mmap(-1, MAX_MESSAGE)


def set_buffers(s: Any) -> None:
    """16 MiB send and receive buffers (forced past the sysctl limits as root)."""
    for opt, force in ((socket.SO_SNDBUF, 32), (socket.SO_RCVBUF, 33)):  # *BUFFORCE as root
        try:
            s.setsockopt(socket.SOL_SOCKET, force, SNDBUF)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, opt, SNDBUF)


def pack_array(a: np.ndarray) -> dict[str, str]:
    import numpy as np  # here, not at the top: the preempt workers start without it

    a = np.ascontiguousarray(a)
    if a.dtype == bool:
        return {
            "dtype": "bits",
            "n": str(len(a)),
            "b64": base64.b64encode(np.packbits(a).tobytes()).decode(),
        }
    return {"dtype": a.dtype.str, "b64": base64.b64encode(a.tobytes()).decode()}


def unpack_array(obj: dict[str, str]) -> np.ndarray:
    import numpy as np

    raw = base64.b64decode(obj["b64"])
    if obj["dtype"] == "bits":
        return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=int(obj["n"])).astype(bool)
    return np.frombuffer(raw, dtype=np.dtype(obj["dtype"])).copy()


def _default(o: Any) -> Any:
    np = sys.modules.get("numpy")  # no numpy value exists unless numpy is loaded
    if np is None:
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")
    if isinstance(o, np.ndarray):
        return pack_array(o)
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def encode(msg: dict[str, Any]) -> bytes:
    data = json.dumps(msg, default=_default, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(
            f"control message {msg.get('cmd') or msg.get('event')} is {len(data)} bytes, over {MAX_MESSAGE}"
        )
    return data


def decode(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    obj = json.loads(bytes(data))
    if not isinstance(obj, dict):
        raise ValueError(f"control message is not an object: {bytes(data)[:80]!r}")
    return obj
