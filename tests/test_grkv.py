"""GRKV's numerical tests (docs/grkv-spec.md §4.9), native against the float64
torch reference on random GQA problems."""

import numpy as np
import pytest
import torch

from grkv_cpp import _native
from reference_grkv import Problem, random_problem


def native(pr):
    f32 = lambda x: np.ascontiguousarray(x.numpy(), dtype=np.float32)  # noqa: E731
    return _native.kernels.GrkvProblem(f32(pr["q"]), f32(pr["w"]), pr["vis"].numpy().astype(np.uint8), f32(pr["ostar"]),
                               f32(pr["k0"]), f32(pr["v0"]), pr["mut"].numpy().astype(np.uint8), pr["scale"],
                               pr.get("softcap", 0.0))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


# softcap 2: Gemma-2's tanh cap, tight enough to bend these problems' logits (std 1.5)
SOFTCAPS = pytest.mark.parametrize("softcap", [0.0, 2.0])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("causal", [True, False])
@SOFTCAPS
def test_value_step_dual_equals_primal_and_native(seed, causal, softcap):
    pr = random_problem(seed, causal=causal, softcap=softcap)
    ref = Problem(**pr)
    dual = ref.value_step(ref.k0, 0.01, dual=True)
    primal = ref.value_step(ref.k0, 0.01, dual=False)
    assert rel(dual, primal) < 1e-8
    assert (dual[~ref.mut] == 0).all()
    nat = _native.kernels.grkv_value_step(native(pr), pr["k0"].numpy().astype(np.float32), 0.01)
    assert rel(nat, dual) < 1e-4


@pytest.mark.parametrize("seed", range(3))
@SOFTCAPS
def test_jvp_finite_difference_and_reference(seed, softcap):
    pr = random_problem(seed, softcap=softcap)
    ref, p = Problem(**pr), native(pr)
    K = pr["k0"].numpy().astype(np.float32)
    V = pr["v0"].numpy().astype(np.float32)
    Dir = np.random.default_rng(seed).standard_normal(K.shape).astype(np.float32)
    Dir[~pr["mut"].numpy()] = 0
    jvp = _native.kernels.grkv_jvp(p, K, V, Dir)
    eps = 1e-4
    Kt, Dt, Vt = torch.as_tensor(K, dtype=torch.float64), torch.as_tensor(Dir, dtype=torch.float64), torch.as_tensor(V, dtype=torch.float64)
    fd = (ref.weighted_output(Kt + eps * Dt, Vt) - ref.weighted_output(Kt - eps * Dt, Vt)) / (2 * eps)
    assert rel(jvp, fd) < 1e-4
    assert rel(jvp, ref.jvp(Kt, Vt, Dt)) < 1e-4


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", [{}, dict(G=1, Q=7, d=20, T=90, B=37, n_fixed=5), dict(G=4, Q=8, d=72, T=150, B=70)])
@SOFTCAPS
def test_vjp_is_adjoint_of_jvp(seed, shape, softcap):
    # the shapes cover the product kernel's full tiles and its leftover rows and columns
    pr = random_problem(seed, **shape, softcap=softcap)
    p = native(pr)
    rng = np.random.default_rng(seed)
    K = pr["k0"].numpy().astype(np.float32)
    V = pr["v0"].numpy().astype(np.float32)
    Dir = rng.standard_normal(K.shape).astype(np.float32)
    Dir[~pr["mut"].numpy()] = 0
    U = rng.standard_normal(pr["ostar"].shape).astype(np.float32)
    lhs = float(np.sum(_native.kernels.grkv_jvp(p, K, V, Dir).astype(np.float64) * U))
    rhs = float(np.sum(_native.kernels.grkv_vjp(p, K, V, U).astype(np.float64) * Dir))
    assert abs(lhs - rhs) <= 1e-4 * max(abs(lhs), 1e-6)
    ref = Problem(**pr)
    t = lambda x: torch.as_tensor(x, dtype=torch.float64)  # noqa: E731
    assert rel(_native.kernels.grkv_vjp(p, K, V, U), ref.vjp(t(K), t(V), t(U))) < 1e-4
    assert rel(_native.kernels.grkv_jvp(p, K, V, Dir), ref.jvp(t(K), t(V), t(Dir))) < 1e-4


