"""Metrics on held-out target conditions. Each is computed when the suite makes it possible; the rest are listed
in `skipped` with the reason.

- test_dsm: the held-out DSM loss (σ²-weighted, so ε-space), computable on any data.
- score_error: E_t E‖s_θ(x_t, y, t) − ∇log p_t(x_t|y)‖², t ~ Unif[T0, T]: the quantity the theorems bound
  (theory.md §1.3, L_P(s)); score_error_weighted is the same with the σ_t² weight used in training.
- posterior_mean_mse: mean of N conditional samples vs the true x, averaged over coordinates (theory.md §4), each
  sample denoised at T0 by Tweedie's formula (same expectation, without the σ²(T0) noise the samples carry);
  posterior_mean_mse_floor is the same for the exact posterior mean, where the suite knows it. The mean of N
  samples adds their variance/N to the error of the model's own posterior mean: posterior_mean_mse_mc estimates
  that part (unbiased sample variance / N, averaged), so posterior_mean_mse − posterior_mean_mse_mc is an unbiased
  estimate of the error of the model's exact posterior mean, the quantity the point-estimate references compare to.
- linear_mean_mse (model.linear_mean): the error of the heads' linear mean μ(h(y)) alone, used as a point estimate.
- sliced_w2: sliced Wasserstein-2 between model and true conditional samples, averaged over conditions;
  sliced_w2_floor is the same between two independent true sample sets (the finite-sample floor).
- suite extras (TaskSet.extra_metrics): psnr of the posterior mean (digits, mnist); centre accuracy ID/OOD and
  encoder diagnostics (bumps).
- ref/linear_pooled_mse, ref/linear_target_mse, ref/oracle_ls_mse, ref/encoder_ls_mse, ref/encoder_pooled_mse:
  linear reference estimators scored on the same conditions as posterior_mean_mse (references.py): limits every
  posterior-mean result can be held against (the last two on the model's own features: is the head or the
  representation the bottleneck?).
- divergence check (issue #10): sample_spread_ratio = RMS of (samples − the target data's per-coordinate mean) over
  RMS of (data − that mean), over every sample drawn here, the data being the target's x (pool `target_x` and the
  test split: the distribution the samples should follow; sources may differ in spread); nonfinite_samples
  counts samples holding a NaN or ±inf. diverged = 1.0 when the ratio exceeds evaluate.divergence_ratio or any sample
  is non-finite; the sample-based metrics are then listed in skipped["flags"] ({metric: reason}) so callers mark them
  (`flagged`, `divergence_warning`). The return value stays (metrics, skipped).
"""

from __future__ import annotations

import math

import torch

from cdmtransfer.config import Config
from cdmtransfer.diagnostics import diagnose
from cdmtransfer.diffusion import OUProcess, dsm_loss, sample
from cdmtransfer.model_stack import stack_codes, stack_heads, stackable
from cdmtransfer.models import ScoreModel
from cdmtransfer.references import reference_metrics
from cdmtransfer.tasks.base import TaskSet


HEADLINE = ("score_error", "posterior_mean_mse", "sliced_w2", "test_dsm")  # a sweep's metrics, in table order


