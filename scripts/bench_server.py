"""Time to first token from `grkv-cpp serve` for a document seen for the first
time against the same document again (a cache hit), through the official
openai client on loopback; plus the context file's size and load time against
the prefill. Writes JSON.

    python scripts/bench_server.py --model smollm2 --out results/bench_server.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import openai

from grkv_cpp.models import resolve_model
from grkv_cpp.server import ServerSettings, create_app
from grkv_cpp.server.background import serve_in_thread
from grkv_cpp.texts import demo_context


def ttft(client, messages, max_tokens=16):
    t0 = time.perf_counter()
    first, text, usage = None, "", None
    for ev in client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, stream=True,
                                             temperature=0):
        if ev.choices and ev.choices[0].delta.content and first is None:
            first = time.perf_counter() - t0
        if ev.choices and ev.choices[0].delta.content:
            text += ev.choices[0].delta.content
        usage = ev.usage or usage
    return first, time.perf_counter() - t0, text, usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--method", default="compactor")
    ap.add_argument("--kv-ratio", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    context, needles = demo_context()
    settings = ServerSettings(model=str(resolve_model(a.model)), n_ctx=2048, method=a.method, kv_ratio=a.kv_ratio)
    app = create_app(settings)
    srv, url = serve_in_thread(app)
    url += "/v1"
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
    rows = []
    for r in range(a.repeats):
        doc = context + f"\n(copy {r})"  # a new document each round: the first question misses
        for i, nd in enumerate(needles):
            first, total, text, cached, n_prompt = ttft(client, [{"role": "user", "content": f"{doc}\n\n{nd.question}"}])
            rows.append(dict(round=r, question=i, hit=cached > 0, ttft_s=first, total_s=total, cached_tokens=cached,
                             prompt_tokens=n_prompt, found=nd.answer in text))
            print(json.dumps(rows[-1]), file=sys.stderr)
    srv.should_exit = True
    eng = app.state.engine
    # the context file of the last document against its prefill
    m = eng.model
    path = Path("/tmp/bench_server.grkv")
    saved = next(reversed(eng.cache._entries.values())).saved
    saved.write(path)
    size = path.stat().st_size
    t0 = time.perf_counter()
    m.load(path)
    load_s = time.perf_counter() - t0

    def med(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if xs else None

    miss = [x["ttft_s"] for x in rows if not x["hit"]]
    hit = [x["ttft_s"] for x in rows if x["hit"]]
    out = dict(model=a.model, method=a.method, kv_ratio=a.kv_ratio, rows=rows,
               ttft_miss_median_s=med(miss), ttft_hit_median_s=med(hit),
               found_miss=sum(x["found"] for x in rows if not x["hit"]), n_miss=len(miss),
               found_hit=sum(x["found"] for x in rows if x["hit"]), n_hit=len(hit),
               context_file_bytes=size, full_kv_bytes=saved.header["full_kv_bytes"], kept_kv_bytes=saved.header["kv_bytes"],
               prefill_s=saved.header["prefill_s"], compress_s=saved.header["compress_s"],
               load_s=load_s, server=eng.stats())
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=1))
    if a.out:
        a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
