"""Metrics on held-out target conditions. Each is computed when the suite makes it possible; the rest are listed
in `skipped` with the reason.

- test_dsm: the held-out DSM loss (σ²-weighted, so ε-space), computable on any data.
- score_error: E_t E‖s_θ(x_t, y, t) − ∇log p_t(x_t|y)‖², t ~ Unif[T0, T]: the quantity the theorems bound
  (theory.md §1.3, L_P(s)); score_error_weighted is the same with the σ_t² weight used in training.
- posterior_mean_mse: mean of N conditional samples vs the true x, averaged over coordinates (theory.md §4);
  posterior_mean_mse_floor is the same for the exact posterior mean, where the suite knows it.
- sliced_w2: sliced Wasserstein-2 between model and true conditional samples, averaged over conditions;
  sliced_w2_floor is the same between two independent true sample sets (the finite-sample floor).
- suite extras (TaskSet.extra_metrics): psnr of the posterior mean (digits, mnist); centre accuracy ID/OOD and
  encoder diagnostics (bumps).
"""

from __future__ import annotations

import torch

from cdmtransfer.config import Config
from cdmtransfer.diagnostics import diagnose
from cdmtransfer.diffusion import OUProcess, dsm_loss, sample
from cdmtransfer.models import ScoreModel
from cdmtransfer.tasks.base import TaskSet


def conditional_samples(model: ScoreModel, y: torch.Tensor, n_per: int, process: OUProcess, steps: int,
                        method: str, generator: torch.Generator, head: int = 0) -> torch.Tensor:
    """n_per samples of x | y for every row of y, all in one batched sampler run: [C, n_per, d_x]."""
    with torch.no_grad():
        code = model.encoder(y).repeat_interleave(n_per, dim=0)  # h(y) once per condition
        heads = model.heads.K

        def score(x, t):
            # Evaluate all heads on the batch and keep `head` (K is 1 for adapted models).
            eps = model.eps_from_code(x.expand(heads, *x.shape), code.expand(heads, *code.shape),
                                      t.expand(heads, *t.shape))[head]
            return -eps / process.sigma(t)[:, None]

        x = sample(score, code.shape[0], model.d_x, process, steps, method, generator)
    return x.view(y.shape[0], n_per, model.d_x)


@torch.no_grad()
def score_metrics(model: ScoreModel, taskset: TaskSet, process: OUProcess, draws: int,
                  generator: torch.Generator) -> dict[str, float]:
    x0 = taskset.test_x.repeat(draws, 1)
    y = taskset.test_y.repeat(draws, 1)
    t = process.sample_t((x0.shape[0],), generator)
    noise = torch.randn(x0.shape, generator=generator)
    x_t = process.perturb(x0, t, noise)
    eps = model(x_t[None], y[None], t[None])[0]
    out = {"test_dsm": float(dsm_loss(eps, noise).mean())}
    true_score = taskset.truth.score(0, x_t, y, t)
    if true_score is not None:
        sigma = process.sigma(t)[:, None]
        weighted = (eps + sigma * true_score).pow(2).sum(-1)  # σ²‖s_θ − s*‖² with s_θ = −ε̂/σ
        out["score_error"] = float((weighted / sigma[:, 0] ** 2).mean())
        out["score_error_weighted"] = float(weighted.mean())
    return out


def sliced_w2(a: torch.Tensor, b: torch.Tensor, n_proj: int, generator: torch.Generator) -> torch.Tensor:
    """Sliced Wasserstein-2 between sample sets a, b of shape [C, S, d], per condition: [C]."""
    dirs = torch.randn(a.shape[-1], n_proj, generator=generator)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = torch.sort(a @ dirs, dim=1)  # 1-D optimal transport along each direction = sorted matching
    pb, _ = torch.sort(b @ dirs, dim=1)
    return (pa - pb).pow(2).mean(dim=(1, 2)).sqrt()


def evaluate_model(model: ScoreModel, taskset: TaskSet, cfg: Config) -> tuple[dict[str, float], dict[str, str]]:
    """All metrics the suite allows, with the evaluation noise fixed by `cfg.evaluate.seed`."""
    e = cfg.evaluate
    process = OUProcess(cfg.diffusion.T0, cfg.diffusion.T)
    model = model.eval()
    metrics, skipped = {}, {}
    metrics.update(score_metrics(model, taskset, process, e.t_draws, torch.Generator().manual_seed(e.seed)))
    if "score_error" not in metrics:
        skipped["score_error"] = f"suite '{taskset.name}' has no exact score"

    n_cond = min(e.posterior_conditions, taskset.test_x.shape[0])
    gen = torch.Generator().manual_seed(e.seed + 1)
    x_true, y = taskset.test_x[:n_cond], taskset.test_y[:n_cond]
    draws = conditional_samples(model, y, e.posterior_samples, process, e.sampler_steps, e.sampler, gen)
    metrics["posterior_mean_mse"] = float((draws.mean(1) - x_true).pow(2).mean())
    exact_mean = getattr(taskset.truth, "mean", None)
    if exact_mean is not None:
        metrics["posterior_mean_mse_floor"] = float((exact_mean(0, y) - x_true).pow(2).mean())
    if taskset.extra_metrics is not None:  # image suites: psnr (digits), centre accuracy and h diagnostics (bumps)
        def draw(y_, n_per, generator):
            return conditional_samples(model, y_, n_per, process, e.sampler_steps, e.sampler, generator)

        metrics.update(taskset.extra_metrics(model=model, draw=draw, x_true=x_true, x_mean=draws.mean(1), y=y,
                                             seed=e.seed + 3))

    n_dist = min(e.dist_conditions, taskset.test_y.shape[0])
    y_dist = taskset.test_y[:n_dist]
    gen = torch.Generator().manual_seed(e.seed + 2)
    reference = taskset.truth.sample(0, y_dist.repeat_interleave(e.dist_samples, 0), gen)
    if reference is None:
        skipped["sliced_w2"] = f"suite '{taskset.name}' cannot draw true conditional samples"
    else:
        reference = reference.view(n_dist, e.dist_samples, -1)
        reference2 = taskset.truth.sample(0, y_dist.repeat_interleave(e.dist_samples, 0), gen).view_as(reference)
        model_draws = conditional_samples(model, y_dist, e.dist_samples, process, e.sampler_steps, e.sampler, gen)
        metrics["sliced_w2"] = float(sliced_w2(model_draws, reference, 64, gen).mean())
        metrics["sliced_w2_floor"] = float(sliced_w2(reference2, reference, 64, gen).mean())
    found, why = diagnose(model, taskset, torch.Generator().manual_seed(e.seed + 4))  # regularizers' targets
    metrics.update(found)
    skipped.update(why)
    return metrics, skipped
