#!/usr/bin/env python
"""Average scores of several evaluation runs on the questions they share.

    python scripts/compare_runs.py results/eval_smollm2_1k_20/results.jsonl \\
        results/eval_smollm2_1k_scorers/results.shard*.jsonl results/kvpress_scorers/kvpress_50.jsonl \\
        --methods full,compactor,kvpress:compactor-adakv --ratios 1,0.5 [--json out.json]

Rows are grkv-cpp's (`grkv-cpp eval`) or kvpress's (`scripts/bench_kvpress.py`,
labelled `kvpress:<method>`). A question is (task, sample, question index);
only questions that every selected (engine:method, ratio) answered count, so
the averages compare like with like. Scores x100; `of_full` is the share of
the `full` row's average when one is selected."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def load(paths):
    rows = {}
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                label = ("kvpress:" if r.get("engine") == "kvpress" else "") + r["method"]
                rows[(label, float(r["ratio"]), r["task"], int(r["sample"]), int(r["qid"]))] = r
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--methods", default=None, help="comma list of labels (default: all)")
    ap.add_argument("--ratios", default=None, help="comma list of kept ratios (default: all)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    rows = load(a.files)
    want_m = set(a.methods.split(",")) if a.methods else None
    want_r = {float(x) for x in a.ratios.split(",")} if a.ratios else None
    configs = sorted({(m, r) for (m, r, *_) in rows if (not want_m or m in want_m) and (not want_r or r in want_r)
                      and (m.split(":")[-1] != "full" or r == 1.0)})
    if not configs:
        raise SystemExit("no rows match")
    per = defaultdict(set)
    for (m, r, t, s, q) in rows:
        per[(m, r)].add((t, s, q))
    common = set.intersection(*(per[c] for c in configs))
    if not common:
        raise SystemExit("the selected runs share no question")
    out = []
    full = None
    for m, r in configs:
        scores = [rows[(m, r, *k)]["score"] for k in common]
        avg = sum(scores) / len(scores)
        if m == "full":
            full = avg
        out.append({"method": m, "ratio": r, "questions": len(scores), "average": avg})
    for o in out:
        o["of_full"] = None if full is None else o["average"] / full
    print(f"{len(common)} shared questions, {len({(t, s) for t, s, _ in common})} contexts")
    print(f"{'method':28s} {'kept':>5s} {'average':>8s} {'of full':>8s}")
    for o in out:
        of = "" if o["of_full"] is None else f"{100 * o['of_full']:7.0f}%"
        print(f"{o['method']:28s} {o['ratio']:5.2f} {o['average']:8.1f} {of:>8s}")
    if a.json:
        a.json.write_text(json.dumps({"questions": len(common), "rows": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
