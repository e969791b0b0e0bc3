"""The QMP control codec: greeting, negotiation, commands, replies, events, bad input."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import control, qapi
from protocol.control import (
    ClientConnection,
    Command,
    ErrorReply,
    Event,
    Greeting,
    Return,
    ServerConnection,
)


def _server(negotiated: bool = True) -> ServerConnection:
    server = ServerConnection({"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "godwit"})
    if negotiated:
        server.receive_data(b'{"execute": "qmp_capabilities"}\n')
        assert json.loads(server.data_to_send()) == {"return": {}}
    return server


def _replies(server: ServerConnection) -> list[dict]:
    return [json.loads(line) for line in server.data_to_send().splitlines() if line]


def test_greeting_is_qmp_shaped_and_the_client_reads_it():
    server = _server(negotiated=False)
    client = ClientConnection()
    client.receive_data(server.greeting())
    event = client.next_event()
    assert isinstance(event, Greeting)
    assert event.version["package"] == "godwit"
    assert event.capabilities == ()


def test_commands_before_negotiation_are_refused_with_qemus_text():
    server = _server(negotiated=False)
    server.receive_data(b'{"execute": "query-migrate", "id": 7}\n')
    assert server.next_event() is None
    [reply] = _replies(server)
    assert reply["id"] == 7
    assert reply["error"]["class"] == "CommandNotFound"
    assert "qmp_capabilities" in reply["error"]["desc"]


def test_negotiating_twice_is_an_error_but_not_fatal():
    server = _server()
    server.receive_data(b'{"execute": "qmp_capabilities", "id": "x"}\n')
    [reply] = _replies(server)
    assert reply["id"] == "x" and "already complete" in reply["error"]["desc"]
    server.receive_data(b'{"execute": "query-guests"}\n')
    assert server.next_event() == Command("query-guests", {}, None)


def test_command_with_arguments_and_id_is_delivered_and_id_echoed():
    server = _server()
    server.receive_data(
        b'{"execute": "migrate", "arguments": {"uri": "tls:h:1"}, "id": {"n": 1}, "x-extra": 5}\n'
    )
    cmd = server.next_event()
    assert cmd == Command("migrate", {"uri": "tls:h:1"}, {"n": 1})
    assert json.loads(server.reply({"ok": 1}, cmd.id)) == {"return": {"ok": 1}, "id": {"n": 1}}
    assert json.loads(server.error("nope", id=cmd.id)) == {
        "error": {"class": "GenericError", "desc": "nope"},
        "id": {"n": 1},
    }


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        (b"{not json", "JSON parse error"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"id": 3}', "lacks member 'execute'"),
        (b'{"execute": 5}', "'execute' must be a string"),
        (b'{"execute": "stop", "arguments": []}', "'arguments' must be an object"),
        (b"\xff\xfe", "JSON parse error"),
    ],
)
def test_bad_lines_get_an_error_reply_and_the_connection_goes_on(line, needle):
    server = _server()
    server.receive_data(line + b"\n")
    [reply] = _replies(server)
    assert needle in reply["error"]["desc"]
    server.receive_data(b'{"execute": "query-guests", "id": 1}\n')
    assert server.next_event() == Command("query-guests", {}, 1)


def test_an_endless_line_is_answered_once_and_then_discarded():
    server = ServerConnection({}, max_line=64)
    server.receive_data(b'{"execute": "qmp_capabilities"}\n')
    server.data_to_send()
    server.receive_data(b"x" * 100)
    server.receive_data(b"y" * 100)
    assert len(_replies(server)) == 1
    server.receive_data(b'tail"}\n{"execute": "stop"}\n')
    assert server.next_event() == Command("stop", {}, None)
    assert _replies(server) == []


def test_input_split_at_every_byte_gives_the_same_commands():
    wire = b'{"execute": "qmp_capabilities"}\r\n{"execute": "cont", "id": 2}\n{"execute": "stop"}\n'
    server = ServerConnection({})
    for i in range(len(wire)):
        server.receive_data(wire[i : i + 1])
    assert [server.next_event(), server.next_event(), server.next_event()] == [
        Command("cont", {}, 2),
        Command("stop", {}, None),
        None,
    ]


def test_events_carry_timestamps_the_client_decodes():
    server = _server()
    client = ClientConnection()
    client.receive_data(server.event("MIGRATION", {"status": "active"}, when=1700000000.25))
    event = client.next_event()
    assert isinstance(event, Event)
    assert event.name == "MIGRATION" and event.data == {"status": "active"}
    assert event.timestamp == pytest.approx(1700000000.25)


def test_client_makes_unique_ids_and_matches_replies():
    client = ClientConnection()
    id1, wire1 = client.command("query-migrate", {"guest": "vm1"})
    id2, _ = client.command("query-guests")
    assert id1 != id2
    assert json.loads(wire1) == {
        "execute": "query-migrate",
        "arguments": {"guest": "vm1"},
        "id": id1,
    }
    client.receive_data(
        b'{"return": [], "id": 2}\n{"error": {"class": "GenericError", "desc": "d"}, "id": 1}\n'
    )
    assert client.next_event() == Return([], 2)
    assert client.next_event() == ErrorReply("GenericError", "d", 1)


@pytest.mark.parametrize("line", [b"nonsense", b"[]", b'{"what": 1}', b'{"error": 3}'])
def test_client_reports_nonsense_from_a_server_instead_of_raising(line):
    client = ClientConnection()
    client.receive_data(line + b"\n")
    assert isinstance(client.next_event(), control.ProtocolViolation)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=5))
def test_server_never_raises_on_arbitrary_input(data, cuts):
    server = _server()
    last = 0
    for cut in [*sorted(cuts), len(data)]:
        server.receive_data(data[last:cut])
        last = cut
    server.receive_data(b"\n")
    while (cmd := server.next_event()) is not None:
        assert isinstance(cmd, Command) and isinstance(cmd.arguments, dict)
    for line in server.data_to_send().splitlines():
        assert "error" in json.loads(line)


def test_schema_validation_uses_qemus_words():
    assert qapi.validate_arguments("guest-start", {"name": "a", "memory": "1G"}) == {
        "name": "a",
        "memory": 1 << 30,
    }
    with pytest.raises(qapi.ArgumentError, match="Parameter 'uri' is missing"):
        qapi.validate_arguments("migrate", {})
    with pytest.raises(
        qapi.ArgumentError, match="Invalid parameter type for 'resume', expected: boolean"
    ):
        qapi.validate_arguments("migrate", {"uri": "tls:a:1", "resume": 1})
    with pytest.raises(qapi.ArgumentError, match="Parameter 'bogus' is unexpected"):
        qapi.validate_arguments("migrate", {"uri": "tls:a:1", "bogus": 1})
    with pytest.raises(qapi.ArgumentError, match="does not accept value"):
        qapi.validate_arguments("guest-verify", {"method": "guess"})
    assert qapi.validate_arguments("migrate-set-parameters", {"downtime-limit": 5}) == {
        "downtime-limit": 5
    }


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("1G", 1 << 30), ("512M", 512 << 20), ("2k", 2048), ("1GiB", 1 << 30), (7, 7)],
)
def test_sizes(text, size):
    assert qapi.parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "G", "1X", "-1", True, -5])
def test_bad_sizes(bad):
    with pytest.raises(ValueError):
        qapi.parse_size(bad)
