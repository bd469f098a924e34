"""SmolLM2 end to end: a pass key hidden in ~900 tokens of filler is found
from a compressed cache, at several depths. Settings follow
scripts/bench_passkey.py's measurements: kvpress's defaults (kernel 5, per
head) lose digits of the key on this 135M model, wider pooling (kernel 15)
fixes query-aware compression, and query-agnostic compression also needs
one shared token set (see README, "Measurements")."""

import random

import pytest

from grkv_cpp.llm import CompressedLlama
from grkv_cpp.loader import quiet
from grkv_cpp.texts import haystack, passkey_needle

DEPTHS = [0.1, 0.3, 0.5, 0.7, 0.9]


@pytest.fixture(scope="module")
def model(smollm2_gguf):
    with quiet():
        return CompressedLlama(smollm2_gguf, n_ctx=2048)


def cases():
    rng = random.Random(1)
    return [(d, passkey_needle(rng.randint(10000, 99999))) for d in DEPTHS]


@pytest.mark.slow
def test_full_cache_finds_the_key(model):
    for depth, nd in cases():
        model.prefill(haystack(36, [(depth, nd)]))
        assert nd.answer in model.ask(nd.question, max_tokens=12), depth


@pytest.mark.slow
@pytest.mark.parametrize("shared", [False, True])
def test_query_aware_snapkv_keeping_25_percent(model, shared):
    for depth, nd in cases():
        ctx = haystack(36, [(depth, nd)])
        ans = model.answer_query_aware(ctx, nd.question, method="snapkv", ratio=0.25, kernel=15, shared=shared,
                                       max_tokens=12)
        st = model.stats
        assert st.kv_cells_after == round(0.25 * (st.context_tokens + st.question_tokens - 1))
        assert nd.answer in ans, (depth, ans)


@pytest.mark.slow
def test_query_agnostic_snapkv_keeping_50_percent(model):
    for depth, nd in cases():
        ctx = haystack(36, [(depth, nd)])
        st = model.compress(ctx, method="snapkv", ratio=0.5, kernel=15, shared=True)
        assert st.kv_cells_after == round(0.5 * st.context_tokens)
        assert st.kv_bytes_after < 0.51 * st.kv_bytes_before
        assert nd.answer in model.ask(nd.question, max_tokens=12), depth
        # a second question reuses the same compressed context
        assert nd.answer in model.ask(nd.question, max_tokens=12), depth
