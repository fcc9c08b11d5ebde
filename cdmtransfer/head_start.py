"""A new head's closed-form start: the linear-Gaussian model x | y ~ N(μ_k(h(y)), Σ_k) that every head with a linear
mean begins from (models.ScoreModel: linear_mean, mean_covariance), so that the network F only learns what it misses.

- pretrain_scale / adapt_scale: the preconditioning's σ_d, the RMS of what a linear map of y leaves of x;
- set_source_covariances: pretrain's Σ_k per source head, from each source's ridge fit of x on y;
- fit_linear_means: adapt's μ_k (and Σ_k) per new head, least squares on its own rows, shrunk toward its start;
- linear_summary / start_pretrain: with model.encoder_linear, pretrain's encoder starts as the d-dimensional linear
  summary of y that best serves every source's linear fit, and the source heads as closed-form fits on it;
- start_scratch: scratch's fresh encoder starts the same way on its own m rows (each fold's model on its own);
- completion_basis / complete_code: finetune's and auto's completed encoder, the code directions the sources left
  empty filled by the target rows' own reduced-rank fit (a target that needs a direction no source reads).
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch

from cdmtransfer.config import Config
from cdmtransfer.models import ScoreModel
from cdmtransfer.references import residual_rms, ridge_gcv
from cdmtransfer.tasks import TaskSet
from cdmtransfer.validation import StackedEncoder

if TYPE_CHECKING:
    from cdmtransfer.stages import SourceHeads


def pretrain_scale(cfg: Config, x: torch.Tensor, y: torch.Tensor, counts: torch.Tensor) -> float | None:
    """σ_d of the pretrained heads (models.Preconditioning) from the sources' training rows. With a linear mean: the
    RMS of what each source's linear fit of x on y leaves (references.residual_rms), the part of x the heads model
    around μ_k(h(y)), so that F = 0 is a linear-Gaussian model of about the right width; floored at 1% of x's RMS
    (x linear in y). Else None: x's own RMS (score_model)."""
    if not (cfg.model.linear_mean and cfg.model.parametrization == "edm"):
        return None
    rms = float(x[torch.arange(x.shape[1]) < counts[:, None]].pow(2).mean().sqrt())
    return max(residual_rms(x, y, counts), 0.01 * rms, 1e-3)


def adapt_scale(cfg: Config, taskset: TaskSet, source_heads: SourceHeads | None,
                target: tuple[torch.Tensor, torch.Tensor] | None = None, scratch: bool | None = None) -> float | None:
    """σ_d of an adapt run's heads: the source heads' own when its heads may start from them (`source_heads` given);
    for fresh heads whose linear mean starts at least squares, the pretrain's rule (pretrain_scale) on the sources'
    rows, or for scratch (started on its own rows by start_scratch; `scratch`, by default adapt.mode = scratch: also
    auto's scratch candidate) on its m `target` rows; else None: the m samples' RMS (score_model)."""
    if scratch is None:
        scratch = cfg.adapt.mode == "scratch"
    if source_heads is not None and not scratch:
        return source_heads.spec.get("sigma_data")
    if scratch:
        if target is None or not (cfg.model.encoder_linear and cfg.model.encoder == "mlp") or len(target[0]) < 2:
            return None
        x, y = target
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            return None  # (training names the failing run)
        return pretrain_scale(cfg, x[None], y[None], torch.tensor([x.shape[0]]))
    if not bool((taskset.source_n >= 2).any()):
        return None
    return pretrain_scale(cfg, taskset.source_x, taskset.source_y, taskset.source_n)


