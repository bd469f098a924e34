"""Soak: many compress-and-ask cycles on one context; resident memory must stay
flat. Reports RSS after each cycle and the least-squares slope (bytes per
cycle) over the second half, after allocators have warmed up. Writes JSON.

    python scripts/bench_soak.py --model smollm2 --cycles 1000 --out results/bench_soak.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from grkv_cpp import CompressedLlama
from grkv_cpp.loader import quiet
from grkv_cpp.models import resolve_model
from grkv_cpp.texts import demo_context


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--context-words", type=int, default=200)
    ap.add_argument("--methods", default="knorm,snapkv,streaming")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    text = " ".join(demo_context()[0].split()[: a.context_words])
    with quiet():
        m = CompressedLlama(resolve_model(a.model), n_ctx=1024, n_threads=a.threads)
    methods = a.methods.split(",")
    rss, t0 = [], time.perf_counter()
    for i in range(a.cycles):
        m.compress(text, method=methods[i % len(methods)], ratio=0.5)
        m.ask("What is the pass key?", max_tokens=4)
        if i % 10 == 0 and i:  # the save/load path too
            m.restore_context(m.snapshot())
        rss.append(rss_bytes())
        if i % 100 == 0:
            print(f"cycle {i}: rss {rss[-1] / 2**20:.1f} MiB", file=sys.stderr)
    half = np.arange(len(rss) // 2, len(rss))
    slope = float(np.polyfit(half, np.asarray(rss, float)[half], 1)[0]) if len(half) > 1 else 0.0
    out = dict(model=a.model, cycles=a.cycles, methods=methods, seconds=time.perf_counter() - t0,
               rss_first_mib=rss[0] / 2**20, rss_last_mib=rss[-1] / 2**20, rss_max_mib=max(rss) / 2**20,
               slope_bytes_per_cycle_second_half=slope, rss_every_100=rss[::100])
    print(json.dumps(out, indent=1))
    if a.out:
        a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
