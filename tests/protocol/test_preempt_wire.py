"""protocol.preempt: the fault path's codec against the general one, byte for byte and
error for error."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import FrameTooLarge, MalformedMessage, ProtocolError, UnknownFrameType
from protocol.frames import HEADER_SIZE, FrameDecoder
from protocol.messages import Error, Message, Pages, Ping, ReqPages, Zero, decode_message
from protocol.preempt import (
    PAGES,
    REQ_PAGES,
    ZERO,
    PreemptReader,
    pages_frame_into,
    pages_header,
    request_frame,
    zero_frame,
)

U32, U64 = 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF
CAPACITY = 64 << 10

u32 = st.integers(0, U32)
u64 = st.integers(0, U64)


@st.composite
def requests(draw: st.DrawFn) -> ReqPages:
    count = draw(st.integers(1, U32))
    first = draw(st.integers(0, U64 - count + 1))
    return ReqPages(draw(u32), first, count, draw(st.integers(1, U64)), draw(u64))


@st.composite
def zeros(draw: st.DrawFn) -> Zero:
    count = draw(st.integers(1, U32))
    return Zero(draw(u32), draw(st.integers(0, U64 - count + 1)), count)


@st.composite
def pages(draw: st.DrawFn) -> Pages:
    size = draw(st.sampled_from([512, 4096, 8192]))
    count = draw(st.integers(1, 4))
    first = draw(st.integers(0, U64 - count + 1))
    data = draw(st.binary(min_size=size * count, max_size=size * count))
    return Pages(draw(u32), first, count, data, draw(st.sampled_from([0, 1, U64])))


others = st.one_of(
    st.builds(Error, st.text(max_size=8), st.text(max_size=40)),
    st.builds(Ping, st.integers(1, U64), u64),
)
messages = st.one_of(requests(), zeros(), pages(), others)


def as_event(msg: Message) -> Any:
    """What PreemptReader.next gives for a message the general decoder decoded."""
    if isinstance(msg, ReqPages):
        return (REQ_PAGES, msg.block, msg.first_page, msg.count, msg.request_id, msg.sent_ns)
    if isinstance(msg, Pages):
        return (PAGES, msg.block, msg.first_page, msg.count, msg.request_id, bytes(msg.data))
    if isinstance(msg, Zero):
        return (ZERO, msg.block, msg.first_page, msg.count, 0, 0)
    return msg


def general(stream: bytes) -> tuple[list[Any], ProtocolError | None]:
    decoder = FrameDecoder(channel="preempt", max_payload=CAPACITY)
    out: list[Any] = []
    try:
        decoder.feed(stream)
        while (frame := decoder.next_frame()) is not None:
            out.append(as_event(decode_message(frame, channel="preempt")))
    except ProtocolError as exc:
        return out, exc
    return out, None


def lean(
    stream: bytes, reads: list[int], capacity: int = CAPACITY
) -> tuple[list[Any], ProtocolError | None]:
    """The stream through PreemptReader, read in pieces of the given sizes."""
    reader = PreemptReader(capacity=capacity)
    out: list[Any] = []
    pos, i = 0, 0
    try:
        while True:
            while (event := reader.next()) is not None:
                if isinstance(event, tuple) and event[0] == PAGES:
                    event = (*event[:5], bytes(event[5]))  # valid until the next read
                out.append(event)
            if pos == len(stream):
                return out, None
            room = reader.buffer()
            n = min(reads[i % len(reads)], len(stream) - pos, room.nbytes)
            i += 1
            room[:n] = stream[pos : pos + n]
            reader.filled(n)
            pos += n
    except ProtocolError as exc:
        return out, exc


def same_error(a: ProtocolError | None, b: ProtocolError | None) -> None:
    assert type(a) is type(b)
    if a is not None and b is not None:
        assert str(a) == str(b)
        assert a.offset == b.offset


# -- encoding -----------------------------------------------------------------------


@given(requests())
def test_a_request_frame_is_what_reqpages_encodes(msg: ReqPages) -> None:
    frame = request_frame(msg.block, msg.first_page, msg.count, msg.request_id, msg.sent_ns)
    assert frame == msg.to_bytes()


@given(zeros())
def test_a_zero_frame_is_what_zero_encodes(msg: Zero) -> None:
    assert zero_frame(msg.block, msg.first_page, msg.count) == msg.to_bytes()


@given(pages())
def test_a_pages_frame_is_what_pages_encodes(msg: Pages) -> None:
    buffer = memoryview(bytearray(HEADER_SIZE + CAPACITY))
    data = memoryview(bytes(msg.data))
    frame = pages_frame_into(buffer, msg.block, msg.first_page, msg.count, msg.request_id, data)
    assert bytes(frame) == msg.to_bytes()
    head = pages_header(msg.block, msg.first_page, msg.count, msg.request_id, data.nbytes)
    assert head + bytes(data) == msg.to_bytes()


def test_fields_out_of_range_are_refused_when_encoding() -> None:
    import struct

    with pytest.raises(struct.error):
        request_frame(U32 + 1, 0, 1, 1, 0)
    with pytest.raises(struct.error):
        zero_frame(0, U64 + 1, 1)


# -- decoding: the same messages and the same errors as the general decoder -----------


@settings(max_examples=300)
@given(st.lists(messages, max_size=12), st.lists(st.integers(1, 9000), min_size=1, max_size=8))
def test_valid_streams_read_as_the_general_decoder_reads_them(
    msgs: list[Message], reads: list[int]
) -> None:
    stream = b"".join(m.to_bytes() for m in msgs)
    expected, error = general(stream)
    assert error is None
    got, got_error = lean(stream, reads)
    assert got_error is None
    assert got == expected
    assert got == [as_event(m) for m in msgs]


@settings(max_examples=500)
@given(
    st.lists(messages, min_size=1, max_size=6),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
    st.lists(st.integers(1, 9000), min_size=1, max_size=8),
)
def test_corrupt_streams_fail_as_the_general_decoder_fails(
    msgs: list[Message], flips: list[tuple[int, int]], reads: list[int]
) -> None:
    stream = bytearray(b"".join(m.to_bytes() for m in msgs))
    for where, value in flips:
        stream[where % len(stream)] = value
    expected, error = general(bytes(stream))
    got, got_error = lean(bytes(stream), reads)
    assert got == expected  # frames before a bad one come out first, in both
    same_error(error, got_error)


def test_a_malformed_request_says_what_and_where() -> None:
    good = ReqPages(1, 2, 3, 4, 5).to_bytes()
    bad = bytearray(ReqPages(1, 2, 3, 4, 5).to_bytes())
    bad[HEADER_SIZE + 4 : HEADER_SIZE + 8] = bytes(4)  # count 0
    got, error = lean(good + bytes(bad), [4096])
    assert got == [(REQ_PAGES, 1, 2, 3, 4, 5)]
    assert isinstance(error, MalformedMessage)
    assert "malformed REQ_PAGES: page count must be > 0" in str(error)
    assert error.offset == len(good) and error.channel == "preempt"


def test_a_frame_above_capacity_is_refused_at_its_header() -> None:
    reader = PreemptReader(capacity=8192)
    big = Pages(0, 0, 4, bytes(4 * 4096)).to_bytes()
    reader.feed(big[:HEADER_SIZE])
    with pytest.raises(
        FrameTooLarge, match="PAGES frame of 16408 bytes exceeds the maximum of 8192"
    ):
        reader.next()
    with pytest.raises(FrameTooLarge):  # and stays failed
        reader.next()


def test_an_unknown_type_is_refused_before_its_payload_arrives() -> None:
    reader = PreemptReader()
    reader.feed(bytes([0x7F, 0, 0, 0, 0, 0, 1, 0]))
    with pytest.raises(UnknownFrameType, match="frame type 0x7f unknown"):
        reader.next()


def test_an_error_from_the_peer_is_a_message() -> None:
    reader = PreemptReader()
    reader.feed(Error("not-found", "no such page").to_bytes())
    assert reader.buffered
    assert reader.next() == Error("not-found", "no such page")
    assert not reader.buffered and reader.next() is None


def test_a_huge_page_fits_a_reader_sized_for_it_and_crosses_reads_whole() -> None:
    page = bytes(range(256)) * (2 << 20 >> 8)
    stream = ReqPages(0, 9, 1, 1).to_bytes() + Pages(0, 0, 1, page, 1).to_bytes()
    out, error = lean(stream, [65536], capacity=(2 << 20) + 64)
    assert error is None
    assert out == [(REQ_PAGES, 0, 9, 1, 1, 0), (PAGES, 0, 0, 1, 1, page)]


def test_buffered_means_a_whole_frame_waits() -> None:
    reader = PreemptReader()
    frame = zero_frame(0, 1, 1)
    reader.feed(frame[:-1])
    assert not reader.buffered and reader.next() is None
    reader.feed(frame[-1:])
    assert reader.buffered
    assert reader.next() == (ZERO, 0, 1, 1, 0, 0)
