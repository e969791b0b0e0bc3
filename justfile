# godwit — the verbs a person types.  `just --list` shows them all.

set shell := ["bash", "-euo", "pipefail", "-c"]

python := env_var_or_default("PYTHON", "python3")

# Run the most complete real scenario: two agents, TLS, a guest, a migration, a verification.
demo *ARGS:
    {{python}} -m agents.cli demo {{ARGS}}

# The test suite (everything but soak tests marked slow).
test *ARGS:
    {{python}} -m pytest -m "not slow" {{ARGS}}

# Soak tests (long repeated cut/recover and similar).
test-slow *ARGS:
    {{python}} -m pytest -m slow --timeout 3600 {{ARGS}}

# ruff (style, bugs) and mypy (strict on protocol/).
lint:
    ruff check protocol agents tui tests bench
    ruff format --check protocol agents tui tests bench
    mypy protocol agents tui

# Format the tree.
fmt:
    ruff format protocol agents tui tests bench
    ruff check --fix protocol agents tui tests bench

# Every benchmark, each figure beside a baseline measured in the same run; writes bench/REPORT.md.
bench *ARGS:
    {{python}} bench/report.py {{ARGS}}

# Bring up the two-host network-namespace lab (needs root).
lab-up:
    {{python}} -m agents.cli lab up

# Tear the lab down.
lab-down:
    {{python}} -m agents.cli lab down
