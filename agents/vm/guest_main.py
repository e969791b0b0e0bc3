"""The guest process: maps the RAM memfds, runs vCPU threads, answers the agent.

Started by agents.vm.guest.Guest as ``python -m agents.vm.guest_main --ctl FD
--config JSON`` with the memfds and one end of a SOCK_SEQPACKET socketpair
passed by fd number — or ahead of need as ``--ctl FD --spare`` (spares.py),
which imports everything, says ``spare`` and waits for the same config and
the memfds on the socket, then carries on exactly as a cold start does
(calling setsid(2) first if it is to outlive its agent).  Threads:

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

Outliving the agent: started with an adoption socket (``config["adopt"]``,
see orphans.py), the guest does not exit when its control socket closes.
It detaches: vCPUs keep running, or stay parked if they were stopped (a
source stopped for switchover when its agent died stays stopped; the agent
that adopts it decides whether to ``cont``), an incoming guest keeps
waiting, a throttle stays as it was, a postcopy registration stays (vCPUs
blocked on missing pages stay blocked until someone places them).  Only the
dirty log ends: it belongs to a migration, and the migration died with its
agent.  The control thread then accepts one agent at a time on the socket
(SO_PEERCRED uid must be ours), hands it the memfds and the postcopy uffd
in its hello, and serves it exactly like the agent that started it.
Without an adoption socket, EOF on the control socket still ends the guest.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import queue
import select
import socket
import struct
import sys
import threading
import time
import traceback
from pathlib import Path
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
from agents.vm.orphans import proc_start_time, remove_files, write_record
from agents.vm.ramblock import HUGE_PAGE_SIZE, RamBlock
from agents.vm.workloads import Mem, Workload, gather, make_workload, parse_workload, scatter

EXIT_FATAL = 70
SCM_MAX_FD = 253  # the kernel's limit on fds in one SCM_RIGHTS message
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


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


def hung_up(s: socket.socket) -> bool:
    """Whether the peer of a connected socket is gone (queued messages may remain)."""
    p = select.poll()
    p.register(s.fileno(), select.POLLIN | select.POLLRDHUP)
    return any(ev & (select.POLLHUP | select.POLLRDHUP | select.POLLERR) for _, ev in p.poll(0))


class GuestProcess:
    def __init__(self, config: dict[str, Any], sock: socket.socket) -> None:
        self.config = config
        self.sock: socket.socket | None = sock
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
        self.gen = 0  # bumped at every attach/detach: job results go only to the agent that asked
        self.agent_pid: int | None = os.getppid()
        adopt = config.get("adopt")
        self.sock_path = Path(adopt["socket"]) if adopt else None
        self.record_path = Path(adopt["record"]) if adopt else None
        self.listener = self.listen() if adopt else None

    # -- adoption ------------------------------------------------------------

    def listen(self) -> socket.socket:
        """Bind the adoption socket 0600 (umask while binding: no moment with looser modes)."""
        assert self.sock_path is not None
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # no other thread runs yet
        try:
            s.bind(str(self.sock_path))
        except OSError as e:
            s.close()
            raise CommandError(f"adoption socket {self.sock_path}: {e.strerror}") from e
        finally:
            os.umask(old)
        os.chmod(self.sock_path, 0o600)
        s.listen(4)
        return s

    def write_record(self) -> None:
        if self.record_path is None or self.sock_path is None:
            return
        agent = self.agent_pid
        write_record(
            self.record_path,
            {
                "name": self.name,
                "pid": os.getpid(),
                "starttime": proc_start_time(os.getpid()),
                "socket": str(self.sock_path),
                "spec": self.config.get("spec", {}),
                "blocks": [
                    {"name": b.name, "size": b.size, "page_size": b.page_size} for b in self.blocks
                ],
                "attached_pid": agent,
                "attached_start": proc_start_time(agent) if agent else None,
            },
        )

    def remove_files(self) -> None:
        if self.sock_path is not None and self.record_path is not None:
            remove_files(self.sock_path, self.record_path, os.getpid())

    def hello(self, adopted: bool) -> dict[str, Any]:
        return {
            "event": "hello",
            "pid": os.getpid(),
            "adopted": adopted,
            "state": self.state,
            "spec": self.config.get("spec", {}),
            "blocks": [
                {"name": b.name, "size": b.size, "page_size": b.page_size} for b in self.blocks
            ],
            "mappings": [
                {"name": m.name, "addr": m.addr, "size": len(m.array), "page_size": m.page_size}
                for m in self.mems
            ],
            "uffd": self.postcopy_uffd is not None,
            "throttle": self.gate.throttle,
            "user_mode_only": U.user_mode_only(),
        }

    def detach(self, why: str) -> None:
        """The agent is gone: keep running (or stopped) and wait on the adoption socket."""
        with self.send_lock:
            sock, self.sock = self.sock, None
            self.gen += 1
        if sock is not None:
            sock.close()
        if self.wp_uffd is not None:
            self.dirty_log_stop()
        self.agent_pid = None
        try:
            self.write_record()
        except OSError as e:
            self.log(f"cannot rewrite guest record {self.record_path}: {e.strerror}")
        self.log(f"agent gone ({why}): {self.state}, waiting for adoption on {self.sock_path}")

    def accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except OSError as e:  # the caller gave up already: nothing to adopt us
            self.log(f"adoption socket accept: {e.strerror}")
            return
        try:
            pid, uid, _gid = _PEERCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
        except OSError as e:
            conn.close()
            self.log(f"adoption socket SO_PEERCRED: {e.strerror}")
            return
        me = os.getpid()
        if uid != os.geteuid():
            self.refuse(
                conn,
                f"guest {self.name!r} pid {me}: refusing adoption by uid {uid} (pid {pid}); "
                f"only uid {os.geteuid()} may adopt it",
            )
            return
        if self.sock is not None and not hung_up(self.sock):
            self.refuse(
                conn,
                f"guest {self.name!r} pid {me} is attached to agent pid {self.agent_pid}; "
                "one agent at a time (that agent must exit or detach first)",
            )
            return
        if self.sock is not None:
            self.detach("its socket hung up while another agent connected")
        ctl.set_buffers(conn)
        conn.setblocking(True)
        fds = [b.fd for b in self.blocks]
        if self.postcopy_uffd is not None:
            fds.append(self.postcopy_uffd)
        data = ctl.encode(self.hello(adopted=True))
        with self.send_lock:
            try:
                conn.sendmsg(
                    [data],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, np.array(fds, np.int32).tobytes())],
                )
            except OSError as e:
                conn.close()
                self.log(f"adoption by pid {pid} failed sending hello: {e.strerror}")
                return
            self.sock = conn
            self.gen += 1
        self.agent_pid = pid
        try:
            self.write_record()
        except OSError as e:
            self.log(f"cannot rewrite guest record {self.record_path}: {e.strerror}")
        self.log(f"adopted by agent pid {pid}")

    def refuse(self, conn: socket.socket, reason: str) -> None:
        try:
            conn.send(ctl.encode({"event": "refused", "reason": reason}), socket.MSG_DONTWAIT)
        except OSError:
            pass
        conn.close()
        self.log(reason)

    # -- messaging -----------------------------------------------------------

    def send(
        self, msg: dict[str, Any], *, fds: list[int] | None = None, drop_if_busy: bool = False
    ) -> None:
        data = ctl.encode(msg)
        with self.send_lock:
            sock = self.sock
            if sock is None:
                return  # detached: nobody to tell
            try:
                if fds:
                    sock.sendmsg(
                        [data],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, np.array(fds, np.int32).tobytes())],
                    )
                elif drop_if_busy:
                    sock.send(data, socket.MSG_DONTWAIT)
                else:
                    sock.send(data)
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
            self.remove_files()
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
                done = {"event": "job_done", "job": job["id"], "ok": True, "result": result}
            except Exception as e:
                done = {
                    "event": "job_done",
                    "job": job["id"],
                    "ok": False,
                    "error": f"{type(e).__name__}: {e}",
                }
            if job.get("gen") == self.gen:  # else the agent that asked is gone
                self.send(done)

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
            msg["gen"] = self.gen
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
        self.write_record()
        self.send(self.hello(adopted=False), fds=fds)
        return self.control_loop()

    def control_loop(self) -> int:
        buf = ctl.receive_buffer()
        while True:
            poll = select.poll()
            sock, listener = self.sock, self.listener
            if sock is not None:
                poll.register(sock.fileno(), select.POLLIN)
            if listener is not None:
                poll.register(listener.fileno(), select.POLLIN)
            ready = {fd for fd, _ev in poll.poll()}
            if sock is None or sock.fileno() not in ready:
                if listener is not None and listener.fileno() in ready:
                    self.accept()
                continue
            try:
                n = sock.recv_into(buf)
            except ConnectionResetError:
                n = 0
            if n == 0:
                if listener is None:
                    return 0  # the agent closed the socket: nobody can control us any more
                self.detach("control socket closed")
                continue
            msg = ctl.decode(memoryview(buf)[:n])
            mid = msg.get("id")
            if msg.get("cmd") == "quit":
                self.remove_files()
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


def receive_config(sock: socket.socket, max_fds: int) -> dict[str, Any] | None:
    """Guest side of a spare: say it is ready, then wait for ``become``.

    Returns the config with each block's ``fd`` set to the memfd received
    for it, or None if the agent hung up first (the spare then exits).
    """
    sock.send(ctl.encode({"event": "spare", "pid": os.getpid()}))
    data, ancdata, flags, _addr = sock.recvmsg(ctl.MAX_MESSAGE, socket.CMSG_SPACE(4 * max_fds))
    fds: list[int] = []
    for level, typ, payload in ancdata:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(np.frombuffer(payload[:usable], dtype=np.int32).tolist())
    if not data:
        return None
    msg = ctl.decode(data)
    if msg.get("cmd") != "become" or flags & socket.MSG_CTRUNC:
        raise ValueError(f"spare: expected 'become' with its memfds, got {msg.get('cmd')!r}")
    config: dict[str, Any] = msg["config"]
    blocks = config["blocks"]
    if len(fds) != len(blocks):
        raise ValueError(f"spare: {len(blocks)} RAM blocks but {len(fds)} memfds received")
    for b, fd in zip(blocks, fds, strict=True):
        b["fd"] = fd
    return config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="godwit-guest")
    p.add_argument("--ctl", type=int, required=True)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="the guest to be, as JSON (a cold start)")
    where.add_argument(
        "--spare", action="store_true", help="start ahead; the guest to be arrives on --ctl"
    )
    args = p.parse_args(argv)
    sys.setswitchinterval(0.0002)  # the control thread must get the GIL back quickly
    sock = socket.socket(fileno=args.ctl)
    try:
        if args.spare:
            received = receive_config(sock, SCM_MAX_FD)
            if received is None:
                os._exit(0)  # the pool's owner went away before giving us a guest
            config = received
            if config.get("adopt"):
                os.setsid()  # what a cold start's start_new_session does: no terminal signals
        else:
            config = json.loads(args.config)
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
    g.remove_files()
    # Daemon threads may be asleep on a missing page; leave without joining them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    main()
