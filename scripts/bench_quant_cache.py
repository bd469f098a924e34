"""Compression stacked on quantised KV caches: for each cache type and kept
ratio, the KV bytes of the compressed context and whether the demo's three
facts are still answered. Writes JSON.

    python scripts/bench_quant_cache.py --model smollm2 --out results/quant_cache_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from grkv_cpp import CompressedLlama
from grkv_cpp.loader import quiet
from grkv_cpp.models import resolve_model
from grkv_cpp.texts import demo_context


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--types", default="f16,q8_0,q4_0")
    ap.add_argument("--ratios", default="1.0,0.5,0.25")
    ap.add_argument("--method", default="compactor")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    context, needles = demo_context()
    rows = []
    for t in a.types.split(","):
        with quiet():
            m = CompressedLlama(resolve_model(a.model), n_ctx=2048, flash_attn=True, type_k=t, type_v=t,
                                n_threads=a.threads)
        for r in (float(x) for x in a.ratios.split(",")):
            t0 = time.perf_counter()
            st = m.prefill(context) if r >= 1 else m.compress(context, method=a.method, ratio=r)
            secs = time.perf_counter() - t0
            found = [nd.answer in m.ask(nd.question, max_tokens=16) for nd in needles]
            rows.append(dict(cache=t, ratio=r, method="full" if r >= 1 else a.method, cells=st.kv_cells_after,
                             context_tokens=st.context_tokens, kv_bytes=st.kv_bytes_after,
                             bytes_per_token=st.kv_bytes_after / st.context_tokens, facts_found=sum(found),
                             facts=len(needles), backend=st.apply_backend, seconds=secs))
            print(json.dumps(rows[-1]))
    f16 = {r["ratio"]: r["kv_bytes"] for r in rows if r["cache"] == "f16"}
    for r in rows:
        if 1.0 in f16:
            r["of_f16_full"] = r["kv_bytes"] / f16[1.0]
    out = dict(model=a.model, rows=rows)
    if a.out:
        a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
