"""PAGE_BATCH and ZERO_BATCH: scattered pages in one frame, decoded without copying."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import MalformedMessage, ProtocolError
from protocol.frames import FrameDecoder
from protocol.messages import PageBatch, ZeroBatch, decode_message


def _roundtrip(message):
    decoder = FrameDecoder(channel="main")
    for part in message.encode():
        decoder.feed(bytes(part))
    return decode_message(decoder.next_frame(), channel="main")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 2**40), min_size=1, max_size=40, unique=True),
    st.sampled_from([4096, 8192]),
)
def test_page_batch_round_trips(pages, page_size):
    idx = np.array(pages, dtype=np.uint64)
    data = (
        np.random.default_rng(len(pages))
        .integers(0, 256, len(pages) * page_size, dtype=np.uint8)
        .tobytes()
    )
    got = _roundtrip(PageBatch(7, idx, data))
    assert got == PageBatch(7, idx, data)
    assert isinstance(got.data, memoryview) and got.page_size == page_size
    assert _roundtrip(ZeroBatch(2, idx)) == ZeroBatch(2, idx)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((0, np.array([], dtype=np.uint64), b""), "non-empty"),
        ((0, np.array([1, 2]), b"x" * 4097), "equal size"),
        ((0, np.array([1, 2]), b"x" * 6000), "power"),
        ((0, np.array([-1]), b"x" * 4096), "negative"),
    ],
)
def test_bad_batches_are_refused_when_built(args, needle):
    with pytest.raises(ValueError, match=needle):
        PageBatch(*args)


def test_truncated_index_list_is_a_protocol_error_naming_the_channel():
    wire = b"".join(bytes(p) for p in ZeroBatch(1, np.arange(4)).encode())
    bad = bytearray(wire)
    bad[7] -= 8  # payload length one index short
    decoder = FrameDecoder(channel="multifd-1")
    decoder.feed(bytes(bad[:-8]))
    with pytest.raises(MalformedMessage, match="multifd-1") as info:
        decode_message(decoder.next_frame(), channel="multifd-1")
    assert isinstance(info.value, ProtocolError)
