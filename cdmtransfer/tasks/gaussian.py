"""Gaussian tasks sharing a low-dimensional representation h*, with exact noisy scores at every t.

Task k (0 = target, 1..K = sources): y ~ N(0, I_{D_y}),  x | y ~ N(μ_k(y), Σ_k),  μ_k(y) = A_k h*(y) + b_k.
h*(y) = W y (linear) or tanh(2 W y + c) (nonlinear), W with orthonormal rows, so Assumption 3.2 holds exactly.
Under the OU process x_t | y ~ N(α_t μ_k(y), α_t² Σ_k + σ_t² I), hence the exact score
    ∇log p_t(x_t | y) = −(α_t² Σ_k + σ_t² I)^{-1} (x_t − α_t μ_k(y)).
Targets: `in_span` takes A_0 as a combination of the source maps; `out_of_span` makes every source ignore the last
coordinate of h* while the target uses it, so no encoder learned on the sources can carry it (diversity fails).
"""

from __future__ import annotations

import torch

from cdmtransfer.config import Config
from cdmtransfer.errors import ConfigError
from cdmtransfer.models import FixedEncoder
from cdmtransfer.tasks.base import GroundTruth, TaskSet, draw_splits


class GaussianTruth(GroundTruth):
    def __init__(self, W, c, activation, A, b, Sigma):
        self.W, self.c, self.activation = W, c, activation
        self.A, self.b = A, b  # [K+1, d_x, d], [K+1, d_x]
        self.evals, self.evecs = torch.linalg.eigh(Sigma)  # Σ_k = U diag(λ) Uᵀ, [K+1, d_x], [K+1, d_x, d_x]
        self.chol = torch.linalg.cholesky(Sigma)

    def h_star(self, y: torch.Tensor) -> torch.Tensor:
        z = y @ self.W.T
        return z if self.activation == "identity" else torch.tanh(z + self.c)

    def mean(self, task: int, y: torch.Tensor) -> torch.Tensor:
        return self.h_star(y) @ self.A[task].T + self.b[task]

    def score(self, task, x_t, y, t):
        alpha = torch.exp(-t)[:, None]
        sigma2 = -torch.expm1(-2 * t)[:, None]
        U, lam = self.evecs[task], self.evals[task]
        r = (x_t - alpha * self.mean(task, y)) @ U  # rotate into Σ's eigenbasis
        return -(r / (alpha**2 * lam + sigma2)) @ U.T  # (α²Σ + σ²I)^{-1} applied per row

    def sample(self, task, y, generator):
        eps = torch.randn(y.shape[0], self.A.shape[1], generator=generator)
        return self.mean(task, y) + eps @ self.chol[task].T

    def encoder(self):
        if self.activation == "identity":
            return FixedEncoder(self.W, torch.zeros(self.W.shape[0]), "identity")
        return FixedEncoder(self.W, self.c, "tanh")


def build(cfg: Config) -> TaskSet:
    s, g_cfg = cfg.suite, cfg.suite.gaussian
    d_x, D_y, d, K = g_cfg.d_x, g_cfg.D_y, g_cfg.d, s.K
    if d > D_y:
        raise ConfigError(f"suite.gaussian.d = {d} must be <= suite.gaussian.D_y = {D_y}")
    gen = torch.Generator().manual_seed(cfg.suite.seed)
    W = torch.linalg.qr(torch.randn(D_y, d, generator=gen))[0].T  # orthonormal rows: h* = W y ~ N(0, I_d)
    if g_cfg.h_star == "linear":
        c, activation = torch.zeros(d), "identity"
    else:
        W, c, activation = 2 * W, 0.3 * torch.randn(d, generator=gen), "tanh"
    A = torch.randn(K + 1, d_x, d, generator=gen) / d**0.5
    b = 0.5 * torch.randn(K + 1, d_x, generator=gen)
    if g_cfg.target == "out_of_span":
        A[1:, :, -1] = 0  # sources ignore the last coordinate of h* ...
    coef = torch.randn(K, generator=gen)
    A[0] = torch.einsum("k,kij->ij", coef / coef.norm(), A[1:])  # a unit combination of the source maps
    if g_cfg.target == "out_of_span":
        A[0, :, -1] = torch.randn(d_x, generator=gen) / d**0.5  # ... which the target needs
    L = torch.randn(K + 1, d_x, d_x, generator=gen) / d_x**0.5
    Sigma = g_cfg.noise**2 * (0.5 * torch.eye(d_x) + L @ L.transpose(1, 2))
    truth = GaussianTruth(W, c, activation, A, b, Sigma)

    def draw(task: int, n: int):
        y = torch.randn(n, D_y, generator=gen)
        return truth.sample(task, y, gen), y

    splits = draw_splits(draw, K, s.n, s.n_target_pool, s.n_test)
    desc = f"Gaussian, {g_cfg.h_star} h* (d={d}), target {g_cfg.target}, d_x={d_x}, D_y={D_y}"
    return TaskSet("gaussian", *splits, truth, description=desc)
