"""OwnedThread: a request-path thread owned by a trio task (agents/threads.py); CPU lists
(agents/sched.py)."""

from __future__ import annotations

import os
import select
import threading

import pytest
import trio

from agents.sched import check_cpus, format_cpu_list, parse_cpu_list
from agents.threads import LATER_INTERVAL, OwnedThread, ThreadAborted


async def test_work_handed_over_with_later_runs_on_trio_and_none_is_lost() -> None:
    thread = OwnedThread("test/later")
    seen: list[tuple[int, bool]] = []
    trio_thread = threading.current_thread()
    halfway = threading.Event()
    go_on = threading.Event()

    def body() -> None:
        for i in range(100):
            thread.later(lambda i=i: seen.append((i, threading.current_thread() is trio_thread)))
        halfway.set()
        go_on.wait(10)
        for i in range(100, 200):  # handed over just before the thread ends
            thread.later(lambda i=i: seen.append((i, threading.current_thread() is trio_thread)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(thread.run, body)
        await trio.to_thread.run_sync(halfway.wait)
        with trio.fail_after(10):  # folded in by the owner's periodic drain, unasked
            while len(seen) < 100:
                await trio.sleep(LATER_INTERVAL / 2)
        go_on.set()
        await thread.done.wait()
        assert [i for i, _ in seen] == list(range(200))  # all of it, in order
        assert all(on_trio for _, on_trio in seen)


async def test_a_failing_later_callback_is_logged_not_raised(caplog) -> None:
    thread = OwnedThread("test/later-fails")

    def body() -> None:
        thread.later(lambda: 1 / 0)
        thread.later(lambda: None)

    await thread.run(body)
    assert thread.done.is_set()
    assert "work handed to the trio thread failed" in caplog.text


async def test_cancelling_the_owner_aborts_a_thread_blocked_in_poll() -> None:
    r, w = os.pipe()
    thread = OwnedThread("test/abort")
    outcome: list[str] = []

    def body() -> None:
        try:
            thread.wait(r, select.POLLIN)  # nothing will ever come
        except ThreadAborted:
            outcome.append("aborted")
            raise

    try:
        with trio.move_on_after(0.2):
            await thread.run(body)
    finally:
        os.close(r)
        os.close(w)
    assert outcome == ["aborted"] and thread.done.is_set()


def test_cpu_lists_parse_as_taskset_and_systemd_write_them() -> None:
    assert parse_cpu_list("1") == {1}
    assert parse_cpu_list("0-3,8") == {0, 1, 2, 3, 8}
    assert parse_cpu_list("2 3") == {2, 3}
    assert parse_cpu_list(5) == {5}  # TOML integer
    assert parse_cpu_list([0, 2]) == {0, 2}  # TOML array
    assert format_cpu_list(parse_cpu_list("0,1,2,5,6,9")) == "0-2,5-6,9"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "names no CPU"),
        ("a", "'a' is not a CPU number"),
        ("1-", "'1-' is not a CPU number"),
        ("-1", "'-1' is not a CPU number"),
        ("3-1", "runs backwards"),
        (True, "expected CPU numbers"),
        ([1, "2"], "expected CPU numbers"),
    ],
)
def test_a_bad_cpu_list_says_what_is_wrong(text: object, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_cpu_list(text)  # type: ignore[arg-type]


def test_cpus_outside_the_process_affinity_are_refused() -> None:
    allowed = frozenset(os.sched_getaffinity(0))
    check_cpus(allowed, "preempt-cpus")
    absent = max(allowed) + 1
    with pytest.raises(ValueError, match=f"CPU {absent} is not among the CPUs"):
        check_cpus(allowed | {absent}, "preempt-cpus")
