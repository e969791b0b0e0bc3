"""Guests that outlive their agent: where they wait for adoption, and how to list them.

A guest started with a state directory listens on
``<state_dir>/guests/<name>.sock`` (SOCK_SEQPACKET, 0600, directory 0700)
and keeps ``<name>.json`` beside it: name, pid, the pid's start time (so a
recycled pid is never mistaken for the guest), spec, block layout and the
pid of the agent attached, if any.  The guest writes the record (atomically,
by rename) when it starts, when an agent adopts it and when its agent goes;
it removes both files when it quits.  A guest killed outright leaves them
behind: ``find_orphans`` removes records whose process is gone.

Reading a record never talks to the guest, so an agent can list orphans
before deciding which to adopt (``Guest.adopt``).  This module is imported
by the guest process too, so it uses no trio.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECORD_VERSION = 1
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the NUL
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:+-]*$")


def guests_dir(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / "guests"


def guest_paths(state_dir: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """(socket path, record path) for guest ``name``; refuses names that are not plain file names."""
    if not _NAME.match(name) or len(name) > 200:
        raise ValueError(
            f"guest name {name!r} cannot name a file under {guests_dir(state_dir)}: "
            "use letters, digits and _ . : + - (not starting with . or -)"
        )
    d = guests_dir(state_dir)
    sock = d / f"{name}.sock"
    if len(os.fsencode(sock)) > SUN_PATH_MAX:
        raise ValueError(
            f"adoption socket path {sock} is {len(os.fsencode(sock))} bytes, over the "
            f"{SUN_PATH_MAX} a Unix socket address holds: use a shorter state_dir"
        )
    return sock, d / f"{name}.json"


def make_guests_dir(state_dir: str | os.PathLike[str]) -> Path:
    """Create ``<state_dir>/guests`` mode 0700 (tightening it if it exists)."""
    d = guests_dir(state_dir)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    return d


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if no such live process.

    A zombie counts as gone: it will never answer again.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def proc_exit_code(pid: int) -> tuple[str, int] | None:
    """(state, exit_code field) from /proc/PID/stat, or None if the pid is gone.

    exit_code is the wait(2) status, meaningful once the state is Z.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[-1])


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Replace the record atomically (readers see the old one or the new one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps({"version": RECORD_VERSION, **record}, indent=1).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def remove_files(sock: Path, record: Path, pid: int) -> None:
    """Remove a guest's socket and record if the record is that pid's (or unreadable)."""
    try:
        owner = int(json.loads(record.read_text())["pid"])
    except FileNotFoundError:
        owner = pid
    except (ValueError, KeyError, TypeError):
        owner = pid
    if owner != pid:
        return  # a newer guest of the same name owns them now
    for p in (sock, record):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


@dataclass(frozen=True)
class OrphanRecord:
    """A live guest found on disk; ``Guest.adopt(record.socket)`` takes it over."""

    name: str
    pid: int
    socket: Path
    record: Path
    spec: dict[str, Any]  # GuestSpec.to_json(); GuestSpec.from_json(record.spec) rebuilds it
    blocks: list[tuple[str, int, int]]  # (name, size, page size)
    attached_pid: int | None  # the agent attached when the record was written
    attached_start: int | None = None  # that agent's start time (pid reuse guard)

    def attached_alive(self) -> bool:
        """Whether the agent named in the record still runs (as far as the record knows)."""
        if self.attached_pid is None:
            return False
        start = proc_start_time(self.attached_pid)
        return start is not None and (self.attached_start is None or start == self.attached_start)

    @classmethod
    def load(cls, path: Path) -> OrphanRecord:
        obj = json.loads(path.read_text())
        if not isinstance(obj, dict) or obj.get("version") != RECORD_VERSION:
            raise ValueError(f"guest record {path}: not a version {RECORD_VERSION} record")
        attached = obj.get("attached_pid")
        attached_start = obj.get("attached_start")
        return cls(
            name=str(obj["name"]),
            pid=int(obj["pid"]),
            socket=Path(obj["socket"]),
            record=path,
            spec=dict(obj["spec"]),
            blocks=[(str(b["name"]), int(b["size"]), int(b["page_size"])) for b in obj["blocks"]],
            attached_pid=int(attached) if attached is not None else None,
            attached_start=int(attached_start) if attached_start is not None else None,
        )


def record_alive(path: Path) -> tuple[OrphanRecord | None, bool]:
    """(record, guest alive) for one record file; a record that cannot be read is (None, False)."""
    try:
        rec = OrphanRecord.load(path)
        start = int(json.loads(path.read_text())["starttime"])
    except FileNotFoundError:
        return None, False
    except (ValueError, KeyError, TypeError):
        return None, False
    return rec, proc_start_time(rec.pid) == start


def find_orphans(
    state_dir: str | os.PathLike[str], *, include_attached: bool = False
) -> list[OrphanRecord]:
    """Live guests under ``state_dir`` waiting for an agent, sorted by name.

    Records of processes that are gone (killed, crashed) are removed with
    their sockets.  A guest whose record names a live attached agent is left
    out unless ``include_attached``; ``Guest.adopt`` is the authority either
    way (it refuses while another agent is attached).
    """
    d = guests_dir(state_dir)
    if not d.is_dir():
        return []
    out: list[OrphanRecord] = []
    for path in sorted(d.glob("*.json")):
        rec, alive = record_alive(path)
        if rec is None:
            continue  # unreadable (another version?): not ours to judge or delete
        if not alive:
            remove_files(rec.socket, path, rec.pid)
            continue
        if not include_attached and rec.attached_alive():
            continue
        out.append(rec)
    return out
