#!/usr/bin/env python
"""Side-by-side tables of grkv-cpp's and kvpress's results on the same
questions (results.jsonl from `grkv-cpp eval`, the JSONL of
scripts/bench_kvpress.py): mean score per task and on average, and seconds
per question, per method and kept ratio. Prints Markdown.

    python scripts/report_eval.py runs/eval_smollm2_1k/results.jsonl runs/eval_smollm2_1k/kvpress.jsonl
"""

import argparse
from collections import defaultdict
from pathlib import Path

from grkv_cpp.eval.harness import complete_groups, load_results


def load(path: Path, engine: str) -> list[dict]:
    rows = load_results(path)  # a line cut by an interrupted run ends the file
    for r in rows:
        r.setdefault("engine", engine)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ours", type=Path)
    ap.add_argument("kvpress", type=Path, nargs="?")
    ap.add_argument("--complete-groups", action="store_true",
                    help="only our context groups that every method and ratio finished (a stopped run)")
    a = ap.parse_args()
    rows = load(a.ours, "grkv-cpp")
    if a.complete_groups:
        rows = complete_groups(rows)
    if a.kvpress and a.kvpress.exists():
        rows += load(a.kvpress, "kvpress")
    # one table compares one model's query-agnostic runs: refuse to pool anything else
    for what in ("mode", "model"):
        seen = {r.get(what, "agnostic" if what == "mode" else "") for r in rows if r["engine"] == "grkv-cpp"}
        if len(seen) > 1 or (what == "mode" and seen - {"agnostic"}):
            raise SystemExit(f"{a.ours}: rows of several {what}s ({', '.join(map(str, sorted(seen)))}); "
                             "this table compares one model's query-agnostic runs")
    # only questions both engines answered, when both are present
    key = lambda r: (r.get("length"), r["task"], r["sample"], r["qid"])  # noqa: E731
    engines = {r["engine"] for r in rows}
    if len(engines) > 1:
        common = set.intersection(*({key(r) for r in rows if r["engine"] == e} for e in engines))
        rows = [r for r in rows if key(r) in common]
    cell = defaultdict(list)
    secs = defaultdict(list)
    for r in rows:
        c = (r["engine"], r["method"], float(r["ratio"]))
        cell[(r["task"], *c)].append(r["score"])
        secs[c].append(r.get("seconds", 0.0))
    # where an engine ran on a GPU its seconds are not comparable with a CPU's: say so in its label
    label = {}
    for e in engines:
        devs = sorted({r.get("device", "cpu") for r in rows if r["engine"] == e})
        name = "ours" if e == "grkv-cpp" else e
        label[e] = name if devs == ["cpu"] else f"{name} ({', '.join(devs)})"
    configs = sorted({k[1:] for k in cell}, key=lambda c: (c[1] != "full", c[1], c[0], -c[2]))
    tasks = sorted({k[0] for k in cell})
    print("| engine | method | kept | **average** | s / q | " + " | ".join(tasks) + " |")
    print("|---|---|---|---|---|" + "---|" * len(tasks))
    for c in configs:
        per = {t: sum(cell[(t, *c)]) / len(cell[(t, *c)]) for t in tasks if cell.get((t, *c))}
        avg = sum(per.values()) / len(per)
        e, m, q = c
        print(f"| {label[e]} | {m} | {q:g} | **{avg:.1f}** | "
              f"{sum(secs[c]) / len(secs[c]):.1f} | " + " | ".join(f"{per[t]:.1f}" if t in per else "" for t in tasks)
              + " |")
    n = {len(v) for v in cell.values()}
    print(f"\n{len(tasks)} tasks; {min(n)}-{max(n)} questions per cell; scores x100 (RULER string match); "
          "ratio = kept fraction of the context's cache.")


if __name__ == "__main__":
    main()
