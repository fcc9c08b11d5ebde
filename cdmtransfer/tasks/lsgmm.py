"""Latent subspace Gaussian mixture tasks (companions.md §A.3), in conditional form, with exact noisy scores.

Task k (0 = target, 1..K = sources):
    content   z ~ Σ_c π_c N(μ_c, s² I_k)                  (shared GMM: cluster structure)
    x-style   g ~ N(0, I_m),  x = A z + B_k g + σ_n ε      ([A B_k] orthonormal columns; A shared, B_k per task)
    nuisance  u ~ N(c_k, I_m)                              (condition-side style with a task-specific offset c_k)
    condition y = M [z; u] = M_z z + M_u u                 (M ∈ R^{D_y×(k+m)} fixed, orthonormal columns)
Given y, z = M_zᵀ y exactly and x does not depend on u, so h*(y) = M_zᵀ y (linear; FixedEncoder oracle) carries
all the condition's information about x, while u is pure nuisance that an encoder can leak (task id, style).
x | y ~ N(A z, Σ_k) with Σ_k = σ_n² I + B_k B_kᵀ, so under the OU process x_t | y ~ N(α A z, C), C = α²Σ_k + σ² I =
c I + α² P_B (c = α² σ_n² + σ², P_B = B_k B_kᵀ), and the exact conditional score is
    ∇log p_t(x_t | y) = −[(I − P_B)/c + P_B/(c + α²)] (x_t − α A z).
The unconditional noisy density is the GMM Σ_c π_c N(α A μ_c, α²(s² AAᵀ + Σ_k) + σ² I) (`marginal_score`).

suite.lsgmm.condition = view ("multiple views", companions.md §A.2): the condition is a second view of the same
content in x-space (D_y = d_x), drawn like x but with its own style draw and the task's nuisance offset:
    y = A z + B_k u + σ_n (I − AAᵀ) ε',   u ~ N(c_k, I_m), ε' ~ N(0, I_{d_x})
(the condition-style subspace C_k is B_k itself: orthogonal to A, task-specific). The view's noise is kept out of
span(A), so Aᵀy = z exactly: h*(y) = Aᵀy (linear; FixedEncoder oracle) and x | y ~ N(A z, Σ_k) as above, so every
score formula above holds unchanged with z = Aᵀy. An encoder of the view can be compared with span(A) itself
(‖P_W − P_A‖_F/√(2k), §A.3), and the same h applies to x (the mix-and-match regulariser needs that).
"""

from __future__ import annotations

import torch

from cdmtransfer.config import Config
from cdmtransfer.errors import ConfigError
from cdmtransfer.models import FixedEncoder
from cdmtransfer.tasks.base import GroundTruth, TaskSet, draw_splits


def _orthonormal(shape, gen) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(*shape, generator=gen))[0]


