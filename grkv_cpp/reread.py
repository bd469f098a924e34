"""The re-read pass of context reconstruction (KVzip-style scoring).

After the context's prefill the model is asked to repeat it, and the context
is teacher-forced again in chunks at the positions after it. Each chunk's
queries and keys are captured for every cache layer, then the chunk's cells
are removed, so the cache holds exactly the context again (tested byte for
byte against the state blob)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from . import kvstate
from .capture import QUERIES
from .errors import CompressionError

KEYS = ("Kcur", "ROPE", 2)  # post-RoPE keys [head_dim, n_head_kv, T]
FIRST = "Repeat the previous context exactly."
LATER = "Repeat the part of the previous context exactly, starting with"


@dataclass
class Reread:
    """Per cache layer: (queries [w, n_head, d], positions [w], keys
    [w, n_head_kv, d], chunk of each query [w]); `chunks` holds each chunk's
    context token range [lo, hi)."""

    layers: list
    chunks: list
    tokens: int      # tokens the pass evaluated
    seconds: float


def chunk_inputs(model, tokens: list[int], n_prefix: int, chunk: int, overlap: int):
    """Per chunk: (token range of the context it re-reads, the pass's input).
    The prompt goes through the model's own question template, so chat models
    get their end-of-turn and assistant header before the repeated text."""
    before, _, after = model._format.question_template.partition("{question}")
    tail = model.tokenize(after.replace("{{", "{").replace("}}", "}"), bos=False)
    head = model.tokenize(before, bos=False) if before else []
    out = []
    for lo in range(n_prefix, len(tokens), chunk):
        hi = min(lo + chunk, len(tokens))
        if lo == n_prefix:
            prompt = head + model.tokenize(FIRST, bos=False)
        else:
            prompt = head + model.tokenize(LATER, bos=False) + tokens[max(n_prefix, lo - overlap): lo]
        out.append(((lo, hi), prompt + tail + tokens[lo:hi]))
    return out


def run(model, tokens: list[int], n_prefix: int, *, chunk: int = 2048, overlap: int = 8) -> Reread:
    """Re-read the context whose `tokens` fill sequence 0 (positions
    0..len-1) and return what the scorer needs. The cache is left as it was;
    on failure too."""
    n = len(tokens)
    if model.llm.n_tokens != n:
        raise CompressionError(f"the re-read pass needs the context's {n} tokens in the cache, it holds "
                               f"{model.llm.n_tokens}")
    if n_prefix >= n:
        raise CompressionError("nothing to re-read: the context is all template prefix")
    inputs = chunk_inputs(model, tokens, n_prefix, chunk, overlap)
    longest = max(len(x) for _, x in inputs)
    if model._live + longest > model.n_ctx:
        raise CompressionError(f"the re-read pass needs {longest} cells beyond the context's {model._live}; "
                               f"create the model with n_ctx >= {model._live + longest}")
    # A sliding-window cache sized for its window would lose the context's last
    # window to the re-read tokens: keep its state and put it back afterwards.
    saved = kvstate.get_blob(model.ctx) if model.info.iswa and not model.swa_full else None
    t0 = time.perf_counter()
    per_layer = {il: ([], [], [], []) for il in model.info.cache_layers}
    evaluated = 0
    try:
        for c, ((lo, hi), ids) in enumerate(inputs):
            pos = list(range(n, n + len(ids)))
            model.capture.set_targets([(*QUERIES, pos), (*KEYS, pos)])
            try:
                with model.capture.enabled():
                    model._eval(ids)
            finally:
                kvstate.remove_from(model.ctx, n)
                model._live -= model.llm.n_tokens - n
                model.llm.n_tokens = n
            evaluated += len(ids)
            info = model.info
            for il in info.cache_layers:
                q = model.capture.rows(0, il)
                qp = model.capture.positions(0, il)
                k = model.capture.rows(1, il)
                if len(q) != len(ids) or len(k) != len(ids):
                    raise CompressionError(f"re-read chunk {c}, layer {il}: captured {len(q)} queries and {len(k)} "
                                           f"keys for {len(ids)} tokens")
                acc = per_layer[il]
                acc[0].append(q.reshape(len(ids), info.n_head, info.head_dim))
                acc[1].append(qp.astype(np.int32))
                acc[2].append(k.reshape(len(ids), info.n_head_kv, info.head_dim))
                acc[3].append(np.full(len(ids), c, np.int32))
    finally:
        model.capture.clear()
        if saved is not None and not kvstate.set_blob(model.ctx, saved):
            raise CompressionError("could not restore the cache after the re-read pass")
    layers = [tuple(np.ascontiguousarray(np.concatenate(a)) for a in per_layer[il]) for il in model.info.cache_layers]
    return Reread(layers, [r for r, _ in inputs], evaluated, time.perf_counter() - t0)
