"""Sample-size bounds of Cheng et al. 2025 (theory.md §3-§4), inverted for `estimate`, plus curve calibration.

The paper states rates (≲, Õ), never constants: C, C_P and M_f default to 1, and the log factors follow the
suggestion of theory.md §3.1. Numbers are rates, to be compared across modes or calibrated on measured curves.

Log-factor choices (stated here once; see `iota` and `_tv_logs`):
- Score level: each term's ι counts the samples of the fit it comes from: nK for pre-training (Prop 3.3),
  m for fine-tuning and scratch (Prop 3.2: R = C log^{1/2}(m d_x M_f/δ)), m∧n for the meta target term.
- TV level: log³(m∧n) in Thm C.5 is replaced by its upper bound log³(n). Taken literally, log³(m)·m^{-1/(d_x+d_y+9)}
  rises with m up to m = e^{3(d_x+d_y+9)} > 1e15, so "the smallest m" would mean nothing. Every TV mode (scratch
  too) uses this one factor, so the modes differ only in their rates (§3.1(e) compares them "up to logs").
- `Problem.iota`, when set, replaces every log factor by that constant (1.0 gives the bare rates of §3.1).
Only numpy and the standard library are imported: `estimate` must answer in well under 2 s.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

M_CAP = 10**15  # a required m above this is reported as infeasible
MODES = ("transfer", "meta", "scratch")
METRICS = ("score", "tv")
CAPPED = {("meta", "score"), ("transfer", "tv"), ("meta", "tv")}  # target term uses m∧n
TERM_LABELS = {"approx": "approximation error", "diversity": "diversity Δ", "source": "source term",
               "target": "target term"}


def log_covering(n_params: int, depth: int, width: int, weight_bound: float, n_eff: float) -> float:
    """log N ≈ S·L·log(L·W·(B∨1)·n_eff) for a ReLU class NN(L, W, S, B) (Chen et al. 2022a Lemma 7; theory.md §1.5)."""
    if min(n_params, depth, width, n_eff) < 1 or weight_bound <= 0:
        raise ValueError("log_covering: n_params, depth, width, n_eff must be >= 1 and weight_bound > 0")
    return float(n_params * depth * math.log(depth * width * max(weight_bound, 1.0) * n_eff))


@dataclass(frozen=True)
class Problem:
    """Inputs of the bounds (theory.md §3.1). D_y = raw condition dim, d_y = representation dim (d_y ≤ D_y)."""

    epsilon: float  # target error: L2 score error (metric "score") or E_y TV (metric "tv")
    delta: float  # failure probability
    d_x: int
    d_y: int
    D_y: int
    K: int  # source tasks
    n: int  # samples per source task
    log_NF: float  # log covering number of the score-head class F
    log_NH: float  # log covering number of the encoder class H
    nu: float = 1.0  # task diversity ν (Def 3.1)
    Delta: float = 0.0  # task diversity Δ (Def 3.1)
    eps_approx: float = 0.0  # misspecification ε_approx (Thm 3.4) / ε̃_approx (Thm 3.6)
    C: float = 1.0  # unknown universal constant of the rates
    C_P: float = 1.0  # constant of Prop 3.5 (meta)
    M_f: float = 1.0  # sup-norm bound of the score head, inside the log factor
    iota: Optional[float] = None  # if set, every log factor is this constant

    def __post_init__(self):
        for name in ("d_x", "d_y", "D_y", "K", "n"):  # counts: accept 1e6 from YAML, refuse 2.5
            v = getattr(self, name)
            if not float(v).is_integer():
                raise ValueError(f"Problem.{name} must be an integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        for name in ("epsilon", "d_x", "d_y", "D_y", "K", "n", "nu", "C", "C_P", "M_f"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Problem.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("log_NF", "log_NH", "Delta", "eps_approx"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"Problem.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"Problem.delta must be in (0, 1), got {self.delta!r}")
        if self.iota is not None and not self.iota > 0:
            raise ValueError(f"Problem.iota must be > 0 or None, got {self.iota!r}")


def iota(problem: Problem, m: Optional[float] = None) -> float:
    """ι = log(1/δ) + log³(N·d_x·M_f/δ), N = nK (default, §3.1) or the sample count m of the fit (Prop 3.2).

    The log³ argument is floored at e³: log³(x)/x rises below e³, and the floor (which only raises ι) keeps ι(m)/m
    non-increasing, so every score bound is monotone in m.
    """
    if problem.iota is not None:
        return problem.iota
    N = float(problem.n) * problem.K if m is None else float(m)
    x = max(N * problem.d_x * problem.M_f / problem.delta, math.e**3)
    return math.log(1 / problem.delta) + math.log(x) ** 3


def _tv_logs(p: Problem) -> tuple[float, float]:
    """(m-term, source-term) log factors of Thm C.5: log^{5/2}(nK/δ)·log³(n∨e) [≥ log³(m∧n)], log²(nK/δ)."""
    if p.iota is not None:
        return p.iota, p.iota
    L = math.log(float(p.n) * p.K / p.delta)
    return L**2.5 * math.log(max(p.n, math.e)) ** 3, L**2


def _check(mode: str, metric: str):
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def bound_terms(problem: Problem, m: float, mode: str = "transfer", metric: str = "score",
                capped: bool = True) -> dict[str, float]:
    """Each term of the bound at m, by name (see TERM_LABELS). capped=False drops the m∧n cap (used internally)."""
    _check(mode, metric)
    if not m >= 1:
        raise ValueError(f"m must be >= 1, got {m!r}")
    p, m = problem, float(m)
    mn = min(m, p.n) if capped and (mode, metric) in CAPPED else m
    nK = float(p.n) * p.K
    if metric == "score":
        if mode == "transfer":  # Thm 3.4: ν⁻¹(ε_approx + r_z) + Δ + r_x
            return {"approx": p.eps_approx / p.nu,
                    "source": p.C * iota(p) * (p.K * p.log_NF + p.log_NH) / (nK * p.nu),
                    "diversity": p.Delta,
                    "target": p.C * iota(p, m) * p.log_NF / m}
        if mode == "meta":  # Thm 3.6: ε̃_approx + log N_F/(m∧n) + C_P(log N_H + log(1/δ))/K
            return {"approx": p.eps_approx,
                    "source": p.C_P * iota(p) * (p.log_NH + math.log(1 / p.delta)) / p.K,
                    "target": p.C * iota(p, mn) * p.log_NF / mn}
        return {"approx": p.eps_approx,  # Thm 3.4, scratch: ε_approx + (log N_F + log N_H)/m
                "target": p.C * iota(p, m) * (p.log_NF + p.log_NH) / m}
    L_m, L_src = _tv_logs(p)
    if mode == "scratch":  # §3.1(e): m^{-1/(d_x+D_y+9)}
        return {"target": p.C * L_m * m ** (-1 / (p.d_x + p.D_y + 9))}
    n_src = nK if mode == "transfer" else float(p.K)  # Thm 4.2: (nK)^{-1/(D_y+2)}; Thm 4.3: K^{-1/(D_y+2)}
    return {"target": p.C * L_m * mn ** (-1 / (p.d_x + p.d_y + 9)),
            "source": p.C * L_src * n_src ** (-1 / (p.D_y + 2))}


def bound(problem: Problem, m: float, mode: str = "transfer", metric: str = "score") -> float:
    """Upper bound on the target error with m target samples (sum of `bound_terms`)."""
    return sum(bound_terms(problem, m, mode, metric).values())


def theory_exponent(problem: Problem, mode: str = "transfer", metric: str = "score") -> float:
    """Exponent p of the m-rate m^{-p}: 1 at score level; 1/(d_x+d_y+9) (Thm 4.2/4.3) or 1/(d_x+D_y+9) for TV."""
    _check(mode, metric)
    if metric == "score":
        return 1.0
    return 1 / (problem.d_x + (problem.D_y if mode == "scratch" else problem.d_y) + 9)


# ---------------------------------------------------------------- inversion (theory.md §3.1 a-e)

@dataclass
class Estimate:
    """Smallest m with bound(m) ≤ ε, or why there is none. terms are at m (or at m = 1e15 when infeasible).

    needed (infeasible only): "min_epsilon" (the smallest bound reachable with m ≤ 1e15), and where sources can
    help, "n" / "K": the smallest value (search from the current one) that makes the problem feasible; for a source
    block it also brings the source term to half of the budget left by the other m-independent terms. None if no
    value up to 1e15 does.
    """

    m: Optional[int]
    feasible: bool
    reason: str
    dominant_term: str
    terms: dict = field(default_factory=dict)
    needed: dict = field(default_factory=dict)


def _first_true(pred: Callable[[int], bool], lo: int, cap: int = M_CAP) -> Optional[int]:
    """Smallest k in (lo, cap] with pred(k), given pred(lo) is False: doubling, then bisection. None if not found.

    Invariant: pred(lo) False, pred(hi) True, so the result k always has pred(k) and not pred(k-1).
    """
    hi = min(max(2 * lo, lo + 1), cap)
    while not pred(hi):
        if hi >= cap:
            return None
        lo, hi = hi, min(2 * hi, cap)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if pred(mid) else (mid, hi)
    return hi


def _feasible(p: Problem, mode: str, metric: str) -> bool:
    return bound(p, M_CAP, mode, metric) <= p.epsilon  # bounds are non-increasing in m


def _needed_sources(p: Problem, mode: str, metric: str, fixed: dict) -> dict:
    """Smallest n, then K, with source term ≤ half the budget left by the other fixed terms, and feasible."""
    budget = p.epsilon - sum(v for k, v in fixed.items() if k != "source")
    out = {}
    for name in ("n", "K"):
        def ok(v, name=name):
            q = dataclasses.replace(p, **{name: v})
            return bound_terms(q, 1, mode, metric)["source"] <= budget / 2 and _feasible(q, mode, metric)
        out[name] = _first_true(ok, getattr(p, name)) if budget > 0 else None
    return out


def required_m(problem: Problem, mode: str = "transfer", metric: str = "score") -> Estimate:
    """Invert the bound: smallest integer m ≤ 1e15 with bound(m) ≤ ε (theory.md §3.1 a-e).

    The bounds are non-increasing in m, so a doubling + bisection search on the bound itself is exact (it
    returns m with bound(m) ≤ ε < bound(m-1)); it agrees with §3.1's closed forms when ι is fixed.
    """
    p, eps = problem, problem.epsilon
    best = bound_terms(p, M_CAP, mode, metric)
    fixed = {k: v for k, v in best.items() if k != "target"}
    needed = {"min_epsilon": sum(best.values())}
    if sum(fixed.values()) >= eps:  # m-independent terms alone reach ε
        block = sorted(fixed, key=fixed.get, reverse=True)
        names = ", ".join(f"{TERM_LABELS[k]} {fixed[k]:.3g}" for k in block if fixed[k] > 0)
        if "source" in fixed:
            needed.update(_needed_sources(p, mode, metric, fixed))
        reason = f"m-independent terms already reach ε = {eps:g} ({names}); no number of target samples helps"
        if "n" in needed:
            helps = " or ".join(f"{k} >= {needed[k]}" for k in ("n", "K") if needed[k] is not None)
            reason += f"; more source data would: {helps}" if helps else "; nor would any n or K up to 1e15"
        return Estimate(None, False, reason, block[0], best, needed)
    if sum(best.values()) > eps:
        uncapped = bound_terms(p, M_CAP, mode, metric, capped=False)
        if (mode, metric) in CAPPED and sum(uncapped.values()) <= eps:  # the m∧n cap binds: n is too small
            needed["n"] = _first_true(lambda v: _feasible(dataclasses.replace(p, n=v), mode, metric), p.n)
            reason = (f"n = {p.n} source samples per task is too small: the target term is capped at m∧n, so the "
                      f"bound cannot drop below {needed['min_epsilon']:.3g} > ε = {eps:g}; needs n >= {needed['n']}"
                      + (" (None: no n up to 1e15)" if needed["n"] is None else ""))
        else:
            reason = f"needs more than 1e15 samples (bound at m = 1e15 is {needed['min_epsilon']:.3g} > ε = {eps:g})"
        return Estimate(None, False, reason, "target", best, needed)
    ok = lambda k: bound(p, k, mode, metric) <= eps  # noqa: E731
    m = 1 if ok(1) else _first_true(ok, 1)
    terms = bound_terms(p, m, mode, metric)
    return Estimate(m, True, "", max(terms, key=terms.get), terms, {})


def saving(problem: Problem, metric: str = "score", mode: str = "transfer") -> Optional[float]:
    """m_scratch / m_mode (§3.1(a), (e)); None unless both are feasible."""
    s, t = required_m(problem, "scratch", metric), required_m(problem, mode, metric)
    return s.m / t.m if s.feasible and t.feasible else None


# ---------------------------------------------------------------- calibration on measured learning curves

@dataclass(frozen=True)
class Fit:
    """err(m) ≈ floor + A·m^{-p}; p = 1 for score-level curves (Thm 3.4: A = C·ι·complexity)."""

    floor: float
    A: float
    p: float = 1.0
    rms: float = 0.0  # root-mean-square residual, in the units of err

    def predict(self, m):
        return self.floor + self.A * np.asarray(m, dtype=float) ** (-self.p)

    def m_for(self, eps: float) -> float:
        """Analytic inverse of predict: (A/(ε - floor))^{1/p}; inf if ε ≤ floor (unreachable)."""
        return math.inf if eps <= self.floor else (self.A / (eps - self.floor)) ** (1 / self.p)


def _nnls2(x, e, w):
    """min Σ w(e - f - A x)² over f, A ≥ 0, exactly; batched (broadcast) over the leading axes; sums over the last.

    Convex with box constraints: the optimum is the unconstrained one if feasible, else on an edge f = 0 or A = 0.
    """
    x, e, w = np.broadcast_arrays(x, e, w)
    Sw, Se, Sx = w.sum(-1), (w * e).sum(-1), (w * x).sum(-1)
    Sxx, Sxe = (w * x * x).sum(-1), (w * x * e).sum(-1)
    det = Sw * Sxx - Sx**2
    with np.errstate(divide="ignore", invalid="ignore"):
        A_u = (Sw * Sxe - Sx * Se) / det  # normal equations
        f_u = (Se - A_u * Sx) / Sw
        A_0 = np.maximum(Sxe / Sxx, 0.0)  # edge f = 0
    f_0, zero = np.maximum(Se / Sw, 0.0), np.zeros_like(Sw)  # edge A = 0
    cands = [(f_u, A_u), (zero, A_0), (f_0, zero)]
    sse = np.stack([(w * (e - f[..., None] - A[..., None] * x) ** 2).sum(-1) for f, A in cands])
    sse[0] = np.where((det > 1e-12 * Sw * Sxx) & (f_u >= 0) & (A_u >= 0), sse[0], np.inf)
    i = np.argmin(sse, axis=0)
    pick = lambda vals: np.take_along_axis(np.stack(vals), i[None], 0)[0]  # noqa: E731
    return pick([c[0] for c in cands]), pick([c[1] for c in cands]), pick(list(sse))


def _fit_power_batch(m, E, W, p_range=(0.01, 3.0)):
    """Rows of E ≈ floor + A·m^{-p}: grid over p, then golden-section refinement around each row's best grid point."""
    grid = np.linspace(p_range[0], p_range[1], 300)
    sse = _nnls2(m ** -grid[:, None], E[:, None, :], W[:, None, :])[2]  # [B, grid]
    j = np.argmin(sse, axis=1)
    a, b = grid[np.maximum(j - 1, 0)], grid[np.minimum(j + 1, len(grid) - 1)]
    obj = lambda q: _nnls2(m ** -q[:, None], E, W)[2]  # noqa: E731
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = obj(c), obj(d)
    for _ in range(30):  # golden-section search, bracket shrinks by 0.618 per step
        left = fc < fd  # minimum in [a, d]
        a, b = np.where(left, a, c), np.where(left, d, b)
        c, d = np.where(left, b - g * (b - a), d), np.where(left, c, a + g * (b - a))
        new = obj(np.where(left, c, d))
        fc, fd = np.where(left, new, fd), np.where(left, fc, new)
    mid = (a + b) / 2
    p = np.where(obj(mid) <= sse[np.arange(len(j)), j], mid, grid[j])
    f, A, _ = _nnls2(m ** -p[:, None], E, W)
    return f, A, p


