"""Tiny random GGUF models of the supported architectures, written with the
`gguf` package: the same llama.cpp graphs, cache layouts and RoPE as the real
models, at a size that loads in milliseconds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TinySpec:
    arch: str = "llama"
    n_layer: int = 3
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 0          # 0: n_embd // n_head
    n_ff: int = 128
    rope_freqs: bool = False   # llama: Llama-3.1-style per-pair frequency divisors
    sliding_window: int = 0    # written as metadata (Mistral-style llama files carry it)
    orig_ctx: int = 0          # phi3: original context length; longer contexts use the long factors
    softcap: float = 0.0       # gemma2: attention-logit soft cap written to the metadata
    seed: int = 0

    @property
    def hd(self) -> int:
        return self.head_dim or self.n_embd // self.n_head


def _vocab():
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += ["\u2581" + c for c in "abcdefghijklmnopqrstuvwxyz"] + list("abcdefghijklmnopqrstuvwxyz")
    types = [2, 3, 3] + [6] * 256 + [1] * 52
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(52)]
    return tokens, types, scores


def write_tiny_model(path: Path, spec: TinySpec = TinySpec()) -> Path:
    import gguf

    s = spec
    rng = np.random.default_rng(s.seed)
    tokens, types, scores = _vocab()
    n_vocab, hd = len(tokens), s.hd

    w = gguf.GGUFWriter(str(path), s.arch)
    w.add_context_length(4096)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    if s.head_dim:
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hd)
    if s.sliding_window:
        w.add_sliding_window(s.sliding_window)
    if s.orig_ctx:
        w.add_uint32(f"{s.arch}.rope.scaling.original_context_length", s.orig_ctx)
    if s.arch == "qwen3moe":  # 4 experts, 2 per token
        w.add_expert_count(4)
        w.add_expert_used_count(2)
        w.add_expert_feed_forward_length(s.n_ff)
    if s.softcap:
        w.add_float32(f"{s.arch}.attn_logit_softcapping", s.softcap)
        w.add_float32(f"{s.arch}.final_logit_softcapping", 30.0)
    w.add_file_type(0)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)

    def t(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def near_one(n):
        return (1.0 + 0.3 * rng.standard_normal(n)).astype(np.float32)

    q_dim, kv_dim = s.n_head * hd, s.n_head_kv * hd
    w.add_tensor("token_embd.weight", t(n_vocab, s.n_embd, scale=1.0))
    w.add_tensor("output_norm.weight", np.ones(s.n_embd, np.float32))
    if s.arch != "gemma2":  # gemma2 ties the output to the embeddings
        w.add_tensor("output.weight", t(n_vocab, s.n_embd))
    if s.rope_freqs:
        # Llama-3.1's factors: 1 for high frequencies, up to 8 for low ones
        w.add_tensor("rope_freqs.weight", np.geomspace(1.0, 8.0, hd // 2).astype(np.float32))
    if s.arch == "phi3":
        w.add_tensor("rope_factors_long.weight", np.geomspace(1.0, 6.0, hd // 2).astype(np.float32))
        w.add_tensor("rope_factors_short.weight", np.geomspace(1.0, 1.5, hd // 2).astype(np.float32))
    for i in range(s.n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(s.n_embd, np.float32))
        if s.arch == "phi3":
            w.add_tensor(f"blk.{i}.attn_qkv.weight", t(q_dim + 2 * kv_dim, s.n_embd))
        else:
            w.add_tensor(f"blk.{i}.attn_q.weight", t(q_dim, s.n_embd))
            w.add_tensor(f"blk.{i}.attn_k.weight", t(kv_dim, s.n_embd))
            w.add_tensor(f"blk.{i}.attn_v.weight", t(kv_dim, s.n_embd))
        if s.arch == "qwen2":
            w.add_tensor(f"blk.{i}.attn_q.bias", t(q_dim, scale=0.3))
            w.add_tensor(f"blk.{i}.attn_k.bias", t(kv_dim, scale=0.3))
            w.add_tensor(f"blk.{i}.attn_v.bias", t(kv_dim, scale=0.3))
        if s.arch in ("qwen3", "qwen3moe"):
            w.add_tensor(f"blk.{i}.attn_q_norm.weight", near_one(hd))
            w.add_tensor(f"blk.{i}.attn_k_norm.weight", near_one(hd))
        w.add_tensor(f"blk.{i}.attn_output.weight", t(s.n_embd, q_dim))
        if s.arch == "gemma2":  # norms after attention and after the FFN
            w.add_tensor(f"blk.{i}.post_attention_norm.weight", near_one(s.n_embd))
            w.add_tensor(f"blk.{i}.post_ffw_norm.weight", near_one(s.n_embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(s.n_embd, np.float32))
        if s.arch == "qwen3moe":  # a router and 4 experts
            w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", t(4, s.n_embd))
            w.add_tensor(f"blk.{i}.ffn_gate_exps.weight", t(4, s.n_ff, s.n_embd))
            w.add_tensor(f"blk.{i}.ffn_up_exps.weight", t(4, s.n_ff, s.n_embd))
            w.add_tensor(f"blk.{i}.ffn_down_exps.weight", t(4, s.n_embd, s.n_ff))
            continue
        if s.arch == "phi3":  # gate and up fused
            w.add_tensor(f"blk.{i}.ffn_up.weight", t(2 * s.n_ff, s.n_embd))
        else:
            w.add_tensor(f"blk.{i}.ffn_gate.weight", t(s.n_ff, s.n_embd))
            w.add_tensor(f"blk.{i}.ffn_up.weight", t(s.n_ff, s.n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(s.n_embd, s.n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tiny_llama(path: Path, *, arch: str = "llama", n_layer: int = 3, n_embd: int = 64, n_head: int = 4,
                     n_head_kv: int = 2, n_ff: int = 128, seed: int = 0) -> Path:
    """The small default model most tests use."""
    return write_tiny_model(path, TinySpec(arch=arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                                           n_head_kv=n_head_kv, n_ff=n_ff, seed=seed))


def reference_queries(path: Path, tokens: list[int], layer: int = 0) -> np.ndarray:
    """Layer `layer`'s pre-RoPE queries [T, n_head, head_dim] recomputed in
    float64 from the GGUF's own weights (layer 0 only: deeper layers would need
    the whole block). RMS norms use eps 1e-5 as written above."""
    import gguf

    if layer != 0:
        raise ValueError("only layer 0 is recomputed")
    r = gguf.GGUFReader(str(path))
    arch = str(bytes(r.fields["general.architecture"].parts[-1]), "utf-8")
    n_head = int(r.fields[f"{arch}.attention.head_count"].parts[-1][0])
    T = {t.name: np.asarray(t.data, np.float64) for t in r.tensors}

    def rms(x, wgt):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * wgt

    x = T["token_embd.weight"][tokens]
    if arch in ("gemma2", "gemma3"):  # Gemma scales the embeddings by sqrt(n_embd)
        x = x * np.sqrt(x.shape[1])
    h = rms(x, T["blk.0.attn_norm.weight"])
    if arch == "phi3":
        # phi3's Q is the first n_embd rows of the fused weight (its n_head * head_dim == n_embd)
        q = h @ T["blk.0.attn_qkv.weight"][: h.shape[1]].T
    else:
        q = h @ T["blk.0.attn_q.weight"].T
        if "blk.0.attn_q.bias" in T:
            q = q + T["blk.0.attn_q.bias"]
    q = q.reshape(len(tokens), n_head, -1)
    if "blk.0.attn_q_norm.weight" in T:
        q = rms(q, T["blk.0.attn_q_norm.weight"])
    return q
