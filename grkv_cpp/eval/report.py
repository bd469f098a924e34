"""Summaries of evaluation results: a table per (task, method, ratio, mode)
as CSV and Markdown, and score-against-ratio plots."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

AVERAGE = "average"


def summarise(results: list[dict]) -> list[dict]:
    """Mean score and count per (model, mode, task, method, ratio), plus the
    average over tasks (each task weighted equally)."""
    acc = defaultdict(list)
    secs = defaultdict(list)
    for r in results:
        k = (r.get("model", ""), r["mode"], r.get("task") or "all", r["method"], float(r["ratio"]))
        acc[k].append(float(r["score"]))
        secs[k].append(float(r.get("seconds", 0.0)))
    rows = [dict(model=k[0], mode=k[1], task=k[2], method=k[3], ratio=k[4], score=sum(v) / len(v), n=len(v),
                 seconds_per_q=sum(secs[k]) / len(v)) for k, v in acc.items()]
    by = defaultdict(list)
    for r in rows:
        by[(r["model"], r["mode"], r["method"], r["ratio"])].append(r)
    for (model, mode, method, ratio), rs in by.items():
        rows.append(dict(model=model, mode=mode, task=AVERAGE, method=method, ratio=ratio,
                         score=sum(r["score"] for r in rs) / len(rs), n=sum(r["n"] for r in rs),
                         seconds_per_q=sum(r["seconds_per_q"] * r["n"] for r in rs) / sum(r["n"] for r in rs)))
    rows.sort(key=lambda r: (r["model"], r["mode"], r["task"] == AVERAGE, r["task"], r["method"], -r["ratio"]))
    return rows


def write_csv(rows: list[dict], path: Path):
    with Path(path).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", "mode", "task", "method", "ratio", "score", "n", "seconds_per_q"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "score": f"{r['score']:.1f}", "seconds_per_q": f"{r['seconds_per_q']:.2f}"})


def markdown(rows: list[dict]) -> str:
    """One table per (model, mode): tasks down, method@ratio across."""
    out = []
    for model, mode in sorted({(r["model"], r["mode"]) for r in rows}):
        sel = [r for r in rows if r["model"] == model and r["mode"] == mode]
        cols = sorted({(r["method"], r["ratio"]) for r in sel}, key=lambda c: (c[0] != "full", c[0], -c[1]))
        tasks = sorted({r["task"] for r in sel}, key=lambda t: (t == AVERAGE, t))
        cell = {(r["task"], r["method"], r["ratio"]): r for r in sel}
        out.append(f"**{model or 'model'}**, {mode}\n")
        out.append("| task | " + " | ".join(m if m == "full" else f"{m} {q:g}" for m, q in cols) + " |")
        out.append("|---|" + "---|" * len(cols))
        for t in tasks:
            vals = [f"{cell[(t, m, q)]['score']:.1f}" if (t, m, q) in cell else "" for m, q in cols]
            name = f"**{t}**" if t == AVERAGE else t
            out.append(f"| {name} | " + " | ".join(vals) + " |")
        n = max((r["n"] for r in sel if r["task"] != AVERAGE), default=0)
        out.append(f"\nScores ×100 (RULER string match); up to {n} questions per cell; ratio = kept fraction.\n")
    return "\n".join(out)


def plot(rows: list[dict], path: Path, title: str = ""):
    """Score against kept ratio, one panel per task plus the average, one
    line per method (the full cache as a dashed level)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows}, key=lambda t: (t == AVERAGE, t))
    ncol = min(4, len(tasks))
    nrow = -(-len(tasks) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3.2 * nrow), squeeze=False)
    methods = sorted({r["method"] for r in rows})
    for ax, task in zip(axes.flat, tasks):
        for m in methods:
            pts = sorted((r["ratio"], r["score"]) for r in rows if r["task"] == task and r["method"] == m)
            if not pts:
                continue
            if m == "full":
                ax.axhline(pts[0][1], color="k", ls="--", lw=1, label="full")
            else:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.set_title(task, fontweight="bold" if task == AVERAGE else None)
        ax.set_xlabel("kept ratio")
        ax.set_ylabel("score")
        ax.set_ylim(-3, 103)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat:
        h, lab = ax.get_legend_handles_labels()
        if len(h) > len(handles):
            handles, labels = h, lab
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)))
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(results: list[dict], out_dir: Path, title: str = "") -> list[dict]:
    out_dir = Path(out_dir)
    rows = summarise(results)
    write_csv(rows, out_dir / "summary.csv")
    (out_dir / "summary.md").write_text(markdown(rows))
    for model, mode in sorted({(r["model"], r["mode"]) for r in rows}):
        sel = [r for r in rows if r["model"] == model and r["mode"] == mode]
        name = f"plot_{(model or 'model').replace('/', '_')}_{mode}.png"
        plot(sel, out_dir / name, title=f"{title} {model} {mode}".strip())
    return rows
