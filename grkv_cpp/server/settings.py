"""What `grkv-cpp serve` is started with."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerSettings:
    model: str                      # GGUF path (resolved)
    alias: str = ""                 # the id /v1/models reports (default: the file's stem)
    n_ctx: int = 4096               # -c
    n_gpu_layers: int = 0           # -ngl
    n_threads: int | None = None
    type_k: str = "f16"             # -ctk
    type_v: str = "f16"             # -ctv
    flash_attn: bool = False
    method: str = "compactor"       # default compression of a prompt's document
    kv_ratio: float | None = 0.5
    kv_budget: int | None = None
    min_compress: int = 256         # documents shorter than this are not compressed
    cache_bytes: int = 1 << 30      # in-memory LRU of compressed contexts
    cache_dir: str | None = None    # spill evicted contexts here (context files)
    max_queue: int = 8              # requests waiting beyond the running one; more get 503
    decode_budget: int | None = None
    decode_every: int = 128
    max_tokens: int = 256           # when a request gives none
