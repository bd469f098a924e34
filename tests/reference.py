"""Float64 torch reference, written from the spec (docs/grkv-spec.md §3.1 and
kvpress's definitions), independent of the native code."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _t(x):
    return torch.as_tensor(x, dtype=torch.float64)


def cap(logits, softcap=0.0):
    """Gemma-2's attention-logit soft cap: c * tanh(z / c); 0 = none."""
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def snapkv_scores(k, pos, q, qpos, n_head, scale, kernel=5, pooling="avg", softcap=0.0):
    """k [T, Hkv, d], q [w, H, d] -> scores [Hkv, T]; window columns get max+1."""
    k, q = _t(k), _t(q)
    pos, qpos = torch.as_tensor(pos), torch.as_tensor(qpos)
    T, Hkv, d = k.shape
    G = n_head // Hkv
    kk = k.repeat_interleave(G, dim=1)                          # [T, H, d]
    logits = cap(torch.einsum("whd,thd->hwt", q, kk) * scale, softcap)  # [H, w, T]
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


def gkv_scores(k, pos, q, qpos, n_head, scale, hist=None, alpha=0.8, lam=0.5, thr=0.5, softcap=0.0):
    """G-KV (spec §8.1) -> (final [Hkv, T], protect [T], global [Hkv, T]).
    local: window softmax, max over the GQA group, mean over the window, / max;
    global = max(alpha * hist, local); redundancy: cosine similarity of the
    prefix keys, diagonal and each row's most recent copy (cos > thr) zeroed,
    column mean, softmax, / max; final = lam * global - (1 - lam) * redundancy."""
    k, q = _t(k), _t(q)
    pos, qpos = torch.as_tensor(pos), torch.as_tensor(qpos)
    T, Hkv, d = k.shape
    G = n_head // Hkv
    kk = k.repeat_interleave(G, dim=1)
    logits = cap(torch.einsum("whd,thd->hwt", q, kk) * scale, softcap)
    logits = logits.masked_fill(pos[None, None, :] > qpos[None, :, None], float("-inf"))
    attn = torch.softmax(logits, dim=-1).view(Hkv, G, len(qpos), T)
    n = int((pos < qpos.min()).sum())
    loc = attn.max(dim=1).values.mean(dim=1)[:, :n]               # [Hkv, n]
    loc = loc / loc.max(dim=1, keepdim=True).values
    g = loc if hist is None else torch.maximum(alpha * _t(hist)[:, :n], loc)
    kn = k[:n] / (k[:n].norm(dim=-1, keepdim=True) + 1e-8)       # [n, Hkv, d]
    sim = torch.einsum("ihd,jhd->hij", kn, kn)
    sim = sim * (1 - torch.eye(n, dtype=torch.float64))
    for h in range(Hkv):
        for i in range(n):
            similar = torch.nonzero(sim[h, i] > thr).flatten()
            if len(similar):
                sim[h, i, similar.max()] = 0.0
    red = torch.softmax(sim.mean(dim=1), dim=-1)
    red = red / red.max(dim=1, keepdim=True).values
    out = torch.empty(Hkv, T, dtype=torch.float64)
    out[:, :n] = lam * g - (1 - lam) * red
    out[:, n:] = out[:, :n].max(dim=1, keepdim=True).values + 1
    glob = torch.zeros(Hkv, T, dtype=torch.float64)
    glob[:, :n] = g
    protect = torch.zeros(T, dtype=torch.bool)
    protect[n:] = True
    return out, protect, glob


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


def attention(q, k, v, scale, causal_offset=None, softcap=0.0):
    """q [n, d], k/v [m, d]; query i sees keys j with j <= causal_offset + i (all if None)."""
    q, k, v = _t(q), _t(k), _t(v)
    logits = cap(q @ k.T * scale, softcap)
    if causal_offset is not None:
        n, m = logits.shape
        j = torch.arange(m)[None, :]
        i = torch.arange(n)[:, None]
        logits = logits.masked_fill(j > causal_offset + i, float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


def laser_scores(k, pos, q, qpos, n_head, scale, softcap=0.0):
    """LASER-KV exact ranking for one layer: softmax attention of the scoring
    queries summed over queries and each KV head's group -> [Hkv, T]."""
    k, q = _t(k), _t(q)
    pos, qpos = torch.as_tensor(pos), torch.as_tensor(qpos)
    T, Hkv, d = k.shape
    G = n_head // Hkv
    logits = cap(torch.einsum("whd,thd->hwt", q, k.repeat_interleave(G, dim=1)) * scale, softcap)
    logits = logits.masked_fill(pos[None, None, :] > qpos[None, :, None], float("-inf"))
    return torch.softmax(logits, dim=-1).sum(dim=1).view(Hkv, G, T).sum(dim=1)


def laser_select(layer_scores, budget, divisor=4):
    """Anchors (first B/n) + local (last B/n) + top global by the layer-and-head sum."""
    total = sum(s.sum(dim=0) for s in layer_scores)
    T = len(total)
    n = budget // divisor
    keep = set(range(min(n, T))) | set(range(T - n, T)) | {T - 1}
    rest = [int(i) for i in torch.argsort(total, descending=True, stable=True) if int(i) not in keep]
    keep |= set(rest[: budget - len(keep)])
    return sorted(keep)
