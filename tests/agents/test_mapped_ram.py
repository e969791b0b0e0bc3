"""Mapped-ram save/restore with real guests: round trips, live saves that stay bounded, bad files.

Every round trip checks the restored RAM against the source's by digest
(both stopped) and runs the counter check on the restored guest after it
has run; every refusal checks the message names the file, the byte offset
and the expectation, and that no guest process is left behind.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import trio

from agents.events import EventBus
from agents.mapped_ram import (
    DirectIOUnsupported,
    inspect_file,
    read_saved_file,
    restore_guest,
    save_guest,
)
from agents.migration import MigrationState
from agents.vm.guest import Guest, GuestSpec
from agents.vm.ramblock import free_huge_pages
from agents.vm.spares import SparePool
from agents.vm.verify import counter_check, ram_digest
from protocol.mapped_ram import (
    HEADER_FIXED_SIZE,
    FileLayout,
    MappedRamError,
    TailSection,
    decode_header,
    encode_header,
    encode_tail,
)
from protocol.states import MigrationStatus, Role

S = MigrationStatus


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def guest_processes(name: str) -> list[int]:
    """PIDs of guest processes running a guest called ``name`` (from /proc cmdlines)."""
    found = []
    needle = f'"name": "{name}"'.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"agents.vm.guest_main" in cmd and needle in cmd:
            found.append(int(entry))
    return found


@asynccontextmanager
async def running_guest(
    name: str,
    *,
    workload: str = "counter",
    fill: str = "mixed:50%",
    ram: str = "64M",
    hugetlb: bool = False,
) -> AsyncIterator[Guest]:
    guest = await Guest.start(
        GuestSpec(name, ram_size=ram, workload=workload, fill=fill, seed=7, hugetlb=hugetlb)
    )
    try:
        yield guest
    finally:
        with trio.CancelScope(shield=True):
            await guest.quit()


def digests(guest: Guest) -> list[str]:
    return [ram_digest(b)[0] for b in guest.blocks]


def digests_without_first_bytes(guest: Guest) -> list[str]:
    """Whole-RAM digests ignoring each page's first word (where the counter writes)."""
    out = []
    for b in guest.blocks:
        rows = b.array.reshape(b.npages, b.page_size).copy()
        rows[:, :8] = 0
        out.append(hashlib.sha256(rows.tobytes()).hexdigest())
    return out


async def let_it_run(guest: Guest, seconds: float = 0.2) -> None:
    """Let the counter walk (wait for progress, not for a fixed amount)."""
    start = (await guest.stats())["counter"]["pages"]
    with trio.fail_after(30):
        while (await guest.stats())["counter"]["pages"] <= start:
            await trio.sleep(seconds / 4)
    await trio.sleep(seconds)


async def check_counter_running(guest: Guest) -> None:
    """The restored guest runs its workload on, and its RAM passes the counter check."""
    assert guest.state == "running"
    await let_it_run(guest)
    await guest.stop()
    stats = await guest.stats()
    for b in guest.blocks:
        result = counter_check(b, stats["counter"])
        assert result.ok, result.explanation


def recorder() -> tuple[MigrationState, list[str]]:
    st = MigrationState(Role.SOURCE, "g", EventBus())
    seen: list[str] = []
    st.status_changed.append(lambda s: seen.append(str(s)))
    return st, seen


# -- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("writers", [1, 2, 4])
async def test_non_live_round_trip(tmp_path: Path, writers: int) -> None:
    path = tmp_path / "vm.img"
    name = unique("nl")
    state, seen = recorder()
    async with running_guest(name) as src:
        await let_it_run(src)
        result = await save_guest(src, path, live=False, multifd_channels=writers, state=state)
        assert src.state == "stopped"  # left stopped, as QEMU leaves a saved guest
        want = digests(src)
    assert seen == ["setup", "active", "device", "completed"]
    assert result.writers == writers and result.passes == 1
    assert state.ram.transferred == result.bytes_written == 64 << 20  # counter: no zero pages
    assert file_size(path) == result.layout.file_size
    restored = await restore_guest(path, name=unique("r"), autostart=False, readers=writers)
    try:
        assert digests(restored) == want
        await restored.cont()
        await check_counter_running(restored)
    finally:
        await restored.quit()


