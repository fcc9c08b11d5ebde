"""Task diversity (ν, Δ), ε_approx and the floor's response to K and n, measured (theory.md §2–3).

Def 3.1 (its likely form):  L(P⁰, h) ≤ ν⁻¹ · (1/K) Σ_k L(P^k, h) + Δ  for every encoder h,
with L(P, h) = inf_f E_P ℓ_P(x, y, s_{f,h}) the representation error (3.6). Thm 3.4 then bounds the frozen-encoder
error as ν⁻¹(ε_approx + r_z) + Δ + r_x; the first three terms are the m-independent floor.

How it is measured ("Checking diversity", §2, and §3.1's suggestions):
- Encoders ĥ: the suite's true h* (where it has one), a random encoder, and snapshots along short pretrains on all K
  sources with n rows each, on K/2 of them, and on n/4 rows (the last three also give the K/n check below).
- L(P, ĥ): a fresh head per task refit with ĥ frozen on plenty of rows (synthetic suites draw as many as asked), all
  heads of all encoders in one stacked model trained by the one loop of train.py; then the held-out DSM minus the
  task's irreducible DSM E‖ε + σ_t s*(x_t)‖², where the suite knows its scores (computed directly as E‖ε̂ − ε̂*‖² on
  held-out rows: the same quantity without the cross term's noise). The DSM is in ε-space, so L is the
  σ_t²-weighted score error E_t σ_t²‖s − s*‖² (the training loss's weighting, not the unweighted L_P of §1.3).
- 1/ν and Δ: least squares of the target's L on the sources' average across encoders (weighted by relative error),
  with a bootstrap over encoders. Least squares, not an upper envelope: with a handful of noisy encoders a line
  through the extreme points chases noise. `delta_cover` is the smallest Δ at that slope that puts every measured encoder on or under the line (Def 3.1
  read literally, at the encoders measured).
- ε_approx = inf_h (1/K) Σ_k L(P^k, h) (Thm 3.4): the smallest source average measured (with h* among the encoders,
  the heads' own misfit).
- r_z (Prop 3.3) = the source average of the pretrained ĥ minus ε_approx; with r_z = C·(K log N_F + log N_H)/(nK)
  and C fitted at the recipe's (K, n), the floor ν⁻¹(ε_approx + r_z) + Δ is predicted at other K and n and checked
  against the encoders pretrained on fewer sources or rows.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from cdmtransfer.errors import ConfigError

LEVEL = 0.8  # bootstrap interval level
BOOTSTRAP = 2000
PRETRAIN_STEPS = 1000  # default cap of the pretrains behind the encoders (as estimate's held-out pretrains)
HEAD_STEPS = 2000  # default cap of the head refits
ROWS = 2048  # rows per task for the head refits, where the suite can draw them


# ---------------------------------------------------------------- statistics (numpy only)

def fit_line(x, y, w) -> tuple[float, float]:
    """Weighted least-squares slope and intercept of y on x (weights w)."""
    x, y, w = np.asarray(x, float), np.asarray(y, float), np.asarray(w, float)
    mx, my = (w * x).sum() / w.sum(), (w * y).sum() / w.sum()
    slope = float((w * (x - mx) * (y - my)).sum() / (w * (x - mx) ** 2).sum())
    return slope, float(my - slope * mx)


def fit_diversity(source_avg, target, *, level: float = LEVEL, n_boot: int = BOOTSTRAP, seed: int = 0) -> dict:
    """1/ν and Δ of Def 3.1 from one (source average, target) pair of representation errors per encoder.

    L(P⁰, h) = ν⁻¹·avg_k L(P^k, h) + Δ by least squares weighted by 1/(source average)²: measured errors carry
    relative noise (a refit head's misfit, a finite test set), so each encoder counts by its relative residual and a
    poor encoder's large errors do not set the line alone. Intervals: bootstrap over encoders (pairs resampled).
    """
    x, y = np.asarray(source_avg, float), np.asarray(target, float)
    if x.shape != y.shape or x.ndim != 1:
        raise ConfigError(f"diversity: need one source average and one target error per encoder, got {x.shape} "
                          f"and {y.shape}")
    if len(x) < 3 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ConfigError(f"diversity: need at least 3 encoders with finite errors, got {len(x)}")
    if np.ptp(x) <= 1e-12 * max(1.0, np.abs(x).max()):
        raise ConfigError("diversity: every encoder has the same source error; the slope 1/ν is not identified")
    if np.any(x <= 0):
        raise ConfigError("diversity: source errors must be > 0 (relative weights)")
    w = 1 / x**2
    slope, intercept = fit_line(x, y, w)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        i = rng.integers(0, len(x), len(x))
        if np.ptp(x[i]) > 0:
            draws.append(fit_line(x[i], y[i], w[i]))
    draws = np.array(draws)
    q = [(1 - level) / 2, (1 + level) / 2]
    residual = y - (slope * x + intercept)
    return {"inv_nu": slope, "inv_nu_interval": np.quantile(draws[:, 0], q).tolist(),
            "delta": intercept, "delta_interval": np.quantile(draws[:, 1], q).tolist(),
            "delta_cover": float(intercept + residual.max()),  # every measured encoder on or under the line
            "relative_residual_sd": float(np.sqrt((w * residual**2).sum() / (len(x) - 2))),  # sd of residual/source
            "encoders": len(x), "level": level,
            "method": "least squares of target on source average across encoders, weighted by 1/source²; bootstrap "
                      "over encoders"}


def rz_rate(K: int, n: int, log_NF: float, log_NH: float) -> float:
    """The source term's rate (K log N_F + log N_H)/(nK) (Prop 3.3, Thm 3.4), without its constant."""
    if K < 1 or n < 1:
        raise ConfigError(f"diversity: need K >= 1 and n >= 1, got K = {K}, n = {n}")
    return (K * log_NF + log_NH) / (n * K)


def floor_at(K: int, n: int, *, inv_nu: float, delta: float, eps_approx: float, C: float,
             log_NF: float, log_NH: float) -> float:
    """The m-independent floor ν⁻¹(ε_approx + r_z) + Δ of Thm 3.4 with r_z = C·rate(K, n)."""
    return inv_nu * (eps_approx + C * rz_rate(K, n, log_NF, log_NH)) + delta


def rz_constant(source_avg: float, eps_approx: float, K: int, n: int, log_NF: float, log_NH: float) -> float:
    """C in r_z = C·(K log N_F + log N_H)/(nK), from one measured r_z = source average − ε_approx (Prop 3.3)."""
    return max(source_avg - eps_approx, 0.0) / rz_rate(K, n, log_NF, log_NH)


# ---------------------------------------------------------------- measurement (torch)

def torch_no_grad(fn):
    """torch.no_grad() as a decorator, without importing torch when this module is imported."""
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


def truth_scores(truth, process):
    """The exact ε̂*_k = −σ_t s*_k(x_t, y, t) as a model on [K, B, ·] task stacks (row k is task k); calling it
    raises LookupError where the suite does not know its scores."""
    import torch

    class TruthModel(torch.nn.Module):
        def forward(self, x_t, y, t):
            out = []
            for k in range(x_t.shape[0]):
                score = truth.score(k, x_t[k], y[k], t[k])
                if score is None:
                    raise LookupError
                out.append(-process.sigma(t[k])[:, None] * score)
            return torch.stack(out)

    return TruthModel()


@torch_no_grad
def held_out_errors(model, truth_model, x, y, counts, process, draws: int, seed: int, G: int):
    """On test stacks x [T, n, d_x] (T tasks, rows past counts[k] padding), `draws` (t, ε) pairs per row:
    the held-out DSM E‖ε̂ − ε‖² [G, T] of a model stacking G copies of T heads (head g·T + k scores task k), the
    irreducible DSM E‖ε̂* − ε‖² [T] of the exact ε̂* = −σ_t s* (None when the suite does not know its scores) and
    the excess (3.6) [G, T]: E‖ε̂ − ε̂*‖² = DSM − irreducible in expectation, computed directly (no cross-term noise),
    or the DSM itself when the scores are unknown."""
    import torch

    T, n, _ = x.shape
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(n)[None] < counts[:, None]).float()  # [T, n]
    dsm, irr, exc = torch.zeros(G, T), torch.zeros(T), torch.zeros(G, T)
    known = True
    for _ in range(draws):  # one noise draw per row at a time, batched over encoders, tasks and rows
        t = process.sample_t((T, n), g)
        noise = torch.randn(x.shape, generator=g)
        x_t = process.perturb(x, t, noise)
        eps = model(x_t.repeat(G, 1, 1), y.repeat(G, 1, 1), t.repeat(G, 1)).view(G, T, n, -1)
        dsm += ((eps - noise).pow(2).sum(-1) * mask).sum(-1)
        if known:
            try:
                exact = truth_model(x_t, y, t)
            except LookupError:
                known = False
                continue
            irr += ((exact - noise).pow(2).sum(-1) * mask).sum(-1)
            exc += ((eps - exact).pow(2).sum(-1) * mask).sum(-1)
    rows = draws * mask.sum(1)
    dsm = (dsm / rows).double().numpy()
    if not known:
        return dsm, None, dsm
    return dsm, (irr / rows).double().numpy(), (exc / rows).double().numpy()


