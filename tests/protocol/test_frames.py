"""The frame decoder: any split of a valid stream decodes; any damage is a ProtocolError."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import (
    FrameTooLarge,
    ProtocolError,
    ReservedBitsSet,
    TruncatedStream,
    UnknownFrameType,
)
from protocol.frames import (
    DEFAULT_MAX_PAYLOAD,
    HEADER_SIZE,
    Frame,
    FrameDecoder,
    FrameFlags,
    FrameType,
    encode_header,
)
from protocol.messages import decode_message


def frame_bytes(ftype: FrameType, payload: bytes, flags: int = 0) -> bytes:
    return encode_header(ftype, len(payload), flags) + payload


def drain(dec: FrameDecoder) -> list[tuple[FrameType, int, bytes, int]]:
    return [(f.type, f.flags, bytes(f.payload), f.offset) for f in dec.frames()]


def test_header_layout_is_big_endian_bbhi() -> None:
    assert HEADER_SIZE == 8
    assert DEFAULT_MAX_PAYLOAD == 16 * 1024 * 1024
    assert encode_header(FrameType.PAGES, 0x01020304, 1) == bytes([0x10, 1, 0, 0, 1, 2, 3, 4])


def test_frame_type_numbers_are_stable() -> None:
    assert {t.name: t.value for t in FrameType} == {
        "HELLO": 0x01,
        "ERROR": 0x02,
        "CONFIG": 0x03,
        "PAGES": 0x10,
        "ZERO": 0x11,
        "PASS_END": 0x12,
        "PAGE_BATCH": 0x13,
        "ZERO_BATCH": 0x14,
        "MULTIFD_SYNC": 0x15,
        "POSTCOPY_ADVISE": 0x20,
        "DISCARD": 0x21,
        "DEVICE_STATE": 0x22,
        "VMDESC": 0x23,
        "SWITCHOVER_START": 0x24,
        "POSTCOPY_LISTEN": 0x25,
        "POSTCOPY_RUN": 0x26,
        "COMPLETE": 0x27,
        "PING": 0x30,
        "PONG": 0x31,
        "REQ_PAGES": 0x40,
        "RECV_BITMAP_REQUEST": 0x41,
        "RECV_BITMAP": 0x42,
        "RESUME": 0x43,
        "RESUME_ACK": 0x44,
        "SWITCHOVER_ACK": 0x45,
        "SHUT": 0x46,
        "POSTCOPY_RUN_ACK": 0x47,
    }


def test_encode_header_refuses_what_a_receiver_would() -> None:
    with pytest.raises(ValueError):
        encode_header(FrameType.PING, 1 << 32)
    with pytest.raises(ValueError):
        encode_header(FrameType.PING, 0, flags=0x80)


def test_byte_at_a_time_gives_the_same_frames_with_offsets() -> None:
    stream = (
        frame_bytes(FrameType.PING, b"a" * 16)
        + frame_bytes(FrameType.COMPLETE, b"")
        + frame_bytes(FrameType.PAGES, bytes(range(256)) * 300, FrameFlags.URGENT)
    )
    dec = FrameDecoder()
    got = []
    for i in range(len(stream)):
        dec.feed(stream[i : i + 1])
        got += drain(dec)
    assert [(t, fl, len(p), o) for t, fl, p, o in got] == [
        (FrameType.PING, 0, 16, 0),
        (FrameType.COMPLETE, 0, 0, 24),
        (FrameType.PAGES, 1, 76800, 32),
    ]
    assert got[2][2] == bytes(range(256)) * 300
    assert dec.bytes_received == len(stream)
    dec.eof()


def test_payload_stays_valid_after_the_input_buffer_is_reused() -> None:
    dec = FrameDecoder()
    buf = bytearray(frame_bytes(FrameType.SHUT, b"first"))
    dec.feed(buf)
    first = dec.next_frame()
    buf[:] = frame_bytes(FrameType.SHUT, b"XXXXX")
    dec.feed(buf)
    second = dec.next_frame()
    assert first is not None and second is not None
    assert bytes(first.payload) == b"first" and bytes(second.payload) == b"XXXXX"


def test_large_payload_is_one_buffer_of_exactly_its_size() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    stream = frame_bytes(FrameType.PAGES, payload)
    dec = FrameDecoder()
    for i in range(0, len(stream), 100_000):
        dec.feed(stream[i : i + 100_000])
    frame = dec.next_frame()
    assert frame is not None and frame.payload.nbytes == len(payload)
    assert frame.payload.obj is not None and len(frame.payload.obj) == len(payload)  # type: ignore[arg-type]
    assert bytes(frame.payload) == payload
    assert dec.largest_allocation == len(payload)


def test_errors_name_type_channel_and_offset() -> None:
    dec = FrameDecoder(channel="preempt")
    dec.feed(frame_bytes(FrameType.PING, b"x" * 81912))  # 81920 bytes on the wire
    dec.feed(bytes([0x17, 0, 0, 0, 0, 0, 0, 0]))
    assert dec.next_frame() is not None  # the good frame before the bad one
    with pytest.raises(UnknownFrameType) as info:
        dec.next_frame()
    assert str(info.value) == "frame type 0x17 unknown on channel preempt at byte 81920"
    assert info.value.channel == "preempt" and info.value.offset == 81920


@pytest.mark.parametrize(
    ("header", "error", "text"),
    [
        (struct.pack(">BBHI", 0x30, 0, 1, 0), ReservedBitsSet, "reserved field 0x0001"),
        (struct.pack(">BBHI", 0x30, 0x80, 0, 0), ReservedBitsSet, "undefined flag bits 0x80"),
        (struct.pack(">BBHI", 0x10, 0, 0, 65), FrameTooLarge, "PAGES frame of 65 bytes"),
        (struct.pack(">BBHI", 0x00, 0, 0, 0), UnknownFrameType, "frame type 0x00 unknown"),
    ],
)
def test_bad_headers(header: bytes, error: type[ProtocolError], text: str) -> None:
    dec = FrameDecoder(channel="main", max_payload=64)
    dec.feed(header)
    with pytest.raises(error, match=text):
        dec.next_frame()
    # poisoned: every later call raises the same error
    for call in (lambda: dec.feed(b"\x30"), dec.next_frame, dec.eof, lambda: dec.get_buffer(1)):
        with pytest.raises(error) as again:
            call()
        assert str(again.value).endswith("on channel main at byte 0")
    assert dec.largest_allocation == 0


def test_length_is_checked_before_any_payload_arrives() -> None:
    dec = FrameDecoder(max_payload=1024)
    dec.feed(encode_header(FrameType.PAGES, 0xFFFF_FFFF))
    with pytest.raises(FrameTooLarge):
        dec.next_frame()
    assert dec.largest_allocation == 0


def test_max_payload_can_be_raised_after_negotiation() -> None:
    dec = FrameDecoder(max_payload=16)
    dec.feed(frame_bytes(FrameType.SHUT, b"x" * 16))
    dec.max_payload = 32
    dec.feed(frame_bytes(FrameType.SHUT, b"y" * 32))
    assert [len(p) for _, _, p, _ in drain(dec)] == [16, 32]
    with pytest.raises(ValueError):
        dec.max_payload = 1 << 32


def test_eof_inside_a_frame_is_truncation() -> None:
    dec = FrameDecoder(channel="return")
    dec.feed(frame_bytes(FrameType.PONG, b"z" * 16)[:-3])
    with pytest.raises(TruncatedStream, match="PONG frame cut off after 13 of 16"):
        dec.eof()
    dec = FrameDecoder(channel="return")
    dec.feed(frame_bytes(FrameType.PONG, b"z" * 16) + b"\x31\x00")
    with pytest.raises(TruncatedStream, match=r"header cut off after 2 of 8 .* at byte 24"):
        dec.eof()
    assert dec.next_frame() is not None  # what was whole is still delivered
    with pytest.raises(TruncatedStream):
        dec.next_frame()


def test_eof_between_frames_is_fine() -> None:
    dec = FrameDecoder()
    dec.feed(frame_bytes(FrameType.RESUME, b""))
    dec.eof()
    assert dec.next_frame() is not None


def feed_via_buffer(dec: FrameDecoder, stream: bytes, chunk: int) -> None:
    pos = 0
    while pos < len(stream):
        buf = dec.get_buffer(chunk)
        n = min(len(buf), chunk, len(stream) - pos)
        buf[:n] = stream[pos : pos + n]
        dec.buffer_updated(n)
        pos += n


def test_buffered_protocol_path_reads_large_payloads_in_place() -> None:
    big = bytes(range(256)) * 8192  # 2 MiB
    stream = frame_bytes(FrameType.PING, b"p" * 16) + frame_bytes(FrameType.PAGES, big)
    dec = FrameDecoder()
    buf = dec.get_buffer(4096)
    buf[: 32 + 100] = stream[: 32 + 100]
    dec.buffer_updated(32 + 100)  # one PING, the PAGES header and 100 bytes via scratch
    direct = dec.get_buffer(4096)
    assert len(direct) == len(big) - 100  # the rest of the payload, in its final place
    direct[:] = big[100:]
    dec.buffer_updated(len(direct))
    frames = list(dec.frames())
    assert [f.type for f in frames] == [FrameType.PING, FrameType.PAGES]
    assert bytes(frames[1].payload) == big
    assert frames[1].payload.obj is direct.obj


def test_buffer_updated_without_get_buffer_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        FrameDecoder().buffer_updated(1)


# --- property tests -------------------------------------------------------

TYPES = list(FrameType)


def frames_from(program: bytes) -> list[tuple[FrameType, int, bytes]]:
    """Read a few frames out of hypothesis' bytes: one draw is far cheaper than many."""
    frames = []
    pos = 0
    while pos + 3 <= len(program) and len(frames) < 5:
        ftype = TYPES[program[pos] % len(TYPES)]
        flags = program[pos + 1] & int(FrameFlags.URGENT)
        length = program[pos + 2] % 49
        payload = program[pos + 3 : pos + 3 + length]
        frames.append((ftype, flags, payload))
        pos += 3 + length
    return frames


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in [*points, len(data)]:
        out.append(data[last:p])
        last = p
    return out


