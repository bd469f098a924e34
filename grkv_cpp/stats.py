from dataclasses import asdict, dataclass, field


@dataclass
class Stats:
    """What the last call did. Cells and bytes are the sequence's KV cache
    (cells of the compressed cache; bytes over all caches, the sliding-window
    cache of iSWA models included)."""

    method: str = "full"
    context_tokens: int = 0
    question_tokens: int = 0
    kv_cells_before: int = 0
    kv_cells_after: int = 0
    kv_bytes_before: int = 0
    kv_bytes_after: int = 0
    prefill_s: float = 0.0
    compress_s: float = 0.0
    reread_s: float = 0.0     # reconstruct: the re-read pass (inside compress_s when it ran in this call)
    question_s: float = 0.0   # ask(): evaluating the question's tokens
    decode_s: float = 0.0     # generating the answer (tokens/s = generated_tokens / decode_s)
    generated_tokens: int = 0
    compressions: int = 0  # budgeted prefill: how many times the cache was compressed
    decode_compressions: int = 0   # decode-time compressions (G-KV schedule) so far
    decode_compress_s: float = 0.0
    kv_buffer_bytes: int = 0   # K/V buffers llama.cpp allocated for the context (sized by n_ctx)
    kv_footprint: float = 0.0  # "Cache Me If You Can" footprint of the prefill (grkv_cpp.footprint)
    kv_peak: float = 0.0       # and its KV peak, as fractions of the full cache
    peak_rss_bytes: int = 0    # peak resident memory of the process so far
    apply_backend: str = ""    # where the compressed layout went: "inplace" (patched llama.cpp) or "blob"
    math: str = "core"         # where scores and selection ran: "core" (C++ on host copies) or "graph" (ggml, the cache's backend)
    note: str = ""             # e.g. a context too short to compress, kept whole
    merge_report: dict = field(default_factory=dict)  # GRKV objectives; "apply": backend, read/math/write seconds

    def to_dict(self) -> dict:
        """JSON-ready: numpy values become Python ones; the merge report's large
        arrays (a scorer's carried per-cell state) are summarised by their shape."""
        return _jsonable(asdict(self))


def _jsonable(x):
    import numpy as np

    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist() if x.size <= 256 else {"shape": list(x.shape), "dtype": str(x.dtype)}
    if isinstance(x, np.generic):
        return x.item()
    return x
