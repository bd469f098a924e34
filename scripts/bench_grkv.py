#!/usr/bin/env python
"""Time GRKV's per-head fit (value step + Gauss-Newton key step, spec defaults)
on the shapes a compression of SmolLM2 or Gemma-3 produces, one thread, and
write JSON. A compression runs one fit per (layer, KV head): multiply by the
`heads` column for the merge's share of a compression.

    python scripts/bench_grkv.py --out results/bench_grkv.json

Random problems (seeded): the fit's cost depends on the shapes only, not on
the values (fixed CG iterations unless converged; tol 1e-6 is rarely met).
"""

import argparse
import json
import os
import platform
import time

import numpy as np

# (model, surrogate queries R = window x query heads per KV head, head dim d, KV heads fitted per compression)
# Gemma-3 270M: only its 3 global-attention layers (1 KV head each) are compressed; the 15
# sliding-window layers keep their own 512-token cache.
SHAPES = [("smollm2", 64 * 3, 64, 30 * 3), ("gemma3", 64 * 4, 256, 3 * 1)]


def problem(native, R, B, d, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((R, d)).astype(np.float32)
    k0 = rng.standard_normal((B, d)).astype(np.float32)
    v0 = rng.standard_normal((B, d)).astype(np.float32)
    # the teacher: attention over a larger cache, approximated by a perturbed student output
    ostar = (rng.standard_normal((R, d)) * 0.1).astype(np.float32)
    return native.GrkvProblem(q, np.ones(R, np.float32), np.ones((R, B), np.uint8), ostar, k0, v0,
                              np.ones(B, np.uint8), 1.0 / np.sqrt(d))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kept", default="512,1024,2048", help="kept tokens B per head")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--native", default=None,
                    help="path of another build's _native*.so to time instead of the installed one (A/B)")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if a.native:
        import importlib.util

        spec = importlib.util.spec_from_file_location("_native", a.native)
        _native = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_native)
    else:
        from grkv_cpp import _native
    kernels = getattr(_native, "kernels", _native)  # builds before the kernels submodule had them at the top

    rows = []
    for model, R, d, heads in SHAPES:
        for B in (int(x) for x in a.kept.split(",")):
            p = problem(kernels, R, B, d, 0)
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                kernels.grkv_fit(p, 0.01, 0.5, 0.5, 1, "f16")
                times.append(time.perf_counter() - t0)
            best = min(times)
            rows.append(dict(model=model, R=R, d=d, kept=B, heads=heads, ms_per_head=1e3 * best,
                             s_per_compression=best * heads))
            print(f"{model:8s} R={R:4d} d={d:4d} B={B:5d}: {1e3 * best:8.1f} ms/head, "
                  f"{best * heads:6.2f} s per compression ({heads} heads)", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(machine=platform.processor() or platform.machine(), threads=1, native=_native.__file__,
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
