"""The TUI's pure parts: parsing untrusted answers, figures, bar and histogram, addresses, keys."""

from __future__ import annotations

import pytest
import tui_scenarios as sc
from textual.binding import Binding

from protocol.control import Event
from tui import formatting as fmt
from tui.app import ACTION_COMMANDS, GodwitApp, agent_label, build_parser, default_agents, run
from tui.client import AgentAddress
from tui.model import AgentModel, parse_guests, parse_migration_info
from tui.widgets.postcopy import histogram
from tui.widgets.progress import fraction_done


def test_every_action_has_a_plain_letter_key() -> None:
    """Keys that survive ssh, tmux and screen: one lowercase letter, no modifiers."""
    keys = {b.action: b.key for b in GodwitApp.BINDINGS if isinstance(b, Binding)}
    for action in ACTION_COMMANDS:
        key = keys[action]
        assert len(key) == 1 and key.isalpha() and key.islower(), (action, key)
    assert keys["recover"] == keys["resume"] == "r"  # the one key that matters when paused


def test_migration_info_with_everything_absent_or_wrong_is_all_unknown() -> None:
    info = parse_migration_info(
        {
            "status": 7,
            "total-time": "soon",
            "downtime": True,
            "expected-downtime": float("nan"),
            "ram": ["not", "an", "object"],
            "channels": [{"name": 3}, "main", {"name": "main", "connected": "yes"}],
            "postcopy-latency-dist": [1, -2, "x", 3.0, None],
        }
    )
    assert info is not None
    assert info.status is None
    assert info.total_time is None and info.downtime is None and info.expected_downtime is None
    assert info.ram.total is None and info.ram.dirty_bytes_rate is None
    assert [c.name for c in info.channels] == ["main"]
    assert info.channels[0].connected is None
    assert info.postcopy_latency_dist == (1, 3)
    assert parse_migration_info("garbage") is None
    assert parse_migration_info([]) is None


def test_migration_info_reads_a_real_answer() -> None:
    info = parse_migration_info(sc.postcopy())
    assert info is not None
    assert info.status == "postcopy-active" and info.role == "source"
    assert info.ram.remaining == 96 * sc.MiB
    assert info.ram.dirty_bytes_rate == 48000 * 4096
    assert info.postcopy_latency_ns == 41_500
    assert [c.name for c in info.channels] == [
        "main",
        "return",
        "preempt",
        "multifd-0",
        "multifd-1",
    ]
    assert info.has_postcopy
    assert not parse_migration_info(sc.precopy()).has_postcopy  # type: ignore[union-attr]


def test_guest_list_keeps_good_entries_and_names_bad_ones() -> None:
    guests, problems = parse_guests(
        [sc.guest("vm1"), {"memory": 5}, "vm2", {"name": "vm3", "migration": 5, "memory": "1G"}]
    )
    assert [g.name for g in guests] == ["vm1", "vm3"]
    assert guests[1].memory is None and guests[1].role is None
    assert len(problems) == 2 and "entry 1" in problems[0]
    assert parse_guests({"guests": []}) == ([], ["query-guests answered dict, not a list"])


def test_actions_come_from_the_state_table() -> None:
    model = AgentModel()
    model.apply_guests(parse_guests([sc.guest("vm1"), sc.guest("in", status="incoming")])[0])
    idle, incoming = model.guests["vm1"], model.guests["in"]
    assert "migrate" in idle.allowed()  # a running guest that never migrated: a source
    assert "migrate" not in incoming.allowed()
    assert "migrate-incoming" in incoming.allowed()
    model.apply_event(Event("MIGRATION", {"guest": "vm1", "status": "postcopy-paused"}, 0.0))
    assert idle.allowed() >= {"migrate-resume"} and "migrate-cancel" not in idle.allowed()
    model.apply_event(Event("MIGRATION", {"guest": "vm1", "status": "exploded"}, 0.0))
    assert idle.allowed() == frozenset()  # an unknown state offers nothing