async def test_zero_pages_are_not_written(tmp_path: Path) -> None:
    path = tmp_path / "vm.img"
    async with running_guest(unique("z"), workload="idle", fill="mixed:30%") as src:
        result = await save_guest(src, path, live=False, multifd_channels=2)
        block = src.blocks[0]
        nonzero = int(
            np.bitwise_or.reduce(block.array.view(np.uint64).reshape(block.npages, -1), axis=1)
            .astype(bool)
            .sum()
        )
        want = digests(src)
    saved = read_saved_file(path)
    bits = saved.bitmaps[0].to_bool()
    assert result.present_pages == nonzero == int(bits.sum())
    assert 0.2 < nonzero / block.npages < 0.4
    assert result.zero_pages == block.npages - nonzero
    # The zero pages' slots are holes: the file holds about as many data bytes as present pages.
    assert os.stat(path).st_blocks * 512 < (nonzero + 512) * 4096
    restored = await restore_guest(path, autostart=False, name=unique("zr"))
    try:
        assert digests(restored) == want
    finally:
        await restored.quit()


async def test_live_save_of_a_writer_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "vm.img"
    state, seen = recorder()
    async with running_guest(unique("live")) as src:
        await let_it_run(src)
        # downtime-limit 0 never converges: the save runs its max passes, every
        # pass rewriting pages the counter dirtied into their own slots.
        result = await save_guest(
            src,
            path,
            live=True,
            multifd_channels=2,
            state=state,
            parameters={"downtime-limit": 0},
            max_passes=4,
        )
        assert src.state == "stopped"
        assert src.dirty_log is None
        want = digests(src)
    assert seen == ["setup", "active", "device", "completed"]
    assert result.live and result.passes == 5  # 4 live passes + the final one while stopped
    assert state.ram.dirty_sync_count == 5
    assert result.bytes_written > 2 * (64 << 20)  # pages were written more than once …
    layout = result.layout
    assert result.max_page_end <= layout.ram_end  # … each into its own slot,
    size = os.stat(path)
    assert size.st_size == layout.file_size  # so the file is exactly its layout's size
    assert size.st_blocks * 512 <= (layout.file_size + 4095) // 4096 * 4096
    restored = await restore_guest(path, autostart=False, name=unique("lr"))
    try:
        assert digests(restored) == want
        await restored.cont()
        await check_counter_running(restored)
    finally:
        await restored.quit()


async def test_live_save_converges_without_extra_passes_when_idle(tmp_path: Path) -> None:
    async with running_guest(unique("idle"), workload="idle", fill="random") as src:
        result = await save_guest(src, tmp_path / "vm.img", live=True)
        want = digests(src)
    assert result.live and result.passes == 2  # bulk + the final (empty) one
    assert result.bytes_written == 64 << 20
    restored = await restore_guest(tmp_path / "vm.img", autostart=False, name=unique("ir"))
    try:
        assert digests(restored) == want
    finally:
        await restored.quit()


def _direct_io_supported(directory: Path) -> str | None:
    probe = directory / ".odirect-probe"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600)
    except OSError as e:
        return f"{directory} refuses O_DIRECT ({e.strerror})"
    os.close(fd)
    probe.unlink()
    return None


async def test_direct_io_round_trip(tmp_path: Path) -> None:
    reason = _direct_io_supported(tmp_path)
    if reason:
        pytest.skip(reason)
    path = tmp_path / "vm.img"
    async with running_guest(unique("dio")) as src:
        await let_it_run(src)
        result = await save_guest(src, path, live=True, multifd_channels=2, direct_io=True)
        want = digests(src)
    assert result.direct_io
    restored = await restore_guest(path, direct_io=True, autostart=False, name=unique("dr"))
    try:
        assert digests(restored) == want
        await restored.cont()
        await check_counter_running(restored)
    finally:
        await restored.quit()


