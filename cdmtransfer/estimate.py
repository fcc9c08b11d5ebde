"""`cdmtransfer estimate`: how many target samples for error ε, from the theory's bounds and from measured curves.

Theory (theory.md §3, §3.1): the recipe gives d_x, D_y, d, K, n and the network sizes, which give the complexity
terms log N_F (score head) and log N_H (encoder); theory.required_m inverts each bound for m. The paper states rates
with unknown constants, so uncalibrated answers are orders of magnitude, not predictions.
Calibrated (`--calibrate SWEEP_RUN`): fit err(m) ≈ floor + A/m (the rate of Thm 3.4 / Prop 3.2) to a sweep's measured
curve per mode, with bootstrap intervals over seeds, and invert the fit for m. Imports numpy only (torch only to read
a `file` suite's data with the training loader), so an answer takes well under two seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cdmtransfer import theory
from cdmtransfer.config import Config
from cdmtransfer.errors import ConfigError, DataError


def mlp_params(widths: list[int]) -> int:
    """Weights + biases of an MLP with the given layer widths."""
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def suite_dims(cfg: Config) -> dict:
    """d_x, D_y, K and n of the recipe's suite, without building it (and without torch)."""
    s = cfg.suite
    if s.name in ("gaussian", "langevin", "lsgmm"):
        sub = getattr(s, s.name)
        return {"d_x": sub.d_x, "D_y": sub.D_y, "K": s.K, "n": s.n}
    if s.name != "file":
        raise ConfigError(f"estimate: the theory's sizes are defined for the gaussian, langevin, lsgmm and file "
                          f"suites, not '{s.name}'")
    from cdmtransfer.tasks import files  # the same readers and checks as training (imports torch: file suite only)

    f = s.file
    path = Path(f.path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: data file not found (suite.file.path)")
    if path.suffix == ".csv":
        x, y, task = files.read_csv(path, f.x_columns, f.y_columns, f.task_column)
    else:
        x, y, task = files.read_npz(path)
    x, y, task = files.validate(path, x, y, task)
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
    epsilon: float
    metric: str
    inputs: dict
    theory: dict  # mode -> Estimate as dict
    saving: float | None
    calibrated: dict = field(default_factory=dict)  # mode -> fit summary and m for ε with interval
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"epsilon": self.epsilon, "metric": self.metric, "inputs": self.inputs, "theory": self.theory,
                "saving": self.saving, "calibrated": self.calibrated, "notes": self.notes}


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


def estimate(cfg: Config, epsilon: float, *, delta: float = 0.1, modes=("transfer", "scratch"),
             metric: str = "score", overrides: dict | None = None, calibration: dict | None = None,
             seed: int = 0) -> EstimateReport:
    problem, inputs = build_problem(cfg, epsilon, delta, overrides or {})
    results = {}
    for mode in modes:
        est = theory.required_m(problem, mode, metric)
        results[mode] = {"m": est.m, "feasible": est.feasible, "reason": est.reason,
                         "dominant_term": theory.TERM_LABELS.get(est.dominant_term, est.dominant_term),
                         "terms": est.terms, "needed": est.needed}
    ratio = theory.saving(problem, metric) if {"transfer", "scratch"} <= set(modes) else None
    notes = ["theory: rates with unknown constants (C = %g%s); read them as orders of magnitude"
             % (problem.C, ", log factors replaced by %g" % problem.iota if problem.iota is not None else "")]
    report = EstimateReport(epsilon, metric, inputs, results, ratio, notes=notes)
    if calibration:
        report.calibrated = calibrate(calibration, epsilon, problem, metric, seed=seed)
    return report


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
        raise DataError(f"the sweep has no metric {metric_key!r} (use --calibrate-metric)")
    return curves