def mean_sd(values: list[float]) -> dict:
    """{"mean", "std"} of values over seeds (sample standard deviation; 0 for one value)."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
    return {"mean": mean, "std": math.sqrt(var) if len(values) > 1 else 0.0}


SAMPLE_CHUNK = 2048  # rows per head call while sampling: 2048 × 128-wide activations are 1 MB


def chunks(n: int, size: int = SAMPLE_CHUNK) -> list[slice]:
    """Row slices of at most `size` covering 0..n."""
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def conditional_samples(model: ScoreModel, y: torch.Tensor, n_per: int, process: OUProcess, steps: int,
                        method: str, generator: torch.Generator, head: int = 0, denoise: bool = False) -> torch.Tensor:
    """n_per samples of x | y for every row of y, all in one batched sampler run: [C, n_per, d_x].

    With `denoise`, each sample's Tweedie estimate E[x_0 | x_T0, y] (diffusion.tweedie_denoise): the same mean,
    less Monte-Carlo noise; what posterior-mean estimates use.
    """
    with torch.no_grad():
        code = model.encoder(y).repeat_interleave(n_per, dim=0)  # h(y) once per condition
        y_rep = y.repeat_interleave(n_per, dim=0) if model.head_sees_y else None
        x = _draw(model, code, y_rep, head, process, steps, method, generator, denoise)
    return x.view(y.shape[0], n_per, model.d_x)


def stacked_conditional_samples(models: list[ScoreModel], y: torch.Tensor, n_per: int, process: OUProcess,
                                steps: int, method: str, generator: torch.Generator, denoise: bool = False,
                                device=None) -> torch.Tensor:
    """conditional_samples of every model, [M, C, n_per, d_x] on the CPU, each drawn from the generator state this
    call starts from: a model's samples are those it draws alone. Models whose heads stack (model_stack) run side by
    side, one sampler call per step for all of them (on `device`, the noise still drawn by the generator); the others
    one after the other."""
    if not stackable(models):
        state, out = generator.get_state(), []
        for model in models:
            generator.set_state(state)
            out.append(conditional_samples(model, y, n_per, process, steps, method, generator, denoise=denoise))
        return torch.stack(out)
    with torch.no_grad():
        stack = stack_heads(models, device)
        code = stack_codes(models, y, device).repeat_interleave(n_per, dim=1)  # [M, C·n_per, d]
        x = _draw(stack, code, None, None, process, steps, method, generator, denoise)
    return x.cpu().view(len(models), y.shape[0], n_per, stack.d_x)


def _draw(model, code: torch.Tensor, y_rep: torch.Tensor | None, head: int | None, process: OUProcess, steps: int,
          method: str, generator: torch.Generator, denoise: bool) -> torch.Tensor:
    """The sampler run on codes [B, d] of head `head`, or of every head ([M, B, d], head None): [(M,) B, d_x]."""
    # The head runs in row chunks whose activations stay in a core's cache (rows are independent: ~25% faster than
    # one pass over 12,800 rows; a chunk of M stacked heads holds 1/M the rows), each chunk's row-constant terms
    # computed once (ScoreModel.sampling_eps)
    copies = None if head is not None else code.shape[0]
    slices = chunks(code.shape[-2], max(64, SAMPLE_CHUNK // (copies or 1)))
    row_eps = [model.sampling_eps(code[..., rows, :], None if y_rep is None else y_rep[rows], head)
               for rows in slices]

    def score(x, t):  # every sampler step has one time for all rows
        t = t.flatten()[0]
        eps = torch.empty_like(x)
        for rows, eps_rows in zip(slices, row_eps):
            eps_rows(x[..., rows, :], t, out=eps[..., rows, :])
        return eps.div_(-process.sigma(t))

    return sample(score, code.shape[-2], model.d_x, process, steps, method, generator, device=code.device,
                  denoise=denoise, copies=copies)


SCORE_ROWS = 1 << 16  # rows of (x_t, t) per stacked score evaluation: 2^16 × 128-wide activations are 32 MB


@torch.no_grad()
def score_metrics(models: list[ScoreModel], taskset: TaskSet, process: OUProcess, draws: int,
                  generator: torch.Generator, device=None) -> list[dict[str, float]]:
    """test_dsm and, where the suite has the exact score, score_error(_weighted) of every model on the same draws of
    (t, noise); models whose heads stack (model_stack) in one call."""
    x0 = taskset.test_x.repeat(draws, 1)
    y = taskset.test_y.repeat(draws, 1)
    t = process.sample_t((x0.shape[0],), generator)
    noise = torch.randn(x0.shape, generator=generator)
    x_t = process.perturb(x0, t, noise)
    if stackable(models):  # in stacks of at most SCORE_ROWS rows in all, so that memory stays bounded
        eps_all, per = [], max(1, SCORE_ROWS // x_t.shape[0])
        for part in (models[i:i + per] for i in range(0, len(models), per)):
            stack, code = stack_heads(part, device), stack_codes(part, y, device)
            where = code.device
            eps_all += stack.eps_from_code(x_t.to(where).expand(len(part), *x_t.shape), code,
                                           t.to(where).expand(len(part), -1)).cpu()
    else:
        eps_all = [model(x_t[None], y[None], t[None])[0] for model in models]
    true_score = taskset.truth.score(0, x_t, y, t)
    sigma = process.sigma(t)[:, None]
    out = []
    for eps in eps_all:
        got = {"test_dsm": float(dsm_loss(eps, noise).mean())}
        if true_score is not None:
            weighted = (eps + sigma * true_score).pow(2).sum(-1)  # σ²‖s_θ − s*‖² with s_θ = −ε̂/σ
            got["score_error"] = float((weighted / sigma[:, 0] ** 2).mean())
            got["score_error_weighted"] = float(weighted.mean())
        out.append(got)
    return out


def sliced_w2(a: torch.Tensor, b: torch.Tensor, n_proj: int, generator: torch.Generator) -> torch.Tensor:
    """Sliced Wasserstein-2 between sample sets a, b of shape [C, S, d], per condition: [C]."""
    dirs = torch.randn(a.shape[-1], n_proj, generator=generator)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = torch.sort(a @ dirs, dim=1)  # 1-D optimal transport along each direction = sorted matching
    pb, _ = torch.sort(b @ dirs, dim=1)
    return (pa - pb).pow(2).mean(dim=(1, 2)).sqrt()


FLAGS = "flags"  # key of `skipped` holding {metric: reason} for metrics computed but not to be taken as results
SAMPLE_METRICS = ("posterior_mean_mse", "posterior_mean_mse_mc", "posterior_mean_mse_excess", "sliced_w2", "psnr",
                  "centre_accuracy_id", "centre_accuracy_ood")


class SampleSpread:
    """Running RMS spread of model samples about the data's per-coordinate mean, and a count of non-finite samples."""

    def __init__(self, data: torch.Tensor):
        data = data.double()
        self.mean = data.mean(0)
        self.data_rms = float((data - self.mean).pow(2).mean().sqrt())
        self.sq, self.values, self.nonfinite = 0.0, 0, 0

    def add(self, draws: torch.Tensor) -> torch.Tensor:
        flat = draws.detach().reshape(-1, draws.shape[-1]).double()
        ok = torch.isfinite(flat).all(1)
        self.nonfinite += int((~ok).sum())
        self.sq += float((flat[ok] - self.mean).pow(2).sum())
        self.values += int(ok.sum()) * flat.shape[1]
        return draws

    @property
    def ratio(self) -> float:
        if self.values == 0:
            return math.inf
        return math.sqrt(self.sq / self.values) / max(self.data_rms, 1e-12)


