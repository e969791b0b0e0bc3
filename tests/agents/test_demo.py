"""`godwit demo --json`: each scenario end to end with agents as separate processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (userfaultfd, PAGEMAP_SCAN)")


def _demo(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "agents.cli", "demo", "--json", *args],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert out.stdout.strip(), out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == (0 if summary.get("verified") else 1)
    return summary


def test_precopy_demo_verifies_the_guest_on_the_destination():
    summary = _demo("--scenario", "precopy", "--memory", "64M")
    assert summary["status"] == "completed" and summary["verified"] is True
    assert summary["verify_method"] == "counter"
    assert summary["transferred_bytes"] > 0 and summary["downtime_ms"] > 0


def test_recovery_demo_pauses_recovers_and_verifies():
    summary = _demo("--scenario", "recovery", "--memory", "96M")
    assert summary["status"] == "completed" and summary["verified"] is True, summary
    assert summary["pauses"] == 1 and summary["recoveries"] == 1
    assert summary["postcopy"]["postcopy_bytes"] > 0
    assert "preempt" in summary["postcopy"]["channels"]


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["postcopy", "preempt", "mapped-ram", "full"])
def test_other_demos_verify(scenario):
    memory = "256M" if scenario == "full" else "96M"
    summary = _demo("--scenario", scenario, "--memory", memory)
    assert summary["verified"] is True, summary
