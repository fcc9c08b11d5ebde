"""Statistics of `estimate` (curve_fit.py) on synthetic learning curves with known floors, amplitudes, exponents."""

import math

import numpy as np
import pytest

from cdmtransfer import curve_fit as cf
from cdmtransfer.curve_fit import Curve, Epsilon

M = np.array([8.0, 16.0, 32.0, 64.0])
MU, TASK_SD = np.array([0.15, 4.0]), np.array([0.03, 1.0])  # (floor, A) across tasks


def noisy_curve(rng, floor, A, p, noise, seeds=1, m=M) -> Curve:
    """floor + A·m^(−p) with multiplicative noise, `seeds` draws per m."""
    true = floor + A * m**-p
    return Curve.of(m, true * (1 + noise * rng.standard_normal((seeds, len(m)))))


def tasks(rng, n, p=1.0, noise=0.05, mu=MU, sd=TASK_SD):
    theta = np.maximum(mu + sd * rng.standard_normal((n, 2)), [0.01, 0.05])
    return theta, [noisy_curve(rng, f, A, p, noise) for f, A in theta]


def lo_hi(interval):
    return [math.inf if v is None else v for v in interval]


def test_epsilon_parsing_and_inversion():
    assert Epsilon.parse("0.3") == Epsilon(0.3, "absolute")
    assert Epsilon.parse("0.3", over_floor=True) == Epsilon(0.3, "excess")
    assert Epsilon.parse("10%") == Epsilon(0.1, "relative")
    for bad in ("x", "-1", "0%"):
        with pytest.raises(ValueError):
            Epsilon.parse(bad)
    # floor 0.1, A 2, p 1: err ≤ 0.3 at m = 10; excess 0.05 at m = 40; within 10% of the floor at m = 200
    assert cf.m_for(0.1, 2.0, 1.0, Epsilon(0.3)) == pytest.approx(10)
    assert cf.m_for(0.1, 2.0, 1.0, Epsilon(0.05, "excess")) == pytest.approx(40)
    assert cf.m_for(0.1, 2.0, 1.0, Epsilon(0.1, "relative")) == pytest.approx(200)
    assert cf.m_for(0.1, 2.0, 0.5, Epsilon(0.3)) == pytest.approx(100)
    assert np.isinf(cf.m_for(0.3, 2.0, 1.0, Epsilon(0.3)))  # ε at the floor: never


def test_fit_recovers_floors_amplitudes_and_a_shared_exponent():
    rng = np.random.default_rng(0)
    theta = np.array([[0.1, 2.0], [0.3, 5.0], [0.05, 3.0]])
    m = np.array([4.0, 8, 16, 32, 64, 128, 256])
    curves = [noisy_curve(rng, f, A, 0.6, 0.02, seeds=8, m=m) for f, A in theta]
    fits = cf.fit_tasks(curves, p=None)
    assert fits.free and fits.p == pytest.approx(0.6, abs=0.06)
    assert fits.theta[:, 0] == pytest.approx(theta[:, 0], abs=0.03)
    assert fits.theta[:, 1] == pytest.approx(theta[:, 1], rel=0.15)
    assert math.sqrt(fits.s2) == pytest.approx(0.02, rel=0.35)  # the per-seed relative noise
    exact = cf.fit_tasks([Curve.of(M, 0.2 + 3.0 / M)], p=1.0)
    assert exact.theta[0] == pytest.approx([0.2, 3.0]) and exact.sse < 1e-20


def test_shape_is_chosen_by_held_out_points_not_assumed():
    rng = np.random.default_rng(1)
    m = np.array([4.0, 8, 16, 32, 64, 128])
    slow = [noisy_curve(rng, 0.05, A, 0.5, 0.01, m=m) for A in (1.0, 1.5, 2.0)]
    fits, scores = cf.choose_shape(slow)
    assert fits.free and scores["free p"] < scores["p=1"] and fits.p == pytest.approx(0.5, abs=0.1)
    rate = [noisy_curve(rng, 0.05, A, 1.0, 0.01, m=m) for A in (1.0, 1.5, 2.0)]
    fits, scores = cf.choose_shape(rate)
    assert fits.p == pytest.approx(1.0, abs=0.1)