def spread_text(metrics: dict, threshold: float | None = None) -> str:
    """'spread 13.2× the data's, threshold 3[, 5 non-finite samples]' from a diverged run's metrics."""
    text = f"spread {metrics.get('sample_spread_ratio', math.nan):.3g}× the data's"
    if threshold is not None:
        text += f", threshold {threshold:g}"
    n_bad = int(metrics.get("nonfinite_samples", 0) or 0)
    return text + (f", {n_bad} non-finite sample{'s' if n_bad != 1 else ''}" if n_bad else "")


def flagged(skipped: dict | None) -> dict[str, str]:
    """{metric: reason} of the metrics evaluate_model computed but flagged (today: from diverged samples)."""
    return dict((skipped or {}).get(FLAGS) or {})


def divergence_warning(label: str, metrics: dict, skipped: dict | None, threshold: float | None = None) -> str | None:
    """The one stderr line a run with diverged samples prints, or None when its samples did not diverge."""
    if not metrics.get("diverged"):
        return None
    names = list(flagged(skipped))
    what = (f"{', '.join(names)} {'is not a result' if len(names) == 1 else 'are not results'}" if names
            else "its sample-based metrics are not results")
    return f"warning: {label}: samples diverged ({spread_text(metrics, threshold)}); {what}"


