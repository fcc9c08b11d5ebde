"""`cdmtransfer estimate`: how many target samples for error ε, from the source tasks, a few target points, the theory.

Source-calibrated (the default, source_calibration.py runs the curves): source tasks held out in turn stand in for
the target; their learning curves, fitted as floor + A·m^(−p) and pooled (curve_fit.py), predict m(ε) for a new task
with an interval that covers task-to-task spread and seed noise. `--calibrate SWEEP_RUN` adds the target's own
points (a small sweep, e.g. m ∈ {8, 16}) as evidence: the prediction is updated and the interval narrows.
Theory (theory.md §3, §3.1): the recipe gives d_x, D_y, d, K, n and the network sizes, which give the complexity
terms log N_F (score head) and log N_H (encoder); theory.required_m inverts each bound for m. The paper states rates
with unknown constants, so these answers are orders of magnitude, not predictions.
`--diversity` measures the theory's constants instead of asking for them: 1/ν, Δ, ε_approx and the floor's response
to K and n (diversity.py).
Target-only (`--calibrate` with `--holdout 0`): err(m) ≈ floor + A/m fitted to the sweep alone, with bootstrap
intervals over seeds. This module imports numpy only (no torch).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cdmtransfer import curve_fit, theory
from cdmtransfer.config import Config
from cdmtransfer.curve_fit import Curve, Epsilon
from cdmtransfer.errors import ConfigError, DataError

ERRORS = ("posterior_mean_mse", "test_dsm", "score_error")  # errors a user can state ε in


def mlp_params(widths: list[int]) -> int:
    """Weights + biases of an MLP with the given layer widths."""
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def suite_dims(cfg: Config) -> dict:
    """d_x, D_y, K and n (the smallest source) of the recipe's suite: from the recipe where it says, else by
    reading the data (.npz) or building the task set (image suites, .csv; imports torch)."""
    s = cfg.suite
    if s.name in ("gaussian", "langevin", "lsgmm") and not s.holdout:
        sub = getattr(s, s.name)
        return {"d_x": sub.d_x, "D_y": sub.D_y, "K": s.K, "n": s.n}
    if s.name == "file" and not s.holdout:
        return _file_dims(cfg)
    from cdmtransfer.tasks import build_taskset

    ts = build_taskset(cfg)
    return {"d_x": ts.d_x, "D_y": ts.D_y, "K": ts.K, "n": int(ts.source_n.min())}


def _file_dims(cfg: Config) -> dict:
    """Sizes of a `file` suite read with the training loader and its checks (imports torch)."""
    from cdmtransfer.tasks import files

    f = cfg.suite.file
    path, x, y, task = files.read_checked(f)
    ids, counts = np.unique(task, return_counts=True)
    sources = [i for i in ids if i != f.target] if not f.sources else f.sources
    sizes = [int(c) for i, c in zip(ids, counts) if i in sources]
    if not sizes:
        raise DataError(f"{path}: no source tasks for the estimate (task ids: {', '.join(map(str, ids))})")
    return {"d_x": x.shape[1], "D_y": y.shape[1], "K": len(sources), "n": min(sizes)}


def complexity(cfg: Config, dims: dict) -> dict:
    """log N_F and log N_H from parameter counts (theory.md §3.1): S·L·log(L·W·B·nK) with B = 1."""
    m = cfg.model
    n_eff = dims["n"] * dims["K"]
    head = [dims["d_x"] + m.d + m.time_dim] + [m.head_width] * m.head_depth + [dims["d_x"]]
    enc = [dims["D_y"]] + [m.encoder_width] * m.encoder_depth + [m.d]
    s_f, s_h = mlp_params(head), mlp_params(enc)
    return {"head_params": s_f, "encoder_params": s_h,
            "log_NF": theory.log_covering(s_f, len(head) - 1, m.head_width, 1.0, n_eff),
            "log_NH": theory.log_covering(s_h, len(enc) - 1, m.encoder_width, 1.0, n_eff)}


@dataclass
class EstimateReport:
    epsilon: float | None  # the theory's ε (None when ε is relative to a floor)
    metric: str  # the theory's metric (score or tv)
    inputs: dict
    theory: dict  # mode -> Estimate as dict (orders of magnitude)
    saving: float | None
    calibrated: dict = field(default_factory=dict)  # target-only fit: mode -> fit summary and m for ε with interval
    notes: list[str] = field(default_factory=list)
    error: str = ""  # the measured error ε is stated in (ERRORS)
    epsilon_text: str = ""  # ε as stated: '0.3', 'floor + 0.1', 'floor × 1.1'
    predicted: dict = field(default_factory=dict)  # source-calibrated: mode -> prediction (and update)
    evidence: dict = field(default_factory=dict)  # the runs and settings behind `predicted`
    diversity: dict = field(default_factory=dict)  # measured 1/ν, Δ, ε_approx and the K/n check (diversity.py)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_problem(cfg: Config, epsilon: float, delta: float, overrides: dict) -> tuple[theory.Problem, dict]:
    dims = suite_dims(cfg)
    comp = complexity(cfg, dims)
    values = dict(epsilon=epsilon, delta=delta, d_x=dims["d_x"], d_y=cfg.model.d, D_y=dims["D_y"], K=dims["K"],
                  n=dims["n"], log_NF=comp["log_NF"], log_NH=comp["log_NH"])
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        problem = theory.Problem(**values)
    except ValueError as exc:
        raise ConfigError(f"estimate: {exc}") from None
    return problem, {**dims, **comp, **{k: v for k, v in values.items() if k not in dims}}


def estimate(cfg: Config, epsilon: float | None, *, delta: float = 0.1, modes=("transfer", "scratch"),
             metric: str = "score", overrides: dict | None = None, calibration: dict | None = None,
             theory_table: bool = True, seed: int = 0) -> EstimateReport:
    """The theory's bounds inverted (theory_table) and the target-only fit of `calibration` curves, for ε."""
    problem, inputs = build_problem(cfg, epsilon if epsilon else 1.0, delta, overrides or {})
    results, ratio, notes = {}, None, []
    if theory_table and epsilon:
        for mode in modes:
            est = theory.required_m(problem, mode, metric)
            results[mode] = {"m": est.m, "feasible": est.feasible, "reason": est.reason,
                             "dominant_term": theory.TERM_LABELS.get(est.dominant_term, est.dominant_term),
                             "terms": est.terms, "needed": est.needed}
        ratio = theory.saving(problem, metric) if {"transfer", "scratch"} <= set(modes) else None
        notes.append("theory: rates with unknown constants (C = %g%s); read them as orders of magnitude"
                     % (problem.C, ", log factors replaced by %g" % problem.iota if problem.iota is not None else ""))
    report = EstimateReport(epsilon, metric, inputs, results, ratio, notes=notes)
    if calibration and epsilon:
        report.calibrated = calibrate(calibration, epsilon, problem, metric, seed=seed)
    return report


