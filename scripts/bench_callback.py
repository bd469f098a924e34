#!/usr/bin/env python
"""Decode speed with grkv-cpp's eval callback installed but idle, against no
callback at all. Interleaved rounds; writes JSON.

    python scripts/bench_callback.py --out results/callback.json
"""

import argparse
import json
import statistics
import time
from pathlib import Path

from grkv_cpp.capture import QUERIES, GraphCapture
from grkv_cpp.loader import open_llama, quiet
from grkv_cpp.models import resolve_model


def decode_rate(llm, prompt, n):
    llm.reset()
    llm.eval(prompt)
    t0 = time.perf_counter()
    tok = 1000
    for _ in range(n):
        llm.eval([tok])
        tok = (tok * 7 + 13) % 20000 + 100
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=128, help="decoded tokens per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    path = resolve_model(a.model)
    cap = GraphCapture()
    cap.set_targets([QUERIES])
    with quiet():
        plain = open_llama(path, n_ctx=1024)
        hooked = open_llama(path, callback=cap.c_callback, user_data=cap.user_data, n_ctx=1024)
    prompt = list(range(500, 756))
    rates = {"no_callback": [], "callback_idle": []}
    for _ in range(a.rounds):
        rates["no_callback"].append(decode_rate(plain, prompt, a.tokens))
        rates["callback_idle"].append(decode_rate(hooked, prompt, a.tokens))
    res = {k: {"tokens_per_s": v, "median": statistics.median(v), "stdev": statistics.stdev(v)}
           for k, v in rates.items()}
    res["ratio_idle_over_none"] = res["callback_idle"]["median"] / res["no_callback"]["median"]
    res["model"] = str(path)
    print(json.dumps(res, indent=2))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
