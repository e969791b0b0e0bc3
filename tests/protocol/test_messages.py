"""Messages: every one round-trips; every inconsistency is refused with what and where."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import PROTOCOL_VERSION
from protocol.bitmap import PageBitmap
from protocol.errors import CapabilityMismatch, MalformedMessage, VersionMismatch
from protocol.frames import FrameDecoder, FrameFlags, FrameType
from protocol.messages import (
    RECV_BITMAP_END_MARK,
    ChannelKind,
    Complete,
    Config,
    DeviceState,
    Discard,
    Error,
    Hello,
    Message,
    MultifdSync,
    PageBatch,
    Pages,
    PassEnd,
    Ping,
    Pong,
    PostcopyAdvise,
    PostcopyListen,
    PostcopyRun,
    PostcopyRunAck,
    RamBlockInfo,
    RecvBitmap,
    RecvBitmapRequest,
    ReqPages,
    Resume,
    ResumeAck,
    Shut,
    SwitchoverAck,
    SwitchoverStart,
    Vmdesc,
    Zero,
    ZeroBatch,
    check_version,
    decode_message,
    negotiate_capabilities,
)

MID = bytes(range(16))


def bitmap_with(npages: int, pages: list[int]) -> PageBitmap:
    bm = PageBitmap(npages)
    bm.set_indices(np.array(pages, dtype=np.int64))
    return bm


SAMPLES: list[Message] = [
    Hello(PROTOCOL_VERSION, MID, ChannelKind.MAIN),
    Hello((1, 7), MID, ChannelKind.MULTIFD, index=5, resume=True),
    Hello((1, 0), MID, ChannelKind.RETURN, resume=True),
    Error("version-mismatch", "peer speaks 2.0 — ünïcode too"),
    Error("", ""),
    Config(
        (RamBlockInfo("pc.ram", 1 << 30, 4096), RamBlockInfo("huge", 1 << 22, 2 << 20)),
        {"postcopy-ram": True},
        {"downtime-limit": 300, "zero-page-detection": "legacy", "x": 1.5, "direct-io": False},
        {"name": "vm1", "vcpus": 2},
    ),
    Config(()),
    Pages(0, 17, 2, bytes(range(256)) * 32),
    Pages(3, 2**64 - 1, 1, b"\xff" * 4096, request_id=99),
    Zero(1, 0, 2**32 - 1),
    PageBatch(1, np.array([9, 2, 2**40], dtype=np.uint64), bytes(range(256)) * 48),
    ZeroBatch(0, np.array([5, 1], dtype=np.uint64)),
    PassEnd(3, {"bytes": 123, "dirty_rate": 4.5}),
    MultifdSync(0),
    MultifdSync(2**32 - 1),
    PostcopyAdvise((4096, 2 << 20)),
    PostcopyAdvise(()),
    Discard(2, np.array([[0, 1], [10, 5], [2**64 - 2, 2]], dtype=np.uint64)),
    DeviceState("cpu/vcpu0", 0, 3, b"\x00\x01state"),
    DeviceState("tïmer", 2**32 - 1, 0, b""),
    Vmdesc({"devices": [{"name": "ram", "pages": 10}]}),
    SwitchoverStart(),
    PostcopyListen(),
    PostcopyRun(),
    Complete(),
    Resume(),
    ResumeAck(),
    SwitchoverAck(),
    PostcopyRunAck(),
    Shut(),
    Shut("destination guest crashed"),
    Ping(1, 123456789),
    Pong(2**64 - 1, 0),
    ReqPages(0, 5, 1, request_id=7, sent_ns=42),
    RecvBitmapRequest(4),
    RecvBitmap(1, bitmap_with(130, [0, 63, 64, 129])),
    RecvBitmap(0, PageBitmap(0)),
]


def roundtrip(msg: Message, chunk: int = 7) -> Message:
    wire = msg.to_bytes()
    dec = FrameDecoder(channel="main")
    for i in range(0, len(wire), chunk):
        dec.feed(wire[i : i + chunk])
    frame = dec.next_frame()
    assert frame is not None and dec.next_frame() is None
    assert frame.type is msg.TYPE
    return decode_message(frame, channel="main")


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_roundtrip(msg: Message) -> None:
    assert roundtrip(msg) == msg


def test_every_frame_type_has_a_message_class_and_a_sample() -> None:
    assert {m.TYPE for m in SAMPLES} == set(FrameType)


def test_pages_data_is_never_copied() -> None:
    guest = np.arange(4 * 4096, dtype=np.uint8)
    view = memoryview(guest)[4096 : 3 * 4096]
    msg = Pages(0, 1, 2, view, request_id=3)
    parts = msg.encode()
    assert parts[-1] is view  # the caller's memoryview goes out as is
    assert parts[0][1] == FrameFlags.URGENT  # an answered request is flagged in the header
    dec = FrameDecoder()
    dec.feed(b"".join(parts))
    frame = dec.next_frame()
    assert frame is not None
    got = decode_message(frame)
    assert isinstance(got, Pages) and isinstance(got.data, memoryview)
    assert got.data.obj is frame.payload.obj  # a slice of the payload, not a copy
    assert got.page_size == 4096 and bytes(got.data) == guest[4096 : 3 * 4096].tobytes()


def test_discard_decodes_to_a_view_of_the_payload() -> None:
    msg = Discard(0, np.array([[5, 3]] * 1000, dtype=np.uint64))
    dec = FrameDecoder()
    dec.feed(msg.to_bytes())
    frame = dec.next_frame()
    assert frame is not None
    got = decode_message(frame)
    assert isinstance(got, Discard) and got.ranges.shape == (1000, 2)
    assert np.shares_memory(got.ranges, np.frombuffer(frame.payload, dtype=np.uint8))
    assert got.ranges.dtype == np.uint64


@pytest.mark.parametrize(
    "make",
    [
        lambda: Pages(0, 0, 0, b""),
        lambda: Pages(0, 0, 2, b"x" * 4097),
        lambda: Pages(0, 0, 3, b"x" * 300),  # 100-byte pages: not a power of two
        lambda: Zero(0, 0, 0),
        lambda: ReqPages(0, 0, 0, 1),
        lambda: ReqPages(0, 0, 1, 0),
        lambda: Discard(0, np.zeros((0, 2), dtype=np.uint64)),
        lambda: Discard(0, np.array([[1, 0]])),
        lambda: Discard(0, np.array([[-1, 2]])),
        lambda: Discard(0, np.array([1, 2, 3])),
        lambda: Hello((1, 0), b"short", ChannelKind.MAIN),
        lambda: Hello((1, 0), MID, ChannelKind.MAIN, index=1),
        lambda: Zero(2**32, 0, 1),
        lambda: Ping(-1, 0),
        lambda: RamBlockInfo("ram", 4097, 4096),
        lambda: RamBlockInfo("ram", 4096, 3000),
        lambda: Config((RamBlockInfo("a", 0, 4096), RamBlockInfo("a", 0, 4096))),
        lambda: PostcopyAdvise((4095,)),
        lambda: DeviceState("", 0, 0, b""),
    ],
)
def test_invalid_messages_cannot_be_built(make: object) -> None:
    with pytest.raises(ValueError):
        make()  # type: ignore[operator]


def frame_of(ftype: FrameType, payload: bytes) -> bytes:
    return struct.pack(">BBHI", ftype, 0, 0, len(payload)) + payload


def decode_raw(ftype: FrameType, payload: bytes) -> Message:
    dec = FrameDecoder(channel="main")
    dec.feed(b"\x00" * 0 + frame_of(FrameType.PING, bytes(16)) + frame_of(ftype, payload))
    dec.next_frame()
    frame = dec.next_frame()
    assert frame is not None
    return decode_message(frame, channel="main")


GOOD_BITMAP = RecvBitmap(0, bitmap_with(70, [1, 69])).to_bytes()[8:]


@pytest.mark.parametrize(
    ("ftype", "payload", "what"),
    [
        (FrameType.PAGES, bytes(23), "needs at least 24"),
        (FrameType.PAGES, struct.pack(">IIQQ", 0, 0, 0, 0), "page count must be > 0"),
        (FrameType.PAGES, struct.pack(">IIQQ", 0, 2, 0, 0) + bytes(4097), "not 2 pages"),
        (FrameType.ZERO, struct.pack(">IIQ", 0, 0, 0), "page count must be > 0"),
        (FrameType.ZERO, struct.pack(">IIQ", 0, 1, 0) + b"!", "1 trailing bytes"),
        (FrameType.PING, bytes(15), "needs 16"),
        (FrameType.COMPLETE, b"x", "1 trailing bytes"),
        (FrameType.HELLO, bytes(23), "needs 24"),
        (FrameType.HELLO, bytes(20) + b"\x09" + bytes(3), "channel kind 9 unknown"),
        (FrameType.HELLO, bytes(20) + b"\x00\x02" + bytes(2), "undefined flag bits 0x02"),
        (FrameType.ERROR, b"\x00\x05abc", "needs at least 7"),
        (FrameType.ERROR, b"\x00\x01\xff", "code is not valid UTF-8"),
        (FrameType.SHUT, b"\xc3", "reason is not valid UTF-8"),
        (FrameType.CONFIG, b"{", "CONFIG is not JSON"),
        (FrameType.CONFIG, b"[]", "must be a JSON object"),
        (FrameType.CONFIG, b'{"ramblocks": 3}', "'ramblocks' must be a list"),
        (FrameType.CONFIG, b'{"ramblocks": [{"name": "a"}]}', "needs name, size"),
        (FrameType.CONFIG, b'{"ramblocks": [], "parameters": {"x": NaN}}', "not JSON"),
        (
            FrameType.CONFIG,
            b'{"ramblocks": [{"name": "a", "size": 100, "page_size": 4096}]}',
            "not a multiple",
        ),
        (FrameType.VMDESC, b"\xff", "not valid UTF-8"),
        (FrameType.VMDESC, b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
        (FrameType.PASS_END, b"\x00\x00\x00\x01[1]", "must be a JSON object"),
        (FrameType.DISCARD, struct.pack(">II", 0, 0), "no ranges"),
        (FrameType.DISCARD, struct.pack(">II", 0, 2) + bytes(16), "needs 40"),
        (FrameType.DISCARD, struct.pack(">II", 0, 1) + bytes(16), "range 0 has count 0"),
        (FrameType.DEVICE_STATE, struct.pack(">IIH", 0, 0, 9) + b"abc", "section name"),
        (FrameType.POSTCOPY_ADVISE, struct.pack(">II", 1, 0) + bytes(8), "not a power of two"),
        (FrameType.POSTCOPY_ADVISE, struct.pack(">II", 1, 1) + bytes(8), "reserved field"),
        (FrameType.POSTCOPY_ADVISE, struct.pack(">II", 2, 0) + bytes(8), "needs 24"),
        (FrameType.REQ_PAGES, struct.pack(">IIQQQ", 0, 1, 0, 0, 0), "request id must be > 0"),
        (FrameType.RECV_BITMAP_REQUEST, bytes(5), "1 trailing bytes"),
        (FrameType.RECV_BITMAP, GOOD_BITMAP[:-1], "needs 48"),
        (FrameType.RECV_BITMAP, GOOD_BITMAP[:-8] + bytes(8), "end mark 0x0000000000000000"),
        (FrameType.RECV_BITMAP, GOOD_BITMAP[:16] + struct.pack(">Q", 8) + bytes(16), "size 8"),
        (
            FrameType.RECV_BITMAP,
            GOOD_BITMAP[:4] + b"\x00\x00\x00\x01" + GOOD_BITMAP[8:],
            "reserved",
        ),
        (
            FrameType.RECV_BITMAP,
            GOOD_BITMAP[:39] + b"\x80" + GOOD_BITMAP[40:],  # bit 127 of a 70-page bitmap
            "bits set past its 70 pages",
        ),
    ],
)
def test_malformed_payloads_say_what_and_where(ftype: FrameType, payload: bytes, what: str) -> None:
    with pytest.raises(MalformedMessage) as info:
        decode_raw(ftype, payload)
    text = str(info.value)
    assert text.startswith(f"malformed {ftype.name}: ")
    assert what in text
    assert text.endswith("on channel main at byte 24")
    assert info.value.offset == 24 and info.value.channel == "main"


def test_recv_bitmap_wire_form_is_qemus() -> None:
    bm = bitmap_with(70, [0, 65])
    wire = RecvBitmap(9, bm).to_bytes()[8:]
    assert wire[:24] == struct.pack(">IIQQ", 9, 0, 70, 16)
    assert wire[24:40] == (1).to_bytes(8, "little") + (2).to_bytes(8, "little")
    assert wire[40:] == RECV_BITMAP_END_MARK.to_bytes(8, "big")


def test_version_check() -> None:
    assert check_version(Hello((1, 9), MID, ChannelKind.MAIN), ours=(1, 2)) == (1, 2)
    assert check_version(Hello((1, 0), MID, ChannelKind.MAIN), ours=(1, 2)) == (1, 0)
    with pytest.raises(VersionMismatch, match=r"peer speaks protocol 2\.0 on its preempt"):
        check_version(Hello((2, 0), MID, ChannelKind.PREEMPT), ours=(1, 0))
    with pytest.raises(VersionMismatch):
        check_version(Hello((0, 9), MID, ChannelKind.MAIN), ours=(1, 0))
    err = Error.from_exception(VersionMismatch("majors differ", channel="main"))
    assert err.code == "version-mismatch" and "majors differ on channel main" in err.message


def test_capability_negotiation() -> None:
    got = negotiate_capabilities(
        {"postcopy-ram": True, "auto-converge": True}, {"postcopy-ram": True}
    )
    assert got["postcopy-ram"] and got["auto-converge"] and not got["multifd"]
    # a one-sided capability does not need the peer
    assert negotiate_capabilities({}, {"auto-converge": True})["auto-converge"] is False
    with pytest.raises(CapabilityMismatch) as info:
        negotiate_capabilities(
            {"postcopy-ram": True, "multifd": False},
            {"postcopy-ram": False, "multifd": True, "x-new": True, "x-off": False},
        )
    text = str(info.value)
    assert "'postcopy-ram' is on here but off on the peer" in text
    assert "'multifd' is off here but on on the peer" in text
    assert "peer enabled 'x-new'" in text and "x-off" not in text


def test_config_checks_page_ranges() -> None:
    cfg = Config((RamBlockInfo("pc.ram", 1 << 20, 4096),))
    assert cfg.check_pages(0, 250, 6).name == "pc.ram"
    with pytest.raises(MalformedMessage, match=r"pages \[250, 257\) outside ramblock pc.ram"):
        cfg.check_pages(0, 250, 7)
    with pytest.raises(MalformedMessage, match="ramblock 1 unknown"):
        cfg.check_pages(1, 0, 1)


@settings(max_examples=200, deadline=None)
@given(
    block=st.integers(0, 2**32 - 1),
    first=st.integers(0, 2**40),
    count=st.integers(1, 8),
    shift=st.integers(9, 13),
    rid=st.integers(0, 2**64 - 1),
)
def test_pages_roundtrip_property(block: int, first: int, count: int, shift: int, rid: int) -> None:
    data = np.random.default_rng(first).integers(0, 256, count << shift, dtype=np.uint8)
    msg = Pages(block, first, count, memoryview(data), rid)
    assert roundtrip(msg, chunk=1000) == msg