class LsgmmTruth(GroundTruth):
    def __init__(self, A, B, M, k, means, scale, noise, offsets, view: bool = False):
        self.A, self.B = A, B  # [d_x, k], [K+1, d_x, m]
        self.view = view
        if view:  # y = A z + B_k u + σ_n P_⊥ ε': content directions A, style directions span(B_0, …, B_K)
            self.M_z = A
            U, S, _ = torch.linalg.svd(B.transpose(0, 1).reshape(A.shape[0], -1), full_matrices=False)
            self.M_u = U[:, S > 1e-5 * S[0]]
        else:
            self.M_z, self.M_u = M[:, :k], M[:, k:]  # [D_y, k], [D_y, m]
        self.means, self.scale, self.noise, self.offsets = means, scale, noise, offsets  # [C, k], s, σ_n, [K+1, m]

    def h_star(self, y: torch.Tensor) -> torch.Tensor:
        return y @ self.M_z

    def style(self, y: torch.Tensor) -> torch.Tensor:
        """The condition-side nuisance: u = M_uᵀ y (latent); view: the coordinates of y on span(B_0, …, B_K)."""
        return y @ self.M_u

    def content_basis(self) -> torch.Tensor:
        """Orthonormal basis of the content directions in condition space: span(M_z), or span(A) for views [D_y, k]."""
        return self.M_z

    def style_basis(self) -> torch.Tensor:
        """The nuisance directions: span(M_u), or for views every task's condition style, span(B_0, …, B_K)."""
        return self.M_u

    def support_basis(self) -> torch.Tensor:
        """Orthonormal basis of the span the conditions live in: span(M) (latent) or all of R^{D_y} (views)."""
        if self.view:
            return torch.eye(self.A.shape[0])
        return torch.cat([self.M_z, self.M_u], dim=1)

    def condition(self, task: int, z: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A condition y for content z [n, k] in `task`: M [z; u] (latent) or a second view (module docstring)."""
        u = self.offsets[task] + torch.randn(z.shape[0], self.offsets.shape[1], generator=generator)
        if not self.view:
            return z @ self.M_z.T + u @ self.M_u.T
        eps = torch.randn(z.shape[0], self.A.shape[0], generator=generator)
        eps = eps - (eps @ self.A) @ self.A.T  # (I − AAᵀ) ε': the view's noise never touches the content
        return z @ self.A.T + u @ self.B[task].T + self.noise * eps

    def mean(self, task: int, y: torch.Tensor) -> torch.Tensor:
        return self.h_star(y) @ self.A.T

    def score(self, task, x_t, y, t):
        alpha = torch.exp(-t)[:, None]
        sigma2 = -torch.expm1(-2 * t)[:, None]
        c = alpha**2 * self.noise**2 + sigma2
        r = x_t - alpha * self.mean(task, y)
        rb = (r @ self.B[task]) @ self.B[task].T  # P_B r
        return -((r - rb) / c + rb / (c + alpha**2))

    def sample(self, task, y, generator):
        B = self.B[task]
        g = torch.randn(y.shape[0], B.shape[1], generator=generator)
        eps = torch.randn(y.shape[0], self.A.shape[0], generator=generator)
        return self.mean(task, y) + g @ B.T + self.noise * eps

    def marginal_cov(self, task: int, t: torch.Tensor) -> torch.Tensor:
        """Cov of x_t | component: α²(s² AAᵀ + B_k B_kᵀ + σ_n² I) + σ² I, [B, d_x, d_x]."""
        d_x = self.A.shape[0]
        base = self.scale**2 * self.A @ self.A.T + self.B[task] @ self.B[task].T + self.noise**2 * torch.eye(d_x)
        alpha2 = torch.exp(-2 * t)[:, None, None]
        return alpha2 * base + (1 - alpha2) * torch.eye(d_x)

    def marginal_score(self, task: int, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """∇log p_t(x_t) of the unconditional GMM: Σ_c w_c(x) · (−C⁻¹(x − α A μ_c)), w = posterior responsibilities."""
        cov = self.marginal_cov(task, t)
        centres = torch.exp(-t)[:, None, None] * (self.means @ self.A.T)[None]  # [B, C, d_x]
        r = x_t[:, None, :] - centres
        prec_r = torch.linalg.solve(cov[:, None], r.unsqueeze(-1)).squeeze(-1)  # C⁻¹ r per component
        logw = -0.5 * (r * prec_r).sum(-1)  # equal weights and a shared covariance: log-dets cancel
        w = torch.softmax(logw, dim=1)
        return -(w[..., None] * prec_r).sum(1)

    def encoder(self):
        return FixedEncoder(self.M_z.T, torch.zeros(self.M_z.shape[1]), "identity")


def build(cfg: Config) -> TaskSet:
    s, c = cfg.suite, cfg.suite.lsgmm
    K, k, m = s.K, c.k, c.m_style
    if c.d_x < k + m:
        raise ConfigError(f"suite.lsgmm.d_x = {c.d_x} must be >= k + m_style = {k + m}")
    if c.condition == "view" and c.D_y != c.d_x:
        raise ConfigError(f"suite.lsgmm.condition = view needs D_y = d_x (the condition is a view in x-space), "
                          f"got D_y = {c.D_y}, d_x = {c.d_x} (use --set suite.lsgmm.D_y={c.d_x})")
    if c.D_y < k + m:
        raise ConfigError(f"suite.lsgmm.D_y = {c.D_y} must be >= k + m_style = {k + m}")
    gen = torch.Generator().manual_seed(s.seed)
    A = _orthonormal((c.d_x, k), gen)
    comp = torch.eye(c.d_x) - A @ A.T  # B_k in the orthogonal complement of A, so [A B_k] is orthonormal
    B = torch.stack([torch.linalg.qr(comp @ torch.randn(c.d_x, m, generator=gen))[0] for _ in range(K + 1)])
    M = _orthonormal((c.D_y, k + m), gen)
    means = c.spread * torch.randn(c.components, k, generator=gen)
    offsets = c.nuisance_shift * torch.randn(K + 1, m, generator=gen) / m**0.5
    truth = LsgmmTruth(A, B, M, k, means, c.scale, c.noise, offsets, view=c.condition == "view")

    def draw(task: int, n: int):
        which = torch.randint(c.components, (n,), generator=gen)
        z = means[which] + c.scale * torch.randn(n, k, generator=gen)
        y = truth.condition(task, z, gen)
        return truth.sample(task, y, gen), y

    splits = draw_splits(draw, K, s.n, s.n_target_pool, s.n_test)
    desc = f"LSGMM, content k={k} ({c.components}-GMM), style m={m}, d_x={c.d_x}, D_y={c.D_y}, {c.condition} y"
    return TaskSet("lsgmm", *splits, truth, description=desc)
