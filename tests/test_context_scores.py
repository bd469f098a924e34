"""The context scorers (expected, compactor, reconstruct) against the float64
torch reference, on random GQA tensors with both RoPE pairings."""

import numpy as np
import pytest

from grkv_cpp import _native
from grkv_cpp.errors import NativeError
import reference as ref
import reference_context as rc


def rotate(x, pos, rope):
    """Apply RoPE at each row's position (float64 reference matrices)."""
    out = np.empty_like(x)
    for i, p in enumerate(pos):
        R = rc.rope_matrix(int(p), x.shape[-1], *rope).numpy()
        out[i] = x[i] @ R.T
    return out.astype(np.float32)


def layer(seed, T=150, Hkv=2, G=3, d=16, neox=False, n_rot=None):
    rng = np.random.default_rng(seed)
    n_rot = n_rot or d
    rope = (n_rot, 10000.0, 1.0, neox)
    pos = np.arange(T, dtype=np.int32)
    mu = rng.standard_normal(d) * 1.5  # queries share a mean direction, as real ones do
    q = rotate((rng.standard_normal((T, Hkv * G, d)) + mu).astype(np.float32), pos, rope)
    k = rotate(rng.standard_normal((T, Hkv, d)).astype(np.float32), pos, rope)
    v = rng.standard_normal((T, Hkv, d)).astype(np.float32) * rng.uniform(0.5, 2, (T, Hkv, 1)).astype(np.float32)
    return k, v, q, pos, Hkv * G, rope


def native_rope(rope):
    n_rot, base, scale, neox = rope
    return _native.RopeParams(n_rot, base, scale, neox)


def params(**kw):
    p = _native.ContextParams()
    for key, val in kw.items():
        setattr(p, key, val)
    return p


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("seed,use_cov,eps,n_recent", [(0, True, 0.0, 0), (1, False, 1e-2, 5), (2, True, 1e-3, 0)])
def test_expected_matches_reference(seed, neox, use_cov, eps, n_recent):
    k, v, q, pos, H, rope = layer(seed, neox=neox, n_rot=12 if seed == 2 else None)
    scale = 1 / np.sqrt(k.shape[-1])
    p = params(n_sink=4, n_recent=n_recent, n_future=64, next_pos=len(pos), eps=eps, use_cov=use_cov)
    s, prot = _native.kernels.score_context_layer("expected", k, pos, q, pos, H, scale, p, native_rope(rope), v=v)
    rs, rprot = rc.expected_scores(k, v, pos, q, pos, H, scale, rope, n_sink=4, n_recent=n_recent, n_future=64,
                                   eps=eps, use_cov=use_cov)
    np.testing.assert_allclose(s, rs.numpy(), rtol=2e-4, atol=1e-7)
    assert (prot.astype(bool) == rprot.numpy()).all()
    sel = _native.kernels.select_per_head(s, prot, 60)
    assert (sel == ref.select(rs, rprot, 60).numpy()).all()