def predict(curves: dict[str, list[Curve]], tasks: list[int], eps: Epsilon, *, level: float = 0.8,
            target: dict[str, Curve] | None = None, error: str = "") -> dict:
    """Per mode: the pseudo-targets' curves fitted, pooled and inverted for ε; updated with the target's points.

    curves: mode -> one Curve per held-out task (in the order of `tasks`); target: mode -> the target's own Curve.
    """
    out = {}
    for mode, mode_curves in curves.items():
        out[mode] = predict_mode(mode_curves, tasks, eps, level, (target or {}).get(mode), error)
    return out


def predict_mode(curves: list[Curve], tasks: list[int], eps: Epsilon, level: float, target: Curve | None,
                 error: str = "") -> dict:
    """One mode: shape chosen, fits pooled, m(ε) with its interval, leave-one-task-out check, the predicted band
    of the curve; with `target`, the update by its points and how many more samples to collect."""
    fits, scores = curve_fit.choose_shape(curves)
    pred = curve_fit.pool(fits)
    answer = pred.m_interval(eps, level)
    T, V = pred.parts["task_cov"], pred.parts["noise_cov"]
    loto = curve_fit.leave_one_task_out(curves, eps, fits.free, level)
    ratios = [abs(r["log2_ratio"]) for r in loto if r["log2_ratio"] is not None]
    grid = np.unique(np.geomspace(min(c.m.min() for c in curves), 16 * max(c.m.max() for c in curves), 25).round())
    lo, mid, hi = pred.band(grid, level)
    out = {**answer, "shape": "floor + A/m" if not fits.free else f"floor + A·m^-{fits.p:.2f}", "p": fits.p,
           "p_free": fits.free, "lopo_rms_log": scores,
           "residual_sd": math.sqrt(fits.s2) if math.isfinite(fits.s2) else None,
           "floor": {"mean": float(pred.mean[0]), "task_sd": math.sqrt(T[0, 0]), "noise_sd": math.sqrt(V[0, 0])},
           "A": {"mean": float(pred.mean[1]), "task_sd": math.sqrt(T[1, 1]), "noise_sd": math.sqrt(V[1, 1])},
           "tasks": [{"task": k, "floor": float(fits.theta[j, 0]), "A": float(fits.theta[j, 1]),
                      "m_own": _finite(float(curve_fit.m_for(fits.theta[j, 0], fits.theta[j, 1], fits.p, eps))),
                      "points": [[float(m), float(e)] for m, e in zip(curves[j].m, curves[j].mean)]}
                     for j, k in enumerate(tasks)],
           "loto": [{**r, "task": tasks[r["task"]]} for r in loto],
           "loto_summary": {"median_abs_log2": float(np.median(ratios)) if ratios else None,
                            "covered": sum(r["covered"] for r in loto), "cases": len(loto)},
           "band": {"m": grid.tolist(), "lo": lo.tolist(), "mid": mid.tolist(), "hi": hi.tolist()}}
    if error == "score_error" and not fits.free:  # Thm 3.4 with C·ι = 1: A is the target term's complexity
        out["effective_complexity"] = float(pred.mean[1])
    if target is not None:
        post, weights = curve_fit.update(pred, target, fits.s2, fits.dof, level=level)
        upd = post.m_interval(eps, level)
        have = int(target.m.max())
        more = None if upd["m"] is None else max(0, math.ceil(upd["m"] - have))
        more_hi = None if upd["interval"][1] is None else max(0, math.ceil(upd["interval"][1] - have))
        blo, bmid, bhi = post.band(grid, level)
        out["updated"] = {**upd, "weights": weights, "target_points": [[float(m), float(e), int(s)] for m, e, s in
                                                                       zip(target.m, target.mean, target.seeds)],
                          "have": have, "collect_more": more, "collect_more_hi": more_hi,
                          "narrowing": _narrowing(answer["interval"], upd["interval"]),
                          "band": {"m": grid.tolist(), "lo": blo.tolist(), "mid": bmid.tolist(), "hi": bhi.tolist()}}
    return out


