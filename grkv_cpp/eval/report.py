"""Summaries of evaluation results: a table per (task, method, ratio, mode)
as CSV and Markdown, and score-against-ratio plots.

    python -m grkv_cpp.eval.report RUN_DIR [--complete-groups]

re-summarises a run folder (every shard's results file) without asking anything.
Several folders run on the same data file (say the budgeted variants, run
later into their own folder, beside the main sweep) are read as one run:

    python -m grkv_cpp.eval.report BUDGET_DIR MAIN_DIR --methods snapkv,snapkv@budget \
        --device cpu --complete-groups --out DIR --paired snapkv@budget:snapkv --times
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

AVERAGE = "average"


def _is_full(method: str) -> bool:
    """`full`, or `full[q8_0]` when runs are labelled by cache type."""
    return method.partition("[")[0] == "full"


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
        cols = sorted({(r["method"], r["ratio"]) for r in sel}, key=lambda c: (not _is_full(c[0]), c[0], -c[1]))
        tasks = sorted({r["task"] for r in sel}, key=lambda t: (t == AVERAGE, t))
        cell = {(r["task"], r["method"], r["ratio"]): r for r in sel}
        out.append(f"**{model or 'model'}**, {mode}\n")
        out.append("| task | " + " | ".join(m if _is_full(m) else f"{m} {q:g}" for m, q in cols) + " |")
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
            if _is_full(m):
                ax.axhline(pts[0][1], color="k", ls="--", lw=1, label=m)
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


def sign_flip_p(d, n_draws: int = 100_000, seed: int = 0) -> float:
    """Two-sided p-value of a paired sign-flip (permutation) test of mean(d) = 0.
    Only the nonzero differences can flip; exact up to 2^16 sign patterns,
    Monte Carlo beyond. When a handful of 260 questions differ, a bootstrap
    interval can exclude zero while this test does not: report both."""
    import numpy as np

    z = np.asarray(d, dtype=np.float64)
    z = z[z != 0]
    if z.size == 0:
        return 1.0
    obs = abs(z.sum()) - 1e-12
    if z.size <= 16:
        signs = 1 - 2 * ((np.arange(2 ** z.size)[:, None] >> np.arange(z.size)) & 1)
        return float((np.abs(signs @ z) >= obs).mean())
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_draws, z.size))
    return float(((np.abs(signs @ z) >= obs).sum() + 1) / (n_draws + 1))


def paired(results: list[dict], a: str, b: str, n_boot: int = 10000, seed: int = 0) -> list[dict]:
    """Method `a` minus method `b` per kept ratio, on the questions both
    answered (the same contexts): mean score difference over questions, a 95%
    bootstrap interval over questions, a sign-flip p-value, and how many
    questions each one won. `b` may be `full` (its one ratio, 1.0, against
    each of `a`'s). `method/mode` pins a side to one mode, so that
    `snapkv/aware:snapkv/agnostic` compares the two protocols."""
    import numpy as np

    (a, a_mode), (b, b_mode) = (x.partition("/")[::2] for x in (a, b))
    by = defaultdict(dict)
    for r in results:
        by[(r["method"], r["ratio"], r["mode"])][(r["group"], r["qid"])] = r["score"]
    methods = {m for m, _, _ in by}
    missing = [x for x in (a, b) if x not in methods]
    if missing:
        raise ValueError(f"no rows for method {', '.join(missing)} (have: {', '.join(sorted(methods))})")
    out = []
    for (m, ratio, mode), sa in sorted(by.items(), key=lambda kv: (kv[0][2], -kv[0][1])):
        kb = (b, 1.0 if _is_full(b) else ratio, b_mode or mode)
        if m != a or (a_mode and mode != a_mode) or kb not in by:
            continue
        label = mode if kb[2] == mode else f"{mode} − {kb[2]}"
        sb = by[kb]
        keys = sorted(set(sa) & set(sb))
        if not keys:
            continue
        d = np.array([sa[k] - sb[k] for k in keys], dtype=np.float64)
        idx = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
        lo, hi = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
        out.append(dict(a=a, b=b, ratio=ratio, mode=label, n=len(d), diff=float(d.mean()), ci_low=float(lo),
                        ci_high=float(hi), p=sign_flip_p(d, seed=seed), a_better=int((d > 0).sum()),
                        b_better=int((d < 0).sum())))
    return out


def _p(p: float) -> str:
    return f"{p:.2f}" if p >= 0.01 else "<0.01"


def _md_table(head: list[str], cells: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, c)) + " |" for c in cells]
    return "\n".join(lines) + "\n"


def paired_markdown(rows: list[dict]) -> str:
    return _md_table(["A", "B", "kept", "mode", "questions", "A − B", "95% CI", "p", "A better", "B better"],
                     [[r["a"], r["b"], f"{r['ratio']:g}", r["mode"], r["n"], f"{r['diff']:+.1f}",
                       f"[{r['ci_low']:+.1f}, {r['ci_high']:+.1f}]", _p(r["p"]), r["a_better"], r["b_better"]]
                      for r in rows])


def same_device(results: list[dict], device: str) -> list[dict]:
    """Rows of the context groups whose every row ran on `device` (`cpu`,
    `gpu`): a paired difference across backends would mix in their rounding."""
    other = {r["group"] for r in results if r.get("device", "cpu") != device}
    return [r for r in results if r["group"] not in other]


def times(results: list[dict]) -> list[dict]:
    """Median wall time per question and its parts (prefill, compression,
    decode) per (mode, method, ratio)."""
    import numpy as np

    by = defaultdict(list)
    for r in results:
        by[(r["mode"], r["method"], float(r["ratio"]))].append(r)
    out = []
    for (mode, method, ratio), rs in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2])):
        med = {f: float(np.median([float(r.get(f, 0.0)) for r in rs]))
               for f in ("seconds", "prefill_s", "compress_s", "decode_s")}
        out.append(dict(mode=mode, method=method, ratio=ratio, n=len(rs), **med))
    return out


def times_markdown(rows: list[dict]) -> str:
    parts = ("seconds", "prefill_s", "compress_s", "decode_s")
    table = _md_table(["method", "kept", "mode", "questions", *parts],
                      [[r["method"], f"{r['ratio']:g}", r["mode"], r["n"], *(f"{r[f]:.1f}" for f in parts)]
                       for r in rows])
    return ("Median per question, seconds (`seconds`: the wall time the row cost, a shared prefill paid "
            "once; `prefill_s` counts a shared prefill in every row).\n\n" + table)


def cache_label(manifest: dict | None) -> str:
    """A run's KV cache types as a label: `q8_0`, or K-V (`q8_0-f16`) for mixed types."""
    tk, tv = ((manifest or {}).get(k, "f16") for k in ("type_k", "type_v"))
    return tk if tk == tv else f"{tk}-{tv}"


def load_runs(run_dirs: list[Path], by_cache: bool = False) -> list[dict]:
    """Rows of one or more run folders. Folders must come from the same data
    file (their manifests' digests agree), since rows are keyed by group index.
    `by_cache`: each method is labelled with its folder's cache types,
    `compactor[q8_0]`, so runs that differ only in the cache sit side by side."""
    from .harness import dedupe, load_run, read_manifest, results_files

    digests, rows = {}, []
    for d in run_dirs:
        if not results_files(d):
            raise SystemExit(f"no results*.jsonl in {d}")
        manifest = read_manifest(d)
        if manifest is not None:  # folders from before manifests cannot be checked
            digests[str(d)] = manifest.get("data")
        run = load_run(d)
        if by_cache:
            label = cache_label(manifest)
            run = [dict(r, method=f"{r['method']}[{label}]") for r in run]
        rows += run
    if len(set(digests.values())) > 1:
        raise SystemExit("run folders come from different data files: "
                         + ", ".join(f"{d} ({h[:12]})" for d, h in digests.items()))
    return dedupe(rows, " + ".join(map(str, run_dirs)))


def main(argv=None):
    import argparse

    from .harness import complete_groups

    ap = argparse.ArgumentParser(description="Summarise `grkv-cpp eval` folders (summary.csv/.md, plots).")
    ap.add_argument("run_dirs", type=Path, nargs="+", metavar="run_dir",
                    help="one run folder, or several run on the same data file, read as one run")
    ap.add_argument("--methods", default=None,
                    help="comma-separated: only these methods (applied before --complete-groups)")
    ap.add_argument("--device", default=None, help="only context groups whose every row ran on this device (cpu, gpu)")
    ap.add_argument("--complete-groups", action="store_true",
                    help="only context groups that every method and ratio finished (a stopped run)")
    ap.add_argument("--out", type=Path, default=None,
                    help="where summary.csv/.md and plots go (default: the run folder; required with several)")
    ap.add_argument("--paired", action="append", default=[], metavar="A:B",
                    help="also print method A minus method B per ratio on the same questions, with a "
                         "95%% bootstrap interval and a sign-flip p-value (repeatable), e.g. snapkv+grkv:snapkv")
    ap.add_argument("--times", action="store_true", help="also print median seconds per question and their parts")
    ap.add_argument("--by-cache", action="store_true",
                    help="label each folder's methods with its KV cache types, e.g. compactor[q8_0], to compare "
                         "runs that differ only in -ctk/-ctv (--paired 'compactor[q8_0]:compactor[f16]')")
    a = ap.parse_args(argv)
    if a.out is None and len(a.run_dirs) > 1:
        raise SystemExit("several run folders: say where the summary goes with --out")
    results = load_runs(a.run_dirs, by_cache=a.by_cache)
    if a.methods:
        keep = {m.strip() for m in a.methods.split(",") if m.strip()}
        unknown = keep - {r["method"] for r in results}
        if unknown:
            raise SystemExit(f"--methods: no rows for {', '.join(sorted(unknown))}")
        results = [r for r in results if r["method"] in keep]
    if a.device:
        results = same_device(results, a.device)
    if a.complete_groups:
        results = complete_groups(results)
    if not results:
        raise SystemExit("no rows left after the filters")
    out = a.out or a.run_dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    print(f"{len({r['group'] for r in results})} contexts, {len(results)} rows\n")
    print(markdown(write_all(results, out)))
    for pair in a.paired:
        ma, _, mb = pair.partition(":")
        try:
            print(paired_markdown(paired(results, ma, mb)))
        except ValueError as e:
            raise SystemExit(f"--paired {pair}: {e}")
    if a.times:
        print(times_markdown(times(results)))


if __name__ == "__main__":
    main()
