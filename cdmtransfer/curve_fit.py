"""Learning-curve statistics for `estimate` (numpy and the standard library only).

Per task j, the mean error over seeds at each m is modelled as (theory.md §3, Thm 3.4: ν⁻¹(ε_approx + r_z) + Δ + r_x)
    ē_j(m) = floor_j + A_j·m^(−p) + noise,   sd(noise) = s·ē_j(m)/√seeds   (relative noise: weights seeds/ē²)
with p = 1 (the score-level rate of Prop 3.2 / Thm 3.4) or one free p shared by the tasks of a mode (same network,
same estimator). floor_j, A_j ≥ 0 by exact box-constrained least squares (theory._nnls2); the shape is chosen by
leave-one-point-out error, never assumed.
Pooling (random effects, method of moments): θ_j = (floor_j, A_j) = μ + task deviation (cov T) + fit noise (cov V_j,
weighted-LS covariance with the pooled residual variance s²). A new task's fitted θ is predicted as
    θ_new ~ μ̂ + t_{L−1}(0, (T̂ + V̄)(1 + 1/L)),   T̂ = diag(S − V̄)₊, S the across-task covariance:
T covers task-to-task spread, V̄ seed noise and misfit, 1/L the uncertainty of μ̂, the t its estimation from L tasks
(T is diagonal: a floor–amplitude correlation across tasks is not estimable from a few of them).
A new task's own points update this prior by importance resampling of its draws (`update`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from statistics import NormalDist

import numpy as np

from cdmtransfer.theory import _nnls2

P_GRID = np.round(np.arange(0.10, 2.5001, 0.01), 2)  # free exponents searched
DRAWS = 20000  # predictive draws for quantiles of m(ε)


@dataclass(frozen=True)
class Curve:
    """One task's measured curve: distinct m, the mean error over seeds at each, and how many seeds."""

    m: np.ndarray
    mean: np.ndarray
    seeds: np.ndarray

    @staticmethod
    def of(m_values, errors) -> "Curve":
        """From errors [seeds, len(m)] (NaN where a cell is missing); columns with no value are dropped."""
        E = np.atleast_2d(np.asarray(errors, dtype=float))
        count = np.isfinite(E).sum(0)
        keep = count > 0
        with np.errstate(invalid="ignore"):
            mean = np.nansum(np.where(np.isfinite(E), E, 0.0), 0) / np.maximum(count, 1)
        m = np.asarray(m_values, dtype=float)
        if np.any(m <= 0) or np.any(mean[keep] <= 0):
            raise ValueError("curves need m > 0 and errors > 0")
        return Curve(m[keep], mean[keep], count[keep].astype(float))

    def drop(self, i: int) -> "Curve":
        keep = np.arange(len(self.m)) != i
        return Curve(self.m[keep], self.mean[keep], self.seeds[keep])


@dataclass(frozen=True)
class Epsilon:
    """The error to reach: `absolute` (err ≤ value), `excess` (err − floor ≤ value) or `relative` (err ≤ (1+value)·floor)."""

    value: float
    kind: str = "absolute"

    @staticmethod
    def parse(text: str, over_floor: bool = False) -> "Epsilon":
        """'0.3' (absolute, or an excess over the floor with over_floor) or '10%' (relative to the floor)."""
        s = str(text).strip()
        try:
            value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
        except ValueError:
            raise ValueError(f"epsilon {text!r}: expected a number (0.3) or a percentage of the floor (10%)") from None
        if not value > 0 or not math.isfinite(value):
            raise ValueError(f"epsilon {text!r} must be > 0")
        if s.endswith("%"):
            return Epsilon(value, "relative")
        return Epsilon(value, "excess" if over_floor else "absolute")

    def text(self) -> str:
        return {"absolute": f"{self.value:g}", "excess": f"floor + {self.value:g}",
                "relative": f"floor × {1 + self.value:g}"}[self.kind]


