"""Linear reference estimators: limits you can compute, held beside every posterior-mean result (issue #10).

All are scored like `posterior_mean_mse` (metrics.py): the squared error of a point estimate of x on the held-out
target conditions, averaged over conditions and coordinates, in the model's units (a suite that standardised x
reports in standardised units, as the model's own metric does).

- ref/linear_pooled_mse: the best linear estimator of x from y fitted on the POOLED SOURCE tasks, no target data:
  x̂ = μ_x + Σ_xy Σ_yy⁻¹ (y − μ_y) from the sources' pooled joint mean and covariance (padding rows excluded), with a
  ridge of 1e-6·tr(Σ_yy)/D_y for conditioning. The linear-Gaussian posterior mean built from the sources' covariance.
- ref/linear_target_mse: ridge regression of x on y fitted on the m target samples (with an intercept), the ridge
  chosen by generalised cross-validation (closed form, no tuning): the small-data baseline.
- ref/oracle_ls_mse (suites with a true representation h*): the same ridge/GCV least squares of x on the true
  features h*(y): "least squares on the true features".
- ref/encoder_ls_mse: the same least squares on the model's OWN features h(y) (the frozen, fine-tuned or scratch
  encoder the run ended with): what a linear head on this representation reaches from the m samples. Beside
  posterior_mean_mse it separates the two bottlenecks: a score head far above it is limited by its own training,
  a head near it by the representation (compare ref/oracle_ls_mse).
- ref/encoder_pooled_mse: the pooled sources' best linear estimator (as ref/linear_pooled_mse) on the model's own
  features h(y) instead of y: what a linear head on this representation reaches with the sources' data and no
  target data. Beside ref/linear_pooled_mse it is the price of the representation itself (a d-dimensional code
  keeps less than y); beside a frozen run's linear_mean_mse, how much its head's target fit gains or loses. Fitted
  on at most POOL_ROWS source rows (the first rows of each source), encoded in blocks.
- ref/h_star_readout_error (pretrain and adapt, suites with h*): how much of the true representation the run's
  encoder carries, 1 − R² of the best affine readout of h*(y) from h(y) (least squares fitted on half the sources'
  conditions, scored on the other half, relative to h*'s variance); in adapt, of the encoder the run ended with
  (frozen: the pretrain's; finetune: moved by the m samples; scratch: learned from them alone). 0 when h is an
  invertible affine map of h* (Assumption 3.2's ĥ up to a change of basis), 1 when it carries nothing; with d below
  h*'s width it cannot reach 0.

float64 throughout; the pooled fit accumulates moments in row blocks, so pooled image suites (D_y ≈ 800, ~60 000
rows) take seconds and no pooled copy of the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

POOLED, TARGET, ORACLE = "ref/linear_pooled_mse", "ref/linear_target_mse", "ref/oracle_ls_mse"
ENCODER, ENCODER_POOLED = "ref/encoder_ls_mse", "ref/encoder_pooled_mse"
READOUT = "ref/h_star_readout_error"
BLOCK = 8192  # rows per block when accumulating pooled moments
POOL_ROWS = 16384  # source rows encoded for ref/encoder_pooled_mse (image suites hold ~60 000)


@dataclass
class LinearFit:
    """x̂ = intercept + features @ coef (float64); `lam` is the ridge used (absolute, on centred features)."""

    intercept: torch.Tensor  # [d_x]
    coef: torch.Tensor  # [D, d_x]
    lam: float = 0.0
    gcv: float = math.nan  # ridge_gcv: the GCV estimate of the fit's mean squared prediction error per row

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.intercept + features.double() @ self.coef


def pooled_linear(source_x: torch.Tensor, source_y: torch.Tensor, source_n: torch.Tensor,
                  rel_ridge: float = 1e-6) -> LinearFit:
    """x̂ = μ_x + Σ_xy Σ_yy⁻¹ (y − μ_y) from the pooled sources ([K, n_max, ·], rows past source_n[k] ignored)."""
    d_x, D = source_x.shape[-1], source_y.shape[-1]
    n_total = int(source_n.sum())
    if n_total < 2:
        raise ValueError(f"pooled sources hold {n_total} rows; need at least 2")
    # Shift by the first valid row so the raw second moments stay well conditioned (exact after centring).
    k0 = int(torch.nonzero(source_n > 0)[0])
    shift_x, shift_y = source_x[k0, 0].double(), source_y[k0, 0].double()
    sx, sy = torch.zeros(d_x, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
    syy = torch.zeros(D, D, dtype=torch.float64)
    syx = torch.zeros(D, d_x, dtype=torch.float64)
    for k in range(source_x.shape[0]):
        n_k = int(source_n[k])
        for start in range(0, n_k, BLOCK):
            stop = min(n_k, start + BLOCK)
            xb = source_x[k, start:stop].double() - shift_x
            yb = source_y[k, start:stop].double() - shift_y
            sx += xb.sum(0)
            sy += yb.sum(0)
            syy += yb.T @ yb
            syx += yb.T @ xb
    mx, my = sx / n_total, sy / n_total
    cov_yy = syy / n_total - torch.outer(my, my)
    cov_yx = syx / n_total - torch.outer(my, mx)
    lam = rel_ridge * float(torch.diagonal(cov_yy).sum()) / D
    lam = lam if lam > 0 else rel_ridge
    reg = cov_yy + lam * torch.eye(D, dtype=torch.float64)
    chol, info = torch.linalg.cholesky_ex(reg)
    coef = torch.cholesky_solve(cov_yx, chol) if int(info) == 0 else torch.linalg.lstsq(reg, cov_yx).solution
    mu_x, mu_y = mx + shift_x, my + shift_y
    return LinearFit(mu_x - mu_y @ coef, coef, lam)


def residual_rms(source_x: torch.Tensor, source_y: torch.Tensor, source_n: torch.Tensor) -> float:
    """RMS per coordinate of what a linear map of y leaves of x, task by task: each source's ridge fit of x on y
    (`ridge_gcv`, its GCV error: an out-of-sample estimate), pooled over the sources' rows. The scale of x around a
    head's linear mean μ_k(h(y)) (models.Preconditioning's σ_d for heads with one); padding rows ignored."""
    sq, rows = 0.0, 0
    for k in range(source_x.shape[0]):  # once per source before training, on [n_k, D_y] matrices: not a hot loop
        n_k = int(source_n[k])
        if n_k >= 2:
            gcv = ridge_gcv(source_y[k, :n_k], source_x[k, :n_k]).gcv
            if math.isfinite(gcv):
                sq, rows = sq + n_k * max(gcv, 0.0), rows + n_k
    if rows == 0:
        raise ValueError("residual_rms needs a source with at least 2 rows (and a finite fit)")
    return math.sqrt(sq / rows / source_x.shape[-1])


def ridge_gcv(features: torch.Tensor, x: torch.Tensor, grid: int = 81, intercept: bool = True) -> LinearFit:
    """Ridge regression of x [n, d_x] on features [n, D] with an unpenalised intercept, the ridge λ chosen by GCV.

    GCV(λ) = (1/n)‖(I − H_λ) X‖² / (1 − tr(H_λ)/n)², H_λ the hat matrix (intercept included), one λ shared by the
    d_x outputs, minimised over a log grid of λ/s_max² ∈ [1e-10, 1e6] in closed form through the SVD of the centred
    features, among the ridges whose fit keeps tr(H_λ) ≤ n/2 (near interpolation GCV's denominator vanishes and its
    estimate with it). Works for n ≤ D. `intercept` False: none (features and x used uncentred).
    """
    F, X = features.double(), x.double()
    n = F.shape[0]
    if n < 2:
        raise ValueError("ridge_gcv needs at least 2 rows")
    f_mean, x_mean = (F.mean(0), X.mean(0)) if intercept else (F.new_zeros(F.shape[1]), X.new_zeros(X.shape[1]))
    Fc, Xc = F - f_mean, X - x_mean
    U, s, Vh = torch.linalg.svd(Fc, full_matrices=False)
    keep = s > s.max() * 1e-10 if s.numel() and float(s.max()) > 0 else torch.zeros_like(s, dtype=torch.bool)
    U, s, Vh = U[:, keep], s[keep], Vh[keep]
    if s.numel() == 0:  # constant features: the intercept alone
        return LinearFit(x_mean, torch.zeros(F.shape[1], X.shape[1], dtype=torch.float64), float("inf"),
                         float(Xc.pow(2).sum() / n / (1 - 1 / n) ** 2))
    proj = U.T @ Xc  # [r, d_x]
    p2 = proj.pow(2).sum(1)  # [r]
    outside = max(float(Xc.pow(2).sum() - p2.sum()), 0.0)  # residual energy no λ can fit (≥ 0 up to rounding)
    s2 = s.pow(2)
    lams = float(s2.max()) * torch.logspace(-10, 6, grid, dtype=torch.float64)
    shrink = lams[:, None] / (s2[None] + lams[:, None])  # [G, r]: 1 − s²/(s²+λ)
    rss = outside + (shrink.pow(2) * p2[None]).sum(1)
    dof = int(intercept) + (1 - shrink).sum(1)  # tr(H): intercept + Σ s²/(s²+λ)
    gcv = (rss / n) / (1 - dof / n).clamp_min(1e-12).pow(2)
    # GCV is unreliable as the fit nears interpolation (its denominator → 0; at n = 8 it picked near-zero ridges
    # that tested 6× worse than it said): only ridges leaving at least half the rows' degrees of freedom compete
    gcv = torch.where(dof <= n / 2, gcv, torch.full_like(gcv, math.inf)) if bool((dof <= n / 2).any()) else gcv
    best = int(torch.argmin(gcv))
    lam = float(lams[best])
    coef = Vh.T @ ((s / (s2 + lam))[:, None] * proj)  # [D, d_x]
    return LinearFit(x_mean - f_mean @ coef, coef, lam, float(gcv[best]))


@torch.no_grad()
def readout_error(encoder, h_star, y: torch.Tensor) -> float:
    """1 − R² of h*(y) read out affinely from encoder(y): fitted on the even rows of y, scored on the odd ones; NaN
    where the encoder's output is not finite (least squares would fail on it: nothing is read out)."""
    h, target = encoder(y.float()).double(), h_star(y.float()).double()
    if not torch.isfinite(h).all():
        return math.nan
    ones = torch.ones(h.shape[0], 1, dtype=torch.float64, device=h.device)
    design = torch.cat([h, ones], 1)
    coef = torch.linalg.lstsq(design[0::2], target[0::2]).solution
    test = target[1::2]
    return float((test - design[1::2] @ coef).pow(2).sum() / (test - test.mean(0)).pow(2).sum())


