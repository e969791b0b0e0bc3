"""TUI test wiring: a fixed time zone and a short working directory for every test."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def utc_in_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """UTC, so event-log times read the same everywhere; tmp_path as cwd, so socket
    paths are relative, short (unix sockets allow 107 bytes) and the same in snapshots."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    monkeypatch.chdir(tmp_path)
    yield
    monkeypatch.undo()
    time.tzset()
