"""Device sections round-trip, describe themselves, load older versions with defaults,
and refuse newer ones by name."""

import json

import pytest

from agents.vm.devices import (
    ClockDevice,
    ConsoleDevice,
    Device,
    DeviceSection,
    Field,
    VcpuDevice,
    load_sections,
    vmdesc,
)
from agents.vm.errors import DeviceVersionError


class Nic(Device):
    NAME = "nic"
    VERSION = 2
    FIELDS = (Field("mac", "bytes", b""), Field("rx", "u64"), Field("mtu", "u16", 1500, since=2))


class NicV1(Device):
    NAME = "nic"
    VERSION = 1
    FIELDS = (Field("mac", "bytes", b""), Field("rx", "u64"))


def test_sections_round_trip():
    v = VcpuDevice()
    v["workload"], v["position"], v["passes"], v["throttle"] = "counter", 12345, 7, 30
    c = ConsoleDevice()
    for i in range(100):
        c.log(f"line {i}")
    s1, s2 = v.save(), c.save()
    v2, c2 = VcpuDevice(), ConsoleDevice()
    load_sections([v2, c2], [DeviceSection.from_json(s1.to_json()), s2])
    assert v2.values == v.values
    assert list(c2.ring) == [f"line {i}" for i in range(36, 100)]
    assert c2["dropped"] == 36


def test_clock_never_goes_back():
    src = ClockDevice()
    src.resume()
    src.pause()
    frozen = src.now_ns()
    dst = ClockDevice()
    dst.load(src.save())
    assert dst.now_ns() == frozen
    dst.resume()
    assert dst.now_ns() >= frozen


def test_older_section_loads_with_defaults_newer_is_refused():
    old = NicV1()
    old["mac"], old["rx"] = b"\x52\x54\x00\x12\x34\x56", 99
    new = Nic()
    new.load(old.save())
    assert (new["mac"], new["rx"], new["mtu"]) == (b"\x52\x54\x00\x12\x34\x56", 99, 1500)
    with pytest.raises(
        DeviceVersionError,
        match=r"device 'nic' instance 0: section version 2 is newer .* \(up to 1\)",
    ):
        NicV1().load(Nic().save())


def test_truncated_or_unknown_sections_are_errors():
    s = VcpuDevice().save()
    with pytest.raises(DeviceVersionError, match="field 'bursts' runs past the end"):
        VcpuDevice().load(DeviceSection(s.name, s.instance, s.version, s.data[:-1]))
    with pytest.raises(DeviceVersionError, match="trailing bytes"):
        VcpuDevice().load(DeviceSection(s.name, s.instance, s.version, s.data + b"x"))
    with pytest.raises(DeviceVersionError, match="no device here"):
        load_sections([VcpuDevice()], [DeviceSection("gpu", 0, 1, b"")])


def test_vmdesc_describes_the_layout():
    doc = json.loads(vmdesc([VcpuDevice(), Nic()], blocks=[{"name": "ram", "size": 4096}]))
    nic = doc["devices"][1]
    assert nic["name"] == "nic" and nic["version"] == 2
    assert nic["fields"][1] == {"name": "rx", "type": "u64", "size": 8}
    assert nic["fields"][2]["since"] == 2
    assert doc["ramblocks"][0]["name"] == "ram"
