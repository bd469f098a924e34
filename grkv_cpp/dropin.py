"""Drop-in compression for code that already uses ``llama_cpp.Llama``.

    >>> llm = llama_cpp.Llama("model.gguf", n_ctx=4096)
    >>> grkv_cpp.compress_llama(llm, method="knorm", ratio=0.5)
    >>> llm.create_chat_completion(messages=[...])       # unchanged

After every prefill of at least `min_tokens` tokens from position 0, the cache
is compressed in place; `create_completion` and `create_chat_completion` then
decode over it. llama-cpp-python reuses the longest common token prefix of the
next prompt: when that prefix ends inside the compressed region, the cells
left there are a compressed remnant of a longer prompt, so the wrapper
prefills the whole prompt again (and compresses it again) instead of
answering from them. Prompts that extend the compressed one (a chat's next
turn) reuse it.

Methods that score with queries (compactor, snapkv, expected...) need the
queries captured during the prefill: the patched llama.cpp switches its eval
callback on for that. On a stock build only query-free methods (knorm,
streaming) are available."""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import kvstate
from .apply import patched_library
from .capture import QUERIES, GraphCapture
from .compressor import capture_positions, compress_cache
from .errors import BadRequestError
from .loader import describe
from .methods import parse_method


@dataclass
class DropIn:
    """What `compress_llama` attached: settings and the last compression."""

    method: str
    ratio: float | None
    budget: int | None
    min_tokens: int
    compressed_until: int = 0   # positions [0, this) hold a compressed cache
    compressions: int = 0
    refills: int = 0            # prompts that diverged inside the compressed region
    last_cells: tuple[int, int] = (0, 0)  # cells before, after


def compress_llama(llm, *, method: str = "knorm", ratio: float | None = 0.5, budget: int | None = None,
                   min_tokens: int = 256, n_threads: int | None = None) -> DropIn:
    """Give `llm` (a ``llama_cpp.Llama``) a compressed cache after each prefill."""
    if getattr(llm, "_grkv", None) is not None:
        raise BadRequestError("this Llama already compresses its cache")
    if (ratio is None) == (budget is None):
        raise BadRequestError("give exactly one of ratio or budget")
    m, merge = parse_method(method)
    if merge is not None:
        raise BadRequestError("the drop-in runs eviction methods only (no +merge)")
    info = describe(llm)
    if getattr(m, "reread", False):
        raise BadRequestError(f"{method} needs a re-read pass, which the drop-in does not run")
    positions_needed = m.needs_queries
    capture = None
    if positions_needed:
        if not patched_library():
            raise BadRequestError(f"{method} scores with the prefill's queries, which a stock llama-cpp-python "
                                  "cannot capture after the context was made; use knorm or streaming, or the "
                                  "patched build (README, 'One build')")
        capture = GraphCapture()
        capture.attach(llm._ctx.ctx)
    state = DropIn(method, ratio, budget, min_tokens)
    original = llm.eval
    threads = n_threads or llm.context_params.n_threads or max(1, os.cpu_count() or 1)

    def eval(tokens):
        tokens = list(tokens)
        start = llm.n_tokens
        if state.compressed_until and start < state.compressed_until:
            # the reused prefix ends inside the compressed region: prefill it again
            tokens = [int(t) for t in llm.input_ids[:start]] + tokens
            llm.n_tokens = 0
            kvstate.remove_from(llm._ctx.ctx, 0)
            state.compressed_until = 0
            state.refills += 1
            start = 0
        if start != 0 or len(tokens) < min_tokens:
            return original(tokens)
        pos, _ = capture_positions(len(tokens), m, None)
        if capture is None or not pos:
            original(tokens)
        else:
            capture.set_targets([(*QUERIES, pos)])
            with capture.enabled():
                original(tokens)
        # the last token's logits are already computed: compressing now changes what follows only
        res = compress_cache(llm._ctx.ctx, info, m, ratio=ratio, budget=budget, capture=capture,
                             n_threads=threads)
        state.compressed_until = llm.n_tokens
        state.compressions += 1
        state.last_cells = (res.cells_before, res.cells_after)

    llm.eval = eval
    llm._grkv = state
    return state


def cells(llm) -> int:
    """Cells the Llama's sequence occupies now (the compressed part included)."""
    return kvstate.parse(kvstate.get_blob(llm._ctx.ctx)).part_info(0)["n_cells"]
