"""CPU scheduling for the postcopy request path: SCHED_FIFO, and the CPUs it runs on.

Apart from agents/threads.py because the preempt workers (agents/preempt_worker.py)
use it too, and they import nothing they do not need: a worker's start-up is
time a switch to postcopy waits for.
"""

from __future__ import annotations

import logging
import os

__all__ = ["check_cpus", "format_cpu_list", "parse_cpu_list", "set_realtime"]

log = logging.getLogger("godwit.sched")

REALTIME_PRIORITY = 1
"""SCHED_FIFO priority of request-path threads: above every normal thread, below
everything the system runs at real-time priority."""

_realtime_refused = False


def set_realtime(on: bool, name: str) -> bool:
    """Put the calling thread in (or back out of) SCHED_FIFO; False if not allowed.

    On two cores saturated by the background stream, a request-path thread
    that wakes at normal priority waits for a time slice at every hop
    (measured: postcopy fault latency p99 5.5 ms at normal priority, 1.7 ms at
    SCHED_FIFO 1).  It needs CAP_SYS_NICE (root has it; the systemd unit grants
    it and allows real-time scheduling for this).  The threads block in poll
    between messages, so they cannot starve the machine, and the kernel's RT
    throttling keeps 5 % of every second for everyone else regardless.
    """
    global _realtime_refused
    try:
        if on:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))
        else:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        return True
    except OSError as exc:
        if on and not _realtime_refused:
            _realtime_refused = True
            log.info(
                "%s runs at normal priority (SCHED_FIFO refused: %s); postcopy page "
                "requests wait longer when the machine is busy",
                name,
                exc.strerror,
            )
        return False


def parse_cpu_list(text: str | int | list[int]) -> frozenset[int]:
    """CPUs as taskset and systemd's ``CPUAffinity=`` write them: ``1``, ``0-3,8``,
    ``2 3`` (or, from TOML, an integer or a list of them).  ValueError names what
    is wrong."""
    if isinstance(text, str):
        items = text.replace(",", " ").split()
    elif isinstance(text, list) and all(type(i) is int for i in text):
        items = [str(i) for i in text]
    elif type(text) is int:
        items = [str(text)]
    else:
        raise ValueError(f"CPU list {text!r}: expected CPU numbers such as 1 or 0-3,8")
    cpus: set[int] = set()
    for item in items:
        first, sep, last = item.partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise ValueError(f"CPU list {text!r}: {item!r} is not a CPU number or range A-B")
        low, high = int(first), int(last) if sep else int(first)
        if high < low:
            raise ValueError(f"CPU list {text!r}: range {item!r} runs backwards")
        cpus.update(range(low, high + 1))
    if not cpus:
        raise ValueError(f"CPU list {text!r} names no CPU")
    return frozenset(cpus)


def format_cpu_list(cpus: frozenset[int] | set[int] | list[int]) -> str:
    """The inverse of :func:`parse_cpu_list`, ranges folded: ``0-3,8``."""
    out: list[str] = []
    for cpu in sorted(cpus):
        if out and out[-1].split("-")[-1] == str(cpu - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{cpu}"
        else:
            out.append(str(cpu))
    return ",".join(out)


def check_cpus(cpus: frozenset[int], what: str) -> None:
    """Refuse CPUs this process may not run on (offline, absent, or outside the
    affinity systemd or taskset gave it) before anything is pinned to them."""
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed:
        raise ValueError(
            f"{what} {format_cpu_list(cpus)}: CPU {format_cpu_list(cpus - allowed)} is not "
            f"among the CPUs this process may use ({format_cpu_list(allowed)})"
        )
