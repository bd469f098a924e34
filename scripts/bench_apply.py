#!/usr/bin/env python
"""Apply backends side by side: reading the sequence's cache and writing a
compressed one back, in place (the patched llama.cpp) against the state blob;
writes JSON.

    python scripts/bench_apply.py --models smollm2,gemma3 --tokens 2048,8192,16384 --ratios 0.1,0.5 \\
        --out results/bench_apply.json

The cache is filled with random f16 rows through a state blob (n cells at
positions 0..n-1) instead of a prefill: the timings depend on the cells, not on
what they hold, and a 16K prefill would take minutes. Each configuration runs
KNorm (its scoring is a norm per key, so the split shows the apply cost) with
each way of applying from the same cache, `--repeat` times, and reports the
medians of read, math and write, with the compression's total:

  blob          llama_state_seq_get_data + parse; the math (scores, selection,
                the new layout's rows built on the host); serialise +
                llama_state_seq_set_data
  inplace-rows  llama_kv_ext_read of the sequence's cells; the same math;
                llama_kv_ext_seq_apply of the host rows (GRKV_GATHER=0)
  inplace       llama_kv_ext_read; scores and selection only (the plan);
                llama_kv_ext_seq_gather (the library copies a host-memory
                cache's kept slices itself)
  inplace-graph no row read (cells and sizes only); scores and selection as
                ggml graphs over the cache's tensors; llama_kv_ext_seq_gather
                as a ggml graph (LLAMA_KV_EXT_GATHER_GRAPH): what a GPU cache
                runs, here on the CPU backend; only indices cross"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
import time
from pathlib import Path

import numpy as np

from grkv_cpp import kvstate
from grkv_cpp.apply import InplaceBackend, patched_library
from grkv_cpp.compressor import compress_cache
from grkv_cpp.llm import CompressedLlama
from grkv_cpp.loader import quiet
from grkv_cpp.methods import KNorm
from grkv_cpp.models import resolve_model

F16 = 1
# name: (backend, math, gather) -- see the module doc
WAYS = {"blob": ("blob", "core", False), "inplace-rows": ("inplace", "core", False),
        "inplace": ("inplace", "core", True), "inplace-graph": ("inplace", "graph", "graph")}


def _layout(blob: bytes):
    """Per memory part: (v_trans, [(k_type, k_row)], [(v_type, v_row_or_el, n_embd_v)]) of a 1-cell-or-more blob."""
    off = 8
    parts = []
    while off < len(blob):
        (n_stream,) = struct.unpack_from("<I", blob, off)
        off += 4
        for _ in range(n_stream):
            (cells,) = struct.unpack_from("<I", blob, off)
            off += 4
            if not cells:
                continue
            for _ in range(cells):
                _, n_seq = struct.unpack_from("<iI", blob, off)
                off += 8 + 4 * n_seq
            v_trans, n_layer = struct.unpack_from("<II", blob, off)
            off += 8
            ks, vs = [], []
            for _ in range(n_layer):
                t, row = struct.unpack_from("<iQ", blob, off)
                off += 12 + row * cells
                ks.append((t, row))
            for _ in range(n_layer):
                if not v_trans:
                    t, row = struct.unpack_from("<iQ", blob, off)
                    off += 12 + row * cells
                    vs.append((t, row, None))
                else:
                    t, el, ne = struct.unpack_from("<iII", blob, off)
                    off += 12 + el * ne * cells
                    vs.append((t, el, ne))
            parts.append((v_trans, ks, vs))
    return parts


def synthetic_blob(template: bytes, n: int, rng) -> bytes:
    """A one-sequence blob of n cells at positions 0..n-1 with random f16 rows,
    in the template's layout (every cache part)."""
    out = [template[:8]]
    for v_trans, ks, vs in _layout(template):
        out.append(struct.pack("<II", 1, n))
        out.append(b"".join(struct.pack("<iIi", p, 1, 0) for p in range(n)))
        out.append(struct.pack("<II", v_trans, len(ks)))
        for t, row in ks:
            assert t == F16, "bench_apply fills f16 caches"
            out.append(struct.pack("<iQ", t, row))
            out.append((rng.standard_normal(row // 2 * n) * 0.5).astype(np.float16).tobytes())
        for t, a, ne in vs:
            if not v_trans:
                out.append(struct.pack("<iQ", t, a))
                out.append((rng.standard_normal(a // 2 * n) * 0.5).astype(np.float16).tobytes())
            else:
                out.append(struct.pack("<iII", t, a, ne))
                out.append((rng.standard_normal(ne * n) * 0.5).astype(np.float16).tobytes())
    return b"".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--tokens", default="2048,8192,16384")
    ap.add_argument("--ratios", default="0.1,0.5")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--flash-attn", action="store_true", help="V untransposed (flash attention)")
    ap.add_argument("--budgeted", type=int, default=None,
                    help="instead: a budgeted prefill of this many tokens (SnapKV, --budget, --chunk) with each "
                         "backend, driven by the loop and by the hook")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.budgeted:
        return budgeted(a)
    if not patched_library():
        sys.exit("bench_apply needs the patched llama.cpp (the default build; LLAMA_CPP_LIB_PATH points elsewhere)")
    rng = np.random.default_rng(0)
    rows = []
    for name in a.models.split(","):
        for n in map(int, a.tokens.split(",")):
            with quiet():
                m = CompressedLlama(resolve_model(name), n_ctx=n + 256, n_threads=a.threads, flash_attn=a.flash_attn)
            m._reset()
            m._eval([1, 2, 3, 4])
            blob = synthetic_blob(kvstate.get_blob(m.ctx), n, rng)
            for ratio in map(float, a.ratios.split(",")):
                for way in WAYS:
                    be, math, gather = WAYS[way]
                    runs = []
                    for _ in range(a.repeat):
                        if not kvstate.set_blob(m.ctx, blob):
                            sys.exit("llama.cpp rejected the synthetic cache")
                        t0 = time.perf_counter()
                        res = compress_cache(m.ctx, m.info, KNorm(), ratio=ratio, n_threads=m.n_threads,
                                             backend=be if be == "blob" else InplaceBackend(gather=gather),
                                             math=math)
                        total = time.perf_counter() - t0
                        ap_ = res.merge_report["apply"]
                        runs.append((ap_["read_s"], ap_["math_s"], ap_["write_s"], total))
                    med = [statistics.median(r[i] for r in runs) for i in range(4)]
                    row = {"model": name, "cells": n, "ratio": ratio, "backend": way, "math": math,
                           "write": ap_["write"], "flash_attn": a.flash_attn,
                           "read_s": med[0], "math_s": med[1], "write_s": med[2], "compress_s": med[3],
                           "apply_s": med[0] + med[2], "kv_bytes_before": res.bytes_before,
                           "kv_bytes_after": res.bytes_after, "repeat": a.repeat}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            m.close()
    by = {(r["model"], r["cells"], r["ratio"], r["backend"]): r for r in rows}
    for (mod, n, ratio, be), r in by.items():
        if be != "blob":
            b = by[(mod, n, ratio, "blob")]
            r["apply_speedup_vs_blob"] = b["apply_s"] / r["apply_s"]
            r["compress_speedup_vs_blob"] = b["compress_s"] / r["compress_s"]
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(rows, indent=2) + "\n")


def budgeted(a):
    """A long prompt through the budgeted prefill, per backend and driver."""
    import os

    from grkv_cpp.texts import haystack, passkey_needle

    rows = []
    for name in a.models.split(","):
        with quiet():
            m = CompressedLlama.for_budget(resolve_model(name), budget=a.budget, chunk=a.chunk, n_threads=a.threads)
        per = len(m._tokens_for(haystack(20, []))) / 20
        ctx = haystack(int(a.budgeted / per), [(0.5, passkey_needle(31415))])
        for be, driver in (("blob", "loop"), ("inplace", "loop"), ("inplace", "hook")):
            os.environ["GRKV_APPLY"] = be
            t0 = time.perf_counter()
            st = m.compress_budgeted(ctx, budget=a.budget, chunk=a.chunk, method="snapkv", driver=driver)
            row = {"model": name, "context_tokens": st.context_tokens, "budget": a.budget, "chunk": a.chunk,
                   "backend": st.apply_backend, "driver": driver, "wall_s": time.perf_counter() - t0,
                   "prefill_s": st.prefill_s, "compress_s": st.compress_s, "compressions": st.compressions,
                   "kv_cells_after": st.kv_cells_after}
            rows.append(row)
            print(json.dumps(row), flush=True)
        os.environ.pop("GRKV_APPLY", None)
        m.close()
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