def test_expected_rope_pairing_matters():
    """The averaged rotation must follow the model's pairing: scoring NEOX
    data as NORM gives other scores."""
    k, v, q, pos, H, rope = layer(3, neox=True)
    p = params(n_future=64, next_pos=len(pos))
    right, _ = _native.kernels.score_context_layer("expected", k, pos, q, pos, H, 0.25, p, native_rope(rope), v=v)
    wrong, _ = _native.kernels.score_context_layer("expected", k, pos, q, pos, H, 0.25, p,
                                           native_rope((rope[0], rope[1], 1.0, False)), v=v)
    assert np.abs(right - wrong).max() > 1e-3 * np.abs(right).max()


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("seed,chunk,chunk_scale,beta", [(0, 64, False, 0.5), (1, 50, True, 0.75), (2, 256, False, 0.0)])
def test_compactor_matches_reference(seed, neox, chunk, chunk_scale, beta):
    k, v, q, pos, H, rope = layer(seed, neox=neox)
    scale = 1 / np.sqrt(k.shape[-1])
    p = params(n_sink=8, n_recent=4, chunk=chunk, beta=beta, ridge=1e-2, chunk_scale=chunk_scale)
    s, prot = _native.kernels.score_context_layer("compactor", k, pos, q, pos, H, scale, p, native_rope(rope), v=v)
    rs, rprot = rc.compactor_scores(k, v, pos, q, H, scale, rope, n_sink=8, n_recent=4, chunk=chunk, beta=beta,
                                    chunk_scale=chunk_scale)
    np.testing.assert_allclose(s, rs.numpy(), rtol=1e-3, atol=2e-4)
    assert (prot.astype(bool) == rprot.numpy()).all()


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("t0,chunk", [(64, 64), (100, 50), (90, 256)])
def test_compactor_carried_matches_reference(neox, t0, chunk):
    """compactor@budget: the first t0 cells bring their tile attention along
    (hist) and their keys' true positions differ per head (the per-head layout
    relabelled the cells); the queries cover only the cells after t0."""
    k, v, q, _, H, rope = layer(4, neox=neox)
    T, Hkv = k.shape[0], k.shape[1]
    rng = np.random.default_rng(5)
    true = np.stack([np.sort(rng.choice(400, T, replace=False)) for _ in range(Hkv)]).astype(np.int32)
    # each head's key rotated at its own true position, as a relabelled cache holds them
    k = np.stack([rotate(rc.derotate(k[:, h:h + 1], np.arange(T), rope).numpy(), true[h], rope)[:, 0]
                  for h in range(Hkv)], axis=1)
    cells = np.arange(T, dtype=np.int32) + 400  # the labels llama.cpp sees
    hist = rng.uniform(0.1, 3.0, (Hkv, T)).astype(np.float32)
    hist[:, t0:] = 1e9  # past t0 the history must be ignored
    scale = 1 / np.sqrt(k.shape[-1])
    p = params(n_sink=8, n_recent=0, chunk=chunk, beta=0.5, ridge=1e-2)
    s, prot, tile = _native.kernels.score_context_layer("compactor", k, cells, q[t0:], cells[t0:], H, scale, p,
                                                native_rope(rope), v=v, hist=hist, kpos=true, carry=True)
    rs, rprot = rc.compactor_scores(k, v, true, q[t0:], H, scale, rope, n_sink=8, n_recent=0, chunk=chunk, beta=0.5,
                                    hist=hist[:, :t0])
    np.testing.assert_allclose(s, rs.numpy(), rtol=1e-3, atol=2e-4)
    assert (prot.astype(bool) == rprot.numpy()).all()
    np.testing.assert_array_equal(tile[:, :t0], hist[:, :t0])
    # carrying a full scoring's own tile attention reproduces it when the tiles line up
    full, _, att = _native.kernels.score_context_layer("compactor", k, cells, q, cells, H, scale, p, native_rope(rope), v=v,
                                               kpos=true, carry=True)
    if t0 % chunk == 0:
        part, _ = _native.kernels.score_context_layer("compactor", k, cells, q[t0:], cells[t0:], H, scale, p,
                                              native_rope(rope), v=v, hist=att, kpos=true)
        np.testing.assert_allclose(part, full, rtol=1e-5, atol=1e-6)
    with pytest.raises(NativeError):  # queries for fewer cells need the carried history
        _native.kernels.score_context_layer("compactor", k, cells, q[t0:], cells[t0:], H, scale, p, native_rope(rope), v=v)


