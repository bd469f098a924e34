"""GRKV on f16, q8_0 and q4_0 caches: the share of the layers' summed
objective SnapKV+GRKV keeps after requantisation (lower is better), per model.

    python scripts/bench_grkv_quant.py --out results/grkv_quant.json
"""

import argparse
import json

import numpy as np

import grkv_cpp  # noqa: F401  (before llama_cpp)
from grkv_cpp.compressor import compress_cache
from grkv_cpp.llm import CompressedLlama
from grkv_cpp.loader import quiet
from grkv_cpp.methods import parse_method
from grkv_cpp.models import gemma3_path, smollm2_path
from grkv_cpp.texts import haystack, passkey_needle


def run(path, cache_type, ratio):
    with quiet():
        m = CompressedLlama(path, n_ctx=2048, flash_attn=True, type_k=cache_type, type_v=cache_type)
    toks = m._tokens_for(haystack(16, [(0.4, passkey_needle(31337))]))
    m._prefill(toks, 32)
    method, merge = parse_method("snapkv+grkv")
    res = compress_cache(m.ctx, m.info, method, merge=merge, ratio=ratio, capture=m.capture)
    r = res.merge_report
    choice = np.array(r["choice"])
    objs = np.stack([r["obj_none"], r["obj_v"], r["obj_kv"]], 1)
    chosen = objs[np.arange(len(choice)), choice]
    return {"tokens": len(toks), "cells_after": res.cells_after, "objective_kept": float(chosen.sum() / objs[:, 0].sum()),
            "choices_none_v_kv": np.bincount(choice, minlength=3).tolist(), "seconds": res.seconds}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = []
    for name, path in (("smollm2", smollm2_path()), ("gemma3", gemma3_path())):
        for t in ("f16", "q8_0", "q4_0"):
            row = dict(model=name, cache_type=t, ratio=a.ratio, **run(path, t, a.ratio))
            print(json.dumps(row), flush=True)
            out.append(row)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
