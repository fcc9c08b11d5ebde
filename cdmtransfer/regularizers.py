"""Companion-paper loss terms (papers/companions.md §A, §C, §D), added to the per-sample DSM loss.

- consistency (§D, Daras et al. 2023): the x₀-prediction x̂₀(x_t, t) = (x_t − σ_t ε̂)/α_t (Tweedie, OU/VP form of the
  EDM denoiser) is a martingale along the model's own reverse SDE; L_C = (a¹ − b)·(a² − b) with a^i from two
  independent gradient-free chains estimates ‖E[a] − b‖² without bias (§D.2 steps 5–7).
- mmd (§C.2, InfoDiffusion): MMD² between the codes h(y) of the batch and draws from a prior, kernel exp(−‖a−b‖²/d).
- info (§C.6, anti-ignoring): a hinge on the DSM gap between shuffled and matching codes, batch mean.
- hsic (§A.2/A.4): HSIC between h(y) and a nuisance (task one-hot, or the suite's known style), Gaussian kernels with
  the median heuristic (Gretton et al. 2005; unbiased form: Song et al. 2012, eq. 5).
- mixmatch (§A.2, style-guided score matching / mix-and-match; a plausible reading, the paper's exact loss is not
  available): "draw a second style g′, generate X̂ ~ p_θ(·|φ(X₀), g′), penalise ‖φ(X̂) − φ(X₀)‖²". Here the style
  label is the task k (its head f_k), the content encoder φ is h, and the condition y is a second *view* of the
  content in x-space (suite.lsgmm.condition = view; D_y = d_x), so h applies to generated x too. For each row of
  task k, with k′ = k + s mod K (one random shift s ∈ {1..K−1} per step, all heads in one batched call), the swapped
  head "generates" by one Tweedie step at the row's own noised x_t: X̂ = x̂₀^{k′}(x_t, h(y), t) = E_θ[x₀ | x_t, h(y),
  style k′], and the per-row penalty is ‖h(X̂) − h(y)‖² / tr Cov_batch(h(y)) on rows with t ≤ t_max (0 on the
  others). Choices:
  * normalised by the codes' batch variance (normalize = true): the raw ‖·‖² could be lowered by shrinking h, which
    the heads undo by scaling up their input weights, a degenerate direction; the ratio is scale-free;
  * the gradient flows into h only (both h(X̂) and h(y)); X̂ is generated without gradient (through_generation =
    true also trains the swapped head to keep h's content, as the paper trains its generator): the term is then an
    invariance penalty on the encoder, and costs one gradient-free head call plus one encoder call per step;
  * t ≤ t_max (default 1): x̂₀ = (x_t − σ_t ε̂)/α_t amplifies the head's error by σ_t/α_t (55× at t = 4), which
    would make h(X̂) noise at large t; at small t, X̂ ≈ x₀ keeps the row's own style (the term becomes the
    multi-view invariance ‖h(x₀) − h(y)‖²), at moderate t the swapped head fills in its own style;
  * one head only (adapt) has no other style: the term is skipped there; the encoder must read x-space (D_y = d_x);
  * swap = false uses the row's own head (k′ = k): the multi-view invariance ‖h(x̂₀^k) − h(y)‖² without the style
    swap, to tell the two apart. Measured: it gives the same gains (the swap adds nothing measurable here).
  For the oracle h = Aᵀ and exact heads the numerator is ‖Aᵀ(x̂₀ − A z)‖², of the scale k σ_n² (the x noise along
  A); an h that reads the style directions B_k pays ‖B_kᵀ(B_k u − X̂)‖²-scale, since X̂ carries style k′ (or g), not
  u. Measured in recipes/regularize-mixmatch.yaml (3 pretrain seeds): lower subspace error, style leakage and
  frozen score error on every seed; with t_max = null it hurts.

Every estimator is a small batched function. `make_objective` turns a `RegularizeConfig` into the per-sample loss
that `stages.dsm_objective` hands to the one training loop; batch-level terms are broadcast over the batch, so the
mean the loop minimises is DSM + Σ weight · term. All functions are pure except the running term means an objective
keeps for logging: their means over the whole run (`summary()`, logged once as reg_<term>) and over each logging
interval of the loop (`RegMetrics` adds them as reg/<term> to every log_metrics call of the loop, by step; the
terms are accumulated as detached device tensors and read back once per interval, never per step).
"""

from __future__ import annotations

import math

import torch

from cdmtransfer.diffusion import OUProcess, dsm_loss, model_dsm_terms
from cdmtransfer.errors import ConfigError