def source_readout(encoder, taskset) -> float | None:
    """ref/h_star_readout_error of `encoder` on the sources' conditions (padding rows left out), on the encoder's
    device; None when the suite has no h* or no encoder is given."""
    h_star = taskset.truth.encoder()
    if h_star is None or encoder is None:
        return None
    device = _device(encoder)
    y = taskset.source_y[torch.arange(taskset.source_y.shape[1]) < taskset.source_n[:, None]]
    return readout_error(encoder, h_star.to(device), y.to(device))


@torch.no_grad()
def encoded_sources(encoder, taskset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, h(y), counts) of the sources' first rows, at most POOL_ROWS in all, h computed in blocks of BLOCK rows on
    the encoder's device (returned on the CPU): the pooled fit of ref/encoder_pooled_mse."""
    K = taskset.source_y.shape[0]
    keep = min(taskset.source_y.shape[1], -(-POOL_ROWS // K))
    device = _device(encoder)
    y = taskset.source_y[:, :keep].reshape(K * keep, -1)
    codes = torch.cat([encoder(y[i:i + BLOCK].float().to(device)).cpu() for i in range(0, y.shape[0], BLOCK)])
    return taskset.source_x[:, :keep], codes.view(K, keep, -1), taskset.source_n.clamp(max=keep)


def _device(module) -> torch.device:
    return next((t.device for t in (*module.parameters(), *module.buffers())), torch.device("cpu"))


def _mse(pred: torch.Tensor, x: torch.Tensor) -> float:
    return float((pred - x.double()).pow(2).mean())


def reference_metrics(taskset, x_test: torch.Tensor, y_test: torch.Tensor, x_m: torch.Tensor | None = None,
                      y_m: torch.Tensor | None = None, encoder=None) -> tuple[dict[str, float], dict[str, str]]:
    """The reference MSEs on (x_test, y_test) that the data allow, and the others with the reason they are absent.

    x_m, y_m: the m target samples the adapt run trained on (for the target ridge and both least squares);
    encoder: the model's own h (for ref/encoder_ls_mse).
    """
    out, skipped = {}, {}
    readout = source_readout(encoder, taskset)
    if readout is not None:
        out[READOUT] = readout
    try:
        out[POOLED] = _mse(pooled_linear(taskset.source_x, taskset.source_y, taskset.source_n).predict(y_test),
                           x_test)
        if encoder is None:
            skipped[ENCODER_POOLED] = "no encoder given"
        else:
            x_s, h_s, n_s = encoded_sources(encoder, taskset)
            with torch.no_grad():
                h_test = encoder(y_test.float().to(_device(encoder))).cpu()
            out[ENCODER_POOLED] = _mse(pooled_linear(x_s, h_s, n_s).predict(h_test), x_test.cpu())
    except ValueError as exc:
        skipped[POOLED] = skipped[ENCODER_POOLED] = str(exc)
    if x_m is None or y_m is None or x_m.shape[0] < 2:
        why = "needs at least 2 target samples" if x_m is not None else "no target samples given"
        skipped[TARGET] = skipped[ORACLE] = skipped[ENCODER] = why
        return out, skipped
    out[TARGET] = _mse(ridge_gcv(y_m, x_m).predict(y_test), x_test)
    for key, h in ((ORACLE, taskset.truth.encoder()), (ENCODER, encoder)):
        if h is None:
            skipped[key] = (f"suite '{taskset.name}' has no true representation h*" if key == ORACLE
                            else "no encoder given")
            continue
        with torch.no_grad():
            h_m, h_test = h(y_m.float()), h(y_test.float())
        out[key] = _mse(ridge_gcv(h_m, x_m).predict(h_test), x_test)
    return out, skipped
