"""The main paper's conditioned-diffusion experiment (theory.md §4.1; Cui et al. 2016).

x = (u_Δ, …, u_1) ∈ R^{d_x} is an Euler–Maruyama path (step Δ = 1/d_x, u_0 = 0) of the Langevin SDE
    du = β u(1 − u²)/(1 + u²) ds + dw,
and y | x ~ N(M x, obs_std² I_{D_y}) with one fixed M ∈ R^{D_y × d_x}. Sources have β = 1..K; the target has
β = beta_target (5.5 is in-domain for K = 10, 15 is out-of-domain). The posterior p(x | y) depends on y only through
Mᵀy, which is the oracle representation. No closed-form score or posterior sampler: the evaluator reports the
posterior-mean MSE against the true x (the paper's metric) and says it skipped the rest.
"""

from __future__ import annotations

import torch

from cdmtransfer.config import Config
from cdmtransfer.models import FixedEncoder
from cdmtransfer.tasks.base import GroundTruth, TaskSet, draw_splits


def langevin_paths(beta: float, n: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    """n Euler–Maruyama paths of du = β u(1−u²)/(1+u²) ds + dw on [0, 1], batched over paths."""
    dt = 1.0 / steps
    u = torch.zeros(n)
    path = torch.empty(n, steps)
    for i in range(steps):  # a loop over time steps, vectorised over the n paths
        drift = beta * u * (1 - u**2) / (1 + u**2)
        u = u + drift * dt + dt**0.5 * torch.randn(n, generator=generator)
        path[:, i] = u
    return path


class LangevinTruth(GroundTruth):
    def __init__(self, M: torch.Tensor):
        self.M = M

    def encoder(self):
        # h*(y) = Mᵀy, a sufficient statistic of y for x (scaled to O(1) entries).
        return FixedEncoder(self.M.T / self.M.shape[0] ** 0.5, torch.zeros(self.M.shape[1]), "identity")


def build(cfg: Config) -> TaskSet:
    s, l_cfg = cfg.suite, cfg.suite.langevin
    gen = torch.Generator().manual_seed(cfg.suite.seed)
    M = torch.randn(l_cfg.D_y, l_cfg.d_x, generator=gen) / l_cfg.d_x**0.5

    def draw(task: int, n: int):  # source k has β = k; the target (task 0) has β = beta_target
        beta = l_cfg.beta_target if task == 0 else float(task)
        x = langevin_paths(beta, n, l_cfg.d_x, gen)
        y = x @ M.T + l_cfg.obs_std * torch.randn(n, l_cfg.D_y, generator=gen)
        return x, y

    splits = draw_splits(draw, s.K, s.n, s.n_target_pool, s.n_test)
    desc = f"conditioned diffusion, sources β=1..{s.K}, target β={l_cfg.beta_target}, d_x={l_cfg.d_x}, D_y={l_cfg.D_y}"
    return TaskSet("langevin", *splits, LangevinTruth(M), description=desc)
