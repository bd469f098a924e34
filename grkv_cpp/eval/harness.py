"""The evaluation loop: JSON Lines questions -> one results row per
(question, method, ratio), kvpress's protocol.

Query-agnostic (default): each context is prefilled once with the full cache
(`prefill_state`), and every method and kept ratio is applied to a restored
copy; each question of the context's group is then asked against that same
compressed cache. Budgeted variants (`snapkv@budget`) run their own chunked
prefill, since compression happens inside it; up to their first compression
it is the same for all of them, so that part is shared within the group
(`compress_budgeted(prefixes=...)`; list ratios in rising order to share
the most). Query-aware (`mode="aware"`): the question sits in the
observation window, so each question costs a prefill, shared by all its
methods and ratios. Results are appended as they come, and a rerun skips
rows already written, so an interrupted run resumes.

A row's `seconds` is the wall time it cost: a shared prefill is paid by the
first row that needs it (after a resume, whichever that is), while
`prefill_s` reports that prefill's time on every row that used it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from .metrics import score as score_answer

RESULT_KEY = ("group", "qid", "method", "ratio", "mode")


@dataclass
class EvalConfig:
    methods: list[str]                 # full, streaming, knorm, snapkv, snapkv+grkv, snapkv@budget, ...
    ratios: list[float]                # kept fractions of the context's cache
    mode: str = "agnostic"             # or "aware"
    window: int = 64                   # queries kept from the shared prefill (the widest method window)
    chunk: int = 512                   # budgeted variants: prefill chunk
    params: dict = field(default_factory=dict)  # per method name: extra parameters (e.g. {"snapkv": {"kernel": 15}})
    default_max_new_tokens: int = 32

    def __post_init__(self):
        if self.mode not in ("agnostic", "aware"):
            raise ValueError("mode must be 'agnostic' or 'aware'")
        bad = [r for r in self.ratios if not 0.0 < r <= 1.0]
        if bad:
            raise ValueError(f"kept ratios must lie in (0, 1]: {bad}")


def group_rows(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """Questions sharing a context, in order of first appearance."""
    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for r in rows:
        for k in ("context", "question", "answers"):
            if k not in r:
                raise ValueError(f"dataset line lacks {k!r}: {str(r)[:120]}")
        if not isinstance(r["answers"], list) or not r["answers"]:
            raise ValueError("'answers' must be a non-empty list of accepted strings")
        groups.setdefault(r["context"], []).append(r)
    return list(groups.items())


def result_key(row: dict) -> tuple:
    """What identifies a results row: a rerun skips rows with a key already written."""
    return tuple(row[k] for k in RESULT_KEY)


def load_results(path: Path) -> list[dict]:
    """A results file's rows. A last line cut by an interruption is dropped
    (that row is redone); an unreadable line elsewhere is skipped with a
    warning, so the rows after it are kept."""
    if not path.exists():
        return []
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                warnings.warn(f"{path}: skipping unreadable line {i + 1}: {line[:60]!r}", stacklevel=2)
    return out


def dedupe(rows: list[dict], what: str = "results") -> list[dict]:
    """One row per result key, the first seen: a shard file left beside the
    results.jsonl it was merged into would otherwise count twice."""
    seen, out = set(), []
    for r in rows:
        k = result_key(r)
        if k not in seen:
            seen.add(k)
            out.append(r)
    if len(out) < len(rows):
        warnings.warn(f"{what}: dropped {len(rows) - len(out)} rows whose (group, question, method, ratio, mode) "
                      "was already seen", stacklevel=2)
    return out


def load_run(out_dir: Path) -> list[dict]:
    """Every row of a run folder (results.jsonl and the shard files), each key once."""
    return dedupe([r for f in results_files(out_dir) for r in load_results(f)], str(out_dir))


MANIFEST = "run.json"


def data_digest(rows: list[dict]) -> str:
    """The dataset's content (not its file's bytes): rows are keyed by group
    index, so resuming into a folder with other data would mix answers."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=True).encode() + b"\n")
    return h.hexdigest()


