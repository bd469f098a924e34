#!/usr/bin/env python
"""Compression time against prefill time, per model, context length and
method; writes JSON.

    python scripts/bench_compress.py --models smollm2,gemma3 --tokens 2048 --out results/compress.json
"""

import argparse
import json
from pathlib import Path

from grkv_cpp.llm import CompressedLlama
from grkv_cpp.loader import quiet
from grkv_cpp.models import resolve_model
from grkv_cpp.texts import haystack, passkey_needle

CONFIGS = [("snapkv", False), ("snapkv", True), ("knorm", False), ("streaming", False)]


def context_of(m, n_tokens):
    """Filler context of about n_tokens tokens for this model's tokenizer."""
    def count(n):
        return len(m._tokens_for(haystack(n, [(0.5, passkey_needle(12345))])))

    base, per_block = count(0), (count(20) - count(0)) / 20
    n = max(0, int((n_tokens - base) / per_block))
    return haystack(n, [(0.5, passkey_needle(12345))])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--tokens", default="2048")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    rows = []
    for name in a.models.split(","):
        for n_tokens in map(int, a.tokens.split(",")):
            with quiet():
                m = CompressedLlama(resolve_model(name), n_ctx=n_tokens + 512, n_threads=a.threads)
            ctx = context_of(m, n_tokens)
            for method, shared in CONFIGS:
                st = m.compress(ctx, method=method, ratio=a.ratio, shared=shared)
                row = {"model": name, "context_tokens": st.context_tokens, "method": st.method, "ratio": a.ratio,
                       "prefill_s": st.prefill_s, "compress_s": st.compress_s,
                       "compress_share_of_prefill": st.compress_s / st.prefill_s,
                       "kv_cells_before": st.kv_cells_before, "kv_cells_after": st.kv_cells_after,
                       "kv_bytes_before": st.kv_bytes_before, "kv_bytes_after": st.kv_bytes_after,
                       "prefill_tokens_per_s": st.context_tokens / st.prefill_s}
                rows.append(row)
                print(json.dumps(row), flush=True)
            m.close()
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
