"""Benchmark: encode + decode of 1 MiB PAGES frames beside a plain memory copy.

The receive side of a channel cannot beat one copy of every byte from the
socket (or TLS) buffer into its final place, so the baseline is exactly that
copy, measured here in the same run on the same bytes and in the same chunk
sizes.  Two receive paths are measured: ``feed()`` with 64–256 KiB chunks
(what a plain ``recv`` loop does) and ``get_buffer()``/``buffer_updated()``
(what a TLS layer decrypting into frame memory does; the bench's "read" is a
copy from the stream, standing in for the decrypt).  Encoding is included
(it builds headers only: page data goes out as the caller's memoryview).

Run: ``python bench/frames.py``.  Takes a few seconds.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import numpy as np

from protocol.frames import FrameDecoder
from protocol.messages import Message, Pages, decode_message

FRAME = 1 << 20
PAGE = 4096
NFRAMES = 64
REPEATS = 7


def best_of(fns: list[Callable[[], object]]) -> list[float]:
    """Best time of each, measured in interleaved rounds so machine noise hits all alike."""
    best = [float("inf")] * len(fns)
    for _ in range(REPEATS):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def main() -> None:
    rng = np.random.default_rng(1)
    guest = rng.integers(0, 256, NFRAMES * FRAME, dtype=np.uint8)
    ram = memoryview(guest)
    pages_per_frame = FRAME // PAGE

    def encode() -> list[list[bytes | memoryview]]:
        return [
            Pages(
                0, i * pages_per_frame, pages_per_frame, ram[i * FRAME : (i + 1) * FRAME]
            ).encode()
            for i in range(NFRAMES)
        ]

    stream = b"".join(b"".join(bytes(p) for p in parts) for parts in encode())
    wire = memoryview(stream)
    total = len(stream)
    sizes = rng.integers(64 << 10, (256 << 10) + 1, total // (64 << 10) + 2)
    cuts = np.minimum(np.concatenate([[0], np.cumsum(sizes)]), total)
    cuts = np.unique(cuts).tolist()
    chunks = [wire[a:b] for a, b in itertools.pairwise(cuts)]

    def check(count: int, last: Message | None) -> None:
        assert count == NFRAMES
        assert isinstance(last, Pages) and bytes(last.data[-8:]) == guest[-8:].tobytes()

    def decode_feed() -> None:
        # a receiver handles each frame (pwrite, UFFDIO_COPY) and drops it
        dec = FrameDecoder(channel="bench")
        count, last = 0, None
        for chunk in chunks:
            dec.feed(chunk)
            for f in dec.frames():
                last = decode_message(f)
                count += 1
        check(count, last)

    def decode_buffer() -> None:
        dec = FrameDecoder(channel="bench")
        count, last = 0, None
        for chunk in chunks:
            pos = 0
            while pos < len(chunk):
                buf = dec.get_buffer(len(chunk) - pos)
                n = min(len(buf), len(chunk) - pos)
                buf[:n] = chunk[pos : pos + n]
                dec.buffer_updated(n)
                pos += n
            for f in dec.frames():
                last = decode_message(f)
                count += 1
        check(count, last)

    # The baseline copies the same chunks into one reused frame-sized buffer,
    # as a receiver that handles and drops each frame touches the same memory.
    dest = np.empty(FRAME, dtype=np.uint8)
    dview = memoryview(dest)

    def baseline_copy() -> None:
        off = 0
        for chunk in chunks:
            pos = 0
            while pos < len(chunk):
                n = min(len(chunk) - pos, FRAME - off)
                dview[off : off + n] = chunk[pos : pos + n]
                pos += n
                off = (off + n) % FRAME

    t_copy, t_enc, t_feed, t_buf = best_of([baseline_copy, encode, decode_feed, decode_buffer])

    def gbps(t: float) -> float:
        return total / t / 1e9

    print(
        f"{NFRAMES} PAGES frames of 1 MiB ({total / 2**20:.0f} MiB), "
        f"chunks of 64-256 KiB, best of {REPEATS}"
    )
    print(f"  baseline: memory copy of the same bytes      {gbps(t_copy):6.2f} GB/s   1.00x")
    print(f"  encode only (headers; data by reference)     {gbps(t_enc):6.2f} GB/s  ", end="")
    print(f"{t_copy / t_enc:5.2f}x")
    for name, t in (("feed()", t_feed), ("get_buffer()/buffer_updated()", t_buf)):
        both = t_enc + t
        print(
            f"  encode + decode via {name:<30} {gbps(both):5.2f} GB/s  "
            f"{t_copy / both:5.2f}x of the copy"
        )


if __name__ == "__main__":
    main()
