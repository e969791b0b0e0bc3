"""Migration URIs parse as QEMU writes them, and bad ones say what is wrong."""

import pytest

from protocol.uri import MigrationURI, parse_uri


@pytest.mark.parametrize(
    ("text", "uri"),
    [
        ("tls:10.0.0.2:4444", MigrationURI("tls", "10.0.0.2", 4444)),
        ("tcp:localhost:1", MigrationURI("tcp", "localhost", 1)),
        ("tls:[::1]:65535", MigrationURI("tls", "::1", 65535)),
        ("file:/var/lib/x.img", MigrationURI("file", path="/var/lib/x.img")),
    ],
)
def test_good_uris_round_trip(text, uri):
    assert parse_uri(text) == uri
    assert str(uri) == text


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("10.0.0.2:4444", "scheme"),
        ("rdma:h:1", "scheme"),
        ("tls:host", "expected tls:HOST:PORT"),
        ("tls::44", "host is empty"),
        ("tls:h:0", "not a number"),
        ("tls:h:70000", "not a number"),
        ("tls:h:x", "not a number"),
        ("tls:[::1:4", "bracketed"),
        ("file:", "needs a path"),
    ],
)
def test_bad_uris_say_why(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_uri(text)
