"""Tests of cdmtransfer.theory: bounds of Cheng et al. 2025 (theory.md §3-§4), their inversion, and calibration."""

import ast
import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from cdmtransfer import theory as th
from cdmtransfer.theory import Problem, bound, bound_terms, required_m

CASES = [(mode, metric) for mode in th.MODES for metric in th.METRICS]
INF = math.inf


def problem(mode="transfer", metric="score", logs=False, **kw) -> Problem:
    """A feasible problem for each (mode, metric): bare rates (iota=1) or the paper's log factors with small C."""
    base = dict(delta=0.05, d_x=2, d_y=1, D_y=6, K=10**5 if mode == "meta" else 20, n=10**6,
                log_NF=10.0, log_NH=1000.0, epsilon=0.05 if metric == "score" else 0.6)
    if not logs:
        base["iota"] = 1.0
    elif metric == "score":
        base.update(C=1e-3, C_P=1e-4)
    else:
        base.update(C=1e-7 if mode == "meta" else 3e-7)
    base.update(kw)
    return Problem(**base)


def m_or_inf(est):
    return est.m if est.feasible else INF


# ---------------------------------------------------------------- complexity terms and log factors

def test_log_covering_formula():
    assert th.log_covering(1000, 3, 64, 2.0, 1e4) == pytest.approx(1000 * 3 * math.log(3 * 64 * 2.0 * 1e4))
    assert th.log_covering(1000, 3, 64, 0.5, 1e4) == pytest.approx(1000 * 3 * math.log(3 * 64 * 1.0 * 1e4))  # B∨1
    with pytest.raises(ValueError):
        th.log_covering(0, 3, 64, 1.0, 10)


def test_iota_formula_floor_and_override():
    p = problem(logs=True, d_x=3, M_f=2.0)
    nK = p.n * p.K
    assert th.iota(p) == pytest.approx(math.log(20) + math.log(nK * 3 * 2.0 / 0.05) ** 3)
    assert th.iota(p, 100) == pytest.approx(math.log(20) + math.log(100 * 3 * 2.0 / 0.05) ** 3)
    tiny = problem(logs=True, d_x=1, delta=0.5)  # m·d_x/δ = 2 < e³: floored at e³
    assert th.iota(tiny, 1) == pytest.approx(math.log(2) + 27)
    assert th.iota(problem(iota=2.5), 7) == 2.5


def test_problem_validation_names_field():
    with pytest.raises(ValueError, match="epsilon"):
        problem(epsilon=0.0)
    with pytest.raises(ValueError, match="delta"):
        problem(delta=1.0)
    with pytest.raises(ValueError, match="bogus"):
        bound(problem(), 10, mode="bogus")


# ---------------------------------------------------------------- forward bounds

def test_terms_named_and_summed():
    p = problem(nu=0.5, Delta=0.01, eps_approx=0.02, C=2.0)
    t = bound_terms(p, 50, "transfer", "score")
    assert set(t) == {"approx", "source", "diversity", "target"}
    assert t["approx"] == pytest.approx(0.02 / 0.5)  # ν⁻¹ ε_approx (Thm 3.4)
    assert t["source"] == pytest.approx(2.0 * (20 * 10 + 1000) / (1e6 * 20 * 0.5))
    assert t["target"] == pytest.approx(2.0 * 10 / 50)
    assert bound(p, 50, "transfer", "score") == pytest.approx(sum(t.values()))
    assert set(bound_terms(p, 50, "scratch", "score")) == {"approx", "target"}
    assert set(bound_terms(p, 50, "meta", "tv")) == {"target", "source"}
    tv = bound_terms(p, 50, "transfer", "tv")  # Thm 4.2 with ι = 1
    assert tv["target"] == pytest.approx(2.0 * 50 ** (-1 / 12))
    assert tv["source"] == pytest.approx(2.0 * (1e6 * 20) ** (-1 / 8))


