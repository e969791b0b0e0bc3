"""Capabilities and parameters: names, ranges and the dependency rules."""

from __future__ import annotations

import pytest

from protocol.options import (
    CAPABILITIES,
    PARAMETERS,
    check_capability_dependencies,
    default_capabilities,
    default_parameters,
    needs_return_path,
    validate_capabilities,
    validate_parameters,
)


def test_defaults_are_valid_and_within_range() -> None:
    assert validate_parameters(default_parameters()) == default_parameters()
    assert validate_capabilities(default_capabilities()) == default_capabilities()
    check_capability_dependencies(default_capabilities(), default_parameters())
    assert default_parameters()["downtime-limit"] == 300
    assert default_parameters()["zero-page-detection"] == "legacy"
    assert set(CAPABILITIES) >= {"postcopy-ram", "postcopy-preempt", "mapped-ram", "multifd"}


def test_unknown_names_are_named_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown capability 'xbzrle'.*postcopy-ram"):
        validate_capabilities({"xbzrle": True})
    with pytest.raises(ValueError, match=r"unknown parameter 'downtime'.*downtime-limit"):
        validate_parameters({"downtime": 1})


def test_capability_values_must_be_bools() -> None:
    with pytest.raises(ValueError, match="'multifd' must be true or false"):
        validate_capabilities({"multifd": 1})


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"downtime-limit": -1}, r"'downtime-limit' must be in \[0, 2000000\] ms"),
        ({"cpu-throttle-initial": 100}, r"\[1, 99\]"),
        ({"multifd-channels": 0}, r"\[1, 255\]"),
        ({"multifd-channels": True}, "must be an integer"),
        ({"max-bandwidth": "1G"}, "must be an integer"),
        ({"zero-page-detection": "multifd"}, "one of none, legacy"),
        ({"direct-io": "yes"}, "true or false"),
    ],
)
def test_bad_parameters_name_key_and_allowed(params: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_parameters(params)


def test_parameters_are_normalised() -> None:
    assert validate_parameters({"downtime-limit": 500.0}) == {"downtime-limit": 500}
    assert type(validate_parameters({"downtime-limit": 500.0})["downtime-limit"]) is int
    assert validate_parameters({"max-bandwidth": 0}) == {"max-bandwidth": 0}
    assert set(PARAMETERS) >= {"max-postcopy-bandwidth", "max-cpu-throttle", "keepalive-ms"}


@pytest.mark.parametrize(
    ("caps", "params", "message"),
    [
        ({"postcopy-preempt": True}, None, "'postcopy-preempt' requires capability 'postcopy-ram'"),
        ({"switchover-ack": True}, None, "'switchover-ack' requires capability 'return-path'"),
        ({"mapped-ram": True, "postcopy-ram": True}, None, "incompatible"),
        ({}, {"direct-io": True}, "'direct-io' requires capability 'mapped-ram'"),
    ],
)
def test_dependencies(
    caps: dict[str, bool], params: dict[str, object] | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_capability_dependencies(caps, params)


def test_good_combinations_pass() -> None:
    check_capability_dependencies({"postcopy-ram": True, "postcopy-preempt": True})
    check_capability_dependencies({"return-path": True, "switchover-ack": True})
    check_capability_dependencies({"mapped-ram": True, "multifd": True}, {"direct-io": True})
    assert needs_return_path({"postcopy-ram": True}) and not needs_return_path({})
