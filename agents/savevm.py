"""Device state on the wire (QEMU's savevm.c): sections, and the VMDESC description.

Each device section travels as one DEVICE_STATE frame (name, instance,
version, bytes).  After them the source sends VMDESC, a JSON description of
the RAM blocks and the device sections (QEMU appends the same thing so tools
like analyze-migration.py can read a stream); ``suppress-vmdesc`` leaves it
out, and postcopy never builds it (it would sit on the downtime path while
nothing on the destination needs it).  The destination checks VMDESC
against what it received, so a stream that lost a section is caught before
the guest runs on it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from protocol.messages import DeviceState, Vmdesc

from .vm.devices import DeviceSection

SendFn = Callable[[Any], Awaitable[int]]


async def send_devices(send: SendFn, sections: Sequence[DeviceSection]) -> None:
    for section in sections:
        await send(
            DeviceState(section.name, section.instance, section.version, bytes(section.data))
        )


def describe(blocks: Sequence[Any], sections: Sequence[DeviceSection]) -> dict[str, Any]:
    return {
        "page_size": blocks[0].page_size if blocks else 4096,
        "ram": [{"name": b.name, "size": b.size, "page_size": b.page_size} for b in blocks],
        "devices": [
            {
                "name": s.name,
                "instance": s.instance,
                "version": s.version,
                "size": len(s.data),
                "sha256": hashlib.sha256(s.data).hexdigest(),
                **({"fields": s.fields} if getattr(s, "fields", None) else {}),
            }
            for s in sections
        ],
    }


async def send_vmdesc(send: SendFn, guest: Any, sections: Sequence[DeviceSection]) -> None:
    await send(Vmdesc(describe(guest.blocks, sections)))


def section_from_message(msg: DeviceState) -> DeviceSection:
    return DeviceSection(msg.section, msg.instance, msg.version, bytes(msg.data))


def check_vmdesc(
    description: dict[str, Any], blocks: Sequence[Any], sections: Sequence[DeviceSection]
) -> None:
    """Raise ValueError naming the first difference between VMDESC and what arrived."""
    expected = describe(blocks, sections)
    ram = description.get("ram")
    if ram != expected["ram"]:
        raise ValueError(
            f"VMDESC RAM layout {ram} differs from the received configuration {expected['ram']}"
        )
    theirs = {(d.get("name"), d.get("instance")): d for d in description.get("devices", [])}
    ours = {(d["name"], d["instance"]): d for d in expected["devices"]}
    for key in theirs.keys() - ours.keys():
        raise ValueError(f"VMDESC lists device section {key[0]}/{key[1]} that never arrived")
    for key, mine in ours.items():
        if key not in theirs:
            raise ValueError(
                f"device section {key[0]}/{key[1]} arrived but VMDESC does not list it"
            )
        if theirs[key].get("sha256") != mine["sha256"]:
            raise ValueError(
                f"device section {key[0]}/{key[1]}: contents differ from VMDESC's checksum"
            )
