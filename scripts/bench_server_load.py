"""Load: N parallel openai clients against `grkv-cpp serve` on loopback for a
while; every answer is checked against the one the same prompt got alone.
Reports requests, errors (503s counted apart: the queue's answer), p50/p95
latency and the document cache's hit rate. Writes JSON.

    python scripts/bench_server_load.py --model smollm2 --clients 8 --seconds 300 --out results/bench_server_load.json
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from pathlib import Path

import openai

from grkv_cpp.models import resolve_model
from grkv_cpp.server import ServerSettings, create_app
from grkv_cpp.server.background import serve_in_thread
from grkv_cpp.texts import demo_context


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--method", default="knorm")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--documents", type=int, default=2)
    ap.add_argument("--max-queue", type=int, default=16)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    context, needles = demo_context()
    docs = [context + f"\n(edition {d})" for d in range(a.documents)]
    prompts = [f"{d}\n\n{nd.question}" for d in docs for nd in needles]
    app = create_app(ServerSettings(model=str(resolve_model(a.model)), n_ctx=a.n_ctx, method=a.method, kv_ratio=0.5,
                                    max_queue=a.max_queue))
    srv, url = serve_in_thread(app)
    url += "/v1"
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)

    def ask(p):
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": p}], max_tokens=12,
                                           temperature=0)
        return r.choices[0].message.content

    expected = {p: ask(p) for p in prompts}  # alone, one at a time
    lat, lock = [], threading.Lock()
    counts = dict(ok=0, wrong=0, busy=0, errors=0)
    stop_at = time.perf_counter() + a.seconds

    def worker(seed):
        rng = random.Random(seed)
        while time.perf_counter() < stop_at:
            p = rng.choice(prompts)
            t0 = time.perf_counter()
            try:
                got = ask(p)
                key = "ok" if got == expected[p] else "wrong"
            except openai.APIStatusError as e:
                key = "busy" if e.status_code == 503 else "errors"
                if key == "busy":
                    time.sleep(1)
            except Exception:
                key = "errors"
            with lock:
                counts[key] += 1
                if key in ("ok", "wrong"):
                    lat.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    srv.should_exit = True
    lat.sort()
    pick = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else (lambda q: None)
    out = dict(model=a.model, method=a.method, clients=a.clients, seconds=a.seconds, **counts,
               requests=sum(counts.values()), p50_s=pick(0.5), p95_s=pick(0.95), server=app.state.engine.stats())
    print(json.dumps(out, indent=1))
    if a.out:
        a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
