"""What the compressor must know about each llama.cpp architecture it supports,
read from the pinned llama.cpp's graphs (src/models/<arch>.cpp), and the
reason for each one it refuses.

For every supported architecture the eval callback's ``Qcur-<il>`` ROPE node
is the post-RoPE query; what differs is the scale llama.cpp applies to q.k
after that node, the RoPE pairing, per-pair frequency factors, and which
layers live in the compressed (non-sliding-window) cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    name: str
    families: str
    # Tensors holding per-pair RoPE frequency divisors, in llama.cpp's order of
    # preference: llama's rope_freqs, or phi3's long/short pair (chosen by n_ctx).
    rope_factor_tensors: tuple[str, ...] = ()
    iswa_pattern: int = 0        # every n-th layer is global, the rest sliding-window (0: no iSWA)
    # attention-logit soft cap c * tanh(z / c): llama.cpp's default, overridden by
    # `{arch}.attn_logit_softcapping` (0: the graph has none)
    softcap: float = 0.0
    refused_methods: tuple[tuple[str, str], ...] = ()  # (method, why) this architecture cannot run
    notes: str = ""
    verified: str = ""
    test: str = ""


_SHARED_CHECKS = ("captured layer-0 queries = numpy recomputation from the GGUF weights; RoPE re-rotation; "
                  "per-head attention after compression = float64 reference; blob round trip byte-identical; "
                  "budgeted prefill at the budget; GRKV value/key steps = torch reference on captured data")

ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch("llama", "Llama 2 / 3.x, Mistral 7B, SmolLM, TinyLlama",
         rope_factor_tensors=("rope_freqs.weight",),
         notes="NORM RoPE; Llama-3.1's rope_freqs divide each pair's frequency; llama.cpp ignores "
               "sliding_window metadata for this architecture, so Mistral-style files attend to the whole cache",
         verified="SmolLM2 (real weights): RULER, pass-key, every test below. Tiny: GQA 1 and 8, head dim 64 and 128, "
                  "rope_freqs, sliding_window metadata. " + _SHARED_CHECKS,
         test="tests/test_architectures.py, tests/test_attention_reference.py"),
    Arch("qwen2", "Qwen2, Qwen2.5 (and Qwen2.5-Coder)",
         notes="NEOX RoPE; biases on Q, K and V before RoPE",
         verified="tiny random GGUF, GQA 4, head dim 64, non-zero QKV biases. " + _SHARED_CHECKS,
         test="tests/test_architectures.py"),
    Arch("qwen3", "Qwen3 (dense)",
         notes="NEOX RoPE; per-head RMS norm of Q and K (attn_q_norm, attn_k_norm) before RoPE; "
               "head_dim need not be n_embd / n_head",
         verified="tiny random GGUF, GQA 8, head dim 128 with n_embd / n_head = 32. " + _SHARED_CHECKS,
         test="tests/test_architectures.py"),
    Arch("qwen3moe", "Qwen3 MoE (Qwen3-30B-A3B, 235B-A22B)",
         notes="attention as qwen3 (NEOX RoPE, Q/K RMS norms before RoPE); mixture-of-experts feed-forward, "
               "which the cache never sees",
         verified="tiny random GGUF, 4 experts (2 per token), GQA 4, head dim 128. " + _SHARED_CHECKS,
         test="tests/test_architectures.py"),
    Arch("phi3", "Phi-3, Phi-3.5, Phi-4 (dense)",
         rope_factor_tensors=("rope_factors_long.weight", "rope_factors_short.weight"),
         notes="NEOX RoPE; fused attn_qkv; two Qcur nodes (the ROPE one is unscaled, 1/sqrt(head_dim) follows "
               "in the graph); long/short RoPE factors picked by n_ctx against the original context length; "
               "llama.cpp disables phi3's sliding window",
         verified="tiny random GGUF, GQA 1, head dim 64, fused QKV, long and short RoPE factors. " + _SHARED_CHECKS,
         test="tests/test_architectures.py"),
    Arch("gemma2", "Gemma 2",
         iswa_pattern=2, softcap=50.0,
         refused_methods=(("expected", "Expected Attention's closed-form E[exp(q.k)] has no counterpart under "
                                       "soft-capped logits"),),
         notes="NEOX RoPE; Q scaled after the Qcur node (1/sqrt(head_dim), 27B: 1/sqrt(n_embd / n_head)); "
               "logits soft-capped (cap * tanh(z / cap)) in every score and in GRKV's teacher, student, JVP and "
               "VJP; odd layers global (compressed), even layers sliding-window",
         verified="tiny random GGUF, GQA 2, head dim 128, cap 5 (so the cap matters), sliding window 64. "
                  + _SHARED_CHECKS,
         test="tests/test_architectures.py"),
    Arch("gemma3", "Gemma 3 (text)",
         iswa_pattern=6,
         notes="NEOX RoPE; Q scaled after the Qcur node; 5 of every 6 layers use a sliding window and are not "
               "compressed",
         verified="Gemma-3-270M (real weights): RULER, pass-key, attention reference, blob, budgeted prefill, "
                  "re-rotation",
         test="tests/test_attention_reference.py, tests/test_budgeted_gemma3.py, tests/test_grkv_model.py"),
)}

# Known-unsupported families, with the reason given to the user.
REFUSED: dict[str, str] = {
    "gemma3n": "its KV cache is reused across layers",
    "gemma4": "its KV cache is reused across layers",
    "qwen2vl": "it uses M-RoPE (per-cell position extensions)",
    "qwen3vl": "it uses M-RoPE (per-cell position extensions)",
    "qwen25vl": "it uses M-RoPE (per-cell position extensions)",
    "llama4": "it normalises Q and K after RoPE and uses chunked attention",
}


def attn_scale(arch: str, *, n_layer: int, n_embd: int, n_head: int, head_dim: int) -> float:
    """The factor llama.cpp applies to q.k for the captured (post-RoPE) query."""
    if (arch, n_layer) in (("gemma3", 62), ("gemma2", 46)):  # the 27B models scale by n_embd / n_head
        return 1.0 / math.sqrt(n_embd / n_head)
    # llama (its graph ignores attention.scale metadata), qwen2, qwen3, gemma2, gemma3,
    # and phi3 (whose ggml_scale after the ROPE node is 1/sqrt(head_dim), kq_scale 1)
    return 1.0 / math.sqrt(head_dim)


def support_table() -> list[dict]:
    """One row per architecture: supported or refused, with what was verified."""
    rows = [{"arch": a.name, "status": "supported", "families": a.families, "notes": a.notes,
             "verified": a.verified, "test": a.test} for a in ARCHS.values()]
    rows += [{"arch": name, "status": "refused", "families": "", "notes": why, "verified": "", "test": ""}
             for name, why in REFUSED.items()]
    return rows