@pytest.mark.parametrize("logs", [False, True])
@pytest.mark.parametrize("mode,metric", CASES)
def test_bounds_non_increasing_in_m_and_capped_at_n(mode, metric, logs):
    p = problem(mode, metric, logs, n=1000)
    ms = np.unique(np.logspace(0, 6, 200).astype(int))
    b = np.array([bound(p, m, mode, metric) for m in ms])
    assert np.all(np.diff(b) <= 1e-12 * b[:-1])
    if (mode, metric) in th.CAPPED:  # m∧n: flat beyond n
        assert bound(p, 10**6, mode, metric) == bound(p, 1000, mode, metric)
    else:
        assert bound(p, 10**6, mode, metric) < bound(p, 1000, mode, metric)


# ---------------------------------------------------------------- inversion

@pytest.mark.parametrize("logs", [False, True])
@pytest.mark.parametrize("mode,metric", CASES)
def test_inversion_returns_smallest_m(mode, metric, logs):
    p = problem(mode, metric, logs)
    est = required_m(p, mode, metric)
    assert est.feasible and est.reason == "" and est.m > 1
    assert bound(p, est.m, mode, metric) <= p.epsilon
    assert bound(p, est.m - 1, mode, metric) > p.epsilon
    assert est.terms == bound_terms(p, est.m, mode, metric)
    assert est.dominant_term == max(est.terms, key=est.terms.get)


def test_inversion_matches_closed_forms_of_section_3_1():
    p = problem(nu=0.8, Delta=0.01, eps_approx=0.004, epsilon=0.0503, C=1.3, C_P=0.7)
    nK = p.n * p.K
    rest = p.Delta + (p.eps_approx + p.C * (p.K * p.log_NF + p.log_NH) / nK) / p.nu  # (a)
    assert required_m(p).m == math.ceil(p.C * p.log_NF / (p.epsilon - rest))
    assert required_m(p, "scratch").m == math.ceil(p.C * (p.log_NF + p.log_NH) / (p.epsilon - p.eps_approx))
    pm = dataclasses.replace(p, K=10**5)  # (b)
    rest = pm.eps_approx + pm.C_P * (pm.log_NH + math.log(1 / pm.delta)) / pm.K
    assert required_m(pm, "meta").m == math.ceil(pm.C * pm.log_NF / (pm.epsilon - rest))
    q = problem(metric="tv", epsilon=0.61, C=0.9)  # (c), with the source term subtracted
    src = q.C * (q.n * q.K) ** (-1 / (q.D_y + 2))
    assert required_m(q, "transfer", "tv").m == math.ceil((q.C / (q.epsilon - src)) ** (q.d_x + q.d_y + 9))
    assert required_m(q, "scratch", "tv").m == math.ceil((q.C / q.epsilon) ** (q.d_x + q.D_y + 9))  # (e)


@pytest.mark.parametrize("logs", [False, True])
@pytest.mark.parametrize("mode,metric", CASES)
def test_smaller_epsilon_needs_more_samples(mode, metric, logs):
    p = problem(mode, metric, logs)
    ms = [m_or_inf(required_m(dataclasses.replace(p, epsilon=p.epsilon * f), mode, metric))
          for f in (4.0, 2.0, 1.0, 0.9, 0.7, 0.5, 0.3)]
    assert ms == sorted(ms) and ms[0] < ms[-1]


def test_more_source_data_needs_fewer_target_samples():
    p = problem(logs=True)
    ms = [m_or_inf(required_m(dataclasses.replace(p, n=n))) for n in (10, 100, 10**3, 10**4, 10**6, 10**9)]
    assert ms == sorted(ms, reverse=True) and ms[0] == INF and ms[-1] < ms[2]
    # more tasks K: the source term is (K log N_F + log N_H)/(nK), decreasing in K when log N_H dominates
    p = problem(logs=True, n=20000, log_NF=2.0, log_NH=5000.0)
    ms = [m_or_inf(required_m(dataclasses.replace(p, K=K))) for K in (1, 3, 10, 30, 100, 1000)]
    assert ms == sorted(ms, reverse=True) and ms[0] == INF and ms[-3] > ms[-2] > ms[-1]
    q = problem(metric="tv")  # TV transfer (Thm 4.2), bare rates: (nK)^{-1/(D_y+2)} and the m∧n cap
    ms = [m_or_inf(required_m(dataclasses.replace(q, n=n), "transfer", "tv")) for n in (10**3, 10**4, 10**6, 10**9)]
    assert ms == sorted(ms, reverse=True) and ms[0] == INF and ms[-1] < INF


