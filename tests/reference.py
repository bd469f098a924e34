"""Float64 torch reference, written from the spec (docs/grkv-spec.md §3.1 and
kvpress's definitions), independent of the native code."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _t(x):
    return torch.as_tensor(x, dtype=torch.float64)


def snapkv_scores(k, pos, q, qpos, n_head, scale, kernel=5, pooling="avg"):
    """k [T, Hkv, d], q [w, H, d] -> scores [Hkv, T]; window columns get max+1."""
    k, q = _t(k), _t(q)
    pos, qpos = torch.as_tensor(pos), torch.as_tensor(qpos)
    T, Hkv, d = k.shape
    G = n_head // Hkv
    kk = k.repeat_interleave(G, dim=1)                          # [T, H, d]
    logits = torch.einsum("whd,thd->hwt", q, kk) * scale        # [H, w, T]
    logits = logits.masked_fill(pos[None, None, :] > qpos[None, :, None], float("-inf"))
    attn = torch.softmax(logits, dim=-1)
    prefix = int((pos < qpos.min()).sum())
    s = attn[:, :, :prefix].mean(dim=1)                         # [H, prefix]
    if pooling == "avg":
        s = F.avg_pool1d(s[None], kernel, stride=1, padding=kernel // 2, count_include_pad=True)[0]
    else:
        s = F.max_pool1d(s[None], kernel, stride=1, padding=kernel // 2)[0]
    s = s.view(Hkv, G, prefix).mean(dim=1)
    out = torch.empty(Hkv, T, dtype=torch.float64)
    out[:, :prefix] = s
    out[:, prefix:] = s.max(dim=1, keepdim=True).values + 1 if prefix else 1.0
    protect = torch.zeros(T, dtype=torch.bool)
    protect[prefix:] = True
    return out, protect


def knorm_scores(k):
    k = _t(k)
    return -k.norm(dim=-1).T, torch.zeros(k.shape[0], dtype=torch.bool)


def streaming_scores(T, Hkv, n_sink):
    s = torch.arange(T, dtype=torch.float64).repeat(Hkv, 1)
    protect = torch.zeros(T, dtype=torch.bool)
    protect[:n_sink] = True
    return s, protect


def select(scores, protect, budget):
    """Per KV head: protected tokens first, then top scores; ascending indices."""
    key = scores.clone()
    key[:, protect] = float("inf")
    idx = torch.topk(key, budget, dim=-1).indices
    return torch.sort(idx, dim=-1).values


def attention(q, k, v, scale, causal_offset=None):
    """q [n, d], k/v [m, d]; query i sees keys j with j <= causal_offset + i (all if None)."""
    q, k, v = _t(q), _t(k), _t(v)
    logits = q @ k.T * scale
    if causal_offset is not None:
        n, m = logits.shape
        j = torch.arange(m)[None, :]
        i = torch.arange(n)[:, None]
        logits = logits.masked_fill(j > causal_offset + i, float("-inf"))
    return torch.softmax(logits, dim=-1) @ v
