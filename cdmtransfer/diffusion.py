"""The Ornstein–Uhlenbeck forward process, the denoising score-matching loss, and the two samplers.

Forward process (theory.md §1.2): dX_t = −X_t dt + √2 dW_t, so x_t = α_t x_0 + σ_t ε with α_t = e^{−t},
σ_t² = 1 − e^{−2t}, t ∈ [T0, T]. Networks predict the noise ε (targets stay O(1) at every t); the score is
s(x_t, t) = −ε̂/σ_t. All functions here are pure and batched; none loops over samples.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t [..., B, d], t [..., B]) -> score [..., B, d]


class OUProcess:
    """α_t = e^{−t}, σ_t² = 1 − e^{−2t} on [T0, T] (theory.md §1.2)."""

    def __init__(self, T0: float, T: float):
        if not 0 < T0 < T:
            raise ValueError(f"need 0 < T0 < T, got T0={T0}, T={T}")
        self.T0, self.T = float(T0), float(T)

    @staticmethod
    def alpha(t: torch.Tensor) -> torch.Tensor:
        return torch.exp(-t)

    @staticmethod
    def sigma(t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(-2 * t))  # √(1 − e^{−2t}), accurate for small t

    def sample_t(self, shape, generator: torch.Generator | None, device=None) -> torch.Tensor:
        """t ~ Unif[T0, T], as in the loss of theory.md §1.3."""
        u = torch.rand(shape, generator=generator, device=device)
        return self.T0 + (self.T - self.T0) * u

    def perturb(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = α_t x_0 + σ_t ε (broadcast over the last dimension)."""
        return self.alpha(t)[..., None] * x0 + self.sigma(t)[..., None] * noise

    def prior_sample(self, shape, generator: torch.Generator | None, device=None) -> torch.Tensor:
        return _noise(shape, generator, device)


def dsm_loss(eps_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-sample denoising score matching with σ_t² weighting: ‖ε̂ − ε‖² = σ_t²‖s − ∇log φ_t(x_t|x_0)‖².

    ∇log φ_t(x_t|x_0) = −ε/σ_t (Vincent 2011; theory.md §1.3). Unreduced: the caller averages or weights.
    """
    return (eps_pred - noise).pow(2).sum(dim=-1)


def model_dsm_terms(model, x0: torch.Tensor, x_t: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                    noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A score model's per-sample training loss [K, B] on x_t = perturb(x0, t, noise), with the code h(y) and ε̂ it
    used: the DSM (EDM-weighted when the model says so), plus the linear mean's least squares when it has one
    (models.ScoreModel.mean_fit_loss). One encoder pass serves both terms."""
    code = model.encoder(y)
    eps = model.eps_from_code(x_t, code, t, y)
    loss = model.dsm_weight(t) * dsm_loss(eps, noise)
    if model.linear_mean:
        loss = loss + model.mean_fit_loss(code, x0)
    return loss, code, eps


def time_grid(steps: int, T0: float, T: float, device=None) -> torch.Tensor:
    """Decreasing times T = t_0 > … > t_steps = T0, evenly spaced in log t (finer near T0 where the score is sharp)."""
    return torch.exp(torch.linspace(math.log(T), math.log(T0), steps + 1, device=device))


@torch.no_grad()
def sample_sde(score: ScoreFn, x: torch.Tensor, grid: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Reverse SDE dX = (X + 2 s(X, t)) dτ + √2 dW̄ in reverse time (theory.md §1.2), Euler–Maruyama steps.

    The last step returns the noise-free drift update, the usual choice at the early-stopping time T0. x is [B, d],
    or [M, B, d] for M models sampled side by side: they share each step's noise [B, d], so each gets the chain it
    would get alone from the same generator state.
    """
    times = grid.tolist()
    x = x.clone()  # updated in place below
    for i in range(len(grid) - 1):
        h = times[i] - times[i + 1]
        s = score(x, grid[i].expand(x.shape[:-1]))
        x.mul_(1 + h).add_(s, alpha=2 * h)  # x + h·(x + 2 s): Euler–Maruyama
        if i < len(grid) - 2:
            x.add_(_noise(x.shape[-2:], generator, x.device), alpha=math.sqrt(2 * h))
    return x


def _noise(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """N(0, I) of `shape` from `generator`, drawn where the generator lives and moved to `device`: the same numbers
    whichever device the sampler runs on."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where).to(device)


@torch.no_grad()
def sample_ode(score: ScoreFn, x: torch.Tensor, grid: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Probability-flow ODE dx/dt = −x − s(x, t), integrated from T down to T0 with Heun's method."""
    def velocity(x_, t_):
        return -x_ - score(x_, t_.expand(x_.shape[:-1]))

    for i in range(len(grid) - 1):
        t, t_next = grid[i], grid[i + 1]
        h = t_next - t  # negative: integrating backwards in time
        v = velocity(x, t)
        x_euler = x + h * v  # Euler step
        x = x + 0.5 * h * (v + velocity(x_euler, t_next))  # 2nd-order (Heun) correction
    return x


SAMPLERS = {"sde": sample_sde, "ode": sample_ode}


@torch.no_grad()
def tweedie_denoise(score: ScoreFn, x: torch.Tensor, t: float) -> torch.Tensor:
    """E[x_0 | x_t] = (x_t + σ_t² s(x_t, t)) / α_t (Tweedie's formula), for samples x at time t.

    Averaging it over samples x_t ~ p_t(·|y) estimates E[x_0|y] exactly as the samples' own mean does (tower rule),
    without the noise σ_t² the samples still carry at the early-stopping time T0.
    """
    tt = torch.full(x.shape[:-1], float(t), device=x.device)
    return (x + OUProcess.sigma(tt)[..., None] ** 2 * score(x, tt)) / OUProcess.alpha(tt)[..., None]


def sample(score: ScoreFn, n: int, dim: int, process: OUProcess, steps: int, method: str,
           generator: torch.Generator | None, device=None, denoise: bool = False, copies: int | None = None) -> torch.Tensor:
    """Draw n samples of dimension `dim` by integrating `method` ('sde' or 'ode') from N(0, I) at T down to T0.

    With `denoise`, return each sample's Tweedie estimate E[x_0 | x_T0] instead (for posterior-mean estimates).
    With `copies` = M, sample M models side by side ([M, n, dim]; `score` takes and returns that shape), all from
    the same prior draw and noise: each model's samples are those it would draw alone from this generator state.
    """
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; choose from {', '.join(SAMPLERS)}")
    x = process.prior_sample((n, dim), generator, device)
    if copies is not None:
        x = x.expand(copies, n, dim)
    grid = time_grid(steps, process.T0, process.T, device=device)
    x = SAMPLERS[method](score, x, grid, generator)
    return tweedie_denoise(score, x, process.T0) if denoise else x
