#!/usr/bin/env python
"""Pass-key retrieval from a compressed cache: methods x kept ratio x
selection mode x SnapKV kernel x depth, query-aware and query-agnostic.
Writes JSON rows and prints a summary.

    python scripts/bench_passkey.py --model smollm2 --out results/passkey_smollm2.json
"""

import argparse
import json
import random
from pathlib import Path

from grkv_cpp.llm import CompressedLlama
from grkv_cpp.loader import quiet
from grkv_cpp.models import resolve_model
from grkv_cpp.texts import haystack, passkey_needle


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--filler", type=int, default=36, help="filler blocks (36 ~ 900 SmolLM2 tokens)")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--ratios", default="0.5,0.25")
    ap.add_argument("--configs", default="snapkv:k5,snapkv:k15,snapkv-shared:k5,snapkv-shared:k15,knorm,knorm-shared,streaming")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    with quiet():
        m = CompressedLlama(resolve_model(a.model), n_ctx=a.n_ctx)
    rng = random.Random(1)
    cases = [(float(d), passkey_needle(rng.randint(10000, 99999))) for d in a.depths.split(",")]
    rows = []
    for depth, nd in cases:
        ctx = haystack(a.filler, [(depth, nd)])
        m.prefill(ctx)
        ans = m.ask(nd.question, max_tokens=12)
        rows.append(dict(config="full", ratio=1.0, mode="-", depth=depth, tokens=m.stats.context_tokens,
                         correct=nd.answer in ans, answer=ans))
    for cfg in a.configs.split(","):
        name, _, k = cfg.partition(":")
        method = name.replace("-shared", "")
        kw = dict(shared=name.endswith("-shared"))
        if k:
            kw["kernel"] = int(k[1:])
        for ratio in map(float, a.ratios.split(",")):
            for depth, nd in cases:
                ctx = haystack(a.filler, [(depth, nd)])
                st = m.compress(ctx, method=method, ratio=ratio, **kw)
                ans = m.ask(nd.question, max_tokens=12)
                rows.append(dict(config=cfg, ratio=ratio, mode="agnostic", depth=depth, tokens=st.context_tokens,
                                 cells=st.kv_cells_after, correct=nd.answer in ans, answer=ans))
                ans = m.answer_query_aware(ctx, nd.question, method=method, ratio=ratio, max_tokens=12, **kw)
                rows.append(dict(config=cfg, ratio=ratio, mode="aware", depth=depth, tokens=m.stats.context_tokens,
                                 cells=m.stats.kv_cells_after, correct=nd.answer in ans, answer=ans))
            for mode in ("agnostic", "aware"):
                sel = [r for r in rows if r["config"] == cfg and r["ratio"] == ratio and r["mode"] == mode]
                print(f"{cfg:20s} ratio {ratio:.2f} {mode:8s} {sum(r['correct'] for r in sel)}/{len(sel)}", flush=True)
            if a.out:  # written as it goes, so an interrupted run keeps its rows
                a.out.parent.mkdir(parents=True, exist_ok=True)
                a.out.write_text(json.dumps(rows, indent=2))
    full = [r for r in rows if r["config"] == "full"]
    print(f"{'full':20s} ratio 1.00          {sum(r['correct'] for r in full)}/{len(full)}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
