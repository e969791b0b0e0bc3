"""The ``godwit`` entry point answers --help and --version, and refuses bad agent options."""

import subprocess
import sys

import pytest


def test_version_names_the_program():
    out = subprocess.run(
        [sys.executable, "-m", "agents.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.startswith("godwit ")


def test_help_lists_usage():
    out = subprocess.run(
        [sys.executable, "-m", "agents.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "usage: godwit" in out.stdout


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("4096", "preempt-cpus 4096: CPU 4096 is not among the CPUs this process may use"),
        ("1-0", "range '1-0' runs backwards"),
    ],
)
def test_the_agent_refuses_preempt_cpus_it_cannot_use(tmp_path, value: str, says: str) -> None:
    done = subprocess.run(
        [
            *(sys.executable, "-m", "agents.cli", "agent"),
            *("--control", tmp_path / "c.sock", "--preempt-cpus", value),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert says in done.stderr
    assert not (tmp_path / "c.sock").exists()
