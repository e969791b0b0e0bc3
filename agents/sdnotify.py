"""systemd's notify protocol (sd_notify) from trio, with no extra dependency.

``Type=notify`` lets systemd know when the agent is really up (control socket
and migration listener bound), what it is doing (``STATUS=`` shows in
``systemctl status``), that its event loop still turns (``WATCHDOG=1`` every
half ``WatchdogSec``) and that it is stopping.  The protocol is one datagram
of ``KEY=VALUE`` lines to the ``AF_UNIX`` socket named in ``$NOTIFY_SOCKET``
(a path, or ``@name`` for the abstract namespace); see sd_notify(3).

Everything here is a no-op when ``$NOTIFY_SOCKET`` is unset, so the daemon
calls it unconditionally: under systemd it talks, in tests and by hand it
stays silent.  Sending never blocks the event loop: datagrams go out with
``MSG_DONTWAIT`` and one that does not fit (systemd far behind) is dropped
with a warning — a status line is not worth stalling a migration for.

The watchdog is pinged from a trio task, so a ping proves that the agent's
event loop runs, which is what a hung agent would stop doing.  systemd sets
``$WATCHDOG_PID`` to the main PID; a process that is not it (a guest process
that inherited the environment) must not ping, and does not.

Also here: :class:`JournalFormatter`, log lines with the ``<N>`` syslog
priority prefix that journald turns into the entry's priority when stderr
is connected to the journal (``$JOURNAL_STREAM``).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, MutableMapping

import trio

__all__ = [
    "JournalFormatter",
    "Notifier",
    "stderr_is_journal",
    "syslog_priority",
    "watchdog_task",
]

log = logging.getLogger("godwit.sdnotify")

_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _socket_address(value: str) -> str | bytes:
    """``$NOTIFY_SOCKET`` as an AF_UNIX address: ``@name`` is the abstract ``\\0name``."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    raise ValueError(
        f"NOTIFY_SOCKET={value!r}: expected an absolute path or @abstract-name "
        "(other address families, e.g. vsock:, are not supported)"
    )


class Notifier:
    """Sends sd_notify datagrams to the socket systemd gave us, if any.

    Reads ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID`` once, at
    construction.  ``unset_environment=True`` removes them from ``os.environ``
    afterwards, so child processes (guests) do not inherit them — as
    sd_notify(3)'s ``unset_environment`` does.  Every method returns whether a
    datagram went out (False when notification is off or the send failed).
    """

    def __init__(
        self,
        environ: MutableMapping[str, str] | None = None,
        *,
        unset_environment: bool = False,
    ) -> None:
        env: MutableMapping[str, str] = os.environ if environ is None else environ
        self.socket_name = env.get("NOTIFY_SOCKET") or None
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        if self.socket_name is not None:
            try:
                self._address = _socket_address(self.socket_name)
            except ValueError as exc:
                log.warning("systemd notification off: %s", exc)
        if unset_environment:
            for name in _ENV_VARS:
                env.pop(name, None)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, fields: Mapping[str, str | int]) -> bool:
        """One datagram of ``KEY=VALUE`` lines, in the order given."""
        if self._address is None:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value)
            if "\n" in text:  # a newline would start a new, forged assignment
                text = text.replace("\n", " ")
            lines.append(f"{key}={text}")
        data = "\n".join(lines).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, self._address)
        except OSError as exc:
            log.warning(
                "systemd notification %r to NOTIFY_SOCKET=%s failed: %s",
                data[:80],
                self.socket_name,
                exc,
            )
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """The agent serves: listeners bound, control socket up (``READY=1``)."""
        fields: dict[str, str | int] = {"READY": 1}
        if status is not None:
            fields["STATUS"] = status
        return self.send(fields)

    def status(self, text: str) -> bool:
        """One line for ``systemctl status`` (``STATUS=``)."""
        return self.send({"STATUS": text})

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown began (``STOPPING=1``): systemd waits for the exit, no restart."""
        fields: dict[str, str | int] = {"STOPPING": 1}
        if status is not None:
            fields["STATUS"] = status
        return self.send(fields)

    def watchdog(self) -> bool:
        """Still alive (``WATCHDOG=1``)."""
        return self.send({"WATCHDOG": 1})

    def mainpid(self, pid: int | None = None) -> bool:
        """The service's main process is ``pid`` (``MAINPID=``); default: this process."""
        return self.send({"MAINPID": os.getpid() if pid is None else pid})

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more to start or stop (``EXTEND_TIMEOUT_USEC=``)."""
        return self.send({"EXTEND_TIMEOUT_USEC": int(seconds * 1_000_000)})

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of ``$WATCHDOG_USEC``), or None: no watchdog for us.

        None when notification is off, ``WatchdogSec`` is unset, or
        ``$WATCHDOG_PID`` names another process (we inherited the variables).
        """
        if not self.enabled or not self._watchdog_usec:
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            log.warning("WATCHDOG_USEC=%r is not a number: watchdog off", self._watchdog_usec)
            return None
        if usec <= 0:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                log.warning("WATCHDOG_PID=%r is not a pid: watchdog off", self._watchdog_pid)
                return None
        return usec / 2 / 1_000_000

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def watchdog_task(
    notifier: Notifier, *, task_status: trio.TaskStatus[float | None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Ping systemd's watchdog every half ``WatchdogSec`` until cancelled.

    Started with ``await nursery.start(watchdog_task, notifier)``, which
    returns the interval in seconds, or None — then the task has already
    ended, there being no watchdog to feed.  Pings first, then sleeps, so the
    first ping goes out at once.  Cancellation ends it between pings;
    nothing is left behind.
    """
    interval = notifier.watchdog_interval()
    task_status.started(interval)
    if interval is None:
        return
    while True:
        notifier.watchdog()
        await trio.sleep(interval)


# --- logging -----------------------------------------------------------------

_SYSLOG_PRIORITY = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)


def syslog_priority(levelno: int) -> int:
    """A logging level as the syslog priority journald files it under (crit 2 … debug 7)."""
    for threshold, priority in _SYSLOG_PRIORITY:
        if levelno >= threshold:
            return priority
    return 7


def stderr_is_journal(environ: Mapping[str, str] | None = None) -> bool:
    """Whether stderr is the journal's stream (``$JOURNAL_STREAM`` = its ``dev:inode``)."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(2)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


class JournalFormatter(logging.Formatter):
    """Prefix each line with ``<N>`` (syslog priority), which journald strips and keeps.

    journald then filters by level (``journalctl -p warning``) and colours
    the lines.  Every line of a multi-line record (a traceback) gets the
    prefix, because journald reads each line as its own entry.
    """

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        level = syslog_priority(record.levelno)
        return "\n".join(f"<{level}>{line}" for line in text.split("\n"))