def _prepare(m, err, relative: bool, min_distinct: int):
    m, e = np.asarray(m, dtype=float).ravel(), np.asarray(err, dtype=float)
    if e.shape[-1:] != m.shape or not (np.all(np.isfinite(m)) and np.all(np.isfinite(e))) or np.any(m <= 0):
        raise ValueError("m and err must be finite arrays of the same length, with m > 0")
    if len(np.unique(m)) < min_distinct:
        raise ValueError(f"need at least {min_distinct} distinct values of m to fit, got {len(np.unique(m))}")
    if relative and np.any(e <= 0):
        raise ValueError("relative fit needs err > 0 (pass relative=False)")
    return m, e, (1 / e**2 if relative else np.ones_like(e))  # relative: weights 1/err² (multiplicative noise)


def _make_fit(m, e, f, A, p) -> Fit:
    fit = Fit(float(f), float(A), float(p))
    return dataclasses.replace(fit, rms=float(np.sqrt(np.mean((e - fit.predict(m)) ** 2))))


def fit_score_curve(m, err, relative: bool = True) -> Fit:
    """err ≈ floor + A/m with floor, A ≥ 0 (Thm 3.4 shape); relative=True weights residuals by 1/err²."""
    m, e, w = _prepare(np.ravel(m), np.ravel(err), relative, 2)
    f, A, _ = _nnls2(1 / m, e, w)
    return _make_fit(m, e, f, A, 1.0)


