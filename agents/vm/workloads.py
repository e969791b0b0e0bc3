"""Guest workloads (counter, stress, idle) and the GIL-free ways they touch RAM.

Runs inside the guest process on vCPU threads.  The hazard it is built
around: a thread that touches a missing page of a MISSING-registered
mapping sleeps in the kernel until the agent places the page, and if it
holds the GIL the whole guest (control thread included) freezes.  So every
access to guest RAM here goes through a call that releases the GIL first:
``np.take`` always does; numpy fancy assignment does only above 500
elements (NPY_BEGIN_THREADS_THRESHOLDED), so short index runs are padded by
repeating themselves (same index, same value: idempotent).  Checked by
tests/vm/test_postcopy.py::test_guest_answers_while_vcpu_blocked.

Workload state that must survive migration is either in RAM (the counter
bytes, the stress stamps) or in the ``vcpu`` device (position, passes).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

GIL_FREE_MIN = 513  # numpy releases the GIL for loops of more than 500 elements
COUNTER_CHUNK = 520  # pages per step: just over the GIL threshold; ~30 µs clean, ~0.7 ms protected
COUNTER_SLICE_S = 0.005  # a rate-limited counter walks about this long's worth of pages per step
LATENCY_WINDOW = 1 << 16

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([KMGT]?)(i?B?)?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, what: str = "size") -> int:
    """'200M' → 200 MiB; units are binary (K, M, G, T), plain numbers are bytes."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(f"{what} {text!r}: expected a number with an optional K/M/G/T suffix")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass
class WorkloadSpec:
    """A parsed workload spec string."""

    kind: str
    rate: int = 200 << 20  # bytes of pages touched per second (stress; counter: 0 = unlimited)
    wss: int = 0  # working-set bytes (stress); 0 = all RAM
    mode: str = "write"
    record: bool = False  # stress: remember which pages were written / what was read
    burst_us: int = 1000

    def __str__(self) -> str:
        if self.kind == "counter" and self.rate:
            return f"counter:rate={self.rate}"
        if self.kind != "stress":
            return self.kind
        parts = [f"rate={self.rate}", f"wss={self.wss}", f"mode={self.mode}"]
        if self.record:
            parts.append("record=1")
        if self.burst_us != 1000:
            parts.append(f"burst_us={self.burst_us}")
        return "stress:" + ",".join(parts)


def parse_workload(text: str) -> WorkloadSpec:
    """Parse "counter[:rate=64M]", "idle" or "stress:rate=200M,wss=512M,mode=write|read|rw[,record=1]".

    A counter's rate (bytes of pages walked per second) lets a slow link
    converge without throttling; without it the counter runs flat out.
    """
    kind, _, rest = text.strip().partition(":")
    if kind == "idle":
        if rest:
            raise ValueError(f"workload {text!r}: idle takes no parameters")
        return WorkloadSpec(kind)
    if kind == "counter":
        spec = WorkloadSpec("counter", rate=0)
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if key != "rate" or not eq:
                raise ValueError(f"workload {text!r}: counter takes only rate=BYTES_PER_SECOND")
            spec.rate = parse_size(value, "counter rate")
            if spec.rate <= 0:
                raise ValueError(f"workload {text!r}: rate must be positive")
        return spec
    if kind != "stress":
        raise ValueError(f"workload {text!r}: unknown kind {kind!r} (counter, stress:..., idle)")
    spec = WorkloadSpec("stress")
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"workload {text!r}: {item!r} is not key=value")
        if key == "rate":
            spec.rate = parse_size(value, "stress rate")
        elif key == "wss":
            spec.wss = parse_size(value, "stress wss")
        elif key == "mode":
            if value not in ("write", "read", "rw"):
                raise ValueError(f"workload {text!r}: mode {value!r} is not write, read or rw")
            spec.mode = value
        elif key == "record":
            spec.record = value not in ("0", "false", "no")
        elif key == "burst_us":
            spec.burst_us = int(value)
        else:
            raise ValueError(f"workload {text!r}: unknown parameter {key!r}")
    if spec.rate <= 0:
        raise ValueError(f"workload {text!r}: rate must be positive")
    return spec


