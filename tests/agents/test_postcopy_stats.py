"""Postcopy fault-latency statistics: QEMU's histogram and godwit's exact percentiles."""

import numpy as np

from agents.migration import LATENCY_SAMPLES, PostcopyStats


def test_histogram_buckets_are_powers_of_two_of_microseconds() -> None:
    st = PostcopyStats()
    for us in (1, 2, 3, 255, 256, 511, 512, 1500):
        st.record_latency(us * 1000)
    dist = st.info()["postcopy-latency-dist"]
    assert dist[:11] == [1, 2, 0, 0, 0, 0, 0, 1, 2, 1, 1]
    assert st.info()["postcopy-latency"] == sum((1, 2, 3, 255, 256, 511, 512, 1500)) * 1000 // 8


def test_percentiles_are_exact_where_the_histogram_is_not() -> None:
    st = PostcopyStats()
    assert st.info()["x-postcopy-latency-percentiles"] == {}
    values = np.arange(1, 1001) * 1000  # 1 .. 1000 µs, shuffled
    np.random.default_rng(3).shuffle(values)
    for v in values.tolist():
        st.record_latency(v)
    pct = st.info()["x-postcopy-latency-percentiles"]
    assert pct == {"p50": 500, "p90": 900, "p99": 990, "max": 1000, "samples": 1000}
    # Bucket [256, 512) µs holds the median, which the histogram alone cannot place.
    assert st.info()["postcopy-latency-dist"][8] == 256


def test_percentiles_cover_the_most_recent_window_and_max_covers_all() -> None:
    st = PostcopyStats()
    st.record_latency(9_000_000)  # one slow fault early on
    for _ in range(LATENCY_SAMPLES):
        st.record_latency(100_000)
    pct = st.info()["x-postcopy-latency-percentiles"]
    assert (pct["p99"], pct["max"], pct["samples"]) == (100, 9000, LATENCY_SAMPLES)