def reread_layer(seed, T=120, Hkv=2, G=3, d=16, chunks=((10, 70), (70, 120)), prompt=6):
    """Context keys and a re-read pass over `chunks` at positions T.."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((T, Hkv, d)).astype(np.float32)
    qs, rks, qc = [], [], []
    for c, (lo, hi) in enumerate(chunks):
        n = prompt + hi - lo
        # re-read queries resemble the keys they re-read, as copying heads' do
        base = np.concatenate([rng.standard_normal((prompt, Hkv, d)), k[lo:hi]]).repeat(G, axis=1)
        qs.append((base * 2 + rng.standard_normal((n, Hkv * G, d))).astype(np.float32))
        rks.append(rng.standard_normal((n, Hkv, d)).astype(np.float32))
        qc.append(np.full(n, c, np.int32))
    q, rk, qchunk = np.concatenate(qs), np.concatenate(rks), np.concatenate(qc)
    qpos = (T + np.concatenate([np.arange(len(x)) for x in qs])).astype(np.int32)
    return k, q, rk, qchunk, qpos, Hkv * G


@pytest.mark.parametrize("seed,chunks,n_recent", [(0, ((10, 70), (70, 120)), 0), (1, ((4, 120),), 8),
                                                    (2, ((6, 40), (40, 80), (80, 120)), 0)])
def test_reconstruct_matches_reference(seed, chunks, n_recent):
    k, q, rk, qchunk, qpos, H = reread_layer(seed, chunks=chunks)
    pos = np.arange(len(k), dtype=np.int32)
    n_sink = chunks[0][0]
    p = params(n_sink=n_sink, n_recent=n_recent)
    s, prot = _native.kernels.score_context_layer("reconstruct", k, pos, q, qpos, H, 0.25, p, native_rope((16, 1e4, 1.0, False)),
                                          rk=rk, qchunk=qchunk, chunks=list(chunks))
    rs, rprot = rc.reconstruct_scores(k, q, rk, qchunk, chunks, H, 0.25, n_sink=n_sink, n_recent=n_recent)
    np.testing.assert_allclose(s, rs.numpy(), rtol=1e-4, atol=1e-7)
    assert (prot.astype(bool) == rprot.numpy()).all()
    # the scores are probabilities, comparable across heads
    free = ~prot.astype(bool)
    assert (s[:, free] >= 0).all() and (s[:, free] <= 1).all()


def test_context_scorer_errors():
    k, v, q, pos, H, rope = layer(0)
    p = params()
    with pytest.raises(NativeError, match="values"):
        _native.kernels.score_context_layer("expected", k, pos, q, pos, H, 0.25, p, native_rope(rope))
    with pytest.raises(NativeError, match="every context token"):
        _native.kernels.score_context_layer("compactor", k, pos, q[:10], pos[:10], H, 0.25, p, native_rope(rope), v=v)
    with pytest.raises(NativeError, match="re-read"):
        _native.kernels.score_context_layer("reconstruct", k, pos, q, pos, H, 0.25, p, native_rope(rope))
    kq, qq, rk, qc, qp, H2 = reread_layer(0)
    with pytest.raises(NativeError, match="token range"):
        _native.kernels.score_context_layer("reconstruct", kq, np.arange(len(kq), dtype=np.int32), qq, qp, H2, 0.25, p,
                                    native_rope(rope), rk=rk, qchunk=qc, chunks=[(10, 70), (70, 500)])


def headwise_reference(s, prot, budget, alpha, across):
    """Each head: protected + top floor(alpha*B) fixed; the rest of the
    layer's (or all layers') H*B slots to the best remaining scores."""
    L, H, T = s.shape
    count = np.zeros((L, H), int)
    pool = []
    for l in range(L):
        fixed = max(int(prot[l].sum()), int(alpha * budget))
        for h in range(H):
            order = sorted(range(T), key=lambda t: (-int(prot[l, t]), -s[l, h, t]))
            count[l, h] = fixed
            pool += [(s[l, h, t], l, h) for t in order[fixed:]]
        if not across:
            for _, ll, hh in sorted(pool, key=lambda x: -x[0])[: H * (budget - fixed)]:
                count[ll, hh] += 1
            pool = []
    if across:
        fixed = max(int(prot[0].sum()), int(alpha * budget))
        for _, ll, hh in sorted(pool, key=lambda x: -x[0])[: L * H * (budget - fixed)]:
            count[ll, hh] += 1
    return count.max(), count


@pytest.mark.parametrize("across", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_headwise_allocation_matches_reference(across, alpha):
    rng = np.random.default_rng(1)
    L, H, T, B = 3, 4, 60, 20
    # heads with concentrated and with diffuse scores, so allocations differ
    s = (rng.standard_normal((L, H, T)) * rng.uniform(0.2, 3, (L, H, 1))).astype(np.float32)
    prot = np.zeros((L, T), np.uint8)
    prot[:, :3] = 1
    slots, count = _native.kernels.allocate_headwise(s, prot, B, alpha, across)
    rslots, rcount = headwise_reference(s, prot, B, alpha, across)
    assert slots == rslots and (count == rcount).all()
    # the budget is spent exactly (per layer, or over all layers), and the cells cover the busiest head
    if across:
        assert count.sum() == L * H * B
    else:
        assert (count.sum(1) == H * B).all()
    assert slots == count.max() >= B
    if alpha == 1.0:
        assert slots == B  # the floor is the whole budget: uniform