def read_manifest(out_dir: Path) -> dict | None:
    """A run folder's identity, or None for a folder written before manifests."""
    path = Path(out_dir) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def check_manifest(out_dir: Path, manifest: dict):
    """Write the run's identity (data, model, settings that change answers)
    beside its results, or refuse to resume a folder written with another."""
    from ..errors import BadRequestError

    path = Path(out_dir) / MANIFEST
    old = read_manifest(out_dir)
    if old is not None:
        diff = {k: (old.get(k), v) for k, v in manifest.items() if old.get(k) != v}
        if diff:
            raise BadRequestError(f"{out_dir} holds results of another run ({MANIFEST} differs: "
                                  + "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                                  + "); use another --out")
    else:
        path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _runs(cfg: EvalConfig):
    """(method label, base method, ratio, budgeted) for every method and ratio."""
    for meth in cfg.methods:
        if meth == "full":
            yield "full", "full", 1.0, False
            continue
        base, _, variant = meth.partition("@")
        if variant not in ("", "budget"):
            raise ValueError(f"unknown variant @{variant} (only @budget)")
        for r in cfg.ratios:
            yield meth, base, r, variant == "budget"


def state_window(cfg: EvalConfig) -> int:
    """Queries the shared prefill keeps: the widest window any method needs
    (a context scorer's: every context token)."""
    from ..compressor import observation_window
    from ..methods import parse_method

    w = cfg.window
    for _, base, _, budgeted in _runs(cfg):
        if base != "full" and not budgeted:
            w = max(w, observation_window(*parse_method(base, **_params(cfg, base))))
    return w


def _params(cfg: EvalConfig, base: str) -> dict:
    evict = base.split("+")[0]
    p = dict(cfg.params.get(evict, {}))
    p.update(cfg.params.get(base, {}))
    return p


def results_files(out_dir: Path) -> list[Path]:
    """A run folder's results: results.jsonl and one file per shard."""
    return sorted(Path(out_dir).glob("results*.jsonl"))


def complete_groups(results: list[dict]) -> list[dict]:
    """Rows of the context groups whose every question has every (method,
    ratio, mode) seen in `results`: a stopped run's half-done group would
    otherwise weigh some methods and not others."""
    configs = {(r["method"], r["ratio"], r["mode"]) for r in results}
    have: dict[tuple, set] = {}
    for r in results:
        have.setdefault((r["group"], r["qid"]), set()).add((r["method"], r["ratio"], r["mode"]))
    bad = {g for (g, _), c in have.items() if c != configs}
    return [r for r in results if r["group"] not in bad]


def run_eval(model, rows: list[dict], cfg: EvalConfig, out: Path, *, progress: bool = True,
             model_name: str = "", shard: tuple[int, int] = (0, 1), skip: set | frozenset = frozenset()) -> list[dict]:
    """Evaluate `rows` (dataset lines) on `model` (a CompressedLlama); appends
    result rows to `out` (JSON Lines) and returns all of them, earlier ones
    included. `shard=(i, n)` takes only the context groups whose index is i
    mod n, so n processes (each its own `out`) split one dataset; `skip` holds
    result keys already written elsewhere (another shard's file)."""
    from tqdm.auto import tqdm

    i_shard, n_shard = shard
    if not (n_shard >= 1 and 0 <= i_shard < n_shard):
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = dedupe(load_results(out), str(out))
    done = {result_key(r) for r in results} | set(skip)
    # rewrite the file without a possibly truncated tail (atomically: a crash here loses nothing)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in results))
    os.replace(tmp, out)
    groups = [(gi, g) for gi, g in enumerate(group_rows(rows)) if gi % n_shard == i_shard]
    runs = list(_runs(cfg))
    window = state_window(cfg)
    keys = {(gi, qi, run[0], run[2], cfg.mode) for gi, (_, qs) in groups for run in runs for qi in range(len(qs))}
    bar = tqdm(total=len(keys), initial=len(keys & done), disable=not progress, unit="q",
               desc=f"eval {model_name or ''}".strip())
    with out.open("a") as f:
        for gi, (context, qs) in groups:
            pending = [(run, qi) for run in runs for qi in range(len(qs))
                       if (gi, qi, run[0], run[2], cfg.mode) not in done]
            if not pending:
                continue
            state = []  # the group's full prefill, made on first need
            prefixes = {}  # budgeted variants: chunked prefill up to the first compression

            def get_state(ctx=context):
                if not state:
                    state.append(model.prefill_state(ctx, window=window))
                return state[0]

            if cfg.mode == "aware":
                # the question is part of the prefill: one per question, shared by its methods and ratios
                batches = [(run, [qi]) for qi in range(len(qs)) for run in runs if (run, qi) in pending]
            else:
                batches = [(run, [qi for (r, qi) in pending if r == run]) for run in runs]
            qstate = {}  # query-aware: the current question's prefill

            def get_qstate(qi, ctx=context, qs=qs):
                if qi not in qstate:
                    qstate.clear()  # questions come one after another: keep one state
                    qstate[qi] = model.prefill_state(ctx, window=cfg.window, question=qs[qi]["question"],
                                                     answer_prefix=qs[qi].get("answer_prefix", "") or "")
                return qstate[qi]

            for (label, base, ratio, budgeted), qids in batches:
                if not qids:
                    continue
                if cfg.mode == "aware":
                    new = _aware(model, qs[qids[0]], qids[0], label, base, ratio, cfg, gi, get_qstate)
                else:
                    new = _agnostic(model, context, qs, qids, label, base, ratio, budgeted, get_state, cfg, gi,
                                    prefixes)
                for r in new:
                    r["model"] = model_name
                    r["device"] = getattr(model, "device", "cpu")
                    f.write(json.dumps(r) + "\n")
                    f.flush()
                    results.append(r)
                    bar.update(1)
    bar.close()
    return results