@pytest.fixture
def ramfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A ramfs mount (a file system without O_DIRECT); skipped where mounting is not allowed."""
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "ramfs", "godwit-test", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a ramfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


async def test_direct_io_refused_clearly_and_guest_untouched(ramfs: Path) -> None:
    path = ramfs / "vm.img"
    state, _ = recorder()
    async with running_guest(unique("nodio")) as src:
        with pytest.raises(DirectIOUnsupported) as info:
            await save_guest(src, path, live=False, direct_io=True, state=state)
        text = str(info.value)
        assert str(path) in text and "(ramfs) refuses O_DIRECT" in text
        assert src.state == "running"
        await let_it_run(src)
    assert state.status == S.FAILED and "refuses O_DIRECT" in (state.error_desc or "")


async def test_lazy_restore_serves_faults_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "vm.img"
    async with running_guest(unique("lz")) as src:
        await let_it_run(src)
        await save_guest(src, path, live=True, multifd_channels=2)
        want = digests_without_first_bytes(src)
    state = MigrationState(Role.DESTINATION, "?", EventBus())
    seen: list[str] = []
    state.status_changed.append(lambda s: seen.append(str(s)))
    timings: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        restored = await nursery.start(
            lambda task_status: restore_guest(
                path,
                lazy=True,
                name=unique("lzr"),
                state=state,
                timings=timings,
                task_status=task_status,
            )
        )
        # Running before its memory is: the counter's first page faults come to the file.
        assert restored.state == "running"
        assert "complete" not in timings
    try:
        assert seen == ["setup", "active", "postcopy-device", "postcopy-active", "completed"]
        assert timings["running"] <= timings["complete"]
        assert state.ram.postcopy_requests > 0
        assert restored.uffd is None  # postcopy ended: MISSING unregistered
        await check_counter_running(restored)
        assert digests_without_first_bytes(restored) == want
    finally:
        await restored.quit()


@pytest.mark.parametrize("lazy", [True, False])
async def test_restore_into_a_spare_guest_process(tmp_path: Path, lazy: bool) -> None:
    """A spare started ahead becomes the restored guest (no interpreter start on the way)."""
    path = tmp_path / "vm.img"
    async with running_guest(unique("sp")) as src:
        await let_it_run(src)
        await save_guest(src, path, live=False, multifd_channels=2)
        want = digests_without_first_bytes(src)
    state_dir = tmp_path / "state"
    async with trio.open_nursery() as nursery:
        pool = SparePool(1, refill_delay=3600)
        await nursery.start(pool.run)
        await pool.ready()
        spare_pid = pool._spares[0].pid
        name = unique("spr")
        restored = await restore_guest(path, lazy=lazy, name=name, spares=pool, state_dir=state_dir)
        nursery.cancel_scope.cancel()
    try:
        assert restored.pid == spare_pid
        assert restored.socket_path == state_dir / "guests" / f"{name}.sock"
        assert restored.socket_path.exists()  # it would outlive this agent
        assert digests_without_first_bytes(restored) == want
        await restored.cont()
        await check_counter_running(restored)
    finally:
        await restored.quit()


async def test_lazy_restore_without_running_fills_everything(tmp_path: Path) -> None:
    path = tmp_path / "vm.img"
    async with running_guest(unique("lf"), workload="idle", fill="mixed:50%") as src:
        await save_guest(src, path, live=False, multifd_channels=4)
        want = digests(src)
    restored = await restore_guest(path, lazy=True, autostart=False, readers=3, name=unique("lfr"))
    try:
        assert digests(restored) == want
    finally:
        await restored.quit()


async def test_cancelled_live_save_leaves_guest_running_and_file_unusable(tmp_path: Path) -> None:
    path = tmp_path / "vm.img"
    state, seen = recorder()
    async with running_guest(unique("cx")) as src:
        with trio.CancelScope() as scope:
            state.status_changed.append(lambda s: scope.cancel() if s == S.ACTIVE else None)
            await save_guest(src, path, live=True, state=state, parameters={"downtime-limit": 0})
        assert scope.cancelled_caught
        assert src.state == "running" and src.dirty_log is None
        await let_it_run(src)
    with pytest.raises(MappedRamError, match=r"at byte 12: COMPLETE flag is clear"):
        read_saved_file(path)
    assert "completed" not in seen


async def test_cancel_reaches_the_writer_threads_mid_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while its writer threads are busy: the save returns only once they have
    stopped (the file no longer changes), the guest it stopped runs again, the file is refused."""
    import agents.mapped_ram

    monkeypatch.setattr(agents.mapped_ram, "DELIVER_INTERVAL", 0.0)  # progress after every job
    path = tmp_path / "vm.img"
    state, _seen = recorder()
    async with running_guest(unique("cw"), workload="idle", fill="random", ram="256M") as src:
        with trio.CancelScope() as scope:

            async def cancel_once_pages_move() -> None:
                while state.ram.transferred == 0:
                    await trio.sleep(0.001)
                scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_once_pages_move)
                await save_guest(src, path, live=False, multifd_channels=1, state=state)
        assert scope.cancelled_caught
        assert 0 < state.ram.transferred < 256 << 20  # stopped part-way through the pass
        written = os.stat(path).st_blocks
        await trio.sleep(0.2)
        assert os.stat(path).st_blocks == written  # no writer thread outlived the save
        assert src.state == "running"
    with pytest.raises(MappedRamError, match=r"at byte 12: COMPLETE flag is clear"):
        read_saved_file(path)