def evaluate_model(model: ScoreModel, taskset: TaskSet, cfg: Config, *,
                   target: tuple[torch.Tensor, torch.Tensor] | None = None,
                   keep: dict | None = None) -> tuple[dict[str, float], dict]:
    """All metrics the suite allows, with the evaluation noise fixed by `cfg.evaluate.seed`.

    Returns (metrics, skipped): skipped maps each metric not computed to the reason, and, when the samples diverged,
    skipped[FLAGS] maps each sample-based metric to why it is not a result (metrics["diverged"] is then 1.0).
    `target` = (x_m, y_m), the m samples the model was adapted on, for ref/linear_target_mse and ref/oracle_ls_mse;
    by default the adapt run's own subset, drawn as train_adapt draws it (taskset.target_subset(adapt.m, seed)).
    `keep`, where given, receives the conditional samples the distribution distance drew ("model", "true":
    [C, N, d_x]; "x": the conditions' held-out x), for the adapt run's samples figure to reuse.
    """
    return evaluate_models([model], taskset, [cfg], targets=[target], keeps=[keep])[0]


EVALUATION_SETTINGS = ("evaluate", "diffusion", "suite")  # what every model of one evaluate_models call shares


def evaluate_models(models: list[ScoreModel], taskset: TaskSet, cfgs: list[Config], *,
                    targets: list | None = None, keeps: list | None = None,
                    device=None) -> list[tuple[dict[str, float], dict]]:
    """evaluate_model of every model, with its own config, target and keep, at once: the score errors and each
    sampler step are one batched call for all models whose heads stack (model_stack.stackable; on `device`), and
    every model sees the evaluation noise it would see alone, so each result is its own evaluate_model's to float
    rounding. The configs must agree on EVALUATION_SETTINGS (adapt.m and the seed may differ: the references)."""
    first = cfgs[0].to_dict()
    for cfg in cfgs[1:]:
        other = cfg.to_dict()
        differ = [k for k in EVALUATION_SETTINGS if other[k] != first[k]]
        if differ:
            raise ValueError(f"evaluate_models: the models' configs differ in {', '.join(differ)}")
    M = len(models)
    targets, keeps = targets or [None] * M, keeps or [None] * M
    e, cfg0 = cfgs[0].evaluate, cfgs[0]
    process = OUProcess(cfg0.diffusion.T0, cfg0.diffusion.T)
    models = [model.eval() for model in models]

    def draw_all(y_, n_per, generator, denoise=False):
        return stacked_conditional_samples(models, y_, n_per, process, e.sampler_steps, e.sampler, generator,
                                           denoise=denoise, device=device)

    scores = score_metrics(models, taskset, process, e.t_draws, torch.Generator().manual_seed(e.seed), device)
    n_cond = min(e.posterior_conditions, taskset.test_x.shape[0])
    x_true, y = taskset.test_x[:n_cond], taskset.test_y[:n_cond]
    posterior = draw_all(y, e.posterior_samples, torch.Generator().manual_seed(e.seed + 1), denoise=True)
    n_dist = min(e.dist_conditions, taskset.test_y.shape[0])
    y_dist = taskset.test_y[:n_dist]
    gen = torch.Generator().manual_seed(e.seed + 2)
    reference = taskset.truth.sample(0, y_dist.repeat_interleave(e.dist_samples, 0), gen)
    if reference is not None:
        reference = reference.view(n_dist, e.dist_samples, -1)
        reference2 = taskset.truth.sample(0, y_dist.repeat_interleave(e.dist_samples, 0), gen).view_as(reference)
        dist_draws = draw_all(y_dist, e.dist_samples, gen)
        after_draws = gen.get_state()  # each model's sliced-W2 directions are drawn from here, as alone
        floor = None
    out = []
    for i, (model, cfg) in enumerate(zip(models, cfgs)):
        metrics, skipped = dict(scores[i]), {}
        if "score_error" not in metrics:
            skipped["score_error"] = f"suite '{taskset.name}' has no exact score"
        # The target's x, pool and held-out split: the distribution the model's samples should follow.
        spread = SampleSpread(torch.cat([taskset.target_x, taskset.test_x]))
        draws = spread.add(posterior[i])
        metrics["posterior_mean_mse"] = float((draws.mean(1) - x_true).pow(2).mean())
        if draws.shape[1] > 1:  # E(x̄_N − x)² = (E[x|y]_model − x)² + tr Var/N
            metrics["posterior_mean_mse_mc"] = float(draws.var(1).mean() / draws.shape[1])
        if model.linear_mean:
            with torch.no_grad():
                code = model.encoder(y)
                mu = model.mean_of_code(code.expand(model.heads.K, *code.shape))[0]  # adapted models: K = 1
            metrics["linear_mean_mse"] = float((mu - x_true).pow(2).mean())
        exact_mean = getattr(taskset.truth, "mean", None)
        if exact_mean is not None:
            metrics["posterior_mean_mse_floor"] = float((exact_mean(0, y) - x_true).pow(2).mean())
        target = targets[i]
        if target is None and cfg.adapt.m <= taskset.target_x.shape[0]:
            target = taskset.target_subset(cfg.adapt.m, seed=cfg.seed)
        refs, why = reference_metrics(taskset, x_true, y, *(target or (None, None)),  # same conditions as above
                                      encoder=model.encoder)
        metrics.update(refs)
        skipped.update(why)
        if taskset.extra_metrics is not None:  # image suites: psnr (digits), centre accuracy and h diagnostics (bumps)
            def draw(y_, n_per, generator, model=model, spread=spread):
                return spread.add(conditional_samples(model, y_, n_per, process, e.sampler_steps, e.sampler,
                                                      generator))

            metrics.update(taskset.extra_metrics(model=model, draw=draw, x_true=x_true, x_mean=draws.mean(1), y=y,
                                                 seed=e.seed + 3))
        if reference is None:
            skipped["sliced_w2"] = f"suite '{taskset.name}' cannot draw true conditional samples"
        else:
            model_draws = spread.add(dist_draws[i])
            gen.set_state(after_draws)
            metrics["sliced_w2"] = float(sliced_w2(model_draws, reference, 64, gen).mean())
            if floor is None:  # the same for every model: its directions come next from the same state
                floor = float(sliced_w2(reference2, reference, 64, gen).mean())
            metrics["sliced_w2_floor"] = floor
            if keeps[i] is not None:
                keeps[i].update(model=model_draws, true=reference, x=taskset.test_x[:n_dist])
        reference_diagnostics = getattr(taskset.truth, "reference_diagnostics", None)  # MCMC references (Langevin)
        if reference_diagnostics is not None:
            metrics.update(reference_diagnostics())
        if "posterior_mean_mse_floor" in metrics:
            metrics["posterior_mean_mse_excess"] = metrics["posterior_mean_mse"] - metrics["posterior_mean_mse_floor"]
        found, why = diagnose(model, taskset, torch.Generator().manual_seed(e.seed + 4))  # regularizers' targets
        metrics.update(found)
        skipped.update(why)
        metrics["sample_spread_ratio"] = spread.ratio
        metrics["nonfinite_samples"] = float(spread.nonfinite)
        diverged = spread.nonfinite > 0 or not spread.ratio <= e.divergence_ratio
        metrics["diverged"] = float(diverged)
        if diverged:
            reason = f"from diverged samples: {spread_text(metrics, e.divergence_ratio)}"
            skipped[FLAGS] = {k: reason for k in metrics if k in SAMPLE_METRICS}
        out.append((metrics, skipped))
    return out