def m_for(floor, A, p: float, eps: Epsilon) -> np.ndarray:
    """Smallest m (≥ 1) with floor + A·m^(−p) ≤ ε, per element; inf where no m reaches it."""
    floor, A = np.maximum(np.asarray(floor, float), 0.0), np.maximum(np.asarray(A, float), 1e-300)
    if eps.kind == "absolute":
        gap = eps.value - floor
    elif eps.kind == "excess":
        gap = np.full_like(floor, eps.value)
    else:
        gap = eps.value * floor
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        m = np.where(gap > 0, (A / np.where(gap > 0, gap, 1.0)) ** (1 / p), np.inf)
    return np.maximum(m, 1.0)


# ---------------------------------------------------------------- fitting tasks with a shared exponent

def _stack(curves: list[Curve]):
    """Padded arrays [L, n_max] of m, mean error and weight (0 on padding)."""
    n = max(len(c.m) for c in curves)
    M, E, W = np.ones((len(curves), n)), np.ones((len(curves), n)), np.zeros((len(curves), n))
    for j, c in enumerate(curves):
        k = len(c.m)
        M[j, :k], E[j, :k], W[j, :k] = c.m, c.mean, c.seeds / c.mean**2
    return M, E, W


@dataclass
class TaskFits:
    """Fits of L tasks with one exponent: θ [L, 2] = (floor, A), their covariances [L, 2, 2], residual variance s²."""

    p: float
    free: bool  # p fitted (True) or fixed at 1
    theta: np.ndarray
    cov: np.ndarray
    s2: float  # pooled relative residual variance per seed
    sse: float
    dof: int = 0  # degrees of freedom of s2

    def predict(self, j: int, m) -> np.ndarray:
        return self.theta[j, 0] + self.theta[j, 1] * np.asarray(m, float) ** -self.p


def fit_tasks(curves: list[Curve], p: float | None = 1.0) -> TaskFits:
    """floor_j + A_j·m^(−p) for every task; p=None fits one exponent shared by the tasks (grid of 0.01)."""
    if not curves or any(len(c.m) < 2 for c in curves):
        raise ValueError("every task needs at least two values of m")
    M, E, W = _stack(curves)
    if p is None:
        sse = _nnls2(M[None] ** -P_GRID[:, None, None], E[None], W[None])[2].sum(1)  # [grid]
        p_hat = float(P_GRID[int(np.argmin(sse))])
    else:
        p_hat = float(p)
    f, A, sse = _nnls2(M ** -p_hat, E, W)
    n_points = sum(len(c.m) for c in curves)
    dof = n_points - 2 * len(curves) - (p is None)
    s2 = float(sse.sum() / dof) if dof > 0 else math.nan
    theta = np.stack([f, A], 1)
    cov = np.empty((len(curves), 2, 2))
    for j in range(len(curves)):
        x = np.stack([np.ones_like(M[j]), M[j] ** -p_hat], 1)
        info = x.T @ (W[j, :, None] * x)
        cov[j] = (s2 if math.isfinite(s2) else 0.0) * np.linalg.pinv(info)
    return TaskFits(p_hat, p is None, theta, cov, s2, float(sse.sum()), max(dof, 0))


def leave_one_point_out(curves: list[Curve], free: bool) -> float:
    """RMS of log(predicted / measured) for each point left out in turn and predicted by a refit on the rest
    (the exponent refitted too when free). nan when no point can be left out (a task would keep < 3 points)."""
    need = 4 if free else 3
    errs = []
    for j, c in enumerate(curves):
        if len(c.m) < need:
            continue
        for i in range(len(c.m)):
            rest = curves[:j] + [c.drop(i)] + curves[j + 1:]
            fit = fit_tasks(rest, None if free else 1.0)
            errs.append(math.log(max(float(fit.predict(j, c.m[i])), 1e-300) / c.mean[i]))
    return float(np.sqrt(np.mean(np.square(errs)))) if errs else math.nan


