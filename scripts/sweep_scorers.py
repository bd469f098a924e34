"""Ablation sweep of the context scorers' settings on a RULER data file:
each context is prefilled once, then every configuration (method, kept
ratio, parameters) compresses a restored copy and answers the context's
questions. Writes one JSON line per (question, configuration) and prints the
task-weighted average per configuration.

    python scripts/sweep_scorers.py --model smollm2 --data runs/smollm2_1k_sm.jsonl --limit 26 \
        --config "reconstruct@0.5" --config "reconstruct@0.5:n_recent=32" --out sweep.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path


def parse_config(spec: str):
    """`method@ratio[:key=value,...]` -> (label, method, ratio, params)."""
    head, _, tail = spec.partition(":")
    method, _, ratio = head.partition("@")
    params = {}
    for kv in filter(None, tail.split(",")):
        k, _, v = kv.partition("=")
        try:
            params[k] = json.loads(v)
        except json.JSONDecodeError:
            params[k] = v
    return spec, method, float(ratio or 1.0), params


def main(argv=None):
    from tqdm.auto import tqdm

    from grkv_cpp import CompressedLlama
    from grkv_cpp.eval import ruler
    from grkv_cpp.eval.harness import group_rows
    from grkv_cpp.eval.metrics import score
    from grkv_cpp.loader import quiet
    from grkv_cpp.methods.context import ALL_QUERIES
    from grkv_cpp.models import resolve_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", action="append", required=True, help="method@ratio[:key=value,...] (repeatable)")
    ap.add_argument("--limit", type=int, default=None, help="first N contexts")
    ap.add_argument("--shard", default="0/1", help="i/n: contexts with index = i mod n")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    configs = [parse_config(c) for c in a.config]
    rows = ruler.read_jsonl(Path(a.data))
    groups = group_rows(rows)[: a.limit]
    i, n = map(int, a.shard.split("/"))
    groups = [(gi, g) for gi, g in enumerate(groups) if gi % n == i]
    path = resolve_model(a.model)
    longest = max(len(ruler.gguf_tokenizer(path)(c)) for _, (c, _) in groups) if groups else 0
    with quiet():
        m = CompressedLlama(path, n_ctx=2 * longest + 640, n_threads=a.threads)
    out = Path(a.out)
    done = set()
    if out.exists():
        done = {(r["group"], r["qid"], r["config"]) for r in map(json.loads, out.read_text().splitlines())}
    with out.open("a") as f:
        for gi, (context, qs) in tqdm(groups, desc="contexts"):
            todo = [c for c in configs for qi in range(len(qs)) if (gi, qi, c[0]) not in done]
            if not todo:
                continue
            st = m.prefill_state(context, window=ALL_QUERIES)
            for label, method, ratio, params in configs:
                if all((gi, qi, label) in done for qi in range(len(qs))):
                    continue
                if method == "full":
                    s = m.restore(st)
                else:
                    s = m.compress_state(st, method=method, ratio=ratio, **params)
                for qi, q in enumerate(qs):
                    t0 = time.perf_counter()
                    pred = m.ask(q["question"], max_tokens=int(q.get("max_new_tokens") or a.max_new_tokens),
                                 answer_prefix=q.get("answer_prefix", "") or "")
                    f.write(json.dumps(dict(group=gi, qid=qi, task=q.get("task", ""), config=label, prediction=pred,
                                            score=score(pred, q), prefill_s=s.prefill_s, compress_s=s.compress_s,
                                            reread_s=s.reread_s, kv_cells=s.kv_cells_after,
                                            answer_s=time.perf_counter() - t0)) + "\n")
                    f.flush()
    report(out)


def report(path: Path):
    rows = [json.loads(x) for x in Path(path).read_text().splitlines()]
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[r["config"]][r["task"]].append(r["score"])
    for cfg, tasks in by.items():
        avg = sum(sum(v) / len(v) for v in tasks.values()) / len(tasks)
        print(f"{avg:6.1f}  n={sum(len(v) for v in tasks.values()):4d}  {cfg}")


if __name__ == "__main__":
    main()
