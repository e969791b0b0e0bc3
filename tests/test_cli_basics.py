"""The ``godwit`` entry point answers --help and --version."""

import subprocess
import sys


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
