"""docs/: the generated references match the code, and the prose docs point at real things."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agents import docgen
from agents.cli import build_parser
from protocol import qapi
from protocol.options import CAPABILITIES, PARAMETERS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_committed_docs_match_the_code() -> None:
    """`python -m agents.docgen --check`: regenerate with `python -m agents.docgen`."""
    result = subprocess.run(
        [sys.executable, "-m", "agents.docgen", "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_check_notices_a_stale_file_and_write_fixes_it(tmp_path: Path) -> None:
    assert docgen.main(["--docs", str(tmp_path)]) == 0
    assert docgen.check(tmp_path) == []
    cli = tmp_path / "cli.md"
    cli.write_text(cli.read_text().replace("--listen", "--lisen"))
    (stale,) = docgen.check(tmp_path)
    assert "cli.md is out of date" in stale and "--lisen" in stale
    assert docgen.main(["--docs", str(tmp_path), "--check"]) == 1
    assert docgen.main(["--docs", str(tmp_path)]) == 0
    assert docgen.check(tmp_path) == []


def test_output_does_not_depend_on_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Terminal width and $GODWIT_AGENT must not leak into committed docs."""
    first = docgen.generate_cli()
    script = "import sys; from agents import docgen; sys.stdout.write(docgen.generate_cli())"
    env = {"GODWIT_AGENT": "/elsewhere.sock", "COLUMNS": "37", "PATH": "/usr/bin:/bin"}
    other = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )
    assert other.returncode == 0, other.stderr
    assert other.stdout == first


def _all_options(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    out = []
    for words, sub, _ in docgen.walk(parser):
        for action in sub._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help"):
                    out.append((" ".join(words), opt))
    return out


def test_every_verb_and_option_is_in_the_cli_reference() -> None:
    text = (DOCS / "cli.md").read_text()
    parser = build_parser()
    verbs = [" ".join(words) for words, _, _ in docgen.walk(parser)]
    assert {"agent", "pki issue", "vm start", "migrate", "tui"} <= set(verbs)
    for verb in verbs:
        assert f"### `godwit {verb}`" in text, verb
    for verb, opt in _all_options(parser):
        section = text.split(f"### `godwit {verb}`\n", 1)[1].split("\n### ", 1)[0]
        assert f"`{opt}`" in section, f"{opt} of godwit {verb}"


def test_every_command_event_capability_parameter_is_in_the_api_reference() -> None:
    text = (DOCS / "control-api.md").read_text()
    for name, spec in qapi.COMMANDS.items():
        section = text.split(f"\n### {name}\n", 1)[1].split("\n### ", 1)[0]
        for arg in spec.args:
            assert f"| `{arg.name}` | {arg.type} |" in section, f"{name}: {arg.name}"
    for name in qapi.EVENTS:
        assert f"\n### {name}\n" in text
    for name, cap in CAPABILITIES.items():
        assert f"| `{name}` | `{str(cap.default).lower()}` |" in text
    assert "| `downtime-limit` | int | `300` | 0 … 2000000 | ms |" in text
    for name in PARAMETERS:
        assert f"| `{name}` |" in text


def test_query_migrate_table_is_exactly_what_the_code_reports() -> None:
    assert docgen.query_migrate_fields() == set(docgen.QUERY_MIGRATE_FIELDS)


def test_an_undescribed_query_migrate_field_stops_generation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fields = dict(docgen.QUERY_MIGRATE_FIELDS)
    del fields["ram.duplicate"]
    monkeypatch.setattr(docgen, "QUERY_MIGRATE_FIELDS", fields)
    with pytest.raises(docgen.DocgenError, match=r"reported but not described: ram\.duplicate"):
        docgen.generate_control_api()


PROSE = ["deployment.md", "troubleshooting.md"]


@pytest.mark.parametrize("name", PROSE)
def test_prose_docs_name_only_commands_and_flags_that_exist(name: str) -> None:
    text = (DOCS / name).read_text()
    commands = set(qapi.COMMANDS)
    for cmd in re.findall(r'"execute":\s*"([a-z_-]+)"', text):
        assert cmd in commands, f"{name}: {cmd}"
    parser = build_parser()
    verbs = {" ".join(words): sub for words, sub, _ in docgen.walk(parser)}
    # `godwit VERB [ACTION] --flag`: the verb exists and takes the flag.
    for line in re.findall(r"^\s*(?:\$ |# )?(godwit [^\n`|]*)", text, re.M):
        words = line.split()[1:]
        verb = " ".join(words[:2]) if " ".join(words[:2]) in verbs else words[0]
        if verb in ("<!--",):
            continue
        assert verb in verbs, f"{name}: `{line}`: no verb {verb!r}"
        options = {o for a in verbs[verb]._actions for o in a.option_strings}
        for flag in re.findall(r"\s(--[a-z-]+)", line):
            assert flag in options, f"{name}: `{line}`: godwit {verb} has no {flag}"


@pytest.mark.parametrize("name", PROSE)
def test_prose_docs_link_to_files_that_exist(name: str) -> None:
    text = (DOCS / name).read_text()
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (DOCS / target).resolve().exists(), f"{name} links to missing {target}"