def _narrowing(before, after) -> float | None:
    """The updated interval's width over the source-only one, both on a log scale (1: no narrowing)."""
    if None in before or None in after or before[1] <= before[0]:
        return None
    return math.log(after[1] / after[0]) / math.log(before[1] / before[0])


def calibrate(curves: dict, epsilon: float, problem: theory.Problem, metric: str, seed: int = 0) -> dict:
    """Fit each mode's measured curve (m values, errors [seeds, m]) and invert it for ε, with bootstrap intervals
    (resamples drawn from `seed`)."""
    out = {}
    for mode, (m_values, errors) in curves.items():
        errors = np.asarray(errors, dtype=float)
        if len(set(m_values)) < 2:
            out[mode] = {"error": "needs at least two values of m"}
            continue
        kind = "score" if metric == "score" else "power"
        boot = theory.bootstrap_fit(m_values, errors, kind=kind, n_boot=200, seed=seed)
        power = theory.bootstrap_fit(m_values, errors, kind="power", n_boot=200, seed=seed)
        m_point, m_lo, m_hi = boot["m_for"](epsilon)
        mp_point, mp_lo, mp_hi = power["m_for"](epsilon)
        p_hat, p_int = power["fit"].p, power["intervals"]["p"]
        p_theory = theory.theory_exponent(problem, "scratch" if mode == "scratch" else "transfer", metric)
        consistent, message = theory.consistent_with_theory(p_hat, p_int, p_theory)
        fit = boot["fit"]
        out[mode] = {"m": _finite(m_point), "m_interval": [_finite(m_lo), _finite(m_hi)],
                     "floor": fit.floor, "A": fit.A, "exponent": p_hat, "exponent_interval": list(p_int),
                     "theory_exponent": p_theory, "consistent": consistent, "message": message,
                     "reachable": bool(np.isfinite(m_point)),
                     # the free-exponent fit: better at extrapolating in benchmarks/predictive_check.py
                     "m_power": _finite(mp_point), "m_power_interval": [_finite(mp_lo), _finite(mp_hi)],
                     "predict": {int(m): boot["predict"](m) for m in (64, 256, 1024)}}
    return out


