"""Ask the kernel for fast CPU wake-ups while a migration streams pages (CPU latency QoS).

A postcopy fault's round trip wakes a thread four times: the destination's
fault thread (the uffd), the source's return-path thread (the request), the
fault thread again (the page), and the guest's vCPU (UFFDIO_COPY).  A CPU
that went idle in a deep state pays its exit latency at each of them; in a
VM whose idle state is HLT (cpuidle-haltpoll with halt polling off, as on
the machines godwit is tested on) every wake-up of an idle vCPU is a trip
through the hypervisor.  Measured there with a 1 GiB guest and a throttled
background stream: fault latency p50 316 µs without a request, 178 µs with
one; with the background stream at full speed, 344 µs and 270 µs.

Precopy wakes threads too: each side waits for the other's frames or for
room in the socket, and the destination's trio thread and page writer hand
frames over.  On the same VM a 1 GiB precopy took 1.6-2.6 s without the
request and 1.4-1.8 s with it (interleaved runs), so both agents hold it
from a migration's setup to its switchover (or the switch to postcopy), and
again for each postcopy round; not while a postcopy is paused.

Writing a latency (µs, a native int) to ``/dev/cpu_dma_latency`` and keeping
the file open is the kernel's interface for this (Documentation/power/
pm_qos_interface.rst); the request ends when the file is closed, so a
crashed agent leaves nothing behind.  The kernel keeps the strictest of all
open requests, so concurrent migrations need no counting.  The cost: idle
CPUs poll instead of sleeping while a migration streams — seconds, and
only on the hosts that take part.  ``pm-qos = false`` in the agent's
configuration turns it off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from collections.abc import Iterator

log = logging.getLogger("godwit.pmqos")

DEVICE = "/dev/cpu_dma_latency"

_refused: str | None = None


@contextlib.contextmanager
def cpu_latency(us: int = 0, *, enabled: bool = True, device: str = DEVICE) -> Iterator[bool]:
    """Hold a CPU wake-up latency request of ``us`` microseconds for the block.

    Yields whether the request is held.  Not allowed (no CAP_SYS_ADMIN-free
    access, a systemd unit without the device, no such device) is logged once
    per agent and the block runs without it: slower page faults, nothing else.
    """
    global _refused
    fd = -1
    if enabled:
        try:
            fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
            os.write(fd, struct.pack("=i", us))
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
                fd = -1
            reason = f"{device}: {exc.strerror}"
            if _refused != reason:
                _refused = reason
                log.info(
                    "no CPU latency request during migrations (%s): threads woken by "
                    "pages and requests wait for idle CPUs to wake",
                    reason,
                )
    try:
        yield fd >= 0
    finally:
        if fd >= 0:
            os.close(fd)