@torch.no_grad()
def fit_linear_means(model: ScoreModel, enc: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                     counts: torch.Tensor, into, fresh: bool = False,
                     sources: SourceHeads | None = None) -> None:
    """Start the linear means μ_k(w) = A_k w + b_k of heads `into` (model.linear_mean; else nothing) at ridge least
    squares of x on the code w = enc(y) of each head's own rows: x [len(into), n, d_x], y [len(into), n, D_y], the
    first counts[i] rows. A_k is shrunk toward the map the head starts with (a source head's, or 0), the ridge chosen
    by GCV (references.ridge_gcv), b_k unpenalised; the starting map is kept untouched when its own error on the rows
    (an honest estimate: it was not fitted to them) is below the fit's GCV error (with a full covariance, Σ_k is the
    rows' own around the mean either way: a source's map may carry over, its noise not). With F = 0 the model starts as
    the linear-Gaussian model x | y ~ N(μ_k(h(y)), σ_d² I) fitted to the m samples, instead of learning μ by gradient
    steps that early stopping cuts short at small m; mean_fit_loss refines it as training goes (the code moves where
    the encoder trains). Callers skip it for scratch unless `start_scratch` started its encoder: a random encoder's
    code says nothing yet, and least squares on it made the Gaussian suites worse at m = 8. `fresh` (new random
    heads, not a source head's): with a full covariance their network's output layer starts at 0, so step 0 is
    exactly the fitted linear-Gaussian model N(μ_k(h(y)), Σ_k) and cross-validation trains F only where that pays.
    `sources` (source-started heads): the start map may also become a combination of all the source heads' maps
    (`source_combination`)."""
    if not model.linear_mean:
        return
    if fresh and model.full_covariance:
        for k in into:
            model.heads.weights[-1][k] = 0.0
            model.heads.biases[-1][k] = 0.0
    W, B = model.heads.mean.weights[0], model.heads.mean.biases[0]  # [K, d, d_x], [K, 1, d_x]
    code = enc(y.to(W.device)).double()
    x = x.to(W.device).double()
    for i, k in enumerate(into):  # once per head at the start, on [n, d] matrices: not a hot loop
        n = int(counts[i])
        if n < 2:
            continue
        start, offset = W[k].double(), B[k, 0].double()
        start_error = float((x[i, :n] - code[i, :n] @ start - offset).pow(2).sum(1).mean())  # honest: not fitted
        if sources is not None and not fresh:
            start, offset, start_error = source_combination(code[i, :n], x[i, :n], sources, start, offset,
                                                            start_error)
        residual = x[i, :n] - code[i, :n] @ start
        fit = ridge_gcv(code[i, :n], residual)
        if start_error <= fit.gcv:  # the start predicts these rows better: keep its mean
            W[k], B[k, 0] = start.to(W), offset.to(B)
            residual, error = residual - offset, start_error
        else:
            W[k] = (start + fit.coef).to(W)
            B[k, 0] = fit.intercept.to(B)
            residual, error = residual - fit.predict(code[i, :n]), fit.gcv
        if model.full_covariance:  # and the covariance around that mean, shrunk toward the head's start: a source's
            # map may carry over while its noise does not (LSGMM: each task's own style subspace B_k)
            basis, scale = model.heads.mean.basis[k].double(), model.heads.mean.scale[k, 0].double()
            set_covariance(model, k, residual_covariance(residual, error, (basis * scale.pow(2)) @ basis.T))


@torch.no_grad()
def start_scratch(enc: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                  counts: torch.Tensor) -> list[torch.nn.Module] | None:
    """Scratch's closed-form start with model.encoder_linear: for each row set i (a fold model's training rows, or
    all m), a copy of the fresh encoder whose linear path is the linear summary of those rows alone (`linear_summary`
    with K = 1: reduced-rank ridge regression of x on y) and whose MLP output starts at 0; fit_linear_means then
    starts the head at the closed-form fit on it. Step 0 is the linear-Gaussian model of the m samples (about ridge
    regression on them), which training without a start lost to (Langevin, digits). Each fold's copy sees only its
    own training rows, so cross-validation stays honest. One started copy per row set (`stack_copies` batches
    them); None when `enc` has no linear path (conv encoders, model.encoder_linear = false)."""
    if getattr(enc, "linear", None) is None or not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return None  # (non-finite rows: training names the failing cell)
    copies = []
    for i in range(x.shape[0]):  # once per fold model before training: not a hot loop
        started = copy.deepcopy(enc)
        P, centre = linear_summary(x[i:i + 1], y[i:i + 1], counts[i:i + 1], started.d)
        started.start_linear(P.to(started.linear.weight), centre.to(started.linear.weight))
        copies.append(started.requires_grad_(True))
    return copies


def stack_copies(encoders: list[torch.nn.Module]) -> torch.nn.Module:
    """One model's encoder from per-copy encoders: the lone one, or a StackedEncoder of them (copy i on rows i)."""
    return encoders[0] if len(encoders) == 1 else StackedEncoder.of(encoders, 1)