def _row(q: dict, gi: int, qi: int, label: str, ratio: float, mode: str, pred: str, stats, seconds: float) -> dict:
    return dict(group=gi, qid=qi, task=q.get("task", ""), length=q.get("length"), sample=q.get("sample"),
                method=label, ratio=ratio, mode=mode, prediction=pred, answers=q["answers"],
                metric=q.get("metric", "all"), score=score_answer(pred, q), context_tokens=stats.context_tokens,
                kv_cells=stats.kv_cells_after, prefill_s=stats.prefill_s, compress_s=stats.compress_s,
                decode_s=stats.question_s + stats.decode_s, seconds=seconds)


def _ask(model, q: dict, cfg: EvalConfig) -> str:
    return model.ask(q["question"], max_tokens=int(q.get("max_new_tokens") or cfg.default_max_new_tokens),
                     answer_prefix=q.get("answer_prefix", "") or "")


def _agnostic(model, context, qs, qids, label, base, ratio, budgeted, get_state, cfg, gi, prefixes) -> list[dict]:
    t0 = time.perf_counter()
    if base == "full":
        model.restore(get_state())
    elif budgeted:
        n = len(model._tokens_for(context))
        model.compress_budgeted(context, budget=max(1, round(ratio * n)), chunk=cfg.chunk, method=base,
                                prefixes=prefixes, **_params(cfg, base))
    else:
        model.compress_state(get_state(), method=base, ratio=ratio, **_params(cfg, base))
    setup = time.perf_counter() - t0
    out = []
    for qi in qids:
        t1 = time.perf_counter()
        pred = _ask(model, qs[qi], cfg)
        out.append(_row(qs[qi], gi, qi, label, ratio, "agnostic", pred, model.stats,
                        setup / len(qids) + time.perf_counter() - t1))
    return out


def _aware(model, q, qi, label, base, ratio, cfg, gi, get_qstate) -> list[dict]:
    """One question inside the observation window: compress its own prefill
    (context + question, shared by its methods and ratios), then answer."""
    if "@" in label:
        raise ValueError("budgeted variants run query-agnostic only in the harness")
    t0 = time.perf_counter()
    st = get_qstate(qi)
    if base == "full":
        model.restore(st)
    else:
        model.compress_state(st, method=base, ratio=ratio, **_params(cfg, base))
    pred = "".join(model.generate(int(q.get("max_new_tokens") or cfg.default_max_new_tokens))).strip()
    return [_row(q, gi, qi, label, ratio, "aware", pred, model.stats, time.perf_counter() - t0)]
