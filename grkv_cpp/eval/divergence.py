"""Divergence from the full cache: prefill a long text's first part once,
compress it with each method and ratio, and compare the teacher-forced
next-token distributions over the continuation with the full cache's
(KL(full || compressed) per token, and perplexities)."""

from __future__ import annotations

import time

import numpy as np


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_and_nll(full_logits: np.ndarray, comp_logits: np.ndarray, targets: np.ndarray):
    """Per position: KL(p_full || p_comp) and both negative log-likelihoods of
    the targets (the tokens that follow)."""
    lp, lq = _log_softmax(full_logits), _log_softmax(comp_logits)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    idx = np.arange(len(targets))
    return kl, -lp[idx, targets], -lq[idx, targets]


def run_divergence(model, text: str, *, context_tokens: int, continuation: int, methods: list[str],
                   ratios: list[float], params: dict | None = None, window: int = 64) -> list[dict]:
    """`text` is cut at `context_tokens` (the compressed context; no chat
    template: it is plain language modelling) and the next `continuation`
    tokens are scored. Returns one row per (method, ratio)."""
    params = params or {}
    toks = model.tokenize(text, bos=True)
    if len(toks) < context_tokens + continuation + 1:
        raise ValueError(f"the text has {len(toks)} tokens; need {context_tokens + continuation + 1}")
    ctx, cont = toks[:context_tokens], toks[context_tokens: context_tokens + continuation + 1]
    state = model.prefill_state(tokens=ctx, window=window)
    model.restore(state)
    full = model.continuation_logits(cont[:-1])
    targets = np.asarray(cont[1:])
    rows = []
    for meth in methods:
        for r in ratios:
            t0 = time.perf_counter()
            kw = {**params.get(meth.split("+")[0], {}), **params.get(meth, {})}  # eviction's, then the pair's
            st = model.compress_state(state, method=meth, ratio=r, **kw)
            comp = model.continuation_logits(cont[:-1])
            kl, nll_full, nll_comp = kl_and_nll(full, comp, targets)
            rows.append(dict(method=meth, ratio=r, context_tokens=len(ctx), continuation=len(targets),
                             kl_mean=float(kl.mean()), kl_median=float(np.median(kl)), kl_max=float(kl.max()),
                             ppl_full=float(np.exp(nll_full.mean())), ppl=float(np.exp(nll_comp.mean())),
                             top1_agree=float((full.argmax(-1) == comp.argmax(-1)).mean()),
                             kv_cells=st.kv_cells_after, seconds=time.perf_counter() - t0))
    return rows
