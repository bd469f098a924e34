#!/usr/bin/env python
"""Markdown tables from bench_merge.py's JSON.

    python scripts/report_merge.py results/merge.json
"""

import json
import sys
from collections import defaultdict


def main():
    rows = json.load(open(sys.argv[1]))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    groups = defaultdict(dict)
    for r in rows:
        groups[(r["model"], r["context_tokens"], r["ratio"])][r["method"]] = r
    def table(title, fmt):
        print(f"{title}\n")
        print("| model | tokens | kept | " + " | ".join(methods) + " |")
        print("|---|---|---|" + "---|" * len(methods))
        for (model, T, ratio), g in groups.items():
            print(f"| {model} | {T} | {ratio:g} | " + " | ".join(fmt(g[m]) if m in g else "" for m in methods) + " |")
        print()

    table("Held-out attention-output error (mean over layers; lower is better)",
          lambda r: f"{r['heldout_err_mean']:.4f}")
    table("Teacher-forced KL(full || compressed) of a continuation, nats per token", lambda r: f"{r['kl']:.3f}")
    print("Compression time as a share of prefill time (2 threads)\n")
    print("| model | tokens | kept | prefill s | " + " | ".join(methods) + " |")
    print("|---|---|---|---|" + "---|" * len(methods))
    for (model, T, ratio), g in groups.items():
        pre = next(iter(g.values()))["prefill_s"]
        cells = [f"{100 * g[m]['compress_share']:.1f}% ({g[m]['compress_s']:.2f}s)" if m in g else "" for m in methods]
        print(f"| {model} | {T} | {ratio:g} | {pre:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