def fit_power_law(m, err, relative: bool = True, p_range=(0.01, 3.0)) -> Fit:
    """err ≈ floor + A·m^{-p} (TV-type curves; p is the empirical exponent), p searched in p_range."""
    m, e, w = _prepare(np.ravel(m), np.ravel(err), relative, 3)
    f, A, p = _fit_power_batch(m, e[None], w[None], p_range)
    return _make_fit(m, e, f[0], A[0], p[0])


def _interval(values) -> tuple[float, float]:
    """2.5/97.5 percentiles; with infinities, take sample values instead of interpolating (inf - inf)."""
    v = np.asarray(values, dtype=float)
    method = "linear" if np.all(np.isfinite(v)) else "inverted_cdf"
    lo, hi = np.percentile(v, [2.5, 97.5], method=method)
    return float(lo), float(hi)


def bootstrap_fit(m_values, errors_by_seed, kind: str = "score", n_boot: int = 200, seed: int = 0,
                  relative: bool = True) -> dict:
    """Seed bootstrap of a learning-curve fit. errors_by_seed: [n_seeds, n_m]; curves are fitted on per-m means.

    Each replicate resamples the seeds with replacement independently for each m. Returns {"fit": point Fit,
    "samples": {floor, A, p: arrays}, "intervals": {floor, A, p: (2.5%, 97.5%)}, "predict": m -> (point, lo, hi),
    "m_for": eps -> (point, lo, hi)} (m_for is inf where eps ≤ floor).
    """
    if kind not in ("score", "power"):
        raise ValueError(f"unknown kind {kind!r}; expected 'score' or 'power'")
    E = np.asarray(errors_by_seed, dtype=float)
    if E.ndim != 2 or E.shape[1] != np.size(m_values):
        raise ValueError(f"errors_by_seed must have shape [n_seeds, {np.size(m_values)}], got {E.shape}")
    m = np.asarray(m_values, dtype=float).ravel()
    point = (fit_score_curve if kind == "score" else fit_power_law)(m, E.mean(0), relative=relative)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, E.shape[0], size=(n_boot, E.shape[0], len(m)))
    m, means, W = _prepare(m, E[idx, np.arange(len(m))].mean(1), relative, 2 if kind == "score" else 3)
    if kind == "score":
        f, A, _ = _nnls2(1 / m, means, W)
        p = np.ones(n_boot)
    else:
        f, A, p = _fit_power_batch(m, means, W)
    samples = {"floor": f, "A": A, "p": p}

    def predict(at):
        return (float(point.predict(at)), *_interval(f + A * float(at) ** -p))

    def m_for(eps):
        with np.errstate(divide="ignore", invalid="ignore"):
            vals = np.where(eps > f, (A / (eps - f)) ** (1 / p), np.inf)
        return (point.m_for(eps), *_interval(vals))

    return {"fit": point, "samples": samples, "intervals": {k: _interval(v) for k, v in samples.items()},
            "predict": predict, "m_for": m_for}


def consistent_with_theory(p_hat: float, p_interval: tuple[float, float], p_theory: float) -> tuple[bool, str]:
    """Does the theory's exponent (1 at score level; 1/(d_x+d_y+9) for TV) lie in the bootstrap interval of p?"""
    lo, hi = p_interval
    head = f"fitted exponent {p_hat:.3g} (95% interval [{lo:.3g}, {hi:.3g}]); theory {p_theory:.3g}"
    if lo <= p_theory <= hi:
        return True, head + ": consistent"
    if p_theory < lo:
        return False, head + ": the curve decays faster than the bound's rate (the bound holds but is loose)"
    return False, head + ": the curve decays slower than the bound's rate (pre-asymptotic, or assumptions fail)"
