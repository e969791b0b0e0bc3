"""Test-suite wiring: trio for agent and protocol tests, asyncio for the TUI.

Textual runs only on asyncio, the agents only on trio, so the async mode is
chosen per folder rather than globally: every coroutine test under
``tests/tui`` is marked for pytest-asyncio, every other one for pytest-trio.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest

TUI_DIR = Path(__file__).parent / "tui"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        func = getattr(item, "function", None)
        if func is None or not inspect.iscoroutinefunction(func):
            continue
        if Path(str(item.fspath)).is_relative_to(TUI_DIR):
            item.add_marker(pytest.mark.asyncio)
        else:
            item.add_marker(pytest.mark.trio)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") and os.geteuid() != 0:
        pytest.skip("needs root: userfaultfd on shmem and network namespaces")
