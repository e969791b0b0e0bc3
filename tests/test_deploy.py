"""deploy/: the systemd units pass systemd's checks and agree with the CLI and the config."""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from agents.cli import build_parser
from agents.daemon import AgentConfig
from agents.docgen import subcommands

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "systemd" / "godwit-agent.service"
TEMPLATE = DEPLOY / "systemd" / "godwit-agent@.service"
EXAMPLE = DEPLOY / "godwit.toml"

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (apt-get install systemd)"
)


def _settings(unit: Path) -> list[tuple[str, str]]:
    """(key, value) of every setting, in order, comments and sections left out."""
    out = []
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.append((key, value))
    return out


def _setting(unit: Path, key: str) -> list[str]:
    return [v for k, v in _settings(unit) if k == key]


def _config_keys() -> set[str]:
    return {f.name.replace("_", "-") for f in dataclasses.fields(AgentConfig)}


def _installable_copy(unit: Path, directory: Path) -> Path:
    """The unit with ExecStart pointing at this machine's godwit (verify checks it exists)."""
    godwit = shutil.which("godwit")
    if godwit is None:
        pytest.skip("no godwit executable on PATH (pip install -e .)")
    copy = directory / unit.name
    copy.write_text(unit.read_text().replace("/usr/local/bin/godwit", godwit))
    return copy


def _verify(path: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(path)],
        capture_output=True,
        text=True,
        cwd=path.parent,
        timeout=60,
    )


@needs_systemd_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    # verify exits 0 on unknown keys and syscall groups and only warns, so a
    # clean unit is rc 0 *and* nothing said about our files.
    result = _verify(_installable_copy(UNIT, tmp_path))
    assert result.returncode == 0, result.stderr
    assert UNIT.name not in result.stderr, result.stderr


@needs_systemd_analyze
def test_systemd_analyze_verify_is_clean_for_a_template_instance(tmp_path: Path) -> None:
    _installable_copy(TEMPLATE, tmp_path)
    result = _verify(tmp_path / "godwit-agent@lab.service")
    assert result.returncode == 0, result.stderr
    assert TEMPLATE.name not in result.stderr, result.stderr


@needs_systemd_analyze
def test_verify_here_does_notice_a_broken_unit(tmp_path: Path) -> None:
    """The checks above would catch a mistake: a bad key and a bad group are reported."""
    copy = _installable_copy(UNIT, tmp_path)
    copy.write_text(
        copy.read_text().replace(
            "LockPersonality=yes", "LockPersonality=yes\nLockPersonalty=yes\nSystemCallFilter=@nope"
        )
    )
    result = _verify(copy)
    assert "Unknown key 'LockPersonalty'" in result.stderr
    assert "@nope" in result.stderr


@needs_systemd_analyze
def test_hardening_exposure_is_ok(tmp_path: Path) -> None:
    copy = _installable_copy(UNIT, tmp_path)
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    if match is None:
        pytest.skip(f"systemd-analyze security --offline unsupported here: {result.stderr[:200]}")
    # systemd rates < 4.0 "OK"; the unhardened default is 9.6 "UNSAFE".
    assert float(match.group(1)) < 4.0, result.stdout


def test_the_units_guarantees() -> None:
    for unit in (UNIT, TEMPLATE):
        assert _setting(unit, "Type") == ["notify"]
        assert _setting(unit, "NotifyAccess") == ["main"]
        assert _setting(unit, "WatchdogSec") == ["30"]
        # Guests are the agent's children: only the agent may be signalled.
        assert _setting(unit, "KillMode") == ["process"]
        assert _setting(unit, "Restart") == ["on-failure"]
        # Postcopy's userfaultfd needs CAP_SYS_PTRACE (vm.unprivileged_userfaultfd=0).
        assert "CAP_SYS_PTRACE" in _setting(unit, "CapabilityBoundingSet")[0].split()
        allowed = _setting(unit, "SystemCallFilter")[0].split()
        assert {"@system-service", "userfaultfd", "memfd_create"} <= set(allowed)


def test_the_template_differs_from_the_unit_only_in_its_paths() -> None:
    unit, template = dict(_settings(UNIT)), dict(_settings(TEMPLATE))
    assert unit.keys() == template.keys()
    differ = {k for k in unit if unit[k] != template[k]}
    assert differ == {"Description", "ExecStart", "RuntimeDirectory", "StateDirectory"}
    for key in differ - {"ExecStart"}:
        assert "%i" in template[key]


def _exec_argv(unit: Path) -> list[str]:
    (exec_start,) = _setting(unit, "ExecStart")
    argv = shlex.split(exec_start)
    assert argv[0] == "/usr/local/bin/godwit"
    return argv[1:]


@pytest.mark.parametrize("unit", [UNIT, TEMPLATE], ids=lambda p: p.name)
def test_exec_start_is_a_valid_godwit_agent_command_line(unit: Path) -> None:
    argv = _exec_argv(unit)
    assert argv[0] == "agent"
    args = build_parser().parse_args(argv)  # an unknown flag exits with status 2
    assert args.command == "agent"
    assert str(args.config).endswith(".toml")
    flags = {a.split("=")[0] for a in argv if a.startswith("--")}
    agent_parser = subcommands(build_parser())["agent"]
    known = {opt for action in agent_parser._actions for opt in action.option_strings}
    assert flags <= known
    # Every flag given beside --config is also a config key, so the TOML can say it too.
    assert {f[2:] for f in flags} - {"config"} <= _config_keys()


def test_example_config_parses_and_names_every_key() -> None:
    config = AgentConfig.from_toml(EXAMPLE)  # raises on an unknown key
    assert config.insecure_plaintext is False
    assert config.control == Path("/run/godwit/control.sock")
    assert config.state_dir == Path("/var/lib/godwit")
    text = EXAMPLE.read_text()
    active = set(tomllib.loads(text))
    commented = set(re.findall(r"^#\s*([a-z-]+)\s*=", text, re.M))
    assert active | commented == _config_keys(), "every key the agent takes, set or commented"


def test_example_config_is_accepted_with_commented_keys_on(tmp_path: Path) -> None:
    path = tmp_path / "godwit.toml"
    path.write_text(re.sub(r"^#\s*([a-z-]+\s*=)", r"\1", EXAMPLE.read_text(), flags=re.M))
    assert AgentConfig.from_toml(path).control_tls == "0.0.0.0:4445"


def test_example_config_paths_are_the_units_directories() -> None:
    config = AgentConfig.from_toml(EXAMPLE)
    assert _setting(UNIT, "RuntimeDirectory") == [config.control.parent.name]  # type: ignore[union-attr]
    assert str(config.control).startswith("/run/")
    assert config.state_dir == Path("/var/lib") / _setting(UNIT, "StateDirectory")[0]
    assert str(config.pki).startswith("/etc/") and _setting(UNIT, "ConfigurationDirectory") == [
        "godwit"
    ]
