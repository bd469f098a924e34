"""The `grkv-cpp` command line."""

from __future__ import annotations

import json
import sys

import click

from .merges import REGISTRY as MERGES
from .methods import REGISTRY

METHODS_HELP = (f"Eviction method ({', '.join(REGISTRY)}), optionally '+merge' "
                f"({', '.join(MERGES)}), e.g. compactor+grkv; a context scorer may take '-adakv' or '-global' "
                "(head-wise budgets, e.g. compactor-adakv); or 'full' for no compression.")


def _check_method(ctx, param, value):
    if value is None:
        return value
    if value == "full" and param.name != "decode_method":  # decode-time compression needs a method
        return value
    from .methods import parse_method

    try:
        parse_method(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return value


# shared by every command that loads a model
_CACHE_TYPES = ["f16", "bf16", "f32", "q8_0", "q4_0"]


def _cache_type_options(f):
    """llama.cpp's -ctk/-ctv and -fa: the cache's storage types."""
    f = click.option("--flash-attn", "-fa", is_flag=True, help="Flash attention (needed by a quantized V cache).")(f)
    f = click.option("--cache-type-v", "-ctv", "type_v", type=click.Choice(_CACHE_TYPES), default="f16",
                     show_default=True, help="V cache type (quantized V needs --flash-attn).")(f)
    return click.option("--cache-type-k", "-ctk", "type_k", type=click.Choice(_CACHE_TYPES), default="f16",
                        show_default=True, help="K cache type; every method and merge runs on q8_0/q4_0.")(f)


_gpu_layers_option = click.option(
    "--n-gpu-layers", "-ngl", "n_gpu_layers", type=int, default=0, show_default=True,
    help="Layers offloaded to the GPU (-1: all; needs a GPU build of llama-cpp-python).")


def _model(path_or_name: str, *, progress: bool = False, **kw):
    """The model; `progress`: a bar on stderr for long prefills and
    compressions (only on a terminal)."""
    from .llm import CompressedLlama
    from .loader import quiet
    from .models import resolve_model
    from .progress import terminal_bar

    path = resolve_model(path_or_name)
    verbose = kw.pop("verbose", False)
    if verbose:
        m = CompressedLlama(path, verbose=True, **kw)
    else:
        with quiet():
            m = CompressedLlama(path, **kw)
    m.progress.callback = terminal_bar(progress)
    return m


def require_extra(extra: str, modules: tuple[str, ...]):
    """Name a missing optional extra before any work starts, not after it."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise click.ClickException(f"this command needs the '{extra}' extra ({', '.join(missing)} missing): "
                                   f"pip install 'grkv-cpp[{extra}]'")


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


class _Main(click.Group):
    """Our own errors (bad arguments, a context that does not fit, a refused
    model) end the command with their message, not a traceback."""

    def invoke(self, ctx):
        from .errors import GrkvError

        try:
            return super().invoke(ctx)
        except GrkvError as e:
            raise click.ClickException(f"{type(e).__name__}: {e}") from None


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="grkv-cpp")
def main():
    """Compressed-KV-cache inference for GGUF models through llama.cpp."""


@main.command()
@click.option("--model", "model", default="smollm2", show_default=True,
              help="GGUF path, or smollm2 / gemma3 from their PyPI packages.")
@click.option("--kv-ratio", type=float, default=0.5, show_default=True, help="Kept fraction of the context.")
@click.option("--threads", type=int, default=None, help="CPU threads (default: all cores).")
@_gpu_layers_option
def demo(model, kv_ratio, threads, n_gpu_layers):
    """Full cache against compressed caches on a built-in long context."""
    from .texts import demo_context

    context, needles = demo_context()
    m = _model(model, n_ctx=2048, n_threads=threads, n_gpu_layers=n_gpu_layers, progress=True)
    from .apply import backend

    click.echo(f"model: {model} ({m.info.arch}, {m.info.n_layer} layers, {m.info.n_head_kv} KV heads); "
               f"apply backend: {backend().name}")
    kept = f"{kv_ratio:.0%} kept"
    runs = [("full cache", None, {}),
            (f"compactor (the default), {kept}", "compactor", {}),
            (f"reconstruct (re-read pass), {kept}", "reconstruct", {}),
            (f"snapkv (kvpress defaults: per head, kernel 5), {kept}", "snapkv", {}),
            (f"snapkv shared set, kernel 15, {kept}", "snapkv", dict(shared=True, kernel=15)),
            (f"snapkv shared k15 + grkv, {kept}", "snapkv+grkv", dict(shared=True, kernel=15)),
            (f"streaming, {kept}", "streaming", {}), (f"knorm, {kept}", "knorm", {})]
    rows = []
    for label, method, kw in runs:
        st = m.prefill(context) if method is None else m.compress(context, method=method, ratio=kv_ratio, **kw)
        click.echo(f"\n== {label}: {st.kv_cells_after}/{st.context_tokens} cells, "
                   f"KV {_human_bytes(st.kv_bytes_after)} (full {_human_bytes(st.kv_bytes_before)}), "
                   f"prefill {st.prefill_s:.2f}s, compress {st.compress_s * 1000:.0f} ms")
        ok = 0
        for nd in needles:
            ans = m.ask(nd.question, max_tokens=16)
            hit = nd.answer in ans
            ok += hit
            click.echo(f"  [{'ok' if hit else '--'}] {nd.question}  ->  {ans}  (decode {m.stats.decode_s:.2f}s)")
        if st.merge_report.get("choice"):
            ch = st.merge_report["choice"]
            click.echo(f"  grkv: layers updated K+V {sum(c == 2 for c in ch)}, V only {sum(c == 1 for c in ch)}, "
                       f"unchanged {sum(c == 0 for c in ch)}; surrogate objective "
                       f"{sum(st.merge_report['obj_none']):.1f} -> {sum(st.merge_report['obj_kv']):.1f}")
        rows.append((label, ok))
    click.echo(f"\nQuery-aware SnapKV, kernel 15 (question inside the observation window), {kv_ratio / 2:.0%} kept:")
    for nd in needles:
        ans = m.answer_query_aware(context, nd.question, method="snapkv", ratio=kv_ratio / 2, kernel=15,
                                   max_tokens=16)
        click.echo(f"  [{'ok' if nd.answer in ans else '--'}] {nd.question}  ->  {ans}")
    click.echo("\nfacts found: " + ", ".join(f"{label} {ok}/{len(needles)}" for label, ok in rows))


@main.command()
@click.option("--model", required=True, help="GGUF path, or smollm2 / gemma3.")
@click.option("--context-file", type=click.File("r"), default=None,
              help="Text file with the long context ('-' = stdin).")
@click.option("--save-context", "save_context", type=click.Path(dir_okay=False), default=None,
              help="After compressing, save the compressed context to this file (reload with --load-context).")
@click.option("--load-context", "load_context", type=click.Path(dir_okay=False), default=None,
              help="Answer from a context saved with --save-context instead of reading --context-file.")
@click.option("--question", "questions", multiple=True, required=True, help="Repeat for several questions.")
@click.option("--method", default=None, callback=_check_method,
              help=METHODS_HELP + " Default: compactor; snapkv with --query-aware or --chunk.")
@click.option("--kv-ratio", type=float, default=None, help="Kept fraction of the context's cache (default 0.5).")
@click.option("--kv-budget", type=int, default=None, help="Kept tokens (cells).")
@click.option("--chunk", type=int, default=None,
              help="With --kv-budget: bounded-memory prefill in chunks of this many tokens, compressing back to "
                   "the budget after each; the context is sized budget + chunk + answer room.")
@click.option("--shared", is_flag=True, help="One token set for all layers and heads (default: per layer and KV head).")
@click.option("--math", "math_path", type=click.Choice(["core", "graph"]), default="core", show_default=True,
              help="Where scores and selection run: the C++ core on host copies, or ggml graphs on the cache's own "
                   "backend (snapkv, knorm, streaming eviction; patched build).")
@click.option("--query-aware", is_flag=True, help="Compress with the (single) question inside the window.")
@click.option("--window", type=int, default=32, show_default=True, help="SnapKV observation window.")
@click.option("--kernel", type=int, default=5, show_default=True, help="SnapKV pooling kernel.")
@click.option("--n-sink", type=int, default=4, show_default=True, help="StreamingLLM sink tokens.")
@click.option("--query-mode", type=click.Choice(["window", "stratified", "reread"]), default="window", show_default=True,
              help="GRKV surrogate queries.")
@click.option("--lam", type=float, default=0.01, show_default=True, help="GRKV ridge strength.")
@click.option("--steps", type=int, default=1, show_default=True, help="GRKV steps.")
@click.option("--guard", type=float, default=0.1, show_default=True, help="GRKV anchor fraction kept fixed.")
@click.option("--protect-divisor", type=int, default=4, show_default=True,
              help="laser: budget/n anchor tokens and budget/n local tokens.")
@click.option("--decode-budget", type=int, default=None,
              help="Re-compress to this many cells while generating (G-KV schedule).")
@click.option("--decode-every", type=int, default=128, show_default=True,
              help="With --decode-budget: compress every this many generated tokens.")
@click.option("--decode-method", default="gkv", show_default=True, callback=_check_method,
              help="With --decode-budget: the method scoring with the latest tokens' queries.")
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--n-ctx", type=int, default=4096, show_default=True)
@_cache_type_options
@click.option("--threads", type=int, default=None)
@_gpu_layers_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: answers and stats.")
@click.option("--verbose", is_flag=True, help="Show llama.cpp's log.")
def ask(model, context_file, save_context, load_context, questions, method, kv_ratio, kv_budget, chunk, shared, math_path,
        query_aware, window, kernel, n_sink,
        query_mode, lam, steps, guard, protect_divisor, decode_budget, decode_every, decode_method, max_tokens, n_ctx,
        flash_attn, type_k, type_v, threads, n_gpu_layers, as_json, verbose):
    """Answer questions about a long context from a compressed KV cache."""
    if method is None:  # Compactor needs the whole context and no question; the others run chunked / query-aware
        method = "snapkv" if query_aware or chunk is not None else "compactor"
    if (context_file is None) == (load_context is None):
        raise click.UsageError("give --context-file FILE or --load-context FILE")
    if load_context is not None and (save_context or query_aware or chunk is not None):
        raise click.UsageError("--load-context answers from a saved context: it takes no --save-context, "
                               "--query-aware or --chunk")
    if kv_ratio is not None and kv_budget is not None:
        raise click.UsageError("give one of --kv-ratio or --kv-budget, not both")
    if method != "full" and kv_ratio is None and kv_budget is None:
        kv_ratio = 0.5
    if query_aware and method == "full":
        raise click.UsageError("--query-aware compresses: give a method other than full")
    if query_aware and len(questions) != 1:
        raise click.UsageError("--query-aware compresses for one question; give exactly one --question")
    if chunk is not None and (kv_budget is None or method == "full"):
        raise click.UsageError("--chunk runs a budgeted request: it needs --kv-budget and a method")
    if math_path != "core" and (query_aware or chunk is not None or load_context is not None):
        raise click.UsageError("--math graph runs a plain compression: no --query-aware, --chunk or --load-context")
    context = context_file.read() if context_file is not None else None
    kw = {}
    if chunk is not None:
        n_ctx = kv_budget + chunk + max_tokens + 256  # the cache never holds more than this
        kw["swa_full"] = False  # an iSWA model's window cache sized for the window, not n_ctx
    m = _model(model, n_ctx=n_ctx, flash_attn=flash_attn, n_threads=threads, n_gpu_layers=n_gpu_layers,
               verbose=verbose, progress=not as_json, type_k=type_k, type_v=type_v, **kw)
    evict, _, merge = method.partition("+")
    params = {"snapkv": {"window_size": window, "kernel": kernel}, "streaming": {"n_sink": n_sink},
              "laser": {"window_size": window, "protect_divisor": protect_divisor}}.get(evict, {})
    if merge == "grkv":
        params.update(query_mode=query_mode, lam=lam, steps=steps, guard=guard)
    results = []
    if decode_budget is not None:
        m.decode_compression(decode_budget, every=decode_every, method=decode_method)
    if query_aware and chunk is not None:  # budgeted, each chunk scored by the question's queries
        m.compress_budgeted(context, budget=kv_budget, chunk=chunk, method=method, shared=shared,
                            question=questions[0], **params)
        ans = m.ask(questions[0], max_tokens=max_tokens)
        results.append({"question": questions[0], "answer": ans, "stats": m.stats.to_dict()})
    elif query_aware:
        ans = m.answer_query_aware(context, questions[0], method=method, ratio=kv_ratio, budget=kv_budget,
                                   shared=shared, max_tokens=max_tokens, **params)
        results.append({"question": questions[0], "answer": ans, "stats": m.stats.to_dict()})
    else:
        if load_context is not None:
            m.load(load_context)
        elif method == "full":
            m.prefill(context)
        elif chunk is not None:
            m.compress_budgeted(context, budget=kv_budget, chunk=chunk, method=method, shared=shared, **params)
        else:
            m.compress(context, method=method, ratio=kv_ratio, budget=kv_budget, shared=shared, math=math_path,
                       **params)
        if save_context is not None:
            size = m.save(save_context)
            click.echo(f"saved the compressed context to {save_context}: {_human_bytes(size)} "
                       f"(the full cache's K/V: {_human_bytes(m.stats.kv_bytes_before)})", err=True)
        if m.stats.note:
            click.echo(f"note: {m.stats.note}", err=True)
        for q in questions:
            ans = m.ask(q, max_tokens=max_tokens)
            results.append({"question": q, "answer": ans, "stats": m.stats.to_dict()})
    if as_json:
        json.dump({"model": model, "method": method, "kv_ratio": kv_ratio, "kv_budget": kv_budget,
                   "shared": shared, "query_aware": query_aware, "results": results}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    st = results[0]["stats"]
    click.echo(f"context {st['context_tokens']} tokens; KV cells {st['kv_cells_before']} -> {st['kv_cells_after']}, "
               f"bytes {_human_bytes(st['kv_bytes_before'])} -> {_human_bytes(st['kv_bytes_after'])}; "
               f"prefill {st['prefill_s']:.2f}s, compress {st['compress_s'] * 1000:.0f} ms")
    for r in results:
        click.echo(f"Q: {r['question']}\nA: {r['answer']}  ({r['stats']['decode_s']:.2f}s)")



@main.command()
@click.option("--model", "-m", "model", default="smollm2", show_default=True,
              help="GGUF path, or smollm2 / gemma3.")
@click.option("--alias", default="", help="Model id reported by /v1/models (default: the file's stem).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--ctx-size", "-c", "n_ctx", type=int, default=4096, show_default=True, help="Context cells.")
@_gpu_layers_option
@click.option("--threads", "-t", type=int, default=None)
@_cache_type_options
@click.option("--method", default="compactor", show_default=True, callback=_check_method,
              help=METHODS_HELP + " Per request: the body field grkv.method.")
@click.option("--kv-ratio", type=float, default=None, help="Kept fraction of each document (default 0.5).")
@click.option("--kv-budget", type=int, default=None, help="Kept tokens of each document.")
@click.option("--min-compress", type=int, default=256, show_default=True,
              help="Documents shorter than this many tokens are kept whole.")
@click.option("--cache-mib", type=int, default=1024, show_default=True,
              help="In-memory LRU of compressed documents, in MiB.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Spill documents evicted from memory to context files here.")
@click.option("--max-queue", type=int, default=8, show_default=True,
              help="Requests waiting behind the running one; more are answered 503 with Retry-After.")
@click.option("--decode-budget", type=int, default=None, help="Bound long generations to this many cells (G-KV).")
@click.option("--decode-every", type=int, default=128, show_default=True)
@click.option("--verbose", is_flag=True, help="Show llama.cpp's log and uvicorn's access log.")
def serve(model, alias, host, port, n_ctx, n_gpu_layers, threads, type_k, type_v, flash_attn, method, kv_ratio,
          kv_budget, min_compress, cache_mib, cache_dir, max_queue, decode_budget, decode_every, verbose):
    """OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models) that compresses each
    prompt's document once and reuses it for every prompt that starts with it."""
    require_extra("server", ("fastapi", "uvicorn"))
    import math

    import uvicorn

    from .models import resolve_model
    from .server import ServerSettings, create_app

    if kv_ratio is not None and kv_budget is not None:
        raise click.UsageError("give one of --kv-ratio or --kv-budget, not both")
    if kv_ratio is not None and not (math.isfinite(kv_ratio) and 0 < kv_ratio <= 1):
        raise click.BadParameter("must lie in (0, 1]", param_hint="--kv-ratio")
    if kv_budget is not None and kv_budget < 1:
        raise click.BadParameter("must be >= 1", param_hint="--kv-budget")
    if kv_ratio is None and kv_budget is None:
        kv_ratio = 0.5
    settings = ServerSettings(model=str(resolve_model(model)), alias=alias, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers,
                              n_threads=threads, type_k=type_k, type_v=type_v, flash_attn=flash_attn, method=method,
                              kv_ratio=kv_ratio, kv_budget=kv_budget, min_compress=min_compress,
                              cache_bytes=cache_mib << 20, cache_dir=cache_dir, max_queue=max_queue,
                              decode_budget=decode_budget, decode_every=decode_every)
    app = create_app(settings)
    click.echo(f"grkv-cpp serving {settings.model} on http://{host}:{port}/v1 ({method}, "
               f"{f'{kv_ratio:.0%} kept' if kv_ratio else f'{kv_budget} tokens kept'})", err=True)
    uvicorn.run(app, host=host, port=port, log_level="info" if verbose else "warning", access_log=verbose)


