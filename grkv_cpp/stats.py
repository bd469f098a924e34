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
    decode_s: float = 0.0
    generated_tokens: int = 0
    compressions: int = 0  # budgeted prefill: how many times the cache was compressed
    merge_report: dict = field(default_factory=dict)  # GRKV: per-layer objectives and safeguard choice

    def to_dict(self) -> dict:
        return asdict(self)
