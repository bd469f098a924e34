"""Memory table: compression stacked on quantised KV caches at long contexts.

For each model, context length and cache type (f16, q8_0, q4_0): the KV
bytes the sequence holds and the bytes per context token, with the whole
cache, compressed to each kept ratio after a full prefill, and under a
budget (the bounded-memory chunked prefill, in a context sized for the
budget). Also the K/V buffers llama.cpp allocated, which is what a budget
saves and a ratio does not. Every measured row is a real run; the pass key
hidden in the haystack is asked for as a sanity check. Writes JSON (after
every row, so a stopped run keeps what it measured).

`--derive q8_0,q4_0` skips those types' runs and derives their rows from
the f16 rows of the same length: every cache layer holds the same cells
whatever the type, so bytes scale by the type's bytes per value (q8_0 34/64
of f16, q4_0 18/64). Rows measured beside a derivable f16 row are checked
against the derivation (`derived_bytes_match`), which is how the rule is
known to hold to the byte.

    python scripts/bench_quant_memory.py --model smollm2 --tokens 4096 --out results/quant_memory_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from tqdm import tqdm

from grkv_cpp import CompressedLlama
from grkv_cpp.loader import quiet
from grkv_cpp.methods.context import ALL_QUERIES
from grkv_cpp.models import resolve_model
from grkv_cpp.texts import haystack, passkey_needle


def context_of(model: CompressedLlama, n_tokens: int) -> tuple[str, object]:
    """A haystack whose templated prompt is close to (and at most) n_tokens."""
    needle = passkey_needle(48213)
    per = len(model.tokenize(haystack(100, [(0.5, needle)]), False)) / 100
    n = int(n_tokens / per)
    while n > 1 and len(model._tokens_for(haystack(n, [(0.5, needle)]))) > n_tokens:
        n -= max(1, n // 200)
    return haystack(n, [(0.5, needle)]), needle


def row(tokens, cache, what, st, t0, found):
    return dict(tokens_target=tokens, cache=cache, kept=what, method=st.method, context_tokens=st.context_tokens,
                cells=st.kv_cells_after, kv_bytes=st.kv_bytes_after,
                bytes_per_token=st.kv_bytes_after / st.context_tokens, kv_buffer_bytes=st.kv_buffer_bytes,
                pass_key_found=found, seconds=time.perf_counter() - t0)


def bytes_per_value(t: str) -> float:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[t.upper()]]
    return size / block


def derived(f16_row: dict, t: str) -> dict:
    f = bytes_per_value(t) / bytes_per_value("f16")
    r = dict(f16_row, cache=t, derived=True, pass_key_found=None, seconds=None)
    for k in ("kv_bytes", "kv_buffer_bytes"):
        r[k] = int(round(f16_row[k] * f))
    r["bytes_per_token"] = r["kv_bytes"] / r["context_tokens"]
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", default="4096,16384")
    ap.add_argument("--types", default="f16,q8_0,q4_0")
    ap.add_argument("--ratios", default="0.5,0.25")
    ap.add_argument("--method", default="compactor")
    ap.add_argument("--budget", type=float, default=0.25, help="budget as a fraction of the context")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--derive", default="", help="types derived from the f16 rows instead of run")
    ap.add_argument("--append", action="store_true", help="add to the rows already in --out")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table", type=Path, nargs="+", default=None, metavar="JSON",
                    help="print the markdown table of results already written, and exit")
    a = ap.parse_args(argv)
    if a.table:
        print(markdown([json.loads(p.read_text()) for p in a.table]))
        return
    path = resolve_model(a.model)
    lengths = [int(x) for x in a.tokens.split(",")]
    derive = [t for t in a.derive.split(",") if t]
    types = [t for t in a.types.split(",") if t not in derive]
    if derive and "f16" not in types:
        raise SystemExit("--derive needs the f16 rows: keep f16 in --types")
    ratios = [float(x) for x in a.ratios.split(",")]
    rows = json.loads(a.out.read_text())["rows"] if a.append and a.out and a.out.exists() else []

    def save():
        if a.out:
            a.out.write_text(json.dumps(dict(model=a.model, method=a.method, chunk=a.chunk, rows=finish(rows)),
                                        indent=1))

    contexts = {}  # per length: the tokenizer, not the cache type, decides the haystack
    jobs = [(n, t) for n in lengths for t in types]
    for n, t in tqdm(jobs, desc=f"memory {a.model}", unit="run"):
        kw = dict(flash_attn=True, type_k=t, type_v=t, n_threads=a.threads)
        with quiet():
            m = CompressedLlama(path, n_ctx=n + 256, **kw)
        if n not in contexts:
            contexts[n] = context_of(m, n)
        text, needle = contexts[n]
        t0 = time.perf_counter()
        st = m.prefill_state(text, window=ALL_QUERIES)
        full = m.restore(st)
        rows.append(row(n, t, 1.0, full, t0, needle.answer in m.ask(needle.question, max_tokens=12)))
        tqdm.write(json.dumps(rows[-1]))
        for r in ratios:
            t0 = time.perf_counter()
            s = m.compress_state(st, method=a.method, ratio=r)
            rows.append(row(n, t, r, s, t0, needle.answer in m.ask(needle.question, max_tokens=12)))
            tqdm.write(json.dumps(rows[-1]))
        del st
        m.close()
        budget = int(a.budget * n)
        with quiet():
            mb = CompressedLlama.for_budget(path, budget=budget, chunk=a.chunk, **kw)
        t0 = time.perf_counter()
        s = mb.compress_budgeted(text, budget=budget, chunk=a.chunk, method=a.method)
        rows.append(row(n, t, f"budget {budget}", s, t0, needle.answer in mb.ask(needle.question, max_tokens=12)))
        tqdm.write(json.dumps(rows[-1]))
        mb.close()
        save()
    for n in lengths:
        for t in derive:
            rows += [derived(r, t) for r in rows
                     if r["tokens_target"] == n and r["cache"] == "f16" and not r.get("derived")]
    save()


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def markdown(results: list[dict]) -> str:
    """One line per model, length, cache type and kept setting."""
    lines = ["| model | tokens | cache | kept | cells | KV bytes | bytes/token | of f16 full | KV buffer | pass key |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            kept = f"{r['kept'] * 100:.0f}%" if isinstance(r["kept"], float) else r["kept"]
            key = "derived" if r.get("derived") else ("found" if r["pass_key_found"] else "missed")
            lines.append(f"| {res['model']} | {r['context_tokens']} | {r['cache']} | {kept} | {r['cells']} | "
                         f"{_mb(r['kv_bytes'])} | {r['bytes_per_token']:.0f} | {r['of_f16_full'] * 100:.1f}% | "
                         f"{_mb(r['kv_buffer_bytes'])} | {key} |")
    return "\n".join(lines)


def finish(rows: list[dict]) -> list[dict]:
    """Each row against the f16 full cache of its length; measured rows
    checked against the rule the derived ones follow."""
    for r in rows:
        base = next((x for x in rows if x["tokens_target"] == r["tokens_target"] and x["cache"] == "f16"
                     and x["kept"] == 1.0), None)
        if base is None:
            continue
        r["of_f16_full"] = r["kv_bytes"] / base["kv_bytes"]
        r["buffer_of_f16_full"] = r["kv_buffer_bytes"] / base["kv_buffer_bytes"]
        twin = next((x for x in rows if x["tokens_target"] == r["tokens_target"] and x["cache"] == "f16"
                     and x["kept"] == r["kept"] and not x.get("derived")), None)
        if not r.get("derived") and r["cache"] != "f16" and twin is not None:
            d = derived(twin, r["cache"])
            r["derived_bytes_match"] = (d["kv_bytes"], d["kv_buffer_bytes"]) == (r["kv_bytes"], r["kv_buffer_bytes"])
    return rows


if __name__ == "__main__":
    main()