# ----------------------------------------------------------------------------------------------------------------
# §D consistency


def x0_prediction(x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Tweedie: x̂₀ = E[x₀ | x_t] = (x_t + σ_t² s)/α_t = (x_t − σ_t ε̂)/α_t (theory.md §1.2 with s = −ε̂/σ_t)."""
    return (x_t - OUProcess.sigma(t)[..., None] * eps) / OUProcess.alpha(t)[..., None]


@torch.no_grad()
def reverse_chain(eps_fn, x: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor, steps: int,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Euler–Maruyama on the reverse SDE dX = (X + 2 s(X, t)) dτ + √2 dW̄ from t_from down to t_to, per row.

    t_from, t_to have x's shape without the last axis (every row its own interval, `steps` equal steps). Unlike
    diffusion.sample_sde the last step keeps its noise: the chain must sample the SDE's law at t_to (§D.2 step 5).
    """
    h = (t_from - t_to) / steps
    for i in range(steps):
        t = t_from - i * h
        drift = x - 2 * eps_fn(x, t) / OUProcess.sigma(t)[..., None]  # x + 2 s, s = −ε̂/σ_t
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        x = x + h[..., None] * drift + torch.sqrt(2 * h)[..., None] * noise  # Euler–Maruyama step
    return x


def consistency_loss(eps_fn, x_t: torch.Tensor, t: torch.Tensor, b: torch.Tensor, t_to: torch.Tensor, steps: int,
                     generator: torch.Generator | None) -> torch.Tensor:
    """Per-row L_C = Σ_dims (a¹ − b)(a² − b), a^i = x̂₀(x'^i, t'), x'^i from two independent chains (§D.2 eq. L_C).

    Given x_t the chains are independent, so E[L_C | x_t] = ‖E[a | x_t] − b‖²: an unbiased estimate of the squared
    violation of the consistency property E[x̂₀(X_t', t') | X_t = x] = x̂₀(x, t). b = x̂₀(x_t, t) is passed in (it
    carries the gradient of the DSM forward); a¹, a² carry gradients, the chains do not. Shapes [..., B, d].
    """
    both = torch.cat([x_t, x_t], dim=-2)  # two chains per row, one batched call
    t2, to2 = torch.cat([t, t], dim=-1), torch.cat([t_to, t_to], dim=-1)
    x_end = reverse_chain(eps_fn, both, t2, to2, steps, generator)
    a = x0_prediction(x_end, eps_fn(x_end, to2), to2)
    a1, a2 = a.chunk(2, dim=-2)
    return ((a1 - b) * (a2 - b)).sum(-1)


def pairwise_gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Unbiased ‖E[a] − b‖² from n ≥ 2 independent draws a [n, ..., d]: mean over pairs i ≠ j of (aⁱ − b)·(aʲ − b)."""
    n = a.shape[0]
    r = a - b
    total = r.sum(0)
    return (total.pow(2).sum(-1) - r.pow(2).sum((0, -1))) / (n * (n - 1))


# ----------------------------------------------------------------------------------------------------------------
# Kernels, MMD (§C) and HSIC (§A)


def sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖aᵢ − bⱼ‖² for all pairs of rows, as ‖a‖² + ‖b‖² − 2abᵀ (one matmul; cdist's backward is slow on CPU)."""
    return (a.pow(2).sum(-1)[:, None] + b.pow(2).sum(-1)[None, :] - 2 * a @ b.T).clamp_min(0)


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor, bandwidth: float | torch.Tensor) -> torch.Tensor:
    """k(a, b) = exp(−‖a − b‖² / bandwidth) for all pairs of rows: [n, m]."""
    return torch.exp(-sq_dists(a, b) / bandwidth)


def mmd2(a: torch.Tensor, b: torch.Tensor, bandwidth: float | None = None, unbiased: bool = True) -> torch.Tensor:
    """MMD² between samples a [n, d] and b [m, d] with k = exp(−‖·‖²/γ), γ = d by default (§C.2, InfoDiffusion).

    Unbiased U-statistic (Gretton et al. 2012, Lemma 6): the diagonals of k(a, a), k(b, b) are left out; the biased
    V-statistic keeps them (InfoDiffusion's choice).
    """
    gamma = float(a.shape[-1]) if bandwidth is None else bandwidth
    kaa, kbb, kab = gaussian_kernel(a, a, gamma), gaussian_kernel(b, b, gamma), gaussian_kernel(a, b, gamma)
    n, m = a.shape[0], b.shape[0]
    if unbiased:
        return ((kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1)) + (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
                - 2 * kab.mean())
    return kaa.mean() + kbb.mean() - 2 * kab.mean()