@pytest.mark.skipif(free_huge_pages() < 64, reason="needs 64 free 2 MiB huge pages reserved")
async def test_hugetlb_round_trip_eager_and_lazy(tmp_path: Path) -> None:
    path = tmp_path / "vm.img"
    async with running_guest(unique("huge"), hugetlb=True) as src:
        await let_it_run(src)
        await save_guest(src, path, live=True, multifd_channels=2)
        want = digests(src)
        await src.quit()  # give its huge pages back for the restores
    assert read_saved_file(path).layout.blocks[0].page_size == 2 << 20
    for lazy in (False, True):
        restored = await restore_guest(path, lazy=lazy, autostart=False, name=unique("hr"))
        try:
            assert digests(restored) == want
            await restored.cont()
            await check_counter_running(restored)
        finally:
            await restored.quit()


# -- bad files ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One good file (idle guest, mixed fill) that each corruption test copies and damages."""
    path = tmp_path_factory.mktemp("mr") / "good.img"

    async def make() -> None:
        async with running_guest(unique("good"), workload="idle", fill="mixed:50%") as src:
            await save_guest(src, path, live=False)

    trio.run(make)
    return path


def _damaged(saved_file: Path, tmp_path: Path) -> Path:
    path = tmp_path / "bad.img"
    path.write_bytes(saved_file.read_bytes())
    return path


def _rewrite_header(path: Path, **changes: object) -> None:
    with open(path, "r+b") as f:
        layout = decode_header(f.read(1 << 16))
        f.seek(0)
        f.write(encode_header(replace(layout, **changes)))  # type: ignore[arg-type]


def file_size(path: Path) -> int:
    return os.stat(path).st_size


def _write_tail_and_header(path: Path, tail: bytes, final: FileLayout) -> None:
    with open(path, "r+b") as f:
        f.seek(final.tail_offset)
        f.write(tail)
        f.truncate(final.file_size)
        f.seek(0)
        f.write(encode_header(final))


def _truncate(path: Path) -> None:
    os.truncate(path, os.path.getsize(path) - 100)


