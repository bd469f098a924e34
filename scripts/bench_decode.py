#!/usr/bin/env python
"""Decode-time compression: a long greedy continuation generated with the
full cache is fed back teacher-forced through caches re-compressed every N
tokens (G-KV and others); reports the mean extra negative log-likelihood per
token against the full cache (all tokens, and the second half, where every
budgeted run has been compressed several times), the cells held at most and
decode tokens/s (compression included).

    python scripts/bench_decode.py --model smollm2 --tokens 768 --out results/decode_smollm2.json
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from grkv_cpp.llm import CompressedLlama
from grkv_cpp.loader import quiet
from grkv_cpp.models import resolve_model
from grkv_cpp.texts import demo_context


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=768, help="generated tokens")
    ap.add_argument("--configs", default="gkv:256,gkv:512,snapkv:256,snapkv:512,streaming:256,streaming:512")
    ap.add_argument("--every", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    context, _ = demo_context()
    with quiet():
        m = CompressedLlama(resolve_model(a.model), n_ctx=4096, n_threads=a.threads)
    question = "Retell the text above as a long story, sentence by sentence."
    m.prefill(context)
    q = m._question_tokens(question)
    # the reference continuation: greedy with the full cache (EOS ignored)
    m._eval(q)
    t0 = time.perf_counter()
    ref_text = "".join(m.generate(a.tokens + 1, ignore_eos=True))
    full_tps = a.tokens / (time.perf_counter() - t0)
    ref = m.tokenize(ref_text, bos=False)[: a.tokens]
    rows = []
    for cfg in ["full"] + a.configs.split(","):
        m.prefill(context)
        method, _, b = cfg.partition(":")
        m.decode_compression(None if method == "full" else int(b), every=a.every,
                             method="gkv" if method == "full" else method)
        m._eval(q)
        t0 = time.perf_counter()
        lp = []
        for tok in ref:  # one token at a time, as generation runs
            z = m.logprobs([tok])
            lp.append(z[0])
        dt = time.perf_counter() - t0
        rows.append(dict(config=cfg, budget=int(b) if b else None, every=a.every, tokens=len(ref),
                         context_tokens=m.stats.context_tokens, question_tokens=len(q), nll=-float(np.mean(lp)),
                         logprobs=[float(x) for x in lp], decode_compressions=m.stats.decode_compressions,
                         max_cells=max(m.decode_trace) if m.decode_trace else m._live, tok_s=len(ref) / dt))
        print(f"{cfg:14s} NLL {rows[-1]['nll']:.3f}  compressions {rows[-1]['decode_compressions']:3d}  "
              f"max cells {rows[-1]['max_cells']:5d}  {rows[-1]['tok_s']:.1f} tok/s", flush=True)
    full = np.array(rows[0]["logprobs"])
    for r in rows:
        lp = np.array(r["logprobs"])
        r["delta_nll"] = float(np.mean(full - lp))
        r["delta_nll_tail"] = float(np.mean((full - lp)[len(lp) // 2:]))
    summary = [{k: v for k, v in r.items() if k != "logprobs"} for r in rows]
    for r in summary:
        print(f"{r['config']:14s} dNLL {r['delta_nll']:+.4f} (second half {r['delta_nll_tail']:+.4f})")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(dict(model=a.model, full_generate_tok_s=full_tps, rows=rows), indent=1))


if __name__ == "__main__":
    main()
