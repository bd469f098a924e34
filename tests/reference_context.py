"""Float64 torch reference of the context scorers (Expected Attention,
Compactor, context reconstruction), written from their definitions
(docs/scorers.md), independent of the native code: RoPE as explicit 2x2
rotations, attention as dense softmax, leverage as a dense solve."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from reference import cap


def _t(x):
    return torch.as_tensor(x, dtype=torch.float64)


def rope_pairs(n_rot, neox):
    half = n_rot // 2
    return [(i, i + half) if neox else (2 * i, 2 * i + 1) for i in range(half)]


def rope_matrix(pos, d, n_rot, base, freq_scale, neox):
    """R(pos) [d, d]: what RoPE does to a vector at position pos."""
    R = torch.eye(d, dtype=torch.float64)
    for i, (a, b) in enumerate(rope_pairs(n_rot, neox)):
        th = pos * freq_scale * base ** (-2.0 * i / n_rot)
        c, s = math.cos(th), math.sin(th)
        R[a, a], R[a, b], R[b, a], R[b, b] = c, -s, s, c
    return R


def derotate(x, pos, rope):
    """x [n, heads, d] post-RoPE at positions pos -> pre-RoPE."""
    x = _t(x)
    out = torch.empty_like(x)
    for i, p in enumerate(pos):
        R = rope_matrix(int(p), x.shape[-1], *rope)
        out[i] = x[i] @ R  # R^T x = R(-p) x, row-vector form
    return out


def protect(scores, T, n_sink, n_recent):
    prot = torch.zeros(T, dtype=torch.bool)
    prot[:n_sink] = True
    if n_recent:
        prot[T - n_recent:] = True
    out = scores.clone()
    top = out[:, ~prot].max(dim=1, keepdim=True).values if (~prot).any() else torch.zeros(out.shape[0], 1)
    out[:, prot] = (top + 1).expand(-1, int(prot.sum()))
    return out, prot


def expected_scores(k, v, pos, q, qpos, n_head, scale, rope, n_sink=4, n_recent=0, n_future=512, next_pos=None,
                    eps=0.0, use_cov=True):
    k, v = _t(k), _t(v)
    T, Hkv, d = k.shape
    G = n_head // Hkv
    next_pos = int(pos[-1]) + 1 if next_pos is None else next_pos
    qt = derotate(q, qpos, rope)                                   # [w, H, d]
    keep = torch.as_tensor(qpos) >= n_sink
    qt = qt[keep]
    Rbar = sum(rope_matrix(next_pos + i, d, *rope) for i in range(n_future)) / n_future
    out = torch.zeros(Hkv, T, dtype=torch.float64)
    for hq in range(n_head):
        x = qt[:, hq]
        mu = x.mean(0)
        cov = (x - mu).T @ (x - mu) / len(x)
        mub, covb = Rbar @ mu, Rbar @ cov @ Rbar.T
        kk = k[:, hq // G]
        logit = scale * kk @ mub + (0.5 * scale * scale * torch.einsum("td,de,te->t", kk, covb, kk) if use_cov else 0)
        a = torch.zeros(T, dtype=torch.float64)
        a[n_sink:] = torch.softmax(logit[n_sink:], 0)
        out[hq // G] += a / G
    out = (out + eps) * v.norm(dim=-1).T
    return protect(out, T, n_sink, n_recent)


def _z(x, prot):
    sel = x[:, ~prot]
    m, s = sel.mean(), sel.std(unbiased=False)
    y = x.clone()
    y[:, ~prot] = (sel - m) / s
    return y


def compactor_scores(k, v, pos, q, n_head, scale, rope, n_sink=8, n_recent=4, chunk=256, beta=0.5, ridge=1e-2,
                     chunk_scale=False, hist=None, softcap=0.0):
    """pos: [T], or [Hkv, T] keys' true positions per head (a relabelled
    budgeted cache). hist [Hkv, t0]: the first t0 tokens' tile attention,
    carried; q then holds the last T - t0 tokens' queries, tiled from t0."""
    k, v, q = _t(k), _t(v), _t(q)
    T, Hkv, d = k.shape
    G = n_head // Hkv
    t0 = 0 if hist is None else hist.shape[1]
    att = torch.zeros(Hkv, T, dtype=torch.float64)
    if t0:
        att[:, :t0] = _t(hist)
    zs = scale if chunk_scale else 1.0
    for a in range(t0, T, chunk):
        b = min(T, a + chunk)
        for hq in range(n_head):
            z = zs * q[a - t0:b - t0, hq] @ k[a:b, hq // G].T
            p = torch.softmax(cap(z, softcap if chunk_scale else 0.0), dim=-1)  # non-causal inside the tile
            att[hq // G, a:b] += p.sum(0) / G
    att = att * v.norm(dim=-1).T
    att = F.avg_pool1d(att[None], 3, stride=1, padding=1, count_include_pad=True)[0]
    pos = torch.as_tensor(pos)
    if pos.dim() == 1:
        kt = derotate(k, pos, rope)
    else:
        kt = torch.cat([derotate(k[:, h:h + 1], pos[h], rope) for h in range(Hkv)], dim=1)
    lev = torch.zeros(Hkv, T, dtype=torch.float64)
    for h in range(Hkv):
        X = kt[:, h] - kt[:, h].mean(0)
        M = X.T @ X
        M = M + ridge * torch.trace(M) / d * torch.eye(d, dtype=torch.float64)
        lev[h] = torch.einsum("td,de,te->t", X, torch.linalg.inv(M), X)
    prot = torch.zeros(T, dtype=torch.bool)
    prot[:n_sink] = True
    if n_recent:
        prot[T - n_recent:] = True
    s = _z(att, prot) + beta * _z(lev, prot)
    return protect(s, T, n_sink, n_recent)


def reconstruct_scores(k, q, rk, qchunk, chunks, n_head, scale, n_sink=4, n_recent=0, softcap=0.0):
    """k [T, Hkv, d] context keys; q [w, H, d], rk [w, Hkv, d] re-read queries
    and keys; chunk c's queries attend to sinks + context[lo:hi] + its own
    re-read keys causally; score = max over queries and the group."""
    k, q, rk = _t(k), _t(q), _t(rk)
    T, Hkv, d = k.shape
    G = n_head // Hkv
    qchunk = torch.as_tensor(qchunk)
    out = torch.zeros(Hkv, T, dtype=torch.float64)
    for c, (lo, hi) in enumerate(chunks):
        idx = torch.nonzero(qchunk == c).flatten()
        cols = list(range(min(n_sink, lo))) + list(range(lo, hi))
        nR = len(idx)
        for hq in range(n_head):
            keys = torch.cat([k[cols, hq // G], rk[idx, hq // G]])
            z = cap(scale * q[idx, hq] @ keys.T, softcap)            # [nR, |cols| + nR]
            mask = torch.zeros_like(z, dtype=torch.bool)
            mask[:, len(cols):] = torch.triu(torch.ones(nR, nR, dtype=torch.bool), diagonal=1)
            a = torch.softmax(z.masked_fill(mask, float("-inf")), dim=-1)[:, :len(cols)].max(0).values
            out[hq // G, cols] = torch.maximum(out[hq // G, cols], a)
    return protect(out, T, n_sink, n_recent)