@pytest.mark.parametrize("seed", range(2))
@SOFTCAPS
def test_key_step_matches_exact_gauss_newton(seed, softcap):
    pr = random_problem(seed, G=2, Q=6, d=8, T=60, B=20, n_fixed=8, softcap=softcap)
    ref, p = Problem(**pr), native(pr)
    V1 = ref.v0 + ref.value_step(ref.k0, 0.01)
    nat = _native.kernels.grkv_key_step(p, pr["k0"].numpy().astype(np.float32), V1.numpy().astype(np.float32), 0.01, 64, 1e-7)
    exact = ref.key_step(ref.k0, V1, 0.01)
    assert rel(nat, exact) < 1e-3
    # 16 CG iterations (the default) already give most of the step
    nat16 = _native.kernels.grkv_key_step(p, pr["k0"].numpy().astype(np.float32), V1.numpy().astype(np.float32))
    assert rel(nat16, exact) < 0.2


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("moved", [False, True])
def test_key_step_on_the_active_slots_is_gauss_newton_over_them(seed, moved):
    """key_active: slots no surrogate query attends to (largest weight below
    the threshold) stay where they are; the step over the others is the exact
    Gauss-Newton step with those slots fixed."""
    pr = random_problem(seed, G=2, Q=6, d=8, T=60, B=20, n_fixed=4)
    ref, p = Problem(**pr), native(pr)
    Kc = ref.k0.clone()
    if moved:  # a later step starts from moved keys
        Kc += 0.05 * torch.randn(Kc.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * ref.mut[:, None]
    V1 = ref.v0 + ref.value_step(Kc, 0.01)
    A, _ = ref.student(Kc, V1)
    col = A.max(0).values
    srt = col[ref.mut].sort().values
    mid = len(srt) // 2
    tau = float(srt[mid - 1] + srt[mid]) / 2  # between two slots: float rounding cannot flip one
    active = ref.mut & (col >= tau)
    assert 0 < int(active.sum()) < int(ref.mut.sum())
    sub = dict(pr, mut=active.to(torch.uint8))
    exact = Problem(**sub).key_step(Kc, V1, 0.01)  # offset of the active slots, 0 elsewhere
    f32 = lambda x: x.numpy().astype(np.float32)  # noqa: E731
    nat = _native.kernels.grkv_key_step(p, f32(Kc), f32(V1), 0.01, 64, 1e-7, key_active=tau)
    a, inactive = active.numpy(), (ref.mut & ~active).numpy()
    assert rel(nat[a], exact.numpy()[a]) < 1e-3
    np.testing.assert_array_equal(nat[inactive], (f32(Kc) - f32(ref.k0))[inactive])
    np.testing.assert_array_equal(nat[~ref.mut.numpy()], 0.0)


def test_loose_cg_tolerance_stops_early_and_keeps_the_step():
    """cg_tol stops CG once the residual falls below cg_tol * ||b||: at 0.1 the
    step is already close to the exact one (what bench_merge measured on the
    models), and a tolerance that cannot be met runs every iteration."""
    pr = random_problem(0, G=2, Q=6, d=8, T=60, B=20, n_fixed=8)
    ref, p = Problem(**pr), native(pr)
    V1 = ref.v0 + ref.value_step(ref.k0, 0.01)
    K0, V1f = pr["k0"].numpy().astype(np.float32), V1.numpy().astype(np.float32)
    exact = ref.key_step(ref.k0, V1, 0.01).numpy()
    loose = _native.kernels.grkv_key_step(p, K0, V1f, 0.01, 64, 0.1)
    tight = _native.kernels.grkv_key_step(p, K0, V1f, 0.01, 64, 1e-7)
    assert rel(tight, exact) < 1e-3
    assert rel(loose, exact) < 0.1
    assert not np.array_equal(loose, tight)  # it did stop early


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_fit_safeguard_fixed_slots_and_caps(seed, dtype):
    pr = random_problem(seed)
    # store originals in the cache dtype, as they come from the cache
    k0 = _native.kernels.f32_round_trip(pr["k0"].numpy().astype(np.float32), dtype)
    v0 = _native.kernels.f32_round_trip(pr["v0"].numpy().astype(np.float32), dtype)
    pr = dict(pr, k0=torch.as_tensor(k0, dtype=torch.float64), v0=torch.as_tensor(v0, dtype=torch.float64))
    p = native(pr)
    ref = Problem(**pr)
    out = _native.kernels.grkv_fit(p, 0.01, 0.1, 0.025, 1, dtype)
    objs = out["cand_obj"]
    assert len(objs) == 3  # none, V only, K and V
    chosen = _native.kernels.grkv_objective(p, out["k"], out["v"], 0.01)
    assert chosen <= objs[0] * (1 + 1e-6)                      # never worse than no update
    assert chosen == pytest.approx(min(objs), rel=1e-6)
    # objective agrees with the reference
    assert ref.objective(torch.as_tensor(out["k"], dtype=torch.float64), torch.as_tensor(out["v"], dtype=torch.float64), 0.01).item() == pytest.approx(chosen, rel=1e-4)
    # on these problems the fit helps: the V step lowers the objective
    assert objs[1] < objs[0]
    fixed = ~pr["mut"].numpy()
    for k, v in zip(out["cand_k"], out["cand_v"]):
        np.testing.assert_array_equal(k[fixed], k0[fixed])     # bit-identical
        np.testing.assert_array_equal(v[fixed], v0[fixed])
        m = ~fixed
        assert np.linalg.norm(v[m] - v0[m]) <= 0.1 * np.linalg.norm(v0[m]) * (1 + 1e-6)
        assert np.linalg.norm(k[m] - k0[m]) <= 0.025 * np.linalg.norm(k0[m]) * (1 + 1e-6)
        # stored values are representable in the cache dtype
        np.testing.assert_array_equal(_native.kernels.f32_round_trip(v, dtype), v)
        np.testing.assert_array_equal(_native.kernels.f32_round_trip(k, dtype), k)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_fit_on_a_quantised_cache_is_judged_after_requantisation(seed, dtype):
    """Caps and the safeguard see the rows as a rotated q8_0/q4_0 cache will
    hold them: every candidate is a fixed point of store-and-read, within its
    cap after storage, and fixed slots keep their values bit for bit."""
    pr = random_problem(seed, d=64)
    k0 = _native.kernels.f32_round_trip(pr["k0"].numpy().astype(np.float32), dtype, 64)
    v0 = _native.kernels.f32_round_trip(pr["v0"].numpy().astype(np.float32), dtype, 64)
    pr = dict(pr, k0=torch.as_tensor(k0, dtype=torch.float64), v0=torch.as_tensor(v0, dtype=torch.float64))
    p = native(pr)
    out = _native.kernels.grkv_fit(p, 0.01, 0.1, 0.025, 1, dtype, 64)
    objs = out["cand_obj"]
    chosen = _native.kernels.grkv_objective(p, out["k"], out["v"], 0.01)
    assert chosen <= objs[0] * (1 + 1e-6) and chosen == pytest.approx(min(objs), rel=1e-6)
    fixed = ~pr["mut"].numpy()
    m = ~fixed
    for k, v in zip(out["cand_k"], out["cand_v"]):
        np.testing.assert_array_equal(k[fixed], k0[fixed])
        np.testing.assert_array_equal(v[fixed], v0[fixed])
        np.testing.assert_array_equal(_native.kernels.f32_round_trip(v, dtype, 64), v)
        np.testing.assert_array_equal(_native.kernels.f32_round_trip(k, dtype, 64), k)
        assert np.linalg.norm(v[m] - v0[m]) <= 0.1 * np.linalg.norm(v0[m]) * (1 + 1e-6)
        assert np.linalg.norm(k[m] - k0[m]) <= 0.025 * np.linalg.norm(k0[m]) * (1 + 1e-6)
    # the V step survives requantisation: it moves the values and lowers the objective
    assert objs[1] < objs[0]
    assert np.abs(out["cand_v"][1][m] - v0[m]).max() > 0


def test_round_trip_of_a_quantised_row_is_idempotent_and_rotation_matters():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 128)).astype(np.float32)
    for dtype in ("q8_0", "q4_0"):
        y = _native.kernels.f32_round_trip(x, dtype, 64)
        np.testing.assert_array_equal(_native.kernels.f32_round_trip(y, dtype, 64), y)
        # the rotated basis is not the stored one: reading without un-rotating differs
        assert not np.array_equal(_native.kernels.f32_round_trip(y, dtype, 0), y)
    with pytest.raises(_native.NativeError, match="not whole blocks"):
        _native.kernels.f32_round_trip(x[:, :48], "q8_0", 64)
    with pytest.raises(_native.NativeError, match="unknown cache type"):
        _native.kernels.f32_round_trip(x, "q5_k")


