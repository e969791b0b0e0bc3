"""Test-suite wiring: trio for agent and protocol tests, asyncio for the TUI.

Textual runs only on asyncio, the agents only on trio, so the async mode is
chosen per folder rather than globally: every coroutine test outside
``tests/tui`` is marked for pytest-trio here.  pytest-asyncio (strict mode)
must see its mark before this hook runs, so TUI test modules declare
``pytestmark = pytest.mark.asyncio`` themselves.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

TUI_DIR = Path(__file__).parent / "tui"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        func = getattr(item, "function", None)
        if func is None or not inspect.iscoroutinefunction(func):
            continue
        if not Path(str(item.fspath)).is_relative_to(TUI_DIR):
            item.add_marker(pytest.mark.trio)


NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


@contextlib.contextmanager
def _huge_pages(count: int) -> Iterator[None]:
    from agents.vm.ramblock import free_huge_pages

    try:
        before = int(NR_HUGEPAGES.read_text())
        NR_HUGEPAGES.write_text(str(before + count))
    except OSError as e:
        pytest.skip(f"cannot reserve huge pages via {NR_HUGEPAGES}: {e}")
    try:
        if free_huge_pages() < count:
            pytest.skip(
                f"kernel reserved only {free_huge_pages()} of {count} 2 MiB pages "
                "(memory fragmented?)"
            )
        yield
    finally:
        NR_HUGEPAGES.write_text(str(before))


@pytest.fixture
def reserve_huge_pages() -> Iterator[Callable[[int], None]]:
    """``reserve_huge_pages(n)``: n more 2 MiB pages for this test (skipped, with the
    reason, where the kernel cannot give them), given back after it."""
    with contextlib.ExitStack() as stack:
        yield lambda count: stack.enter_context(_huge_pages(count))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") and os.geteuid() != 0:
        pytest.skip("needs root: userfaultfd on shmem and network namespaces")