def choose_shape(curves: list[Curve]) -> tuple[TaskFits, dict]:
    """The shape (p = 1 or a shared free p) with the lower leave-one-point-out error; ties and nan keep p = 1."""
    scores = {"p=1": leave_one_point_out(curves, free=False), "free p": leave_one_point_out(curves, free=True)}
    free = math.isfinite(scores["free p"]) and (not math.isfinite(scores["p=1"]) or scores["free p"] < scores["p=1"])
    return fit_tasks(curves, None if free else 1.0), scores


# ---------------------------------------------------------------- the predictive for a new task

def t_quantile(q: float, df: float) -> float:
    """Student-t quantile: exact for df = 1, 2; Cornish–Fisher (Abramowitz & Stegun 26.7.5) for df ≥ 3."""
    if not math.isfinite(df):
        return NormalDist().inv_cdf(q)
    if df == 1:
        return math.tan(math.pi * (q - 0.5))
    if df == 2:
        return (2 * q - 1) / math.sqrt(2 * q * (1 - q))
    z = NormalDist().inv_cdf(q)
    g = [(z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96, (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
         (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160]
    return z + sum(gi / df ** (i + 1) for i, gi in enumerate(g))


@dataclass
class Predictive:
    """θ = (floor, A) of a curve floor + A·m^(−p): mean + multivariate t (df) with scale matrix `cov`."""

    p: float
    mean: np.ndarray
    cov: np.ndarray
    df: float = math.inf
    parts: dict = field(default_factory=dict)  # for reports: task_cov, noise_cov, tasks
    independent: bool = False  # independent t marginals (diagonal scale) instead of one multivariate t
    samples: np.ndarray | None = None  # a posterior given as draws (update); replaces the parametric form

    def draws(self, n: int = DRAWS, seed: int = 0) -> np.ndarray:
        if self.samples is not None:
            return self.samples.copy()
        rng = np.random.default_rng(seed)
        if self.independent:  # one t per parameter: each variance was estimated on its own
            z = rng.standard_normal((n, 2)) * np.sqrt(np.diag(self.cov))
            scale = (rng.chisquare(self.df, size=(n, 2)) / self.df) if math.isfinite(self.df) else np.ones((n, 2))
            return self.mean + z / np.sqrt(scale)
        z = rng.multivariate_normal(np.zeros(2), self.cov, size=n, method="eigh")
        if math.isfinite(self.df):
            z = z / np.sqrt(rng.chisquare(self.df, size=n) / self.df)[:, None]
        return self.mean + z

    def m_interval(self, eps: Epsilon, level: float = 0.8, seed: int = 0, n: int = DRAWS) -> dict:
        """Median and central `level` interval of the m that reaches ε, and the share of draws that never reach it."""
        th = self.draws(n, seed)
        m = m_for(th[:, 0], th[:, 1], self.p, eps)
        lo, mid, hi = np.quantile(m, [(1 - level) / 2, 0.5, (1 + level) / 2], method="inverted_cdf")
        return {"m": _num(mid), "interval": [_num(lo), _num(hi)], "p_unreachable": float(np.mean(np.isinf(m))),
                "level": level}

    def band(self, m, level: float = 0.8, seed: int = 0) -> np.ndarray:
        """[3, len(m)]: lower, median and upper `level` quantiles of floor + A·m^(−p) (floor, A clipped at 0)."""
        th = np.maximum(self.draws(seed=seed), 0.0)
        curves = th[:, :1] + th[:, 1:] * np.asarray(m, float)[None] ** -self.p
        return np.quantile(curves, [(1 - level) / 2, 0.5, (1 + level) / 2], axis=0)


def _num(v) -> float | None:
    return None if not np.isfinite(v) else float(v)


def pool(fits: TaskFits) -> Predictive:
    """The predictive of a new task's fitted θ from L tasks' fits (module docstring); df = L − 1 (∞ for L = 1)."""
    L = len(fits.theta)
    V = fits.cov.mean(0)
    S = np.cov(fits.theta.T, ddof=1) if L >= 2 else np.zeros((2, 2))
    T = np.diag(np.maximum(np.diag(S - V), 0.0))  # a correlation is not estimable from a few tasks
    cov = (T + V) * (1 + 1 / L)
    return Predictive(fits.p, fits.theta.mean(0), cov, L - 1.0 if L >= 2 else math.inf,
                      {"task_cov": T, "noise_cov": V, "tasks": L})


def update(prior: Predictive, target: Curve, s2: float, s2_dof: float = math.inf, n_draws: int = 200000, seed: int = 0,
           level: float = 0.8) -> tuple[Predictive, dict]:
    """Condition the prior on a new task's own points: importance resampling of prior draws by their likelihood.

    Exact for the model up to Monte Carlo error, heavy t tails included (a Gaussian stand-in for the t prior
    under-covers with few source tasks). Each point ē_i has variance s²·ē_i²/seeds_i; s² estimated with s2_dof
    degrees of freedom makes the likelihood a multivariate t. Weights: the share of each
    parameter's uncertainty the target's points remove, 1 − (posterior / prior width of the central `level`
    interval)², and their mean ("target"); ess is the effective number of prior draws behind the posterior.
    """
    prior = replace(prior, independent=True)  # per-parameter t: one well-measured parameter must not pin the other
    th = prior.draws(n_draws, seed)
    th[:, 0] = np.maximum(th[:, 0], 0.0)
    th[:, 1] = np.maximum(th[:, 1], 0.0)
    pred = th[:, :1] + th[:, 1:] * target.m[None] ** -prior.p  # [draws, points]
    noise = s2 * target.mean**2 / target.seeds
    chi2 = ((pred - target.mean) ** 2 / noise).sum(1)
    if math.isfinite(s2_dof) and s2_dof > 0:  # s² estimated with s2_dof degrees of freedom: multivariate t
        loglik = -0.5 * (s2_dof + len(target.m)) * np.log1p(chi2 / s2_dof)
    else:
        loglik = -0.5 * chi2
    w = np.exp(loglik - loglik.max())
    w /= w.sum()
    ess = float(1 / np.sum(w**2))
    pick = np.random.default_rng(seed + 1).choice(n_draws, size=DRAWS, p=w)
    post = replace(prior, df=math.inf, samples=th[pick], parts={**prior.parts, "updated": True, "ess": ess})
    q = [(1 - level) / 2, (1 + level) / 2]

    def width(x):
        lo, hi = np.quantile(x, q)
        return hi - lo

    weights = {name: float(1 - (width(post.samples[:, i]) / max(width(th[:, i]), 1e-300)) ** 2)
               for i, name in enumerate(("floor", "A"))}
    weights["target"] = (weights["floor"] + weights["A"]) / 2
    weights["sources"] = 1 - weights["target"]
    return post, {**weights, "ess": ess}


def leave_one_task_out(curves: list[Curve], eps: Epsilon, free: bool, level: float = 0.8) -> list[dict]:
    """Each task's m(ε) (from its own fit) against the interval predicted by pooling the others (L ≥ 3)."""
    if len(curves) < 3:
        return []
    own = fit_tasks(curves, None if free else 1.0)
    out = []
    for j in range(len(curves)):
        others = fit_tasks(curves[:j] + curves[j + 1:], None if free else 1.0)
        pred = pool(others).m_interval(eps, level)
        truth = float(m_for(own.theta[j, 0], own.theta[j, 1], own.p, eps))
        lo, hi = (v if v is not None else math.inf for v in pred["interval"])
        point = pred["m"] if pred["m"] is not None else math.inf
        ratio = math.log2(point / truth) if math.isfinite(point) and math.isfinite(truth) else None
        out.append({"task": j, "m_own": _num(truth), "m_predicted": pred["m"], "interval": pred["interval"],
                    "log2_ratio": ratio, "covered": bool(lo <= truth <= hi)})
    return out
