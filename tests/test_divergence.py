"""Teacher-forced divergence from the full cache (tiny model), against a
numpy recomputation and the identities KL(p||p) = 0, KL >= 0."""

import numpy as np
import pytest

from grkv_cpp import CompressedLlama, kvstate
from grkv_cpp.eval.divergence import kl_and_nll, run_divergence

TEXT = "the quick brown fox jumps over the lazy dog and runs away " * 30


def test_kl_and_nll_against_hand_values():
    p = np.log(np.array([[0.5, 0.25, 0.25]]))
    q = np.log(np.array([[0.25, 0.5, 0.25]]))
    kl, nf, nq = kl_and_nll(p, q, np.array([1]))
    assert kl[0] == pytest.approx(0.5 * np.log(2) + 0.25 * np.log(0.5))
    assert nf[0] == pytest.approx(np.log(4)) and nq[0] == pytest.approx(np.log(2))


def test_divergence_rows(tiny_gguf):
    m = CompressedLlama(tiny_gguf, n_ctx=512, n_batch=128)
    rows = run_divergence(m, TEXT, context_tokens=200, continuation=48, methods=["knorm", "snapkv"],
                          ratios=[1.0, 0.25])
    by = {(r["method"], r["ratio"]): r for r in rows}
    for meth in ("knorm", "snapkv"):
        assert by[(meth, 1.0)]["kl_mean"] == pytest.approx(0.0, abs=1e-6)  # nothing evicted: same cache
        assert by[(meth, 1.0)]["top1_agree"] == 1.0
        assert by[(meth, 0.25)]["kl_mean"] > 1e-5 and by[(meth, 0.25)]["kv_cells"] == 50
        assert np.isfinite(by[(meth, 0.25)]["ppl"])
    # the continuation is removed again: the context's cache is unchanged afterwards
    assert m.llm.n_tokens == 200
    assert kvstate.pos_range(m.ctx)[1] == 199  # no continuation cell stays
