"""KV footprint and peak against hand-computed values."""

import pytest

from grkv_cpp.footprint import simulate


def test_full_cache_is_one():
    f = simulate(10, 0)
    assert (f.area, f.peak_entries, f.footprint, f.peak) == (55, 10, 1.0, 1.0)
    f = simulate(10, 5, chunk=3)  # chunking alone changes nothing for a full cache
    assert f.footprint == pytest.approx(1.0) and f.peak == 1.0


def test_post_fill_eviction():
    # prefill 1+..+10 = 55 (peak 10), evict to 4, decode: 5 + 6
    f = simulate(10, 2, budget=4)
    assert f.area == 66 and f.peak_entries == 10
    assert f.footprint == pytest.approx(66 / 78) and f.peak == pytest.approx(10 / 12)


def test_chunked_eviction():
    # chunk [0,4): 10 + 0*4 = 10, peak 4, past 4
    # chunk [4,8): 10 + 4*4 = 26, peak 8, past 8 -> 4
    # chunk [8,10): 3 + 4*2 = 11, peak 6, past 6 -> 4
    # decode: 5 + 6 = 11
    f = simulate(10, 2, chunk=4, budget=4, evict_during_prefill=True)
    assert f.area == 58 and f.peak_entries == 8
    assert f.footprint == pytest.approx(58 / 78) and f.peak == pytest.approx(8 / 12)


def test_decode_time_eviction():
    # prompt 4 in one step: 10, past 4 (budget 4); decode with eviction every 2 tokens:
    # 5, 6 -> 4, 5, 6 -> 4 : 5 + 6 + 5 + 6 = 22
    f = simulate(4, 4, budget=4, decode_every=2)
    assert f.area == 32 and f.peak_entries == 6


def test_bad_input():
    with pytest.raises(ValueError):
        simulate(0)
    with pytest.raises(ValueError):
        simulate(10, budget=0)
