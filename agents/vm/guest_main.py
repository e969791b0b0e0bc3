"""The guest process: maps the RAM memfds, runs vCPU threads, answers the agent.

Started by agents.vm.guest.Guest as ``python -m agents.vm.guest_main --ctl FD
--config JSON`` with the memfds and one end of a SOCK_SEQPACKET socketpair
passed by fd number.  Threads:

- the control thread (main) answers commands; it never touches guest RAM,
  so it keeps answering while a vCPU sleeps on a missing page in postcopy;
- vCPU threads run the workload in bounded steps and park at safe points
  between steps (``stop`` waits for every vCPU to park, then acknowledges);
- a heartbeat thread sends liveness + progress a few times a second, and
  drops a beat rather than block when the agent is not reading;
- a job thread runs one-off RAM accesses the agent asks for (touch pages,
  timed reads/writes for benchmarks) off the control thread.

Userfaultfds are created here, because the registering process must be the
one whose mapping faults: MISSING for an incoming postcopy guest (handed to
the agent with SCM_RIGHTS in the hello message), WP-async for the dirty log
(kept here; the agent scans /proc/PID/pagemap).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import queue
import socket
import sys
import threading
import time
import traceback
from typing import Any

import numpy as np

from agents.vm import ctl
from agents.vm import uffd as U
from agents.vm.devices import (
    ClockDevice,
    ConsoleDevice,
    Device,
    DeviceSection,
    VcpuDevice,
    load_sections,
)
from agents.vm.ramblock import HUGE_PAGE_SIZE, RamBlock
from agents.vm.workloads import Mem, Workload, gather, make_workload, parse_workload, scatter

EXIT_FATAL = 70


class CommandError(Exception):
    """A command the guest refuses; the text goes back to the agent."""


class Gate:
    """Where vCPUs park: ``run`` false means every vCPU stops at its next safe point."""

    def __init__(self, nvcpus: int, running: bool) -> None:
        self.cond = threading.Condition()
        self.nvcpus = nvcpus
        self.run = running
        self.quit = False
        self.parked = 0
        self.throttle = 0

    def park_if_needed(self) -> bool:
        """Called by a vCPU between steps; False means exit."""
        with self.cond:
            if self.run and not self.quit:
                return True
            self.parked += 1
            self.cond.notify_all()
            while not self.run and not self.quit:
                self.cond.wait()
            self.parked -= 1
            return not self.quit

    def sleep(self, seconds: float) -> None:
        """Sleep that a stop interrupts at once."""
        if seconds <= 0:
            return
        with self.cond:
            self.cond.wait_for(lambda: not self.run or self.quit, timeout=seconds)

    def stop(self, timeout: float) -> bool:
        with self.cond:
            self.run = False
            self.cond.notify_all()
            return self.cond.wait_for(lambda: self.parked >= self.nvcpus, timeout=timeout)

    def start(self) -> None:
        with self.cond:
            self.run = True
            self.cond.notify_all()


class GuestProcess:
    def __init__(self, config: dict[str, Any], sock: socket.socket) -> None:
        self.config = config
        self.sock = sock
        self.send_lock = threading.Lock()
        self.name = config["name"]
        self.mode = config["mode"]  # fresh | incoming | postcopy
        self.blocks = [
            RamBlock(b["name"], int(b["size"]), int(b["page_size"]), int(b["fd"]))
            for b in config["blocks"]
        ]
        self.mems = [Mem(b.name, b.array, b.page_size) for b in self.blocks]
        self.wspec = parse_workload(config["workload"])
        nvcpus = int(config.get("vcpus", 1))
        if self.wspec.kind == "counter" and nvcpus != 1:
            raise CommandError("workload counter walks pages in order: it needs vcpus=1")
        self.workloads: list[Workload] = [
            make_workload(self.wspec, self.mems, int(config.get("seed", 0)) * 1000 + i)
            for i in range(nvcpus)
        ]
        self.vcpu_dev = VcpuDevice()
        self.clock = ClockDevice()
        self.console = ConsoleDevice()
        self.devices: list[Device] = [self.vcpu_dev, self.clock, self.console]
        self.gate = Gate(nvcpus, running=False)
        self.postcopy_uffd: int | None = None
        self.wp_uffd: int | None = None
        self.heartbeat_s = float(config.get("heartbeat_ms", 250)) / 1000.0
        self.beat = 0
        self.jobs: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.vcpu_error: str | None = None
        self.started = time.monotonic()
        self._ever_ran = False

    # -- messaging -----------------------------------------------------------

    def send(
        self, msg: dict[str, Any], *, fds: list[int] | None = None, drop_if_busy: bool = False
    ) -> None:
        data = ctl.encode(msg)
        with self.send_lock:
            try:
                if fds:
                    self.sock.sendmsg(
                        [data],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, np.array(fds, np.int32).tobytes())],
                    )
                elif drop_if_busy:
                    self.sock.send(data, socket.MSG_DONTWAIT)
                else:
                    self.sock.send(data)
            except BlockingIOError:
                pass  # a heartbeat nobody is reading: drop it
            except (BrokenPipeError, ConnectionResetError):
                pass  # the agent is gone; the control loop sees EOF

    def log(self, line: str) -> None:
        self.console.log(f"[{self.clock.now_ns() / 1e9:12.6f}] {line}")

    # -- threads -------------------------------------------------------------

    def vcpu_loop(self, index: int) -> None:
        wl = self.workloads[index]
        gate = self.gate
        try:
            while gate.park_if_needed():
                t0 = time.monotonic()
                wait = wl.step()
                if gate.throttle:
                    busy = time.monotonic() - t0
                    gate.sleep(busy * gate.throttle / (100 - gate.throttle))
                if wait > 0:
                    gate.sleep(wait)
        except BaseException as e:  # a vCPU dying is fatal to the guest, as in QEMU
            self.vcpu_error = f"vCPU {index} ({wl.kind}) died: {type(e).__name__}: {e}"
            self.send(
                {"event": "fatal", "reason": self.vcpu_error, "trace": traceback.format_exc()}
            )
            os._exit(EXIT_FATAL)

    def heartbeat_loop(self) -> None:
        while True:
            time.sleep(self.heartbeat_s)
            self.beat += 1
            self.send({"event": "heartbeat", **self.summary()}, drop_if_busy=True)

    def job_loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                result = self.run_job(job)
                self.send({"event": "job_done", "job": job["id"], "ok": True, "result": result})
            except Exception as e:
                self.send(
                    {
                        "event": "job_done",
                        "job": job["id"],
                        "ok": False,
                        "error": f"{type(e).__name__}: {e}",
                    }
                )

    # -- state ---------------------------------------------------------------

    @property
    def state(self) -> str:
        if self.gate.run:
            return "running"
        return "stopped" if self._ever_ran else "incoming"

    def summary(self) -> dict[str, Any]:
        return {
            "beat": self.beat,
            "state": self.state,
            "guest_ns": self.clock.now_ns(),
            "steps": sum(w.steps for w in self.workloads),
            "throttle": self.gate.throttle,
            "mono": time.monotonic(),
        }

    def stats(self, record: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            **self.summary(),
            "workload": self.wspec.kind,
            "spec": self.config["workload"],
            "vcpus": len(self.workloads),
            "dirty_log": self.wp_uffd is not None,
            "postcopy": self.postcopy_uffd is not None,
            "console": list(self.console.ring)[-8:],
        }
        per = [w.stats() for w in self.workloads]
        if self.wspec.kind == "counter":
            out["counter"] = per[0]
        elif self.wspec.kind == "stress":
            st = dict(per[0])
            if len(per) > 1:
                for k in ("bursts", "pages", "reads", "writes", "rate_bps"):
                    st[k] = sum(p[k] for p in per)
                st["p50_us"] = max(p["p50_us"] for p in per)
                st["p99_us"] = max(p["p99_us"] for p in per)
                st["max_us"] = max(p["max_us"] for p in per)
            out["stress"] = st
        if record:
            merged: dict[str, Any] = {}
            for w in self.workloads:
                for name, rec in w.record().items():
                    if name not in merged:
                        merged[name] = {k: v.copy() for k, v in rec.items()}
                    else:
                        merged[name]["written"] |= rec["written"]
                        merged[name]["seen"] |= rec["seen"]
                        merged[name]["values"] = np.where(
                            rec["seen"], rec["values"], merged[name]["values"]
                        )
            out["record"] = merged
        return out

    # -- userfaultfd ---------------------------------------------------------

    def register_postcopy(self) -> int:
        feats = U.FEATURE_MISSING_SHMEM
        if any(b.page_size == HUGE_PAGE_SIZE for b in self.blocks):
            feats |= U.FEATURE_MISSING_HUGETLBFS
        fd = U.open_uffd(feats, "postcopy (MISSING on shmem)")
        for m in self.mems:
            try:
                U.register(fd, m.addr, len(m.array), U.REGISTER_MODE_MISSING)
            except OSError as e:
                os.close(fd)
                raise CommandError(
                    f"UFFDIO_REGISTER MISSING on block {m.name!r} at 0x{m.addr:x}: {e.strerror}"
                ) from e
        self.postcopy_uffd = fd
        self.log("postcopy: RAM registered MISSING")
        return fd

    def postcopy_end(self) -> None:
        fd, self.postcopy_uffd = self.postcopy_uffd, None
        if fd is None:
            return
        for m in self.mems:
            U.unregister(fd, m.addr, len(m.array))
        os.close(fd)
        self.log("postcopy: all RAM present, userfaultfd released")

    def dirty_log_start(self) -> None:
        if self.wp_uffd is not None:
            raise CommandError("dirty log already started")
        if self.postcopy_uffd is not None:
            raise CommandError(
                "dirty log: RAM is still registered MISSING for postcopy; end postcopy first"
            )
        fd = U.open_uffd(U.FEATURE_WP_ASYNC, "dirty tracking (write-protect async)")
        # Park the vCPUs so the workload's record starts exactly when protection does.
        was_running = self.gate.run
        if was_running and not self.gate.stop(timeout=10):
            os.close(fd)
            raise CommandError("dirty log: vCPUs did not reach a safe point within 10 s")
        try:
            for m in self.mems:
                U.register(fd, m.addr, len(m.array), U.REGISTER_MODE_WP)
                U.writeprotect(fd, m.addr, len(m.array), protect=True)
        except OSError as e:
            os.close(fd)
            if was_running:
                self.gate.start()
            raise CommandError(
                f"dirty log: UFFDIO_REGISTER/WRITEPROTECT on {m.name!r}: {e.strerror}"
            ) from e
        self.wp_uffd = fd
        for w in self.workloads:
            w.reset_record()
        if was_running:
            self.gate.start()
        self.log("dirty log started")

    def dirty_log_stop(self) -> None:
        fd, self.wp_uffd = self.wp_uffd, None
        if fd is None:
            return
        for m in self.mems:
            U.unregister(fd, m.addr, len(m.array))
        os.close(fd)
        self.log("dirty log stopped")

    # -- devices -------------------------------------------------------------

    def save_devices(self) -> list[DeviceSection]:
        if self.gate.run:
            raise CommandError("save_devices: the guest is running; stop it first")
        st = self.workloads[0].save_state()
        v = self.vcpu_dev
        v["workload"] = self.config["workload"]
        v["position"] = st.get("position", 0)
        v["passes"] = st.get("passes", 0)
        v["steps"] = sum(w.steps for w in self.workloads)
        v["bursts"] = sum(w.save_state().get("bursts", 0) for w in self.workloads)
        v["throttle"] = self.gate.throttle
        return [d.save() for d in self.devices]

    def load_devices(self, sections: list[DeviceSection]) -> None:
        if self.gate.run:
            raise CommandError("load_devices: the guest is running; devices load before cont")
        load_sections(self.devices, sections)
        v = self.vcpu_dev
        if v["workload"] and v["workload"] != self.config["workload"]:
            self.log(f"workload spec from source: {v['workload']}")
        state = {
            "position": v["position"],
            "passes": v["passes"],
            "steps": v["steps"],
            "bursts": v["bursts"],
        }
        for w in self.workloads:
            w.load_state(state)
        self.gate.throttle = int(v["throttle"])
        self.log(f"devices loaded ({len(sections)} sections)")

    # -- jobs (RAM access on behalf of the agent, off the control thread) ------

    def run_job(self, job: dict[str, Any]) -> dict[str, Any]:
        kind = job["kind"]
        b = [m.name for m in self.mems].index(job["block"])
        mem = self.mems[b]
        pages = ctl.unpack_array(job["pages"]).astype(np.intp)
        if len(pages) and (pages.min() < 0 or pages.max() >= mem.npages):
            raise CommandError(
                f"job {kind}: page index outside block {mem.name!r} (0..{mem.npages - 1})"
            )
        widx = pages * (mem.page_size // 8)
        if kind == "touch":
            t0 = time.perf_counter_ns()
            scatter(mem.words, widx, np.uint64(int(job.get("value", 1))))
            return {"n": len(pages), "ns": time.perf_counter_ns() - t0}
        if kind == "read":
            return {"values": gather(mem.words, widx)}
        if kind == "read_timed":
            # One access at a time, each timed: fault-service latency as the vCPU sees it.
            out = np.zeros(len(pages), dtype=np.uint64)
            lat = np.zeros(len(pages), dtype=np.float64)
            dst = out.ctypes.data
            base = mem.addr
            ps = mem.page_size
            perf = time.perf_counter_ns
            memmove = ctypes.memmove  # releases the GIL while it faults
            for i, p in enumerate(pages.tolist()):
                t0 = perf()
                memmove(dst + 8 * i, base + p * ps, 8)
                lat[i] = (perf() - t0) / 1000.0
            return {"values": out, "lat_us": lat}
        raise CommandError(f"unknown job kind {kind!r}")

    # -- control -------------------------------------------------------------

    def handle(self, msg: dict[str, Any]) -> Any:
        cmd = msg.get("cmd")
        if cmd == "ping":
            return {"mono": time.monotonic()}
        if cmd == "stop":
            t0 = time.perf_counter_ns()
            if not self.gate.stop(timeout=float(msg.get("timeout", 10))):
                raise CommandError(
                    f"stop: {self.gate.nvcpus - self.gate.parked} vCPU(s) did not reach a safe point "
                    f"within {msg.get('timeout', 10)} s (blocked on a missing page?)"
                )
            self.clock.pause()
            self.log("stopped")
            return {"stop_us": (time.perf_counter_ns() - t0) / 1000.0}
        if cmd == "cont":
            self.clock.resume()
            self._ever_ran = True
            self.gate.start()
            self.log("running")
            return {}
        if cmd == "throttle":
            pct = int(msg["percent"])
            if not 0 <= pct <= 99:
                raise CommandError(f"throttle {pct}%: must be 0..99")
            self.gate.throttle = pct
            self.log(f"throttle {pct}%")
            return {}
        if cmd == "stats":
            return self.stats(bool(msg.get("record", False)))
        if cmd == "save_devices":
            return [s.to_json() for s in self.save_devices()]
        if cmd == "load_devices":
            self.load_devices([DeviceSection.from_json(s) for s in msg["sections"]])
            return {}
        if cmd == "describe_devices":
            return [d.describe() for d in self.devices]
        if cmd == "dirty_log_start":
            self.dirty_log_start()
            return {}
        if cmd == "dirty_log_stop":
            self.dirty_log_stop()
            return {}
        if cmd == "postcopy_end":
            self.postcopy_end()
            return {}
        if cmd == "job":
            self.jobs.put(msg)
            return {"job": msg["id"]}
        if cmd == "log":
            self.log(str(msg["line"]))
            return {}
        raise CommandError(f"unknown command {cmd!r}")

    def run(self) -> int:
        fds: list[int] = []
        if self.mode == "postcopy":
            fds.append(self.register_postcopy())
        for i in range(len(self.workloads)):
            threading.Thread(target=self.vcpu_loop, args=(i,), name=f"vcpu{i}", daemon=True).start()
        threading.Thread(target=self.heartbeat_loop, name="heartbeat", daemon=True).start()
        threading.Thread(target=self.job_loop, name="jobs", daemon=True).start()
        if self.mode == "fresh":
            self.clock.resume()
            self._ever_ran = True
            self.gate.start()
            self.log(f"guest {self.name} started: workload {self.config['workload']}")
        else:
            self.log(f"guest {self.name} incoming ({self.mode})")
        self.send(
            {
                "event": "hello",
                "pid": os.getpid(),
                "mappings": [
                    {"name": m.name, "addr": m.addr, "size": len(m.array), "page_size": m.page_size}
                    for m in self.mems
                ],
                "uffd": bool(fds),
                "user_mode_only": U.user_mode_only(),
            },
            fds=fds,
        )
        buf = bytearray(ctl.MAX_MESSAGE)
        while True:
            try:
                n = self.sock.recv_into(buf)
            except ConnectionResetError:
                n = 0
            if n == 0:
                return 0  # the agent closed the socket: nobody can control us any more
            msg = ctl.decode(memoryview(buf)[:n])
            mid = msg.get("id")
            if msg.get("cmd") == "quit":
                self.send({"id": mid, "ok": True, "result": {}})
                return 0
            try:
                result = self.handle(msg)
                self.send({"id": mid, "ok": True, "result": result})
            except (CommandError, OSError, ValueError, KeyError) as e:
                self.send(
                    {
                        "id": mid,
                        "ok": False,
                        "error": str(e)
                        if isinstance(e, CommandError)
                        else f"{type(e).__name__}: {e}",
                    }
                )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="godwit-guest")
    p.add_argument("--ctl", type=int, required=True)
    p.add_argument("--config", required=True)
    args = p.parse_args(argv)
    sys.setswitchinterval(0.0002)  # the control thread must get the GIL back quickly
    sock = socket.socket(fileno=args.ctl)
    config = json.loads(args.config)
    try:
        g = GuestProcess(config, sock)
    except Exception as e:
        data = ctl.encode({"event": "fatal", "reason": f"guest setup failed: {e}"})
        try:
            sock.send(data)
        except OSError:
            pass
        return EXIT_FATAL
    try:
        rc = g.run()
    except Exception as e:
        g.send(
            {
                "event": "fatal",
                "reason": f"guest control thread died: {type(e).__name__}: {e}",
                "trace": traceback.format_exc(),
            }
        )
        rc = EXIT_FATAL
    # Daemon threads may be asleep on a missing page; leave without joining them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    main()
