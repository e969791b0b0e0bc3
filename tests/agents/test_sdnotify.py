"""sd_notify over a real Unix datagram socket that stands in for systemd's."""

from __future__ import annotations

import itertools
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from agents.sdnotify import (
    JournalFormatter,
    Notifier,
    stderr_is_journal,
    syslog_priority,
    watchdog_task,
)


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound where systemd's would be, and its $NOTIFY_SOCKET value."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


def _env(notify: str, **extra: str) -> dict[str, str]:
    return {"NOTIFY_SOCKET": notify, **extra}


def test_every_message_is_one_exact_datagram(systemd: tuple[socket.socket, str]) -> None:
    sock, name = systemd
    n = Notifier(_env(name))
    assert n.enabled
    assert n.ready(status="2 guests, 0 migrations")
    assert sock.recv(4096) == b"READY=1\nSTATUS=2 guests, 0 migrations"
    assert n.ready()
    assert sock.recv(4096) == b"READY=1"
    assert n.status("1 migration active")
    assert sock.recv(4096) == b"STATUS=1 migration active"
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert n.stopping(status="SIGTERM: cancelling 1 migration")
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=SIGTERM: cancelling 1 migration"
    assert n.mainpid()
    assert sock.recv(4096) == f"MAINPID={os.getpid()}".encode()
    assert n.mainpid(1234)
    assert sock.recv(4096) == b"MAINPID=1234"
    assert n.extend_timeout(20)
    assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=20000000"
    n.close()


def test_a_newline_in_a_status_cannot_forge_another_assignment(
    systemd: tuple[socket.socket, str],
) -> None:
    sock, name = systemd
    Notifier(_env(name)).status("guest evil\nREADY=1")
    assert sock.recv(4096) == b"STATUS=guest evil READY=1"


def test_abstract_socket() -> None:
    abstract = f"godwit-test-{os.getpid()}-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + abstract.encode())
        sock.settimeout(5)
        n = Notifier(_env("@" + abstract))
        assert n.ready(status="up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"
        n.close()


def test_without_notify_socket_everything_is_a_quiet_no_op() -> None:
    n = Notifier({})
    assert not n.enabled
    assert not n.ready(status="x")
    assert not n.status("x")
    assert not n.stopping()
    assert not n.watchdog()
    assert not n.mainpid()
    assert n.watchdog_interval() is None


def test_unsupported_address_turns_notification_off(caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier(_env("vsock:2:1234"))
    assert not n.enabled
    assert not n.ready()
    assert "vsock:2:1234" in caplog.text


def test_a_socket_nobody_listens_on_is_reported_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier(_env(str(tmp_path / "gone")))
    assert n.enabled
    assert not n.ready()
    assert "gone" in caplog.text


def test_unset_environment_hides_the_variables_from_children(
    systemd: tuple[socket.socket, str],
) -> None:
    sock, name = systemd
    env = _env(name, WATCHDOG_USEC="30000000", WATCHDOG_PID=str(os.getpid()), PATH="/bin")
    n = Notifier(env, unset_environment=True)
    assert env == {"PATH": "/bin"}
    assert n.watchdog_interval() == 15.0
    assert n.ready()
    assert sock.recv(4096) == b"READY=1"


@pytest.mark.parametrize(
    ("extra", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<ours>"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # inherited: not ours
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_our_pid(
    extra: dict[str, str], interval: float | None
) -> None:
    extra = {k: str(os.getpid()) if v == "<ours>" else v for k, v in extra.items()}
    assert Notifier(_env("/run/systemd/notify", **extra)).watchdog_interval() == interval


async def test_watchdog_task_pings_every_half_period_until_cancelled(
    systemd: tuple[socket.socket, str], autojump_clock: trio.testing.MockClock
) -> None:
    raw, name = systemd
    raw.setblocking(False)
    listener = trio.socket.from_stdlib_socket(raw)
    n = Notifier(_env(name, WATCHDOG_USEC="200000"))
    ping_times = []
    async with trio.open_nursery() as nursery:
        interval = await nursery.start(watchdog_task, n)
        assert interval == 0.1
        for _ in range(4):
            assert await listener.recv(4096) == b"WATCHDOG=1"
            ping_times.append(trio.current_time())
        nursery.cancel_scope.cancel()
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(ping_times)]
    assert gaps == [0.1, 0.1, 0.1]
    # Cancelled: the task is gone, and no more pings arrive however long we wait.
    await trio.sleep(10)
    with pytest.raises(BlockingIOError):
        raw.recv(4096)


async def test_watchdog_task_without_watchdog_returns_at_once(
    systemd: tuple[socket.socket, str],
) -> None:
    raw, name = systemd
    async with trio.open_nursery() as nursery:
        assert await nursery.start(watchdog_task, Notifier(_env(name))) is None
        assert await nursery.start(watchdog_task, Notifier({})) is None
    raw.setblocking(False)
    with pytest.raises(BlockingIOError):
        raw.recv(4096)


def test_journal_formatter_prefixes_every_line_with_its_priority() -> None:
    fmt = JournalFormatter("%(levelname)s %(name)s: %(message)s")
    record = logging.LogRecord("godwit.agent", logging.WARNING, __file__, 1, "a\nb", None, None)
    assert fmt.format(record) == "<4>WARNING godwit.agent: a\n<4>b"
    assert [syslog_priority(x) for x in (50, 40, 30, 20, 10, 5, 25)] == [2, 3, 4, 6, 7, 7, 6]


def test_stderr_is_journal_compares_device_and_inode() -> None:
    st = os.fstat(2)
    assert stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
    assert not stderr_is_journal({})