def test_t_quantiles():
    assert cf.t_quantile(0.9, 1) == pytest.approx(3.0777, abs=1e-3)
    assert cf.t_quantile(0.9, 2) == pytest.approx(1.8856, abs=1e-3)
    assert cf.t_quantile(0.9, 3) == pytest.approx(1.6377, abs=2e-3)
    assert cf.t_quantile(0.9, 10) == pytest.approx(1.3722, abs=1e-3)
    assert cf.t_quantile(0.9, math.inf) == pytest.approx(1.2816, abs=1e-3)


def coverage(L, reps, *, ignore_task_spread=False, seed=0, noise=0.05):
    """Share of new tasks whose fitted m(ε) falls in the 80% interval pooled from L other tasks."""
    rng, eps, hits = np.random.default_rng(seed), Epsilon(0.3), 0
    for r in range(reps):
        theta, curves = tasks(rng, L + 1, noise=noise)
        fits = cf.fit_tasks(curves[:L], 1.0)
        pred = cf.pool(fits)
        if ignore_task_spread:  # seed noise alone, the error a pooled fit over tasks would make
            pred.cov = pred.parts["noise_cov"] * (1 + 1 / L)
        lo, hi = lo_hi(pred.m_interval(eps, 0.8, seed=r, n=5000)["interval"])
        new = cf.fit_tasks(curves[L:], 1.0)
        hits += lo <= float(cf.m_for(*new.theta[0], 1.0, eps)) <= hi
    return hits / reps


@pytest.mark.parametrize("L", [3, 6])
def test_pooled_interval_covers_a_new_task_near_nominal(L):
    assert 0.72 <= coverage(L, 250, seed=L) <= 0.9


def test_pooled_interval_covers_task_to_task_spread():
    # the same tasks, the interval built from seed noise alone: it misses most new tasks
    assert coverage(5, 150, ignore_task_spread=True, seed=3) < 0.5
    assert coverage(5, 150, seed=3) >= 0.72


def test_update_with_target_points_narrows_and_stays_calibrated():
    rng, eps = np.random.default_rng(4), Epsilon(0.3)
    hits, narrowing, weights = 0, [], []
    reps = 150
    for r in range(reps):
        theta, curves = tasks(rng, 5)
        fits = cf.fit_tasks(curves[:4], 1.0)
        prior = cf.pool(fits)
        own = noisy_curve(rng, *theta[4], 1.0, 0.05, seeds=2, m=np.array([8.0, 16.0]))
        post, w = cf.update(prior, own, fits.s2, fits.dof, n_draws=30000, seed=r)
        before, after = prior.m_interval(eps, seed=r, n=5000), post.m_interval(eps, seed=r)
        lo, hi = lo_hi(after["interval"])
        hits += lo <= float(cf.m_for(*theta[4], 1.0, eps)) <= hi
        weights.append(w["target"])
        if all(v is not None for v in before["interval"] + after["interval"]):
            narrowing.append(math.log(hi / lo) / math.log(before["interval"][1] / before["interval"][0]))
    assert 0.68 <= hits / reps <= 0.92  # the true m(ε) of the new task
    assert np.median(narrowing) < 0.6 and 0.2 < np.mean(weights) < 1


def test_update_weights_follow_the_evidence():
    rng = np.random.default_rng(5)
    _, curves = tasks(rng, 4)
    fits = cf.fit_tasks(curves, 1.0)
    prior = cf.pool(fits)
    few = noisy_curve(rng, 0.15, 4.0, 1.0, 0.05, seeds=1, m=np.array([8.0]))
    many = noisy_curve(rng, 0.15, 4.0, 1.0, 0.05, seeds=8, m=np.array([8.0, 16, 32, 64, 128, 256]))
    w_few, w_many = cf.update(prior, few, fits.s2, fits.dof)[1], cf.update(prior, many, fits.s2, fits.dof)[1]
    assert 0 <= w_few["target"] < w_many["target"] <= 1
    assert w_many["A"] > 0.5


def test_leave_one_task_out_reports_each_task():
    rng = np.random.default_rng(6)
    _, curves = tasks(rng, 4)
    out = cf.leave_one_task_out(curves, Epsilon(0.3), free=False)
    assert [r["task"] for r in out] == [0, 1, 2, 3]
    assert all(r["m_predicted"] is None or r["m_predicted"] >= 1 for r in out)
    assert cf.leave_one_task_out(curves[:2], Epsilon(0.3), free=False) == []


def test_module_imports_only_numpy_and_stdlib():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(cf.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= {"__future__", "math", "dataclasses", "statistics", "numpy", "cdmtransfer"}
