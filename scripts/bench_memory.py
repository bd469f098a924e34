#!/usr/bin/env python
"""Bounded memory: full cache against budgeted prefill (compress back to a
budget after every chunk) on pass-key contexts of growing length.

Per (length, config, depth) one fresh process (so peak RSS is that run's):
KV buffer bytes allocated, peak RSS, KV footprint and peak (spec §8.3),
prefill tokens/s (compression included), decode tokens/s (64 tokens after
the answer, EOS ignored) and whether the pass key was answered. Rows are
appended to the JSON as they finish and a rerun skips rows already there,
so an interrupted run resumes. Depths run in the outer loop: after the first
pass every (length, config) has its memory and speed figures.

    python scripts/bench_memory.py --model gemma3 --out results/memory_gemma3.json
    python scripts/bench_memory.py --report results/memory_gemma3.json
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from statistics import median

TOKENS_PER_FILLER = 24  # Gemma-3 and SmolLM2 tokenise a filler block to ~24 tokens


def run_one(spec: dict) -> dict:
    from grkv_cpp import kvstate
    from grkv_cpp.llm import CompressedLlama
    from grkv_cpp.loader import quiet
    from grkv_cpp.models import resolve_model
    from grkv_cpp.texts import haystack, passkey_needle

    key = random.Random(int(spec["depth"] * 1000) + spec["length"]).randint(10000, 99999)
    nd = passkey_needle(key)
    ctx = haystack(max(1, (spec["length"] - 50) // TOKENS_PER_FILLER), [(spec["depth"], nd)])
    path = resolve_model(spec["model"])
    method, budget, chunk = spec["method"], spec.get("budget"), spec["chunk"]
    with quiet():
        if method == "full":
            m = CompressedLlama(path, n_ctx=spec["length"] + 256, n_threads=spec["threads"])
        else:
            m = CompressedLlama.for_budget(path, budget=budget, chunk=chunk, headroom=128,
                                           n_threads=spec["threads"])
    kw = {"kernel": spec["kernel"]} if method.startswith("snapkv") else {}
    st = m.prefill(ctx) if method == "full" else m.compress_budgeted(ctx, budget=budget, chunk=chunk, method=method,
                                                                       **kw)
    row = dict(spec, tokens=st.context_tokens, n_ctx=m.n_ctx, kv_cells=st.kv_cells_after,
               kv_buffer_bytes=st.kv_buffer_bytes, kv_footprint=st.kv_footprint, kv_peak=st.kv_peak,
               compressions=st.compressions, prefill_s=st.prefill_s, compress_s=st.compress_s,
               prefill_tok_s=st.context_tokens / (st.prefill_s + st.compress_s))
    # Gemma-3 270M often answers "1. 2. 3." to the bare question; the prefix fixes it (10/10 at 2K, full cache)
    ans = m.ask(nd.question, max_tokens=12, answer_prefix=" The pass key is")
    row.update(answer=ans, key=nd.answer, correct=nd.answer in ans)
    m.ask("Tell me a long story about the sky.", max_tokens=64, ignore_eos=True)
    row["decode_tok_s"] = m.stats.generated_tokens / m.stats.decode_s
    row["peak_rss_bytes"] = kvstate.peak_rss_bytes()  # after prefill, answer and decode
    return row


def report(rows: list[dict], speed_depths: list[float] | None = None):
    """Speed columns use only the rows at `speed_depths` when given (passes
    run on an otherwise idle machine); memory and accuracy use every row."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["length"], r["config"])].append(r)

    def timed(g):
        sel = [r for r in g if speed_depths is None or r["depth"] in speed_depths]
        return sel or g

    full_buf = {r["length"]: r["kv_buffer_bytes"] for r in rows if r["method"] == "full"}
    full_tps = {n: median(r["prefill_tok_s"] for r in timed(g)) for (n, c), g in groups.items() if c == "full"}
    print(f"{'length':>6} {'config':18} {'tokens':>6} {'KV buf MiB':>10} {'% full':>6} {'RSS MiB':>7} "
          f"{'footpr':>6} {'peak':>5} {'prefill t/s':>11} {'x full':>6} {'decode t/s':>10} {'passkey':>7}")
    for (n, c), g in sorted(groups.items(), key=lambda x: (x[0][0], x[1][0]["config"] != "full", x[0][1])):
        buf = g[0]["kv_buffer_bytes"]
        tps = median(r["prefill_tok_s"] for r in timed(g))
        print(f"{n:>6} {c:18} {g[0]['tokens']:>6} {buf / 2**20:>10.1f} "
              f"{100 * buf / full_buf[n] if n in full_buf else float('nan'):>6.1f} "
              f"{median(r['peak_rss_bytes'] for r in g) / 2**20:>7.0f} {g[0]['kv_footprint']:>6.3f} "
              f"{g[0]['kv_peak']:>5.3f} {tps:>11.1f} {tps / full_tps[n] if n in full_tps else float('nan'):>6.2f} "
              f"{median(r['decode_tok_s'] for r in timed(g)):>10.1f} {sum(r['correct'] for r in g):>4}/{len(g):<2}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3")
    ap.add_argument("--lengths", default="2048,4096,8192,16384")
    ap.add_argument("--configs", default="full,snapkv:512,snapkv:1024,snapkv+grkv:512,snapkv+grkv:1024",
                    help="method[:budget] ('full' = whole prompt in the cache)")
    ap.add_argument("--depths", type=int, default=10, help="pass-key depths, evenly spread")
    ap.add_argument("--depth-order", help="run these of the evenly spread depths first, e.g. 0.05,0.95,0.45")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--kernel", type=int, default=15,
                    help="SnapKV pooling kernel (kvpress's 5 loses the key's digits on Gemma-3 270M)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--report", type=Path, help="print the table of an earlier run and exit")
    ap.add_argument("--speed-depths", help="with --report: speed medians from these depths' rows only")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("ROW " + json.dumps(run_one(json.loads(a.one))), flush=True)
        return
    if a.report:
        sd = [float(x) for x in a.speed_depths.split(",")] if a.speed_depths else None
        report(json.loads(a.report.read_text()), sd)
        return
    rows = json.loads(a.out.read_text()) if a.out and a.out.exists() else []
    done = {(r["length"], r["config"], r["depth"]) for r in rows}
    depths = [round((i + 0.5) / a.depths, 3) for i in range(a.depths)]
    if a.depth_order:  # a short session gets the most telling depths first
        first = [float(x) for x in a.depth_order.split(",")]
        depths = [d for d in first if d in depths] + [d for d in depths if d not in first]
    for depth in depths:
        for n in map(int, a.lengths.split(",")):
            for cfg in a.configs.split(","):
                if (n, cfg, depth) in done:
                    continue
                method, _, b = cfg.partition(":")
                spec = dict(model=a.model, length=n, config=cfg, method=method, budget=int(b) if b else None,
                            chunk=a.chunk, depth=depth, threads=a.threads, kernel=a.kernel)
                p = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True,
                                   text=True)
                line = [s for s in p.stdout.splitlines() if s.startswith("ROW ")]
                if p.returncode or not line:
                    print(f"FAILED {spec}: {p.stderr[-2000:]}", flush=True)
                    continue
                row = json.loads(line[0][4:])
                rows.append(row)
                print(f"{n:>6} {cfg:18} depth {depth:.2f}: {'ok' if row['correct'] else '--'} {row['answer']!r:24} "
                      f"prefill {row['prefill_tok_s']:.0f} t/s, decode {row['decode_tok_s']:.1f} t/s, "
                      f"KV buffer {row['kv_buffer_bytes'] / 2**20:.1f} MiB", flush=True)
                if a.out:
                    a.out.parent.mkdir(parents=True, exist_ok=True)
                    a.out.write_text(json.dumps(rows, indent=1))
    report(rows)


if __name__ == "__main__":
    main()