def diversity_metrics(div: dict) -> dict:
    """The measured diversity constants as MLflow metrics (diversity_inv_nu, diversity_delta, ..., eps_approx)."""
    if not div:
        return {}
    out = {"diversity_inv_nu": div["inv_nu"], "diversity_delta": div["delta"],
           "diversity_delta_cover": div["delta_cover"]}
    out |= {f"diversity_{name}_{end}": v for name in ("inv_nu", "delta")
            for end, v in zip(("lo", "hi"), div[f"{name}_interval"])}
    if div.get("eps_approx") is not None:
        out["eps_approx"] = div["eps_approx"]
    if div.get("k_n"):
        out["r_z"] = div["k_n"]["r_z"]
    return out


def _finite(v):
    return None if v is None or not np.isfinite(v) else float(v)


def sweep_curves(results: dict, metric_key: str) -> dict:
    """From a sweep's results.json: mode -> (sorted m values, errors [seeds, m]) for one metric."""
    curves = {}
    for mode in sorted({r["mode"] for r in results["rows"]}):
        rows = [r for r in results["rows"] if r["mode"] == mode and metric_key in r["metrics"]]
        if not rows:
            continue
        ms = sorted({r["m"] for r in rows})
        seeds = sorted({r["seed"] for r in rows})
        table = np.full((len(seeds), len(ms)), np.nan)
        for r in rows:
            table[seeds.index(r["seed"]), ms.index(r["m"])] = r["metrics"][metric_key]
        keep = ~np.isnan(table).any(axis=0)
        curves[mode] = ([m for m, k in zip(ms, keep) if k], table[:, keep])
    if not curves:
        raise DataError(f"the sweep has no metric {metric_key!r} (use --error)")
    return curves


def log_estimate(cfg: Config, report: EstimateReport, recipe: str, sweep_run: str | None,
                 tracking_uri: str | None) -> str:
    """One MLflow run for the estimate: the answer as metrics, estimate.json, tags naming every run it used."""
    from cdmtransfer.config import flatten
    from cdmtransfer.tracking import TAG, open_tracker, tracked_run

    tracker = open_tracker(cfg, tracking_uri)
    tags = {TAG + "stage": "estimate", TAG + "recipe": cfg.name, TAG + "recipe_path": recipe,
            TAG + "error": report.error, TAG + "epsilon": report.epsilon_text}
    if sweep_run:
        tags[TAG + "sweep_run_id"] = sweep_run
    runs = report.evidence.get("runs", [])
    if runs:
        tags[TAG + "holdout_tasks"] = ",".join(str(r["task"]) for r in runs)
        tags[TAG + "holdout_sweep_runs"] = ",".join(r["sweep_run_id"] for r in runs)
        tags[TAG + "holdout_pretrain_runs"] = ",".join(r["pretrain_run_id"] or "" for r in runs)
    with tracked_run(tracker, f"{cfg.name}-estimate", tags) as run:
        run.log_params(flatten({"inputs": report.inputs, "metric": report.metric, "error": report.error,
                                "epsilon": report.epsilon_text,
                                **{f"holdout.{k}": v for k, v in report.evidence.items() if k != "runs"}}))
        values = {f"m_{mode}": r["m"] for mode, r in report.theory.items() if r["m"] is not None}
        values |= {f"calibrated_m_{mode}": r["m"] for mode, r in report.calibrated.items() if r.get("m")}
        for mode, r in report.predicted.items():
            for name, part in (("predicted", r), ("updated", r.get("updated"))):
                if part and part["m"] is not None:
                    values[f"{name}_m_{mode}"] = part["m"]
                    values |= {f"{name}_m_{mode}_{end}": v for end, v in zip(("lo", "hi"), part["interval"])
                               if v is not None}
        run.log_metrics(values | diversity_metrics(report.diversity), step=0)
        run.log_dict(report.to_dict(), "estimate.json")
        if report.predicted and cfg.tracking.log_artifacts:
            import tempfile

            from cdmtransfer.plots import estimate_band

            with tempfile.TemporaryDirectory() as tmp:
                png = estimate_band(report.predicted, report.error, report.epsilon_text, Path(tmp) / "estimate.png")
                run.log_artifact(png, "plots")
    return run.run_id