def _floats(ctx, param, value):
    try:
        return [float(x) for x in value.split(",") if x]
    except ValueError:
        raise click.BadParameter("a comma-separated list of numbers") from None


def _shard(ctx, param, value):
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise click.BadParameter("I/N, e.g. 0/2") from None
    if not (n >= 1 and 0 <= i < n):
        raise click.BadParameter(f"I/N needs 0 <= I < N, got {value}")
    return i, n


def _ints(ctx, param, value):
    try:
        return [int(x) for x in value.split(",") if x]
    except ValueError:
        raise click.BadParameter("a comma-separated list of integers") from None


@main.command("eval")
@click.option("--model", required=True, help="GGUF path, or smollm2 / gemma3.")
@click.option("--data", "data", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON Lines dataset (context, question, answers[, answer_prefix, max_new_tokens, task, metric]).")
@click.option("--generate", "gen_tasks", default=None,
              help="Generate RULER-style tasks instead: 'all' or a comma list (niah_single_1,vt,...).")
@click.option("--lengths", default="1024", show_default=True, callback=_ints, help="With --generate: prompt lengths.")
@click.option("--samples", type=int, default=20, show_default=True, help="With --generate: samples per task and length.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--methods", default="full,streaming,knorm,snapkv", show_default=True,
              help="Comma list: full, streaming, knorm, snapkv, snapkv+grkv, snapkv+merge, ...; '@budget' for the "
                   "bounded-memory (chunked) variant, e.g. snapkv@budget.")
@click.option("--ratios", default="0.5,0.75,0.9", show_default=True, callback=_floats, help="Kept fractions.")
@click.option("--mode", type=click.Choice(["agnostic", "aware"]), default="agnostic", show_default=True,
              help="agnostic: compress the context alone, then ask (kvpress); aware: question in the window.")
@click.option("--kernel", type=int, default=None, help="SnapKV pooling kernel (default: kvpress's 5).")
@click.option("--window", type=int, default=None, help="SnapKV observation window (default 32; kvpress 0.5.5 uses 64).")
@click.option("--shared", is_flag=True, help="One token set for all layers and heads.")
@click.option("--param", "method_params", multiple=True, metavar="METHOD.KEY=VALUE",
              help="A method's parameter, e.g. expected.eps=0.01 or reconstruct.n_recent=32 (repeatable).")
@click.option("--chunk", type=int, default=512, show_default=True, help="@budget variants: prefill chunk.")
@click.option("--limit", type=int, default=None, help="Only the first N context groups.")
@click.option("--shard", default="0/1", show_default=True, callback=_shard,
              help="I/N: only context groups I, I+N, ... (run N processes on one --out to use N cores).")
@click.option("--n-ctx", type=int, default=None, help="Context size (default: longest prompt + 512).")
@_cache_type_options
@click.option("--threads", type=int, default=None)
@_gpu_layers_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Output folder: data.jsonl (if generated), results.jsonl, summary.csv/.md, plots.")
def eval_cmd(model, data, gen_tasks, lengths, samples, seed, methods, ratios, mode, kernel, window, shared, method_params,
             chunk, limit, shard, n_ctx, flash_attn, type_k, type_v, threads, n_gpu_layers, out_dir):
    """Score against kept ratio on a JSON Lines dataset or generated RULER-style tasks."""
    from pathlib import Path

    from .eval import ruler
    from .eval.harness import (
        EvalConfig,
        check_manifest,
        data_digest,
        dedupe,
        load_results,
        result_key,
        results_files,
        run_eval,
    )
    from .models import resolve_model

    require_extra("eval", ("tqdm", "matplotlib") + (("wonderwords",) if gen_tasks is not None else ()))
    from .eval.report import markdown, write_all

    if (data is None) == (gen_tasks is None):
        raise click.UsageError("give exactly one of --data FILE or --generate TASKS")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = resolve_model(model)
    if gen_tasks is not None:
        data_file = out / "data.jsonl"
        if data_file.exists():
            click.echo(f"reusing {data_file}")
            rows = ruler.read_jsonl(data_file)
        else:
            tasks = list(ruler.TASKS) if gen_tasks == "all" else gen_tasks.split(",")
            rows = ruler.generate(tasks, lengths, ruler.gguf_tokenizer(path), n_samples=samples, seed=seed)
            ruler.write_jsonl(rows, data_file)
            click.echo(f"wrote {len(rows)} questions to {data_file}")
    else:
        rows = ruler.read_jsonl(Path(data))
    digest = data_digest(rows)  # the whole file's: a --limit run may resume a full one
    if limit is not None:
        keep, seen = [], []
        for r in rows:
            if r["context"] not in seen:
                seen.append(r["context"])
            if len(seen) <= limit:
                keep.append(r)
        rows = keep
    params = {}
    if kernel is not None:
        params.setdefault("snapkv", {})["kernel"] = kernel
    if window is not None:
        params.setdefault("snapkv", {})["window_size"] = window
    if shared:
        for m in methods.split(","):
            params.setdefault(m.split("+")[0].split("@")[0], {})["shared"] = True
    for item in method_params:
        name, key, value = _method_param(item)
        params.setdefault(name, {})[key] = value
    cfg = EvalConfig(methods=methods.split(","), ratios=ratios, mode=mode, chunk=chunk, params=params,
                     window=max(64, window or 0))
    manifest = dict(data=digest, model=Path(path).stem, window=cfg.window, chunk=chunk, params=params,
                    flash_attn=bool(flash_attn), default_max_new_tokens=cfg.default_max_new_tokens)
    if (type_k, type_v) != ("f16", "f16"):  # f16 folders written before these flags stay resumable
        manifest.update(type_k=type_k, type_v=type_v)
    check_manifest(out, manifest)
    longest = _longest(rows, path)
    if any(x.split("+")[0] == "reconstruct" for x in methods.split(",")):
        longest += min(longest, 2048) + 64  # the re-read pass's chunk and prompt, after the context
    m = _model(model, n_ctx=n_ctx or longest + 512, flash_attn=flash_attn, n_threads=threads,
               n_gpu_layers=n_gpu_layers, type_k=type_k, type_v=type_v)
    i, n = shard
    own = out / ("results.jsonl" if n == 1 else f"results.shard{i}of{n}.jsonl")
    others = dedupe([r for f in results_files(out) if f != own for r in load_results(f)], str(out))
    results = run_eval(m, rows, cfg, own, model_name=Path(path).stem, shard=shard,
                       skip={result_key(r) for r in others})
    # the summary covers every shard's rows written so far
    summary = write_all(others + results, out)
    click.echo(markdown(summary))


def _method_param(item: str):
    """`METHOD.KEY=VALUE` -> (method, key, value as int, float, bool or text)."""
    import json

    lhs, eq, value = item.partition("=")
    name, dot, key = lhs.partition(".")
    if not (eq and dot and name and key):
        raise click.BadParameter(f"{item!r}: expected METHOD.KEY=VALUE", param_hint="--param")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return name, key, parsed


def _longest(rows, path) -> int:
    from .eval import ruler

    tok = ruler.gguf_tokenizer(path)
    return max(len(tok(r["context"] + r["question"])) for r in rows) + 64


@main.command()
@click.option("--verbose", "-v", is_flag=True, help="Also print what was verified and the test that shows it.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def models(verbose, as_json):
    """The llama.cpp architectures grkv-cpp compresses, and those it refuses with the reason."""
    import textwrap

    from .architectures import support_table

    rows = support_table()
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(f"{'arch':10s} {'status':10s} families / reason")
    for r in rows:
        text = r["families"] if r["status"] == "supported" else r["notes"]
        click.echo(f"{r['arch']:10s} {r['status']:10s} {text}")
        if verbose and r["status"] == "supported":
            for label in ("notes", "verified", "test"):
                click.echo(textwrap.fill(f"{label}: {r[label]}", 100, initial_indent=" " * 22,
                                         subsequent_indent=" " * 24))
    if not verbose:
        click.echo("\n(-v: what was verified for each, and the tests that show it)")


@main.command()
@click.option("--model", required=True, help="GGUF path, or smollm2 / gemma3.")
@click.option("--context-tokens", type=int, default=1024, show_default=True)
@click.option("--continuation", type=int, default=256, show_default=True)
@click.option("--methods", default="streaming,knorm,snapkv,snapkv+grkv", show_default=True)
@click.option("--ratios", default="0.5,0.75,0.9", show_default=True, callback=_floats)
@click.option("--text-file", type=click.File("r"), default=None,
              help="Plain text to use (default: the packaged long text, see docs/results.md).")
@click.option("--threads", type=int, default=None)
@_gpu_layers_option
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="JSON output.")
def divergence(model, context_tokens, continuation, methods, ratios, text_file, threads, n_gpu_layers, out):
    """Teacher-forced KL divergence and perplexity of a continuation, compressed vs full cache."""
    from .eval.divergence import run_divergence
    from .eval.texts import long_text

    text = text_file.read() if text_file else long_text()
    m = _model(model, n_ctx=context_tokens + continuation + 256, n_threads=threads, n_gpu_layers=n_gpu_layers)
    rows = run_divergence(m, text, context_tokens=context_tokens, continuation=continuation,
                          methods=methods.split(","), ratios=ratios)
    click.echo(f"{'method':16s} {'kept':>5s} {'KL mean':>8s} {'KL med':>8s} {'PPL':>7s} {'PPL full':>8s} {'top1':>5s}")
    for r in rows:
        click.echo(f"{r['method']:16s} {r['ratio']:5.2f} {r['kl_mean']:8.4f} {r['kl_median']:8.4f} {r['ppl']:7.3f} "
                   f"{r['ppl_full']:8.3f} {r['top1_agree']:5.2f}")
    if out:
        with open(out, "w") as f:
            json.dump(dict(model=model, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