def source_combination(code: torch.Tensor, x: torch.Tensor, sources: SourceHeads, start: torch.Tensor,
                       offset: torch.Tensor, start_error: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A source-started head's linear mean as a combination of all K source heads' means, fitted to the rows: a
    target between the sources (a Langevin β between theirs, a map in their span) is closer to a mixture of their
    maps than to any one. μ = μ_start + Σ_j w_j (μ_j − μ_start) with w ridge least squares over the rows and
    coordinates ([n·d_x, K] design, GCV, no intercept: w = 0 is the start); kept when its GCV error beats the start's
    own error on the rows (`start_error`, honest: the start was not fitted to them). Returns (map, offset, error)."""
    weights = sources.weights
    maps, offsets = weights["heads.mean.weights.0"].to(code), weights["heads.mean.biases.0"].to(code)[:, 0]
    preds = code @ maps + offsets[:, None]  # [K, n, d_x]: each source head's mean on the rows
    base = code @ start + offset
    design = (preds - base).permute(1, 2, 0).reshape(-1, maps.shape[0])  # [n·d_x, K]
    fit = ridge_gcv(design, (x - base).reshape(-1, 1), intercept=False)
    error = fit.gcv * x.shape[1]  # per row, summed over coordinates, as start_error
    if not error < start_error:
        return start, offset, start_error
    w = fit.coef[:, 0]
    return (start + torch.einsum("k,kij->ij", w, maps - start),
            offset + torch.einsum("k,kj->j", w, offsets - offset), error)


def residual_covariance(residual: torch.Tensor, error: float, prior: torch.Tensor) -> torch.Tensor:
    """Σ̂ of the rows' residuals [n, d_x] around a fitted mean, its trace set to the fit's out-of-sample error per row
    (`error`: GCV; in-sample residuals are too small), shrunk toward `prior` by w = d_x/(d_x + n): half-way at n = d_x,
    little by n = 16 d_x."""
    n, d = residual.shape
    S = residual.T @ residual / n
    if not (math.isfinite(error) and error > 0 and float(torch.trace(S)) > 0):
        return prior
    S = S * (error / float(torch.trace(S)))
    w = d / (d + n)
    return (1 - w) * S + w * prior


def set_covariance(model: ScoreModel, k: int, cov: torch.Tensor) -> None:
    """Head k's Σ_k = U diag(s²) Uᵀ (model.mean_covariance = full) from a covariance matrix; s floored at 1% of σ_d
    (as pretrain_scale: a direction x never varies in would make the F = 0 denoiser a point mass)."""
    lam, U = torch.linalg.eigh(0.5 * (cov + cov.T))
    lam = lam.clamp_min((0.01 * model.sigma_data) ** 2)
    model.heads.mean.basis[k] = U.to(model.heads.mean.basis)
    model.heads.mean.scale[k, 0] = lam.sqrt().to(model.heads.mean.scale)


@torch.no_grad()
def set_source_covariances(model: ScoreModel, x: torch.Tensor, y: torch.Tensor, counts: torch.Tensor) -> None:
    """Pretrain: each source head's Σ_k from its own rows (model.mean_covariance = full; else nothing): the residual
    covariance of the source's ridge fit of x on y (references.ridge_gcv), shrunk toward σ_d² I."""
    if not model.full_covariance:
        return
    prior = model.sigma_data**2 * torch.eye(model.d_x, dtype=torch.float64)
    for k in range(x.shape[0]):  # once per source before training: not a hot loop
        n = int(counts[k])
        if n >= 2:
            fit = ridge_gcv(y[k, :n], x[k, :n])
            set_covariance(model, k, residual_covariance(x[k, :n].double() - fit.predict(y[k, :n]), fit.gcv, prior))


@torch.no_grad()
def linear_summary(x: torch.Tensor, y: torch.Tensor, counts: torch.Tensor, d: int,
                   noise_edge: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(P [d, D_y], centre [D_y]): the d-dimensional linear summary P (y − centre) of y that loses least of every
    source's linear fit of x on y (multi-task reduced-rank regression, the linear-Gaussian case of the shared h*).

    With C_k each source's ridge coefficients (references.ridge_gcv) and S the sources' mean covariance of y, the best
    rank-d approximation of S^{1/2} [C_1 … C_K] is U_d U_dᵀ S^{1/2} [C_1 … C_K], so P = U_dᵀ S^{-1/2} (features of unit
    covariance); rows past d when fewer directions exist are 0, and so are directions whose singular value is below
    1e-3 of the largest (few rows, as scratch's folds: a near-null direction scaled to unit variance on the rows
    would blow up on new y). centre: the mean of y over the sources' rows.

    noise_edge: also 0 the directions no stronger than noise. Each source's whitened coefficients S^{1/2} C_k carry
    noise of about σ_k/√n_k per entry (σ_k² its ridge residual variance per coordinate, the GCV estimate), and the
    largest singular value of a D_y × K·d_x matrix of such noise is about τ (√D_y + √(K d_x)) (the Marchenko–Pastur
    edge, τ² the sources' mean σ_k²/n_k). A direction below that edge is not one the sources share but the noise of
    their fits: filled at unit scale it carries whatever the noise aligned with (a task-shifted nuisance of y on the
    LSGMM suite), and the encoder's MLP part can still learn a real one there. The edge is approximate (ridge shrinks
    the noise, correlated coordinates of x make fewer independent columns), so pretrain starts both ways and keeps
    the one with the lower held-out DSM (pretraining.started_pretrain_model); scratch's start, on m rows that may be
    fewer than D_y, does not use it."""
    coefs, covs, sums, total, noise = [], [], 0.0, 0, []
    for k in range(x.shape[0]):  # once per source before training: not a hot loop
        n = int(counts[k])
        if n < 2:
            continue
        yk = y[k, :n].double()
        fit = ridge_gcv(yk, x[k, :n])
        coefs.append(fit.coef)
        noise.append(fit.gcv / x.shape[-1] / n)  # σ_k²/n_k: the variance of a whitened coefficient's noise
        centred = yk - yk.mean(0)
        covs.append(centred.T @ centred / n)
        sums, total = sums + yk.sum(0), total + n
    if not coefs:  # no source with two rows: nothing to summarise (pretrain's data checks refuse this before)
        return torch.zeros(d, y.shape[-1], dtype=torch.float64), torch.zeros(y.shape[-1], dtype=torch.float64)
    lam, V = torch.linalg.eigh(sum(covs) / len(covs))
    lam = lam.clamp_min(1e-6 * float(lam.max().clamp_min(1e-12)))
    U, sv, _ = torch.linalg.svd((V * lam.sqrt()) @ V.T @ torch.cat(coefs, 1), full_matrices=False)
    keep = sv[:d] > 1e-3 * sv[0].clamp_min(1e-300)
    if noise_edge:  # τ (√D_y + √(K d_x)): the largest singular value noise alone would reach
        edge = math.sqrt(sum(noise) / len(noise)) * (math.sqrt(y.shape[-1]) + math.sqrt(len(coefs) * x.shape[-1]))
        keep &= sv[:d] > edge
    U = U[:, :d][:, keep]
    P = torch.zeros(d, y.shape[-1], dtype=torch.float64)
    P[: U.shape[1]] = U.T @ (V / lam.sqrt()) @ V.T
    return P, sums / total


@torch.no_grad()
def start_pretrain(model: ScoreModel, x: torch.Tensor, y: torch.Tensor, counts: torch.Tensor,
                   noise_edge: bool = False) -> int | None:
    """Pretrain's closed-form start with model.encoder_linear: the encoder h(y) = P (y − ȳ) (`linear_summary`, its
    directions below the noise edge left empty with `noise_edge`), each source head's linear mean least squares on it
    from 0 and its network's output at 0 (fit_linear_means), so step 0 is the linear-Gaussian model
    x | y ~ N(μ_k(h(y)), Σ_k) on the best linear summary and training learns the rest. A fixed encoder (the oracle's
    h*) gets the same heads' start on its own code. Returns the summary's directions (None without a linear path)."""
    encoder, directions = model.encoder, None
    if getattr(encoder, "linear", None) is not None:
        P, centre = linear_summary(x, y, counts, encoder.d, noise_edge=noise_edge)
        encoder.start_linear(P.float(), centre.float())
        directions = int((P.abs().sum(1) > 0).sum())
    elif any(p.requires_grad for p in encoder.parameters()):
        return None  # a random encoder (conv): its code says nothing yet; the heads' means are learned with it
    if model.linear_mean:  # on the linear summary, or on a fixed encoder (model.encoder = oracle: h* itself)
        model.heads.mean.weights[0].zero_()
        model.heads.mean.biases[0].zero_()
        fit_linear_means(model, encoder, x, y, counts, range(x.shape[0]), fresh=True)
    return directions


EMPTY_VARIANCE = 1e-4  # a code direction whose variance is below this share of the largest carries nothing
EMPTY_ROWS = 4096  # source rows encoded to find the empty directions


@torch.no_grad()
def completion_basis(enc: torch.nn.Module, taskset: TaskSet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """[d, r] orthonormal basis of the code directions the pretrained encoder leaves empty (variance below
    EMPTY_VARIANCE of the largest on the sources' rows: the pretrain's start left them below the noise edge and
    training did not fill them), when the m target rows (x, y) fill at least one (`complete_code`); else None,
    also for an encoder without a linear path to fill them with (conv) or fewer than 4 rows. A target in the sources'
    span leaves nothing above the noise edge, so no candidate is added."""
    finite = bool(torch.isfinite(x).all() and torch.isfinite(y).all())  # (else training names the failing run)
    if getattr(enc, "linear", None) is None or x.shape[0] < 4 or not finite:
        return None
    rows = taskset.source_y[:, : max(1, EMPTY_ROWS // taskset.source_y.shape[0])]
    rows = rows[torch.arange(rows.shape[1]) < taskset.source_n[:, None]]
    code = enc(rows.to(enc.linear.weight)).double()
    code = code - code.mean(0)
    lam, V = torch.linalg.eigh(code.T @ code / max(code.shape[0], 1))
    empty = lam <= EMPTY_VARIANCE * float(lam.max().clamp_min(1e-30))
    if not bool(empty.any()):
        return None
    basis = V[:, empty]
    return basis if completed_directions(enc, basis, x, y) > 0 else None


def completed_directions(enc: torch.nn.Module, basis: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> int:
    """How many of the `basis` directions the rows (x [n, d_x], y [n, D_y]) fill (`_completion`)."""
    return int((_completion(enc, basis, x, y)[0].abs().sum(1) > 0).sum())


@torch.no_grad()
def _completion(enc: torch.nn.Module, basis: torch.Tensor, x: torch.Tensor,
                y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P [r, D_y], centre [D_y]): the r = basis.shape[1] directions of y that best explain what a linear fit of x on
    the encoder's code leaves of the rows (`linear_summary` with K = 1 on the residuals: reduced-rank ridge
    regression), those below the noise edge left 0, so that an in-span target adds nothing."""
    code = enc(y.to(enc.linear.weight)).double().cpu()  # (in closed form on the CPU, as linear_summary works)
    x, y = x.double().cpu(), y.double().cpu()
    residual = x - ridge_gcv(code, x).predict(code)
    return linear_summary(residual[None], y[None], torch.tensor([x.shape[0]]), basis.shape[1], noise_edge=True)


@torch.no_grad()
def complete_code(enc: torch.nn.Module, basis: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                  counts: torch.Tensor) -> list[torch.nn.Module]:
    """The completed encoder for each row set i (a fold model's training rows, or all m): a copy of `enc` whose code
    also varies along the empty directions `basis` [d, r] as the rows' own reduced-rank fit says, h'(y) = h(y) +
    V P (y − centre) (`_completion`, through the linear path). On an out-of-span target (the sources never read one
    direction of h*) this is what the sources cannot give: the missing direction, estimated from D_y + d_x numbers
    instead of a whole encoder's. Each copy sees only its own rows, so cross-validation stays honest; the copies are
    fixed (the head trains on them, started by fit_linear_means)."""
    copies = []
    for i in range(x.shape[0]):  # once per fold model before training: not a hot loop
        n = int(counts[i])
        P, centre = _completion(enc, basis, x[i, :n], y[i, :n])
        completed = copy.deepcopy(enc).requires_grad_(False)
        add = (basis.to(P) @ P).to(completed.linear.weight)  # [d, D_y]
        completed.linear.weight += add
        completed.linear.bias -= add @ centre.to(add)
        copies.append(completed)
    return copies
