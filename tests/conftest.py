"""Test-suite wiring: trio for agent and protocol tests, asyncio for the TUI.

Textual runs only on asyncio, the agents only on trio, so the async mode is
chosen per folder rather than globally: every coroutine test outside
``tests/tui`` is marked for pytest-trio here.  pytest-asyncio (strict mode)
must see its mark before this hook runs, so TUI test modules declare
``pytestmark = pytest.mark.asyncio`` themselves.
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
        if not Path(str(item.fspath)).is_relative_to(TUI_DIR):
            item.add_marker(pytest.mark.trio)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") and os.geteuid() != 0:
        pytest.skip("needs root: userfaultfd on shmem and network namespaces")
