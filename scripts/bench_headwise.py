"""What head-wise budgets cost in llama.cpp's cell layout: for each context
scorer, allocation (AdaKV per layer, one global threshold) and nominal kept
ratio, the cells the compressed cache must hold (the busiest head's
allocation) as a fraction of the context. Writes JSON.

    python scripts/bench_headwise.py --model smollm2 --data runs/smollm2_1k_sm.jsonl --limit 6 \
        --out results/headwise_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main(argv=None):
    from grkv_cpp import CompressedLlama
    from grkv_cpp.eval import ruler
    from grkv_cpp.eval.harness import group_rows
    from grkv_cpp.loader import quiet
    from grkv_cpp.methods.context import ALL_QUERIES
    from grkv_cpp.models import resolve_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=6, help="contexts (one per task, in file order)")
    ap.add_argument("--methods", default="compactor,expected,reconstruct")
    ap.add_argument("--ratios", default="0.25,0.5")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    path = resolve_model(a.model)
    groups = group_rows(ruler.read_jsonl(Path(a.data)))[: a.limit]
    with quiet():
        m = CompressedLlama(path, n_ctx=4096, n_threads=a.threads)
    rows = []
    for gi, (context, _) in enumerate(groups):
        st = m.prefill_state(context, window=ALL_QUERIES)
        for meth in a.methods.split(","):
            for hw in ("adakv", "global"):
                for r in map(float, a.ratios.split(",")):
                    s = m.compress_state(st, method=f"{meth}-{hw}", ratio=r)
                    rows.append(dict(group=gi, method=meth, headwise=hw, ratio=r, tokens=s.context_tokens,
                                     cells=s.kv_cells_after, cells_fraction=s.kv_cells_after / s.context_tokens))
                    print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for meth in a.methods.split(","):
        for hw in ("adakv", "global"):
            for r in map(float, a.ratios.split(",")):
                f = [x["cells_fraction"] for x in rows if (x["method"], x["headwise"], x["ratio"]) == (meth, hw, r)]
                summary[f"{meth}-{hw}@{r}"] = dict(median=statistics.median(f), min=min(f), max=max(f))
    Path(a.out).write_text(json.dumps(dict(model=Path(path).stem, rows=rows, summary=summary), indent=1) + "\n")
    for k, v in summary.items():
        print(f"{k:28s} cells/context median {v['median']:.3f} [{v['min']:.3f}, {v['max']:.3f}]")


if __name__ == "__main__":
    main()