MAX = 40  # small, so generated lengths often exceed it


def run_decoder(chunks: list[bytes], use_buffer: bool) -> tuple[list[Frame], Exception | None]:
    dec = FrameDecoder(channel="fuzz", max_payload=MAX)
    frames: list[Frame] = []
    try:
        for chunk in chunks:
            if use_buffer:
                feed_via_buffer(dec, chunk, max(1, len(chunk)))
            else:
                dec.feed(chunk)
            frames += dec.frames()
        dec.eof()
        frames += dec.frames()
    except ProtocolError as exc:
        frames += list(dec._ready)  # frames that preceded the error
        assert dec.largest_allocation <= MAX
        return frames, exc
    assert dec.largest_allocation <= MAX
    return frames, None


@settings(
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    program=st.binary(max_size=256),
    mutations=st.binary(max_size=9),
    cuts=st.binary(max_size=8),
    use_buffer=st.booleans(),
)
def test_fuzz_valid_and_mutated_streams_split_anywhere(
    program: bytes, mutations: bytes, cuts: bytes, use_buffer: bool
) -> None:
    frames = frames_from(program)
    stream = bytearray(b"".join(frame_bytes(t, p, fl) for t, fl, p in frames))
    # each 3 bytes of `mutations`: operation, position, value
    for i in range(0, len(mutations) - 2, 3):
        op, where, value = mutations[i], mutations[i + 1], mutations[i + 2]
        at = where * (len(stream) + 1) // 256
        if op % 4 == 0:
            stream[at:at] = bytes([value])
        elif at < len(stream):
            if op % 4 == 1:
                stream[at] ^= 1 << (value % 8)
            elif op % 4 == 2:
                del stream[at]
            else:
                stream[at] = value
    mutated = len(mutations) >= 3
    got, error = run_decoder(
        split(bytes(stream), [c * (len(stream) + 1) // 256 for c in cuts]), use_buffer
    )
    fits = all(len(p) <= MAX for _, _, p in frames)
    if not mutated and fits:
        assert error is None
        assert [(f.type, f.flags, bytes(f.payload)) for f in got] == frames
        assert [f.offset for f in got] == [
            sum(HEADER_SIZE + len(p) for _, _, p in frames[:i]) for i in range(len(frames))
        ]
    # whatever came out is a well-formed frame, and messages decode or refuse cleanly
    for f in got:
        assert len(f.payload) <= MAX
        try:
            decode_message(f, channel="fuzz")
        except ProtocolError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 1 << 16), max_size=8))
def test_fuzz_random_bytes(data: bytes, cuts: list[int]) -> None:
    got, _ = run_decoder(split(data, cuts), use_buffer=False)
    assert all(len(f.payload) <= MAX for f in got)


def test_after_a_large_frame_only_the_next_header_is_staged() -> None:
    big = bytes(range(256)) * 512  # 128 KiB
    dec = FrameDecoder()

    def read(data: bytes) -> int:
        buf = dec.get_buffer(64 << 10)
        buf[: len(data)] = data
        dec.buffer_updated(len(data))
        return len(buf)

    assert read(encode_header(FrameType.PAGES, len(big))) >= 256 << 10  # staging
    assert read(big) == len(big)  # the whole payload, straight into frame memory
    assert read(encode_header(FrameType.PAGES, len(big))) == HEADER_SIZE  # only a header
    assert read(big) == len(big)
    assert read(frame_bytes(FrameType.PING, bytes(16))[:8]) == HEADER_SIZE
    assert read(bytes(16)) >= 256 << 10  # small payloads are staged
    frames = list(dec.frames())
    assert [f.type for f in frames] == [FrameType.PAGES, FrameType.PAGES, FrameType.PING]
    assert all(bytes(f.payload) == big for f in frames[:2])
