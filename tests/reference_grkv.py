"""Float64 torch reference for GRKV (docs/grkv-spec.md §4), written from the
equations, independent of the native code. Exact solves, no CG."""

from __future__ import annotations

import torch

D = torch.float64


class Problem:
    def __init__(self, q, w, vis, ostar, k0, v0, mut, scale, softcap=0.0):
        t = lambda x: torch.as_tensor(x, dtype=D)  # noqa: E731
        self.q, self.w, self.ostar, self.k0, self.v0 = t(q), t(w), t(ostar), t(k0), t(v0)
        self.vis = torch.as_tensor(vis, dtype=torch.bool)
        self.mut = torch.as_tensor(mut, dtype=torch.bool)
        self.scale = float(scale)
        self.softcap = float(softcap)

    def student(self, K, V):
        logits = (self.q @ K.T) * self.scale
        if self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        logits = logits.masked_fill(~self.vis, float("-inf"))
        A = torch.softmax(logits, dim=-1)
        return A, A @ V

    def objective(self, K, V, lam):
        _, O = self.student(K, V)
        fit = (self.w[:, None] * (O - self.ostar) ** 2).sum()
        m = self.mut[:, None]
        reg = (((K - self.k0) * m) ** 2).sum() + (((V - self.v0) * m) ** 2).sum()
        return fit + lam * reg

    def value_step(self, K, lam, dual=True):
        A, O0 = self.student(K, self.v0)
        sw = self.w.sqrt()[:, None]
        At = sw * A * self.mut[None, :]
        Rt = sw * (self.ostar - O0)
        if dual:
            R = At.shape[0]
            return At.T @ torch.linalg.solve(At @ At.T + lam * torch.eye(R, dtype=D), Rt)
        M = At[:, self.mut]
        dv = torch.zeros_like(self.v0)
        dv[self.mut] = torch.linalg.solve(M.T @ M + lam * torch.eye(M.shape[1], dtype=D), M.T @ Rt)
        return dv

    def weighted_output(self, K, V):
        return self.w.sqrt()[:, None] * self.student(K, V)[1]

    def jvp(self, K, V, Dir):
        Dir = Dir * self.mut[:, None]
        return torch.func.jvp(lambda k: self.weighted_output(k, V), (K,), (Dir,))[1]

    def vjp(self, K, V, U):
        _, f = torch.func.vjp(lambda k: self.weighted_output(k, V), K)
        return f(U)[0] * self.mut[:, None]

    def key_step(self, Kc, V, lam):
        """New total offset K - K0 = J^T (J J^T + lam I)^-1 b, exactly."""
        B, d = Kc.shape
        J = torch.autograd.functional.jacobian(lambda k: self.weighted_output(k, V), Kc)  # [R,d,B,d]
        J = J.reshape(-1, B * d) * self.mut.repeat_interleave(d)[None, :].to(D)
        c = ((Kc - self.k0) * self.mut[:, None]).reshape(-1)
        b = (self.w.sqrt()[:, None] * (self.ostar - self.student(Kc, V)[1])).reshape(-1) + J @ c
        u = torch.linalg.solve(J @ J.T + lam * torch.eye(J.shape[0], dtype=D), b)
        return (J.T @ u).reshape(B, d)


def random_problem(seed, G=3, Q=8, d=16, T=120, B=40, n_fixed=10, causal=True, softcap=0.0):
    """A GQA problem: R = G*Q rows of one KV head, teacher over T tokens."""
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(T, d, generator=g, dtype=D)
    V = torch.randn(T, d, generator=g, dtype=D)
    q = torch.randn(G * Q, d, generator=g, dtype=D) * 1.5
    pos = torch.arange(T)
    qpos = torch.arange(T - Q, T).repeat(G) if causal else torch.full((G * Q,), T - 1)
    keep = torch.sort(torch.randperm(T - Q, generator=g)[: B - Q]).values
    keep = torch.cat([keep, torch.arange(T - Q, T)])
    scale = d ** -0.5
    full_vis = pos[None, :] <= qpos[:, None]
    logits = q @ K.T * scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.masked_fill(~full_vis, float("-inf"))
    ostar = torch.softmax(logits, -1) @ V
    vis = full_vis[:, keep]
    mut = torch.ones(B, dtype=torch.bool)
    mut[-Q:] = False  # window
    mut[torch.randperm(B - Q, generator=g)[: max(0, n_fixed - Q)]] = False  # anchors
    w = torch.ones(G * Q, dtype=D)
    return dict(q=q, w=w, vis=vis, ostar=ostar, k0=K[keep], v0=V[keep], mut=mut, scale=scale, softcap=softcap)