def scatter(arr: np.ndarray, idx: np.ndarray, values: Any) -> None:
    """``arr[idx] = values`` with the GIL released even for short index runs."""
    n = len(idx)
    if n == 0:
        return
    if n < GIL_FREE_MIN:
        idx = np.resize(idx, GIL_FREE_MIN)
        if isinstance(values, np.ndarray):
            values = np.resize(values, GIL_FREE_MIN)
    arr[idx] = values


def gather(arr: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``arr[idx]``; np.take releases the GIL whatever the length."""
    return np.take(arr, idx)


class Mem:
    """One mapped block as the guest sees it."""

    def __init__(self, name: str, array: np.ndarray, page_size: int) -> None:
        self.name = name
        self.array = array
        self.words = array.view(np.uint64)
        self.page_size = page_size
        self.npages = len(array) // page_size
        self.addr = int(array.ctypes.data)


class Workload:
    """Base: one ``step()`` is a bounded slice of work between safe points."""

    kind = "idle"
    paced = True

    def __init__(self, spec: WorkloadSpec, mems: list[Mem], seed: int) -> None:
        self.spec = spec
        self.mems = mems
        self.steps = 0
        self.starts = np.cumsum([0] + [m.npages for m in mems])
        self.total_pages = int(self.starts[-1])

    def step(self) -> float:
        """Do one slice; return seconds until the next slice is due (0 = now)."""
        self.steps += 1
        return 0.01

    def stats(self) -> dict[str, Any]:
        return {}

    def save_state(self) -> dict[str, int]:
        return {"steps": self.steps}

    def load_state(self, state: dict[str, int]) -> None:
        self.steps = int(state.get("steps", 0))

    def reset_record(self) -> None:
        pass

    def record(self) -> dict[str, Any]:
        return {}


class Counter(Workload):
    """QEMU migration-test: walk every page in order, incrementing its first byte.

    With a rate, each step is smaller (about COUNTER_SLICE_S of pages) and
    followed by the wait that keeps the walk at that many bytes per second;
    a guest far behind its schedule (stopped, throttled) does not burst to
    catch up.
    """

    kind = "counter"
    paced = False

    def __init__(self, spec: WorkloadSpec, mems: list[Mem], seed: int) -> None:
        super().__init__(spec, mems, seed)
        self.position = 0  # next global page to increment
        self.passes = 0
        self.pages = 0
        self.chunk = COUNTER_CHUNK
        if spec.rate:
            self.paced = True
            per_slice = spec.rate * COUNTER_SLICE_S / mems[0].page_size
            self.chunk = max(1, min(COUNTER_CHUNK, round(per_slice)))
        self.next_due = time.monotonic()

    def step(self) -> float:
        b = int(np.searchsorted(self.starts, self.position, side="right")) - 1
        mem = self.mems[b]
        p = self.position - int(self.starts[b])
        n = min(self.chunk, mem.npages - p)
        idx = np.arange(p, p + n, dtype=np.intp) * mem.page_size
        scatter(mem.array, idx, gather(mem.array, idx) + np.uint8(1))
        self.position += n
        self.pages += n
        if self.position >= self.total_pages:
            self.position = 0
            self.passes += 1
        self.steps += 1
        if not self.spec.rate:
            return 0.0
        now = time.monotonic()
        self.next_due += n * mem.page_size / self.spec.rate
        if self.next_due < now - 0.1:
            self.next_due = now
        return max(0.0, self.next_due - now)

    def stats(self) -> dict[str, Any]:
        b = int(np.searchsorted(self.starts, self.position, side="right")) - 1
        return {
            "position": self.position,
            "block": self.mems[b].name,
            "block_page": self.position - int(self.starts[b]),
            "passes": self.passes,
            "pages": self.pages,
        }

    def save_state(self) -> dict[str, int]:
        return {"steps": self.steps, "position": self.position, "passes": self.passes}

    def load_state(self, state: dict[str, int]) -> None:
        super().load_state(state)
        self.position = int(state.get("position", 0)) % max(self.total_pages, 1)
        self.passes = int(state.get("passes", 0))


class Stress(Workload):
    """Random pages of a working set at a target rate; per-burst latency shows stalls."""

    kind = "stress"

    def __init__(self, spec: WorkloadSpec, mems: list[Mem], seed: int) -> None:
        super().__init__(spec, mems, seed)
        ps = mems[0].page_size
        self.wss_pages = (
            self.total_pages if spec.wss <= 0 else min(self.total_pages, max(1, spec.wss // ps))
        )
        interval = spec.burst_us / 1e6
        per_burst = spec.rate * interval / ps
        if per_burst < 1:
            interval = ps / spec.rate
            per_burst = 1
        self.interval = interval
        self.per_burst = round(per_burst)
        self.rng = np.random.default_rng(seed)
        self.bursts = 0
        self.pages = 0
        self.reads = 0
        self.writes = 0
        self.read_xor = 0
        self.lat_ns = np.zeros(LATENCY_WINDOW, dtype=np.int64)
        self.max_ns = 0
        self.next_due = time.monotonic()
        self.started = time.monotonic()
        self.written: list[np.ndarray] = []
        self.seen: list[np.ndarray] = []
        self.reset_record()

    def reset_record(self) -> None:
        if self.spec.record:
            self.written = [np.zeros(m.npages, dtype=bool) for m in self.mems]
            self.seen = [np.zeros(m.npages, dtype=bool) for m in self.mems]
            self.values = [np.zeros(m.npages, dtype=np.uint64) for m in self.mems]

    def step(self) -> float:
        now = time.monotonic()
        if now < self.next_due:
            return self.next_due - now
        g = self.rng.integers(0, self.wss_pages, self.per_burst)
        mode = self.spec.mode
        write = mode == "write" or (mode == "rw" and self.bursts % 2 == 0)
        stamp = np.uint64((self.bursts << 8) | 0x5A)
        t0 = time.perf_counter_ns()
        for b, mem in enumerate(self.mems):
            lo, hi = int(self.starts[b]), int(self.starts[b + 1])
            sel = g[(g >= lo) & (g < hi)] - lo if len(self.mems) > 1 else g
            if len(sel) == 0:
                continue
            widx = sel * (mem.page_size // 8)
            if write:
                scatter(mem.words, widx, stamp)
                if self.spec.record:
                    self.written[b][sel] = True
            else:
                vals = gather(mem.words, widx)
                self.read_xor ^= int(np.bitwise_xor.reduce(vals))
                if self.spec.record:
                    self.seen[b][sel] = True
                    self.values[b][sel] = vals
        dt = time.perf_counter_ns() - t0
        self.lat_ns[self.bursts % LATENCY_WINDOW] = dt
        self.max_ns = max(self.max_ns, dt)
        self.bursts += 1
        self.pages += len(g)
        if write:
            self.writes += len(g)
        else:
            self.reads += len(g)
        self.steps += 1
        self.next_due += self.interval
        if self.next_due < now - 0.1:  # far behind (stopped, throttled): do not burst to catch up
            self.next_due = now
        return max(0.0, self.next_due - time.monotonic())

    def stats(self) -> dict[str, Any]:
        n = min(self.bursts, LATENCY_WINDOW)
        lat = self.lat_ns[:n] / 1000.0
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return {
            "bursts": self.bursts,
            "pages": self.pages,
            "reads": self.reads,
            "writes": self.writes,
            "pages_per_burst": self.per_burst,
            "wss_pages": self.wss_pages,
            "rate_bps": self.pages * self.mems[0].page_size / elapsed,
            "p50_us": float(np.percentile(lat, 50)) if n else 0.0,
            "p99_us": float(np.percentile(lat, 99)) if n else 0.0,
            "max_us": self.max_ns / 1000.0,
            "read_xor": self.read_xor,
        }

    def save_state(self) -> dict[str, int]:
        return {"steps": self.steps, "bursts": self.bursts}

    def load_state(self, state: dict[str, int]) -> None:
        super().load_state(state)
        self.bursts = int(state.get("bursts", 0))

    def record(self) -> dict[str, Any]:
        if not self.spec.record:
            return {}
        return {
            m.name: {
                "written": self.written[b],
                "seen": self.seen[b],
                "values": self.values[b],
            }
            for b, m in enumerate(self.mems)
        }


def make_workload(spec: WorkloadSpec, mems: list[Mem], seed: int) -> Workload:
    if spec.kind == "counter":
        return Counter(spec, mems, seed)
    if spec.kind == "stress":
        return Stress(spec, mems, seed)
    return Workload(spec, mems, seed)