def _bad_magic(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(b"NOTGODWT")


def _bad_version(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(struct.pack(">I", 7))


def _bitmap_flip(path: Path) -> None:
    layout = decode_header(path.read_bytes()[:65536])
    with open(path, "r+b") as f:
        f.seek(layout.blocks[0].bitmap_offset + 3)
        byte = f.read(1)[0]
        f.seek(layout.blocks[0].bitmap_offset + 3)
        f.write(bytes([byte ^ 0x01]))


def _pages_out_of_range(path: Path) -> None:
    layout = decode_header(path.read_bytes()[:65536])
    b = layout.blocks[0]
    _rewrite_header(path, blocks=(replace(b, pages_offset=layout.tail_offset),))


def _device_byte_flip(path: Path) -> None:
    layout = decode_header(path.read_bytes()[:65536])
    with open(path, "r+b") as f:
        f.seek(layout.tail_offset + 20)
        byte = f.read(1)[0]
        f.seek(layout.tail_offset + 20)
        f.write(bytes([byte ^ 0x40]))


def _incomplete(path: Path) -> None:
    _rewrite_header(path, flags=0)


CORRUPTIONS = {
    "truncated": (_truncate, r"at byte \d+: file is \d+ bytes, header says \d+: truncated"),
    "bad-magic": (_bad_magic, r"at byte 0: magic b'NOTGODWT' is not b'GODWITMR'"),
    "bad-version": (_bad_version, r"at byte 8: format version 7; this godwit reads version 1"),
    "bitmap": (
        _bitmap_flip,
        r"at byte 4096: block 'ram' bitmap: \d+ pages set, the block table says \d+",
    ),
    "offset": (
        _pages_out_of_range,
        rf"at byte {HEADER_FIXED_SIZE + 288}: block 'ram': pages_offset \d+: .*run past the device tail",
    ),
    "device-byte": (_device_byte_flip, r"at byte \d+: device tail SHA-256 .*device state damaged"),
    "incomplete": (_incomplete, r"at byte 12: COMPLETE flag is clear: the save did not finish"),
}


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
async def test_corrupted_file_is_refused(
    saved_file: Path, tmp_path: Path, kind: str, lazy: bool
) -> None:
    damage, message = CORRUPTIONS[kind]
    path = _damaged(saved_file, tmp_path)
    damage(path)
    name = unique(f"bad-{kind}")
    state = MigrationState(Role.DESTINATION, name, EventBus())
    with pytest.raises(MappedRamError, match=message) as info:
        await restore_guest(path, name=name, lazy=lazy, state=state)
    assert str(info.value).startswith(str(path))
    assert state.status == S.FAILED
    assert guest_processes(name) == []
    report = inspect_file(path)
    assert report["valid"] is False and str(info.value) in report["error"]


async def test_wrong_ram_layout_is_refused(saved_file: Path) -> None:
    name = unique("layout")
    with pytest.raises(
        MappedRamError,
        match=rf"{saved_file} at byte {HEADER_FIXED_SIZE}: RAM block 0 is 'ram' of 67108864 bytes .*expected 'ram' of 134217728",
    ):
        await restore_guest(saved_file, name=name, expect_layout=[("ram", 128 << 20)])
    assert guest_processes(name) == []


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
async def test_device_state_refused_by_the_guest_leaves_nothing_running(
    saved_file: Path, tmp_path: Path, lazy: bool
) -> None:
    """A consistent file whose device section is newer than this runtime: the guest exists by then."""
    from agents.savevm import describe
    from agents.vm.devices import DeviceSection

    path = _damaged(saved_file, tmp_path)
    saved = read_saved_file(path)
    sections = [
        DeviceSection(s.name, s.instance, 99 if s.name == "vcpu" else s.version, s.data)
        for s in saved.sections
    ]
    tail = encode_tail(
        [TailSection(s.name, s.instance, s.version, s.data) for s in sections],
        describe(saved.layout.blocks, sections),
    )
    final = replace(saved.layout, tail_size=0).finished(
        tail, [b.present_pages for b in saved.layout.blocks]
    )
    _write_tail_and_header(path, tail, final)
    name = unique("newer")
    with pytest.raises(Exception, match="vcpu") as info:
        await restore_guest(path, name=name, lazy=lazy)
    assert "99" in str(info.value)
    assert guest_processes(name) == []


async def test_inspect_reports_layout_and_sections(saved_file: Path) -> None:
    report = inspect_file(saved_file)
    assert report["valid"] is True
    block = report["layout"]["blocks"][0]
    assert block["pages"] == 16384
    assert 40 < block["present-percent"] < 60
    assert {s["name"] for s in report["sections"]} == {"vcpu", "clock", "console"}
    assert report["layout"]["config"]["guest"]["workload"] == "idle"


def test_cli_inspect(saved_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from agents.cli import main

    assert main(["inspect", str(saved_file)]) == 0
    out = capsys.readouterr().out
    assert "pages ram" in out and "valid: yes" in out
    bad = _damaged(saved_file, tmp_path)
    _bad_magic(bad)
    assert main(["inspect", str(bad), "--json"]) == 1
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["valid"] is False and "magic" in report["error"]


# -- the daemon handlers (called directly until the daemon dispatches file: URIs to them) --


async def _wait_status(client: object, guest: str, want: set[str]) -> dict[str, object]:
    with trio.fail_after(60):
        while True:
            info: dict[str, object] = await client.execute("query-migrate", {"guest": guest})  # type: ignore[attr-defined]
            if info.get("status") in want:
                return info
            await trio.sleep(0.05)


async def test_daemon_handlers_save_and_lazy_restore(
    short_tmp: Path, pki_dir: Path, tmp_path: Path
) -> None:
    from agents.mapped_ram import qmp_file_migrate, qmp_file_restore
    from protocol.control import QmpError
    from tests.agents.conftest import running_agent

    path = tmp_path / "vm.img"
    async with running_agent(short_tmp, pki_dir, "source", listen=False) as ra:
        c = ra.client
        await c.execute("guest-start", {"name": "vm", "memory": "64M", "workload": "counter"})
        with pytest.raises(QmpError, match="needs capability 'mapped-ram'"):
            await qmp_file_migrate(ra.agent, ra.agent.entry({"guest": "vm"}), str(path))
        caps = [{"capability": n, "state": True} for n in ("mapped-ram", "multifd")]
        await c.execute("migrate-set-capabilities", {"guest": "vm", "capabilities": caps})
        await c.execute("migrate-set-parameters", {"guest": "vm", "multifd-channels": 3})
        await qmp_file_migrate(ra.agent, ra.agent.entry({"guest": "vm"}), str(path))
        info = await _wait_status(c, "vm", {"completed", "failed"})
        assert info["status"] == "completed", info
        assert info["role"] == "source" and info["uri"] == f"file:{path}"
        assert info["ram"]["dirty-sync-count"] >= 1  # type: ignore[index]
        status = await c.execute("query-status", {"guest": "vm"})
        assert status["running"] is False  # a saved guest is left stopped
        reply = await qmp_file_restore(
            ra.agent, {"uri": f"file:{path}", "guest": "copy", "lazy": True}
        )
        assert reply == {"guest": "copy", "lazy": True}
        info = await _wait_status(c, "copy", {"completed", "failed"})
        assert info["status"] == "completed", info
        assert info["role"] == "destination"
        verdict = await c.execute("guest-verify", {"guest": "copy", "method": "counter"})
        assert verdict["verified"] is True, verdict
        with pytest.raises(QmpError, match="already exists"):
            await qmp_file_restore(ra.agent, {"uri": f"file:{path}", "guest": "copy"})
        bad = tmp_path / "bad.img"
        await trio.to_thread.run_sync(_copy_and_break, path, bad)
        with pytest.raises(QmpError, match=rf"{bad} at byte 0: magic"):
            await qmp_file_restore(ra.agent, {"uri": f"file:{bad}", "guest": "nope"})
        assert "nope" not in ra.agent.guests


def _copy_and_break(src: Path, dst: Path) -> None:
    dst.write_bytes(src.read_bytes())
    _bad_magic(dst)