def test_transfer_saves_samples_when_encoder_dominates():
    assert th.saving(problem(logs=True)) > 10  # log N_H = 100 log N_F
    assert th.saving(problem(metric="tv", epsilon=0.3, D_y=12, n=10**9)) > 10  # D_y ≫ d_y (§3.1(e))
    assert th.saving(problem(n=10)) is None  # transfer infeasible


def test_saving_tends_to_complexity_ratio():
    # §3.1(a): m_scratch/m_TL → (log N_F + log N_H)/log N_F as n → ∞ (Δ = ε_approx = 0, ν = 1, ι fixed)
    ratio = (10.0 + 1000.0) / 10.0
    gaps = [abs(th.saving(problem(epsilon=0.005, n=n)) / ratio - 1) for n in (10**5, 10**7, 10**12)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3
    # with the paper's log factors the ratio is larger still: ι(m_scratch) > ι(m_TL) (Prop 3.2)
    assert th.saving(problem(logs=True, epsilon=0.005, n=10**12)) > ratio


def test_source_term_blocking_is_named_with_needed_n():
    p = problem(logs=True, n=100)
    est = required_m(p)
    assert not est.feasible and est.m is None
    assert "source term" in est.reason and est.dominant_term == "source"
    n_needed = est.needed["n"]
    assert n_needed is not None and f"n >= {n_needed}" in est.reason
    q = dataclasses.replace(p, n=n_needed)
    fixed = required_m(q)
    assert fixed.feasible and bound(q, fixed.m) <= p.epsilon
    src = lambda n: bound_terms(dataclasses.replace(p, n=n), 1)["source"]  # noqa: E731
    assert src(n_needed) <= p.epsilon / 2 < src(n_needed - 1)  # minimal n: source term at half of ε
    assert est.needed["min_epsilon"] == pytest.approx(sum(est.terms.values()))


def test_approximation_error_blocking_is_named():
    est = required_m(problem(eps_approx=0.06))
    assert not est.feasible and "approximation error" in est.reason and est.dominant_term == "approx"
    assert est.needed["n"] is None and est.needed["K"] is None  # no amount of source data helps
    est = required_m(problem(Delta=0.07))
    assert not est.feasible and "diversity" in est.reason and est.dominant_term == "diversity"
    est = required_m(problem(eps_approx=0.06), "scratch")
    assert not est.feasible and "n" not in est.needed


@pytest.mark.parametrize("metric", ["score", "tv"])
def test_meta_with_too_few_source_samples_names_n(metric):
    p = problem("meta", metric, n=50)
    est = required_m(p, "meta", metric)
    assert not est.feasible and "n = 50" in est.reason and est.dominant_term == "target"
    n_needed = est.needed["n"]
    assert n_needed > 50 and f"n >= {n_needed}" in est.reason
    assert required_m(dataclasses.replace(p, n=n_needed), "meta", metric).feasible
    assert not required_m(dataclasses.replace(p, n=n_needed - 1), "meta", metric).feasible


def test_beyond_cap_is_infeasible():
    p = problem("scratch", "tv", d_x=50, D_y=100, epsilon=0.1)  # (C/ε)^{159}
    est = required_m(p, "scratch", "tv")
    assert not est.feasible and "1e15" in est.reason and est.dominant_term == "target"


def test_theory_exponents():
    p = problem()
    assert th.theory_exponent(p, "transfer", "score") == 1.0
    assert th.theory_exponent(p, "meta", "tv") == pytest.approx(1 / 12)
    assert th.theory_exponent(p, "scratch", "tv") == pytest.approx(1 / 17)


# ---------------------------------------------------------------- calibration

M = np.array([8.0, 16.0, 32.0, 64.0])


def synthetic(m, floor, A, p, n_seeds=5, noise=0.02, seed=1):
    rng = np.random.default_rng(seed)
    return (floor + A * m**-p) * np.exp(noise * rng.standard_normal((n_seeds, len(m))))


def test_fit_score_curve_recovers_constants():
    E = synthetic(M, 0.02, 3.0, 1.0)
    fit = th.fit_score_curve(np.tile(M, 5), E.ravel())
    assert fit.floor == pytest.approx(0.02, rel=0.1) and fit.A == pytest.approx(3.0, rel=0.1) and fit.p == 1.0
    exact = th.fit_score_curve(M, 0.02 + 3.0 / M)
    assert exact.floor == pytest.approx(0.02) and exact.A == pytest.approx(3.0) and exact.rms < 1e-12


def test_nnls_boundary_is_the_constrained_optimum():
    err = 3.0 / M - 0.03  # unconstrained fit has floor < 0
    fit = th.fit_score_curve(M, err, relative=False)
    assert fit.floor == 0.0 and fit.A > 0
    F, A = np.meshgrid(np.linspace(0, 0.05, 201), np.linspace(2, 4, 2001))  # brute force over floor, A ≥ 0
    sse_grid = ((err - F[..., None] - A[..., None] / M) ** 2).sum(-1).min()
    assert ((err - fit.predict(M)) ** 2).sum() <= sse_grid + 1e-15
    assert th.fit_score_curve(M, np.full(4, 0.1)).A == 0.0  # flat curve: A = 0 edge


def test_fit_power_law_recovers_exponent():
    m = 2.0 ** np.arange(3, 10)
    E = synthetic(m, 0.05, 2.0, 0.5)
    fit = th.fit_power_law(np.tile(m, 5), E.ravel())
    assert abs(fit.p - 0.5) < 0.1
    exact = th.fit_power_law(m, 0.01 + 4.0 * m**-0.8)
    assert exact.p == pytest.approx(0.8, abs=1e-4) and exact.A == pytest.approx(4.0, rel=1e-3)


def test_bootstrap_score_intervals_contain_truth_and_invert():
    E = synthetic(M, 0.02, 3.0, 1.0)
    out = th.bootstrap_fit(M, E, "score", n_boot=200, seed=0)
    fit, iv = out["fit"], out["intervals"]
    assert iv["floor"][0] <= 0.02 <= iv["floor"][1] and iv["A"][0] <= 3.0 <= iv["A"][1]
    point, lo, hi = out["predict"](100)
    assert lo <= 0.02 + 3.0 / 100 <= hi and point == pytest.approx(fit.predict(100))
    point, lo, hi = out["m_for"](0.05)
    assert point == pytest.approx(fit.A / (0.05 - fit.floor)) and lo <= 3.0 / 0.03 <= hi
    assert fit.predict(point) == pytest.approx(0.05)
    assert out["m_for"](0.01) == (INF, INF, INF)  # below every floor: unreachable
    again = th.bootstrap_fit(M, E, "score", n_boot=200, seed=0)
    assert np.array_equal(again["samples"]["A"], out["samples"]["A"])  # seeded


def test_bootstrap_power_and_consistency_with_theory():
    m = 2.0 ** np.arange(3, 10)
    out = th.bootstrap_fit(m, synthetic(m, 0.05, 2.0, 0.5), "power", n_boot=200, seed=0)
    p_iv = out["intervals"]["p"]
    assert p_iv[0] <= 0.5 <= p_iv[1] and p_iv[1] - p_iv[0] < 0.2
    ok, msg = th.consistent_with_theory(out["fit"].p, p_iv, 0.5)
    assert ok and "consistent" in msg
    ok, msg = th.consistent_with_theory(out["fit"].p, p_iv, 1.0)
    assert not ok and "slower" in msg
    ok, msg = th.consistent_with_theory(0.9, (0.8, 1.0), 1 / 12)
    assert not ok and "faster" in msg


def test_module_imports_only_numpy_and_stdlib():
    tree = ast.parse(Path(th.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names - set(sys.stdlib_module_names) == {"numpy"}


def test_counts_are_integers():
    assert problem(n=1e6).n == 10**6 and isinstance(problem(n=1e6).n, int)
    with pytest.raises(ValueError, match="K"):
        problem(K=2.5)