def test_events_fold_in_and_progress_feeds_the_sparklines_only() -> None:
    model = AgentModel()
    model.apply_guests(parse_guests([sc.guest("vm1")])[0])
    state = model.guests["vm1"]
    line = model.apply_event(Event("MIGRATION", {"guest": "vm1", "status": "active"}, 5.0))
    assert line is not None and line.text == "migration active" and line.phase == "active"
    assert model.apply_event(Event("MIGRATION_PROGRESS", {"guest": "vm1", "info": 5}, 6.0)) is None
    model.apply_event(Event("MIGRATION_PROGRESS", {"guest": "vm1", "info": sc.precopy()}, 6.0))
    assert list(state.throughput) == [1180.0] and state.passes == 4
    state.apply_info(parse_migration_info(sc.precopy()), sample=False)  # type: ignore[arg-type]
    assert len(state.throughput) == 1
    model.apply_event(Event("MIGRATION_PASS", {"guest": "vm1", "pass": 9}, 7.0))
    assert state.passes == 9
    assert model.apply_event(Event("MIGRATION", {"guest": "ghost", "status": 3}, 8.0)) is not None


def test_fraction_done_prefers_remaining_and_stays_in_range() -> None:
    assert fraction_done(900, 100, 1000) == pytest.approx(0.9)
    assert fraction_done(1500, None, 1000) == 1.0  # re-sent pages do not overfill
    assert fraction_done(None, None, 1000) == 0.0
    assert fraction_done(5, 5, 0) == 0.0


def test_histogram_trims_to_the_occupied_buckets() -> None:
    text = histogram([0, 0, 0, 4, 0, 8, 1]).plain
    assert text.startswith("8µs ")  # bucket 3 = [8, 16) µs
    assert "··" in text  # the empty bucket 4 inside the range
    assert " 128µs" in text  # end of bucket 6
    assert "most 32µs–64µs" in text
    assert histogram([]).plain == "no faults yet"


def test_figures() -> None:
    assert fmt.size(None) == fmt.DASH
    assert fmt.size(512) == "512 B"
    assert fmt.size(1536 * 1024 * 1024) == "1.50 GiB"
    assert fmt.mbps(940) == "940 Mbit/s" and fmt.mbps(2500) == "2.50 Gbit/s"
    assert fmt.millis(85) == "85 ms" and fmt.millis(12_400) == "12.4 s"
    assert fmt.millis(187_000) == "3m07s"
    assert fmt.micros(41.5) == "42 µs" and fmt.micros(1500) == "2 ms"
    assert [fmt.bucket_label(i) for i in (0, 10, 20)] == ["1µs", "1ms", "1s"]


def test_agent_addresses_and_names() -> None:
    assert AgentAddress.parse("/run/godwit/src.sock").path == "/run/godwit/src.sock"
    tls = AgentAddress.parse("tls:[::1]:4445")
    assert (tls.host, tls.port, tls.is_tls) == ("::1", 4445, True)
    with pytest.raises(ValueError, match="port"):
        AgentAddress.parse("tls:dst:http")
    with pytest.raises(ValueError, match="unix socket path or tls"):
        AgentAddress.parse("tcp:dst:4445")
    assert agent_label("src=/run/a.sock", 0) == ("src", "/run/a.sock")
    assert agent_label("/run/godwit/dst.sock", 1) == ("dst", "/run/godwit/dst.sock")
    assert agent_label("tls:hostb:4445", 1) == ("hostb", "tls:hostb:4445")


def test_run_refuses_tls_without_pki(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["tls:dst:4445"]) == 2
    assert "--pki" in capsys.readouterr().err
    assert run(["tcp:dst:4445"]) == 2


def test_without_agent_the_local_agents_socket_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    assert build_parser().parse_args([]).agent is None
    monkeypatch.delenv("GODWIT_AGENT", raising=False)
    assert default_agents() == ["/run/godwit/control.sock"]
    monkeypatch.setenv("GODWIT_AGENT", "/srv/godwit/ctl.sock")
    assert default_agents() == ["/srv/godwit/ctl.sock"]
    args = build_parser().parse_args(["--agent", "a.sock", "--agent", "b=tls:h:1"])
    assert args.agent == ["a.sock", "b=tls:h:1"]
