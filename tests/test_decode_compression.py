"""Decode-time compression (G-KV schedule) on the tiny model: a long
generation runs in a cache that never holds more than budget + N cells."""

import numpy as np
import pytest

from grkv_cpp import CompressedLlama, kvstate
from grkv_cpp.errors import GrkvError

PROMPT = "abc def ghi jkl " * 20


def cells(m):
    return kvstate.parse(kvstate.get_blob(m.ctx)).part_info(0)["n_cells"]


@pytest.mark.parametrize("method", ["gkv", "snapkv", "gkv+grkv"])
def test_thousand_tokens_stay_within_budget_plus_n(tiny_gguf, method):
    budget, every = 160, 128
    m = CompressedLlama(tiny_gguf, n_ctx=512, n_batch=128)
    m.prefill(PROMPT)
    m.decode_compression(budget, every=every, method=method)
    seen = []
    for _ in m.generate(1000, ignore_eos=True, temperature=0.8):
        seen.append(m._live)
    assert m.stats.generated_tokens == 1000
    assert m.llm.n_tokens > 2 * m.n_ctx  # positions ran far past the context's size
    assert max(seen) <= budget + every and max(m.decode_trace) <= budget + every
    assert cells(m) == m._live <= budget + every
    n_expected = (m.stats.context_tokens + 999 - budget) // every
    assert abs(m.stats.decode_compressions - n_expected) <= 1
    lo, hi = kvstate.pos_range(m.ctx)
    assert hi == m.llm.n_tokens - 1
    if method.startswith("gkv"):  # the kept cells' global scores become the next history
        assert m._gkv_hist.shape == (m.info.n_layer, m.info.n_head_kv, budget)
        assert np.isfinite(m._gkv_hist).all() and m._gkv_hist.max() <= 1.0 + 1e-6


def test_ask_restores_the_context_after_decode_compression(tiny_gguf):
    m = CompressedLlama(tiny_gguf, n_ctx=512, n_batch=128)
    m.prefill(PROMPT)
    before = kvstate.get_blob(m.ctx)
    m.decode_compression(100, every=16)
    m.ask("abc", max_tokens=60, ignore_eos=True)
    assert m.stats.decode_compressions >= 2
    assert kvstate.get_blob(m.ctx) == before  # the next question sees the same context
    a1 = m.ask("abc", max_tokens=40, ignore_eos=True)
    a2 = m.ask("abc", max_tokens=40, ignore_eos=True)
    assert a1 == a2


def test_decode_compression_rejects_bad_settings(tiny_gguf):
    m = CompressedLlama(tiny_gguf, n_ctx=256, n_batch=64)
    with pytest.raises(GrkvError, match="window"):
        m.decode_compression(8, method="gkv", window_size=16)
    with pytest.raises(GrkvError, match=">= 1"):
        m.decode_compression(100, every=0)
    with pytest.raises(ValueError, match="unknown"):
        m.decode_compression(100, method="nope")