def prior_sample(kind: str, n: int, d: int, generator: torch.Generator | None, device=None) -> torch.Tensor:
    """Draws from the code prior: 'gaussian' N(0, I_d) or 'mixture' (2d components ±1.5 e_j, std 0.5, equal weights)."""
    z = torch.randn(n, d, generator=generator, device=device)
    if kind == "gaussian":
        return z
    if kind == "mixture":
        comp = (torch.rand(n, generator=generator, device=device) * 2 * d).long()
        means = 1.5 * torch.cat([torch.eye(d, device=device), -torch.eye(d, device=device)])
        return means[comp] + 0.5 * z
    raise ValueError(f"unknown prior {kind!r}; choose gaussian or mixture")


def median_bandwidth(a: torch.Tensor, rows: int = 96) -> torch.Tensor:
    """Median heuristic γ = median of the squared pairwise distances (off-diagonal), detached; 1 if all coincide.

    Taken over at most `rows` evenly strided rows (a heuristic needs no more; batches are ordered by task, so the
    stride keeps every task).
    """
    sub = a.detach()[:: max(1, a.shape[0] // rows)]
    d2 = sq_dists(sub, sub)
    off = d2[~torch.eye(sub.shape[0], dtype=torch.bool, device=a.device)]
    med = off.median()
    return torch.where(med > 0, med, torch.ones_like(med))


def hsic(a: torch.Tensor, b: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """HSIC between paired samples a [n, p], b [n, q]; Gaussian kernels, median-heuristic bandwidths.

    Biased: tr(K H L H)/(n − 1)² (Gretton et al. 2005, eq. 4). Unbiased (Song et al. 2012, eq. 5), with K̃, L̃ the
    kernel matrices with zeroed diagonals:
        [tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n−1)(n−2)) − 2/(n−2) · 1ᵀK̃L̃1] / (n(n−3)).
    Zero in expectation iff a ⟂ b (characteristic kernels). Invariant to rescaling a or b (the bandwidth follows).
    """
    n = a.shape[0]
    K = gaussian_kernel(a, a, median_bandwidth(a))
    L = gaussian_kernel(b, b, median_bandwidth(b))
    if not unbiased:
        H = torch.eye(n, device=a.device) - 1.0 / n
        return torch.trace(K @ H @ L @ H) / (n - 1) ** 2
    eye = torch.eye(n, dtype=torch.bool, device=a.device)
    K, L = K.masked_fill(eye, 0), L.masked_fill(eye, 0)
    KL1 = K @ L.sum(1)
    return ((K * L).sum() + K.sum() * L.sum() / ((n - 1) * (n - 2)) - 2 * KL1.sum() / (n - 2)) / (n * (n - 3))


# ----------------------------------------------------------------------------------------------------------------
# §C anti-ignoring term


def info_gap(eps_matched: torch.Tensor, eps_shuffled: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-sample DSM(shuffled codes) − DSM(matching codes).

    For a head that ignores its code the gap is 0. For the optimal head it is E‖ε̂(x_t, w') − ε̂(x_t, w)‖² =
    σ_t² E‖s(x_t | y') − s(x_t | y)‖², a score-difference divergence that upper-bounds (by the triangle
    inequality, up to a factor 2) the integrand of I(x₀; y) = ½ ∫ E‖s(x_t|y) − s(x_t)‖² dt: a cheap MI proxy.
    """
    return dsm_loss(eps_shuffled, noise) - dsm_loss(eps_matched, noise)


# ----------------------------------------------------------------------------------------------------------------
# §A.2 style-guided mix-and-match


def swapped_heads_eps(model, x_t: torch.Tensor, code: torch.Tensor, t: torch.Tensor,
                      shift: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """ε̂ of head k + shift (mod K) at task k's rows, for every k in one batched call; shapes [K, B, ·].

    `shift` is a 0-dim integer tensor (no host sync): rows of task k are placed in slice k + shift, whose head runs
    on them, and the outputs are put back in task order.
    """
    K = x_t.shape[0]
    ar = torch.arange(K, device=x_t.device)
    src, back = (ar - shift) % K, (ar + shift) % K  # slice j holds task j − shift; task k's answer is in k + shift
    return model.eps_from_code(x_t[src], code[src], t[src], None if y is None else y[src])[back]


def mixmatch_penalty(encoder, x_hat: torch.Tensor, code: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Per-row ‖h(X̂) − h(y)‖² (content preserved under a style swap), [K, B].

    normalize: divided by the codes' total variance over the batch, tr Cov(h(y)) (with its gradient), so the term
    is invariant to rescaling h: the encoder cannot lower it by shrinking its code (the heads would undo the scale).
    """
    pen = (encoder(x_hat) - code).pow(2).sum(-1)
    if normalize:
        flat = code.reshape(-1, code.shape[-1])
        pen = pen / flat.var(0).sum().clamp_min(1e-8)
    return pen


# ----------------------------------------------------------------------------------------------------------------
# The objective handed to train(): DSM + weighted terms, per sample


class RegularizedObjective:
    """Per-sample loss [K, B] = DSM + λ_C L_C/fraction (on its rows) + λ_MMD MMD² + λ_I hinge + λ_H HSIC
    + λ_MM mix-and-match (on rows with t ≤ t_max).

    `nuisance(y, task_index)` returns the HSIC partner [K, B, q]. Encoder-only terms (MMD, HSIC) are skipped when
    the encoder has nothing to train (frozen, oracle): they would add a constant. `running` keeps detached sums of
    each term over the run, `interval` since the last `interval_means()` (no host sync per step); `summary()`
    returns the run means.
    """

    def __init__(self, reg, process: OUProcess, nuisance=None, use_mixmatch: bool = True):
        self.reg, self.process, self.nuisance = reg, process, nuisance
        self.use_mixmatch = use_mixmatch and reg.mixmatch.weight > 0
        self.running: dict[str, torch.Tensor] = {}
        self.interval: dict[str, torch.Tensor] = {}
        self.calls = self.interval_calls = 0

    def _note(self, name: str, value: torch.Tensor) -> None:
        v = value.detach().mean()
        self.running[name] = self.running.get(name, torch.zeros((), device=v.device)) + v
        self.interval[name] = self.interval.get(name, torch.zeros((), device=v.device)) + v

    def summary(self) -> dict[str, float]:
        return {f"reg_{k}": float(v) / max(1, self.calls) for k, v in self.running.items()}

    def interval_means(self) -> dict[str, float]:
        """Each term's mean over the calls since the previous call of this method (one host sync), then reset."""
        if not self.interval or not self.interval_calls:
            return {}
        names = list(self.interval)
        values = (torch.stack([self.interval[n] for n in names]) / self.interval_calls).tolist()
        self.interval, self.interval_calls = {}, 0
        return {f"reg/{n}": v for n, v in zip(names, values)}

    def __call__(self, model, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
        r = self.reg
        K, B, _ = x0.shape
        x_t = self.process.perturb(x0, t, noise)
        loss, code, eps = model_dsm_terms(model, x0, x_t, y, t, noise)  # theory.md §1.4 (+ the linear mean's LS)
        self.calls += 1
        self.interval_calls += 1
        self._note("dsm", loss)
        encoder_trains = any(p.requires_grad for p in model.encoder.parameters())
        c = r.consistency
        if c.weight > 0:
            rows = max(1, math.ceil(c.fraction * B))
            xs, ts, cs, ys = x_t[:, :rows], t[:, :rows], code[:, :rows], y[:, :rows]  # chains run without gradient
            hop = c.hop_max * torch.rand(ts.shape, generator=generator, device=ts.device)
            t_to = torch.clamp(ts - hop, min=self.process.T0)  # t' = max(t − hop, T0), §D.2 step 3
            b = x0_prediction(xs, eps[:, :rows], ts)

            def eps_fn(x, tt):
                reps = x.shape[1] // rows
                return model.eps_from_code(x, cs.repeat(1, reps, 1), tt, ys.repeat(1, reps, 1))

            lc = consistency_loss(eps_fn, xs, ts, b, t_to, c.steps, generator)
            if c.weighting == "alpha2":  # α_t² L_C: the gap of α_t x̂₀ = x_t − σ_t ε̂, bounded as t → T (1/α_t is not)
                lc = OUProcess.alpha(ts) ** 2 * lc
            self._note("consistency", lc)
            loss = loss + c.weight * torch.cat([lc / (rows / B), lc.new_zeros(K, B - rows)], dim=1)
        if r.mmd.weight > 0 and encoder_trains:
            flat = code.reshape(K * B, -1)
            m = mmd2(flat, prior_sample(r.mmd.prior, K * B, flat.shape[1], generator, flat.device))
            self._note("mmd", m)
            loss = loss + r.mmd.weight * m
        if r.info.weight > 0:
            shuffled = code.roll(1, dims=1)  # every row gets another row's code, same task
            gap = info_gap(eps, model.eps_from_code(x_t, shuffled, t, y), noise).mean()
            self._note("info_gap", gap)
            loss = loss + r.info.weight * torch.relu(r.info.margin - gap)
        if r.hsic.weight > 0 and encoder_trains:
            nz = self.nuisance(y)
            h = hsic(code.reshape(K * B, -1), nz.reshape(K * B, -1))
            self._note("hsic", h)
            loss = loss + r.hsic.weight * h
        mm = r.mixmatch
        if self.use_mixmatch and (encoder_trains or mm.through_generation):
            shift = 1 + (torch.rand((), generator=generator, device=x_t.device) * (K - 1)).long()  # s ∈ {1..K−1}
            if not mm.swap:  # ablation: own head (drawn anyway, so both variants see the same random stream)
                shift = torch.zeros_like(shift)
            with torch.set_grad_enabled(mm.through_generation and torch.is_grad_enabled()):
                eps_sw = swapped_heads_eps(model, x_t, code, t, shift, y)
                x_hat = x0_prediction(x_t, eps_sw, t)
            pen = mixmatch_penalty(model.encoder, x_hat, code, mm.normalize)
            if mm.t_max is not None:
                pen = pen * (t <= mm.t_max)
            self._note("mixmatch", pen)
            loss = loss + mm.weight * pen
        return loss


class RegMetrics:
    """The loop's metric writer, plus the regulariser's per-interval term means (reg/<term>) on every log_metrics.

    train() calls log_metrics once per logging interval with that interval's mean loss; this adds each term's mean
    over the same steps, at the same step, in the same batched write. Anything else is passed through.
    """

    def __init__(self, inner, objective: RegularizedObjective):
        self.inner, self.objective = inner, objective

    def log_metrics(self, values: dict, step: int) -> None:
        self.inner.log_metrics({**values, **self.objective.interval_means()}, step=step)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def with_reg_metrics(metrics, objective: RegularizedObjective | None):
    """`metrics` wrapped in RegMetrics when there is an objective to report and a writer to report to."""
    return metrics if metrics is None or objective is None else RegMetrics(metrics, objective)


def task_onehot(y: torch.Tensor) -> torch.Tensor:
    """Nuisance 'task': the one-hot task index of every row of y [K, B, ·] → [K, B, K]."""
    K, B = y.shape[:2]
    return torch.eye(K, device=y.device)[:, None, :].expand(K, B, K)


def check_regularizers(reg, stage: str, taskset) -> None:
    """Refuse, before any run is created, a term this suite or stage cannot support (ConfigError, exit 2)."""
    if stage not in reg.stages:
        return
    mm = reg.mixmatch
    if stage == "pretrain" and mm.weight > 0:
        if taskset.D_y != taskset.d_x:
            raise ConfigError(f"regularize.mixmatch applies h to generated x, so it needs D_y = d_x (got D_y = "
                              f"{taskset.D_y}, d_x = {taskset.d_x}); use suite.lsgmm.condition = view")
        if taskset.K < 2 and mm.swap:
            raise ConfigError("regularize.mixmatch needs K >= 2 source tasks (styles) to swap")
    if reg.hsic.weight > 0 and reg.hsic.nuisance == "style" and getattr(taskset.truth, "style", None) is None:
        raise ConfigError("regularize.hsic.nuisance = style needs a suite that knows its style (lsgmm)")


def make_objective(reg, stage: str, process: OUProcess, truth=None) -> RegularizedObjective | None:
    """The regularised per-sample objective for `stage`, or None when no term is on there (plain DSM path)."""
    if stage not in reg.stages:
        return None
    terms = ("consistency", "mmd", "info", "hsic") + (("mixmatch",) if stage == "pretrain" else ())
    if not any(getattr(reg, name).weight > 0 for name in terms):  # mixmatch: one head in adapt, nothing to swap
        return None
    nuisance = None
    if reg.hsic.weight > 0:
        if reg.hsic.nuisance == "task":
            nuisance = task_onehot
        else:
            style = getattr(truth, "style", None)
            if style is None:
                raise ConfigError("regularize.hsic.nuisance = style needs a suite that knows its style (lsgmm)")
            nuisance = style
    return RegularizedObjective(reg, process, nuisance, use_mixmatch=stage == "pretrain")