def test_uncapped_fit_reduces_objective_like_reference():
    pr = random_problem(7)
    ref, p = Problem(**pr), native(pr)
    out = _native.kernels.grkv_fit(p, 0.01, 0.0, 0.0, 1, "f32")
    none, v_only, kv = out["cand_obj"]
    V1 = ref.v0 + ref.value_step(ref.k0, 0.01)
    assert v_only == pytest.approx(ref.objective(ref.k0, V1, 0.01).item(), rel=1e-3)
    assert kv < v_only < none


def test_merge_baselines_route_to_nearest_key():
    rng = np.random.default_rng(0)
    T, d = 30, 8
    k = rng.standard_normal((T, d)).astype(np.float32)
    v = rng.standard_normal((T, d)).astype(np.float32)
    keep = np.array([0, 10, 20, 29], np.int32)
    pos = np.arange(T, dtype=np.int32)
    ku = k / np.linalg.norm(k, axis=1, keepdims=True)
    route = {t: int(np.argmax(ku[keep] @ ku[t])) for t in range(T) if t not in keep}
    cos = {t: float(ku[keep[route[t]]] @ ku[t]) for t in route}
    # weighted: x_c <- (x_c + sum w_e x_e) / (1 + sum w_e), w = (cos + 1) / 2
    ok, ov = _native.kernels.merge_head("weighted", k, v, pos, keep)
    for s, c in enumerate(keep):
        es = [t for t in route if route[t] == s]
        w = np.array([(cos[t] + 1) / 2 for t in es])
        want_k = (k[c] + (w[:, None] * k[es]).sum(0)) / (1 + w.sum()) if es else k[c]
        np.testing.assert_allclose(ok[s], want_k, rtol=1e-5, atol=1e-6)
    # pivot: mean of x_c and the midpoints
    ok, ov = _native.kernels.merge_head("pivot", k, v, pos, keep)
    for s, c in enumerate(keep):
        es = [t for t in route if route[t] == s]
        want_v = (v[c] + sum((v[t] + v[c]) / 2 for t in es)) / (1 + len(es))
        np.testing.assert_allclose(ov[s], want_v, rtol=1e-5, atol=1e-6)
    # value merge: keys untouched
    ok, ov = _native.kernels.merge_head("merge", k, v, pos, keep)
    np.testing.assert_array_equal(ok, k[keep])
    assert not np.allclose(ov, v[keep])


def test_softcap_changes_the_student_and_native_follows_it():
    pr = random_problem(0, softcap=2.0)
    K = pr["k0"].numpy().astype(np.float32)
    V = pr["v0"].numpy().astype(np.float32)
    capped, plain = Problem(**pr), Problem(**dict(pr, softcap=0.0))
    t = lambda x: torch.as_tensor(x, dtype=torch.float64)  # noqa: E731
    A_nat, _ = _native.kernels.grkv_student(native(pr), K, V)
    A_cap, A_plain = capped.student(t(K), t(V))[0], plain.student(t(K), t(V))[0]
    assert rel(A_nat, A_cap) < 1e-5 and rel(A_plain, A_cap) > 0.1
