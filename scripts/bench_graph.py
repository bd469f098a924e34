#!/usr/bin/env python
"""The graph path against the C++ core: SnapKV eviction where scores and
per-head top-k run as ggml graphs on the backend that holds the cache (its K
tensors read in place), against the core on host copies. One prefill per
(model, length); each ratio compresses a restored copy `--repeat` times per
path. Checks that both paths write the same cache, and writes JSON.

    python scripts/bench_graph.py --models smollm2,gemma3 --tokens 4096 --ratios 0.5,0.25 \\
        --out results/graph_snapkv.json
"""

import argparse
import json
import statistics
import time
from pathlib import Path

from grkv_cpp import kvstate  # first: it points llama-cpp-python at the patched libllama
from grkv_cpp import _native
from grkv_cpp.compressor import capture_positions, captured_queries, compress_cache
from grkv_cpp.llm import CompressedLlama
from grkv_cpp.loader import quiet
from grkv_cpp.methods import parse_method
from grkv_cpp.models import resolve_model
from tqdm.auto import tqdm
from grkv_cpp.texts import passkey_needle

from bench_merge import context_for  # scripts/ is on the path when run as a script


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--tokens", default="4096")
    ap.add_argument("--ratios", default="0.5,0.25")
    ap.add_argument("--methods", default="snapkv,knorm,streaming")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if not _native.graph_available():
        raise SystemExit("this build has no graph path (it needs the patched llama.cpp: GRKV_LLAMA=ON)")
    rows = []
    capture_for, _ = parse_method("snapkv")  # the window queries SnapKV needs
    for name in a.models.split(","):
        for n_tokens in map(int, a.tokens.split(",")):
            with quiet():
                m = CompressedLlama(resolve_model(name), n_ctx=n_tokens + 256, n_threads=a.threads)
            toks = m._tokens_for(context_for(m, n_tokens, passkey_needle(84606)))
            T = len(toks)
            positions, _ = capture_positions(T, capture_for, None)
            t0 = time.perf_counter()
            m._prefill(toks, positions, whole=True)
            prefill_s = time.perf_counter() - t0
            captured = captured_queries(m.capture, m.info)
            full = kvstate.get_blob(m.ctx)
            for ratio in map(float, a.ratios.split(",")):
                for spec in a.methods.split(","):
                    method, _ = parse_method(spec)
                    row = dict(model=name, context_tokens=T, ratio=ratio, method=spec, prefill_s=prefill_s,
                               threads=a.threads)
                    blobs = {}
                    for math in ("core", "graph"):
                        runs = []
                        for _ in tqdm(range(a.repeat), desc=f"{name} {T} {ratio:g} {spec} {math}", leave=False):
                            assert kvstate.set_blob(m.ctx, full)
                            res = compress_cache(m.ctx, m.info, method, ratio=ratio, captured=captured,
                                                 n_threads=a.threads, math=math)
                            runs.append(res.merge_report["apply"])
                        blobs[math] = kvstate.get_blob(m.ctx)
                        row[math] = {k: statistics.median(r[k] for r in runs) for k in ("read_s", "math_s", "write_s")}
                        if math == "graph":
                            row["graph_backend"] = res.merge_report["graph_backend"]
                    row["identical_cache"] = blobs["core"] == blobs["graph"]
                    row["graph_over_core_math"] = row["graph"]["math_s"] / row["core"]["math_s"]
                    rows.append(row)
                    print(f"{name:8s} T={T:5d} r={ratio:.2f} {spec:9s} math: core {row['core']['math_s'] * 1e3:7.1f} ms, "
                          f"graph {row['graph']['math_s'] * 1e3:7.1f} ms on {row['graph_backend']} "
                          f"({row['graph_over_core_math']:.2f}x); identical cache: {row['identical_cache']}", flush=True)
                    if a.out:
                        a.out.parent.mkdir(parents=True, exist_ok=True)
                        a.out.write_text(json.dumps(rows, indent=2))
            m.close()


if __name__ == "__main__":
    main()
