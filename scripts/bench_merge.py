#!/usr/bin/env python
"""Merge methods against eviction only: held-out attention-output error per
layer, teacher-forced KL of a continuation against the full cache, and
compression time as a share of prefill. One prefill per (model, length); each
method and ratio compresses a restored copy of the full cache. Writes JSON.

    python scripts/bench_merge.py --models smollm2,gemma3 --lengths 1024,2048,4096 \\
        --ratios 0.5,0.25,0.1 --out results/merge.json

`--repeat N` times each compression N times and reports the median.
A method may carry GRKV parameters after a slash, `snapkv+grkv/cg_iters=4`
(several joined by `;`), to measure what a cheaper fit costs in error.

Held-out queries are those of a question asked after the context (never seen
by the fit). The error of layer l is ||O_comp - O_full|| / ||O_full|| over the
question's tokens and all query heads, where O_comp is attention over each
head's compressed slots plus the question's own keys, with the question's
queries and K/V taken from the full-cache run (isolates the layer's error).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from grkv_cpp import kvstate  # first: it points llama-cpp-python at the patched libllama
import llama_cpp.llama_cpp as L  # noqa: E402
from grkv_cpp._native import SeqState
from grkv_cpp.capture import QUERIES
from grkv_cpp.compressor import capture_positions, captured_queries, compress_cache
from grkv_cpp.llm import CompressedLlama
from grkv_cpp.loader import quiet
from grkv_cpp.methods import parse_method
from grkv_cpp.models import resolve_model
from grkv_cpp.texts import haystack, passkey_needle

METHODS = ["snapkv", "snapkv+merge", "snapkv+pivot", "snapkv+weighted", "snapkv+grkv", "snapkv+grkv:stratified"]


def context_for(m, n_tokens, needle):
    def count(n):
        return len(m._tokens_for(haystack(n, [(0.5, needle)])))

    base, per = count(0), (count(20) - count(0)) / 20
    return haystack(max(0, int((n_tokens - base) / per)), [(0.5, needle)])


def eval_logits(m, tokens):
    """Decode tokens at the current position with logits for every token."""
    llm = m.llm
    out = []
    for i in range(0, len(tokens), llm.n_batch):
        chunk = tokens[i: i + llm.n_batch]
        llm._batch.set_batch(batch=chunk, n_past=llm.n_tokens, logits_all=True)
        llm._ctx.decode(llm._batch)
        llm.n_tokens += len(chunk)
        n_vocab = llm.n_vocab()
        for j in range(len(chunk)):
            out.append(np.ctypeslib.as_array(L.llama_get_logits_ith(m.ctx, j), shape=(n_vocab,)).copy())
    return np.array(out)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def attn(q, k, v, scale, offset):
    """q [n, d] over keys [m, d]; query i sees keys j <= offset + i."""
    lg = q @ k.T * scale
    n, mm = lg.shape
    lg = np.where(np.arange(mm)[None, :] > offset + np.arange(n)[:, None], -np.inf, lg)
    lg -= lg.max(-1, keepdims=True)
    p = np.exp(lg)
    return (p / p.sum(-1, keepdims=True)) @ v


def heldout_errors(info, full, comp, q_rows, n_ctx, n_q):
    """Per cache layer: relative error of compressed vs full attention outputs."""
    H, Hkv, d = info.n_head, info.n_head_kv, info.head_dim
    G = H // Hkv
    errs = []
    for ci in range(len(info.cache_layers)):
        Kf = full.keys(0, ci).reshape(-1, Hkv, d).astype(np.float64)
        Vf = full.values(0, ci).reshape(-1, Hkv, d).astype(np.float64)
        Kc = comp.keys(0, ci).reshape(-1, Hkv, d).astype(np.float64)
        Vc = comp.values(0, ci).reshape(-1, Hkv, d).astype(np.float64)
        q = q_rows[ci].astype(np.float64)  # [n_q, H, d]
        num = den = 0.0
        for hq in range(H):
            kv = hq // G
            of = attn(q[:, hq], Kf[:, kv], Vf[:, kv], info.attn_scale, n_ctx)
            kq, vq = Kf[n_ctx:, kv], Vf[n_ctx:, kv]
            k = np.concatenate([Kc[:, kv], kq])
            v = np.concatenate([Vc[:, kv], vq])
            oc = attn(q[:, hq], k, v, info.attn_scale, len(Kc))
            num += ((oc - of) ** 2).sum()
            den += (of ** 2).sum()
        errs.append(float(np.sqrt(num / den)))
    return errs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--ratios", default="0.5,0.25,0.1")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1,
                    help="compressions per method and ratio; the time is their median (the machine is noisy)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    rows = []
    needle = passkey_needle(84606)
    for name in a.models.split(","):
        for n_tokens in map(int, a.lengths.split(",")):
            with quiet():
                m = CompressedLlama(resolve_model(name), n_ctx=n_tokens + 256, n_threads=a.threads)
            info = m.info
            ctx_tokens = m._tokens_for(context_for(m, n_tokens, needle))
            T = len(ctx_tokens)
            q_tokens = m._question_tokens(needle.question)
            cont = m.tokenize(f" The pass key is {needle.answer}. It was hidden in the text.", bos=False)
            # plain prefill, for the time reference
            t0 = time.perf_counter()
            m._prefill(ctx_tokens)
            prefill_plain = time.perf_counter() - t0
            # prefill capturing the window and the strata (what GRKV's modes need)
            _, merge = parse_method("snapkv+grkv", query_mode="stratified")
            method, _ = parse_method("snapkv")
            positions, whole = capture_positions(T, method, merge)
            t0 = time.perf_counter()
            m._prefill(ctx_tokens, positions, whole=True)
            prefill_capture = time.perf_counter() - t0
            captured = captured_queries(m.capture, info)
            full_blob = kvstate.get_blob(m.ctx)
            # held-out queries and K/V: the question, evaluated on the full cache
            m.capture.set_targets([(*QUERIES, list(range(T, T + len(q_tokens))))])
            with m.capture.enabled():
                full_logits = eval_logits(m, q_tokens + cont)
            q_rows = [q.reshape(-1, info.n_head, info.head_dim)[: len(q_tokens)] for q, _ in captured_queries(m.capture, info)]
            full_state = SeqState(kvstate.get_blob(m.ctx))
            lp_full = log_softmax(full_logits[len(q_tokens) - 1: -1])
            tgt = np.array(cont)
            nll_full = float(-lp_full[np.arange(len(cont)), tgt].mean())
            for ratio in map(float, a.ratios.split(",")):
                for spec in a.methods.split(","):
                    spec_m, _, extra = spec.partition("/")  # snapkv+grkv/cg_iters=4: a merge parameter
                    mspec, _, mode = spec_m.partition(":")
                    kw = {"query_mode": mode} if mode else {}
                    for kv in filter(None, extra.split(";")):
                        key, _, val = kv.partition("=")
                        kw[key] = json.loads(val)  # as `eval --param` reads values
                    meth, mrg = parse_method(mspec, **kw)
                    times = []
                    for _ in range(max(1, a.repeat)):
                        assert kvstate.set_blob(m.ctx, full_blob)
                        m.llm.n_tokens = T
                        res = compress_cache(m.ctx, info, meth, merge=mrg, ratio=ratio, captured=captured,
                                             n_threads=a.threads)
                        times.append(res.seconds)
                    seconds = statistics.median(times)
                    comp_blob = kvstate.get_blob(m.ctx)
                    logits = eval_logits(m, q_tokens + cont)
                    lp = log_softmax(logits[len(q_tokens) - 1: -1])
                    kl = float((np.exp(lp_full) * (lp_full - lp)).sum(-1).mean())
                    nll = float(-lp[np.arange(len(cont)), tgt].mean())
                    errs = heldout_errors(info, full_state, SeqState(comp_blob), q_rows, T, len(q_tokens))
                    row = dict(model=name, context_tokens=T, ratio=ratio, method=spec, kept=res.cells_after,
                               heldout_err_mean=float(np.mean(errs)), heldout_err_per_layer=errs, kl=kl,
                               nll=nll, nll_full=nll_full, compress_s=seconds, compress_runs_s=times,
                               prefill_s=prefill_plain, prefill_capture_s=prefill_capture,
                               compress_share=seconds / prefill_plain,
                               grkv_choice=res.merge_report.get("choice"),
                               grkv_timing=res.merge_report.get("timing"), apply=res.merge_report.get("apply"))
                    rows.append(row)
                    print(f"{name:8s} T={T:5d} r={ratio:.2f} {spec:24s} err={row['heldout_err_mean']:.4f} "
                          f"KL={kl:.4f} compress={seconds:.2f}s ({100 * row['compress_share']:.1f}% of "
                          f"{prefill_plain:.1f}s prefill)", flush=True)
                    if a.out:
                        a.out.parent.mkdir(parents=True, exist_ok=True)
                        a.out.write_text(json.dumps(rows, indent=2))
            m.close()


if __name__ == "__main__":
    main()