def task_stacks(taskset, test_rows: int):
    """Training and test stacks of the K + 1 tasks (row 0 the target, 1..K the sources, theory.md §1.1):
    ((x, y, counts), (x, y, counts)). Each source gives its last min(test_rows, n_k/4) rows to the test part."""
    from cdmtransfer.tasks.base import stack_sources

    n = [int(c) for c in taskset.source_n]
    held = [max(1, min(test_rows, c // 4)) for c in n]
    fit_x = [taskset.target_x] + [taskset.source_x[k, : c - h] for k, (c, h) in enumerate(zip(n, held))]
    fit_y = [taskset.target_y] + [taskset.source_y[k, : c - h] for k, (c, h) in enumerate(zip(n, held))]
    test_x = [taskset.test_x] + [taskset.source_x[k, c - h: c] for k, (c, h) in enumerate(zip(n, held))]
    test_y = [taskset.test_y] + [taskset.source_y[k, c - h: c] for k, (c, h) in enumerate(zip(n, held))]
    return stack_sources(fit_x, fit_y), stack_sources(test_x, test_y)


def representation_errors(cfg, taskset, encoders: list, *, steps: int, draws: int = 16, seed: int = 0,
                          quiet: bool = True) -> dict:
    """L(P, ĥ) for each encoder (frozen) and each task: G·(K+1) heads in one stacked model, one training run.

    Returns {"dsm": [G, K+1] held-out DSM, "irreducible": [K+1] or None, "excess": [G, K+1] (`held_out_errors`)};
    column 0 is the target.
    """
    import torch

    from cdmtransfer.diffusion import OUProcess
    from cdmtransfer.progress import Progress
    from cdmtransfer.stages import dsm_objective, score_model
    from cdmtransfer.train import train
    from cdmtransfer.validation import GridEncoder, dsm_validation, holdout_split, unit_clipper

    G, p = len(encoders), cfg.pretrain
    (x, y, n), (xt, yt, nt) = task_stacks(taskset, cfg.suite.n_test)
    tasks = x.shape[0]
    fit_rows, val_rows = holdout_split(n, 0.1, seed)
    (xf, yf, nf), (xv, yv, nv) = fit_rows.gather(x, y), val_rows.gather(x, y)
    process = OUProcess(cfg.diffusion.T0, cfg.diffusion.T)
    frozen = [copy.deepcopy(e).requires_grad_(False) for e in encoders]
    torch.manual_seed(seed)
    model = score_model(cfg, GridEncoder(frozen, tasks), G * tasks, taskset, x[fit_rows.mask])
    head_cfg = dataclasses.replace(p, steps=steps, checkpoint_every=steps, log_every=max(1, min(100, steps)),
                                   warmup_steps=min(p.warmup_steps, steps // 10))
    check = dsm_validation(xv, yv, nv, process, p.val_draws, seed=seed + 17, repeat=G)
    with tempfile.TemporaryDirectory(prefix="cdmtransfer-diversity-") as tmp:
        result = train(model, [{"params": list(model.heads.parameters())}],
                       dsm_objective(xf, yf, nf, process, p.batch_size, repeat=G), head_cfg, seed=seed,
                       ckpt_dir=Path(tmp), meta={"stage": "diversity"},
                       progress=Progress(total=steps, label="diversity heads", enabled=not quiet),
                       validate=lambda ema: check(ema).mean(),  # one length for all: the mean over encoders
                       clip=unit_clipper(model, [], G, p.grad_clip))
    dsm, irreducible, excess = held_out_errors(result.ema.eval(), truth_scores(taskset.truth, process), xt, yt, nt,
                                               process, draws, seed + 29, G)
    return {"dsm": dsm, "irreducible": irreducible, "excess": excess, "steps": result.step,
            "seconds": result.seconds}


def pretrain_snapshots(cfg, taskset, *, steps: int, snapshot_steps, seed: int, quiet: bool = True) -> dict:
    """Joint DSM pretraining on `taskset`'s sources (the pretrain stage's closed-form start and objective, no
    regularisers), capped at `steps`; returns {step: EMA encoder} at the validation checks in `snapshot_steps` and
    {"best": ...}."""
    import torch

    from cdmtransfer.diffusion import OUProcess
    from cdmtransfer.progress import Progress
    from cdmtransfer.pretraining import started_pretrain_model
    from cdmtransfer.stages import dsm_objective
    from cdmtransfer.train import train
    from cdmtransfer.validation import dsm_validation, holdout_split

    p = cfg.pretrain
    train_cfg = dataclasses.replace(p, steps=steps, checkpoint_every=steps)
    fit_rows, val_rows = holdout_split(taskset.source_n, p.val_fraction, cfg.suite.seed)
    x, y, n = fit_rows.gather(taskset.source_x, taskset.source_y)
    torch.manual_seed(seed)
    model, _ = started_pretrain_model(cfg, taskset, fit_rows, val_rows)  # started as the pretrain stage starts
    process = OUProcess(cfg.diffusion.T0, cfg.diffusion.T)
    check = dsm_validation(*val_rows.gather(taskset.source_x, taskset.source_y), process, p.val_draws,
                           seed=seed + 17)
    wanted, snaps, calls = set(snapshot_steps), {}, [0]

    def validate(ema):  # also keeps the EMA encoder at the checks asked for (check i is at step i·val_every)
        step = min(calls[0] * p.val_every, steps)
        calls[0] += 1
        if step in wanted:
            snaps[step] = copy.deepcopy(ema.encoder)
        return check(ema)

    with tempfile.TemporaryDirectory(prefix="cdmtransfer-diversity-") as tmp:
        result = train(model, [{"params": list(model.parameters())}], dsm_objective(x, y, n, process, p.batch_size),
                       train_cfg, seed=seed, ckpt_dir=Path(tmp), meta={"stage": "diversity-pretrain"},
                       progress=Progress(total=steps, label="diversity pretrain", enabled=not quiet),
                       validate=validate)
    snaps["best"] = copy.deepcopy(result.ema.encoder)
    snaps["best_step"] = result.step
    return snaps


def sub_sources(taskset, K: int, n: int):
    """The first K sources with their first n rows each (the K/n sub-sampling of the source term)."""
    counts = taskset.source_n[:K].clamp(max=n)
    return dataclasses.replace(taskset, source_x=taskset.source_x[:K, :n], source_y=taskset.source_y[:K, :n],
                               source_n=counts)


def measurement_config(cfg, rows: int):
    """The recipe with `rows` fresh rows per task for the head refits where the suite can draw them (Gaussian: the
    tasks' parameters are drawn before their data, so a larger n gives the same tasks); else the recipe itself."""
    from cdmtransfer.config import Config, from_dict

    if cfg.suite.name != "gaussian" or cfg.suite.holdout:
        return cfg
    data = cfg.to_dict()
    data["suite"]["n"] = rows + cfg.suite.n_test
    data["suite"]["n_target_pool"] = rows
    return from_dict(Config, data, f"{cfg.name} (diversity measurement)")


def measure(cfg, *, pretrain_steps: int | None = None, head_steps: int | None = None, rows: int = ROWS,
            seed: int | None = None, level: float = LEVEL, quiet: bool = True) -> dict:
    """Measured 1/ν, Δ, ε_approx and the K/n prediction for the recipe's suite (see the module docstring).

    Pretrains are capped at `pretrain_steps` (default min(PRETRAIN_STEPS, pretrain.steps)), head refits at
    `head_steps` (default min(HEAD_STEPS, 2·pretrain.steps)); both stop earlier by validation.
    """
    import torch

    from cdmtransfer.stages import new_encoder, setup_torch
    from cdmtransfer.tasks import build_taskset

    pretrain_steps = min(PRETRAIN_STEPS, cfg.pretrain.steps) if pretrain_steps is None else pretrain_steps
    head_steps = min(HEAD_STEPS, 2 * cfg.pretrain.steps) if head_steps is None else head_steps
    setup_torch(cfg)
    seed = cfg.seed if seed is None else seed
    start = time.perf_counter()
    source_set = build_taskset(cfg)
    K, n = source_set.K, int(source_set.source_n.min())
    if K < 2:
        raise ConfigError(f"diversity: needs at least 2 source tasks, the suite has K = {K}")
    grid = [(K, n), (max(1, K // 2), n), (K, max(8, n // 4)), (max(1, K // 2), max(8, n // 4))]
    every = cfg.pretrain.val_every
    early = [every, 3 * every]  # two snapshots on the way, then the best
    encoders, names = [], []
    truth_encoder = source_set.truth.encoder()
    if truth_encoder is not None and getattr(truth_encoder, "d", None) == cfg.model.d:
        encoders.append(truth_encoder)
        names.append("h*")
    torch.manual_seed(seed + 3)
    encoders.append(new_encoder(cfg, source_set))
    names.append("random")
    best_of = {}
    for Kg, ng in grid:
        snaps = pretrain_snapshots(cfg, sub_sources(source_set, Kg, ng), steps=pretrain_steps, snapshot_steps=early,
                                   seed=seed, quiet=quiet)
        for step in early:
            if step in snaps and step < snaps["best_step"]:
                encoders.append(snaps[step])
                names.append(f"K={Kg} n={ng} step {step}")
        best_of[(Kg, ng)] = len(encoders)
        encoders.append(snaps["best"])
        names.append(f"K={Kg} n={ng} best (step {snaps['best_step']})")
    pretrain_seconds = time.perf_counter() - start
    fit_set = build_taskset(measurement_config(cfg, rows))
    errors = representation_errors(cfg, fit_set, encoders, steps=head_steps, seed=seed, quiet=quiet)
    excess = errors["excess"]
    target, source_avg = excess[:, 0], excess[:, 1:].mean(1)
    fit = fit_diversity(source_avg, target, level=level, seed=seed)
    known = errors["irreducible"] is not None
    eps_approx = float(source_avg.min()) if known else None
    out = {**fit, "known_scores": known,
           "units": ("excess DSM: held-out ε-space DSM minus the exact irreducible DSM, i.e. E_t σ_t²‖s − s*‖²" if known
                     else "held-out ε-space DSM (the suite's irreducible DSM is unknown: Δ includes the difference "
                          "of the constants, and ε_approx is not reported)"),
           "irreducible_dsm": None if not known else {"target": float(errors["irreducible"][0]),
                                                       "sources_mean": float(errors["irreducible"][1:].mean()),
                                                       "sources": [float(v) for v in errors["irreducible"][1:]]},
           "eps_approx": eps_approx, "eps_approx_encoder": names[int(source_avg.argmin())] if known else None,
           "table": [{"encoder": name, "source_avg": float(s), "target": float(t),
                      "sources": [float(v) for v in row[1:]]}
                     for name, s, t, row in zip(names, source_avg, target, excess)],
           "sizes": {"K": K, "n": n, "rows_per_task_for_heads": int(fit_set.target_x.shape[0]),
                     "pretrain_steps_cap": pretrain_steps, "head_steps_cap": head_steps,
                     "head_steps_kept": int(errors["steps"])}}
    if known:
        out["k_n"] = k_n_check(cfg, grid, best_of, source_avg, target, fit, eps_approx)
    out["seconds"] = {"pretrains": pretrain_seconds, "heads": errors["seconds"], "total": time.perf_counter() - start}
    return out


def k_n_check(cfg, grid, best_of, source_avg, target, fit, eps_approx) -> dict:
    """The floor at each (K, n) of the grid predicted from the first (the recipe's: C fitted there) and measured
    (the target error of the encoder pretrained at that K, n), and what 2K or 4n would give."""
    from cdmtransfer.estimate import complexity, suite_dims

    dims = suite_dims(cfg)

    def logs(K, n):  # log N_F, log N_H from parameter counts at this K, n (theory.md §3.1)
        c = complexity(cfg, {**dims, "K": K, "n": n})
        return {"log_NF": c["log_NF"], "log_NH": c["log_NH"]}

    K0, n0 = grid[0]
    C = rz_constant(float(source_avg[best_of[grid[0]]]), eps_approx, K0, n0, **logs(K0, n0))
    theta = {"inv_nu": fit["inv_nu"], "delta": fit["delta"], "eps_approx": eps_approx, "C": C}
    rows = []
    for K, n in grid:
        j = best_of[(K, n)]
        rows.append({"K": K, "n": n, "measured_floor": float(target[j]),
                     "predicted_floor": floor_at(K, n, **theta, **logs(K, n)),
                     "measured_source_avg": float(source_avg[j]),
                     "predicted_source_avg": eps_approx + C * rz_rate(K, n, **logs(K, n))})
    for row in rows:
        row["measured_shift"] = row["measured_floor"] - rows[0]["measured_floor"]
        row["predicted_shift"] = row["predicted_floor"] - rows[0]["predicted_floor"]
    more = [{"K": K, "n": n, "predicted_floor": floor_at(K, n, **theta, **logs(K, n))}
            for K, n in ((2 * K0, n0), (4 * K0, n0), (K0, 4 * n0), (2 * K0, 4 * n0))]
    return {"C": C, "r_z": C * rz_rate(K0, n0, **logs(K0, n0)), "grid": rows, "more_sources": more}
