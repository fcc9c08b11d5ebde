"""Linear reference estimators (references.py): pooled-source linear posterior mean, GCV ridge, oracle least squares."""

from __future__ import annotations

import math

import pytest
import torch

from cdmtransfer.config import Config
from cdmtransfer import references
from cdmtransfer.references import (ENCODER, ENCODER_POOLED, ORACLE, POOLED, READOUT, TARGET, pooled_linear,
                                   readout_error, reference_metrics, residual_rms, ridge_gcv)
from cdmtransfer.tasks import build_taskset
from cdmtransfer.tasks.base import TaskSet, stack_sources
from cdmtransfer.typed import from_dict

D_Y, D_X, NOISE = 6, 3, 0.3


def linear_world(seed: int = 0):
    """x = A y + b + N(0, NOISE² I): one map A, b for every task; the tasks' y differ in mean and covariance."""
    g = torch.Generator().manual_seed(seed)
    A, b = torch.randn(D_X, D_Y, generator=g), torch.randn(D_X, generator=g)

    def draw(n: int, shift: float, scale: float):
        y = shift + scale * torch.randn(n, D_Y, generator=g) @ torch.randn(D_Y, D_Y, generator=g) / D_Y**0.5
        return y @ A.T + b + NOISE * torch.randn(n, D_X, generator=g), y

    return A, b, draw


def sources(draw, sizes=(1500, 700, 2500, 1200)):
    xs, ys = zip(*(draw(n, shift=0.5 * k, scale=1 + 0.3 * k) for k, n in enumerate(sizes)))
    return stack_sources(list(xs), list(ys))


def test_pooled_estimator_reaches_the_noise_variance():
    A, b, draw = linear_world()
    X, Y, n = sources(draw)
    fit = pooled_linear(X, Y, n)
    x_test, y_test = draw(20000, shift=0.2, scale=1.1)  # a target with its own y distribution, same map
    mse = float((fit.predict(y_test) - x_test.double()).pow(2).mean())
    N = int(n.sum())
    expected = NOISE**2 * (1 + (D_Y + 1) / N)  # the noise, plus the estimation error of D_Y + 1 coefficients
    sampling = NOISE**2 * math.sqrt(2 / x_test.numel())  # sd of a mean of x_test.numel() squared N(0, NOISE²)
    assert abs(mse - expected) < 5 * sampling
    assert torch.allclose(fit.coef.T, A.double(), atol=0.02)
    assert torch.allclose(fit.intercept, b.double(), atol=0.03)

    taskset = TaskSet("linear", X, Y, n, x_test[:10], y_test[:10], x_test, y_test)
    out, skipped = reference_metrics(taskset, x_test, y_test)
    assert out[POOLED] == pytest.approx(mse, rel=1e-12)
    assert set(skipped) == {TARGET, ORACLE, ENCODER, ENCODER_POOLED}  # no target samples, no encoder given


def test_padding_rows_are_ignored():
    _, _, draw = linear_world(1)
    X, Y, n = sources(draw, sizes=(300, 50, 800))
    x_test, y_test = draw(64, shift=0.0, scale=1.0)
    X2, Y2 = X.clone(), Y.clone()
    for k, n_k in enumerate(n.tolist()):
        X2[k, n_k:] = 1e6 * torch.randn_like(X2[k, n_k:])  # garbage where the rows are padding
        Y2[k, n_k:] = float("nan")
    a, b = pooled_linear(X, Y, n), pooled_linear(X2, Y2, n)
    assert torch.equal(a.coef, b.coef) and torch.equal(a.intercept, b.intercept)
    first = reference_metrics(TaskSet("a", X, Y, n, x_test, y_test, x_test, y_test), x_test, y_test)[0][POOLED]
    second = reference_metrics(TaskSet("b", X2, Y2, n, x_test, y_test, x_test, y_test), x_test, y_test)[0][POOLED]
    assert first == second


def test_residual_rms_is_the_noise_each_source_s_own_linear_fit_leaves():
    g = torch.Generator().manual_seed(3)
    sizes, xs, ys = (3000, 400, 2000), [], []
    for n_k in sizes:  # each source its own map: one pooled map would leave most of x
        y = torch.randn(n_k, D_Y, generator=g)
        xs.append(y @ torch.randn(D_Y, D_X, generator=g) + NOISE * torch.randn(n_k, D_X, generator=g))
        ys.append(y)
    X, Y, n = stack_sources(xs, ys)
    rms = residual_rms(X, Y, n)
    assert abs(rms - NOISE) < 0.03 * NOISE  # GCV: out of sample, about NOISE·(1 + (D_Y + 1)/(2 n_k))
    pooled = pooled_linear(X, Y, n)
    pooled_rms = float((pooled.predict(Y[0]) - X[0].double()).pow(2).mean().sqrt())
    assert pooled_rms > 3 * rms
    X[1, 400:] = 1e6  # padding rows
    assert residual_rms(X, Y, n) == rms


def _explicit_gcv(F, X, lam):
    """GCV from the hat matrix written out: H = 11ᵀ/n + F_c (F_cᵀF_c + λI)⁻¹ F_cᵀ."""
    F, X = F.double(), X.double()
    n = F.shape[0]
    Fc = F - F.mean(0)
    H = torch.full((n, n), 1 / n, dtype=torch.float64) + Fc @ torch.linalg.solve(
        Fc.T @ Fc + lam * torch.eye(F.shape[1], dtype=torch.float64), Fc.T)
    resid = X - H @ X
    return float(resid.pow(2).sum() / n / (1 - torch.trace(H) / n) ** 2)


def test_gcv_ridge_recovers_a_known_coefficient():
    g = torch.Generator().manual_seed(2)
    beta, intercept = torch.tensor([[1.5], [-2.0], [0.5], [0.0], [3.0]]), 0.7
    F = torch.randn(400, 5, generator=g)
    x = F @ beta + intercept + 0.1 * torch.randn(400, 1, generator=g)
    fit = ridge_gcv(F, x)
    assert torch.allclose(fit.coef, beta.double(), atol=0.02)
    assert fit.intercept.item() == pytest.approx(intercept, abs=0.02)
    assert fit.lam < 1.0  # clean signal: hardly any shrinkage

    noise_only = torch.randn(400, 1, generator=g)  # nothing to fit: GCV shrinks hard
    assert ridge_gcv(F, noise_only).coef.norm() < 0.1 * ridge_gcv(F, noise_only * 0 + F @ beta).coef.norm()


@pytest.mark.parametrize("n", [12, 60])  # fewer rows than features, and more
def test_gcv_closed_form_matches_the_hat_matrix(n):
    g = torch.Generator().manual_seed(n)
    F = torch.randn(n, 20, generator=g)
    x = F[:, :3] @ torch.randn(3, 2, generator=g) + 0.5 * torch.randn(n, 2, generator=g)
    fit = ridge_gcv(F, x)
    best = _explicit_gcv(F, x, fit.lam)
    s2 = torch.linalg.svdvals((F - F.mean(0)).double()).pow(2)
    dof = lambda lam: 1 + float((s2 / (s2 + lam)).sum())  # noqa: E731  tr(H), the intercept included
    assert dof(fit.lam) <= n / 2  # only ridges that leave half the rows' degrees of freedom compete
    for factor in (0.1, 0.3, 3.0, 10.0):  # GCV's minimum over them is no worse than its neighbours
        if dof(fit.lam * factor) <= n / 2:
            assert best <= _explicit_gcv(F, x, fit.lam * factor) * (1 + 1e-9)
    Fc = (F - F.mean(0)).double()  # and the coefficients are the ridge solution at that λ
    coef = torch.linalg.solve(Fc.T @ Fc + fit.lam * torch.eye(20, dtype=torch.float64),
                              Fc.T @ (x - x.mean(0)).double())
    assert torch.allclose(fit.coef, coef, atol=1e-8)


def test_target_and_oracle_least_squares_approach_the_exact_posterior_mean():
    """Linear h*: with the whole target pool, ridge on y and least squares on h*(y) reach the exact posterior mean's
    MSE (the floor), the oracle faster; with few samples both are worse and the oracle stays ahead."""
    cfg = from_dict(Config, {"suite": {"name": "gaussian", "K": 4, "n": 256, "n_target_pool": 4000, "n_test": 400,
                                       "gaussian": {"d_x": 3, "D_y": 16, "d": 2}}}, "test")
    taskset = build_taskset(cfg)
    x, y = taskset.test_x, taskset.test_y
    floor = float((taskset.truth.mean(0, y) - x).pow(2).mean())
    many, _ = reference_metrics(taskset, x, y, taskset.target_x, taskset.target_y)
    few, _ = reference_metrics(taskset, x, y, *taskset.target_subset(12, seed=0))
    assert many[ORACLE] == pytest.approx(floor, rel=0.03)
    assert many[TARGET] == pytest.approx(floor, rel=0.05)
    assert few[ORACLE] < few[TARGET]
    assert few[TARGET] > many[TARGET]
    assert many[POOLED] == few[POOLED] > 2 * floor  # the sources' maps differ from the target's: pooling misses it


def test_encoder_least_squares_scores_the_given_features():
    """ref/encoder_ls_mse is least squares on the features of the encoder it is given: the true h* reproduces the
    oracle's value exactly, a random encoder of the same width loses to it, and no encoder is skipped with a reason."""
    cfg = from_dict(Config, {"suite": {"name": "gaussian", "K": 4, "n": 256, "n_target_pool": 2000, "n_test": 400,
                                       "gaussian": {"d_x": 3, "D_y": 16, "d": 2}}}, "test")
    taskset = build_taskset(cfg)
    x, y = taskset.test_x, taskset.test_y
    x_m, y_m = taskset.target_subset(200, seed=0)
    truth, _ = reference_metrics(taskset, x, y, x_m, y_m, encoder=taskset.truth.encoder())
    assert truth[ENCODER] == truth[ORACLE]
    torch.manual_seed(0)
    random = torch.nn.Linear(16, 2)
    with_random, _ = reference_metrics(taskset, x, y, x_m, y_m, encoder=random)
    assert with_random[ENCODER] > 1.2 * truth[ORACLE]
    _, skipped = reference_metrics(taskset, x, y, x_m, y_m)
    assert skipped[ENCODER] == "no encoder given"
    # and how much of h* each encoder carries: all of it (h* itself), little (a random linear map of y)
    assert truth[READOUT] < 1e-10 and with_random[READOUT] > 0.5


def test_the_pooled_fit_on_the_encoders_features_is_the_sources_linear_estimator_on_them():
    """ref/encoder_pooled_mse is the pooled sources' linear estimator on h(y): with h the identity it is
    ref/linear_pooled_mse itself; with h(y) = A y (all x depends on) it stays there, while a random 3-dimensional
    summary of y loses; sources of unequal size leave their padding out; rows past POOL_ROWS are left out; no
    encoder is skipped with a reason."""
    A, b, draw = linear_world()
    X, Y, n = sources(draw)
    x, y = draw(4000, shift=0.2, scale=1.1)
    taskset = TaskSet("linear", X, Y, n, x[:10], y[:10], x, y)
    same, _ = reference_metrics(taskset, x, y, encoder=torch.nn.Identity())
    assert same[ENCODER_POOLED] == pytest.approx(same[POOLED], rel=1e-9)
    sufficient = torch.nn.Linear(D_Y, D_X)
    torch.manual_seed(0)
    random = torch.nn.Linear(D_Y, D_X)
    with torch.no_grad():
        sufficient.weight.copy_(A)
    on_a, _ = reference_metrics(taskset, x, y, encoder=sufficient)
    on_random, _ = reference_metrics(taskset, x, y, encoder=random)
    assert on_a[ENCODER_POOLED] == pytest.approx(same[POOLED], rel=0.01)
    assert on_random[ENCODER_POOLED] > 3 * on_a[ENCODER_POOLED]
    _, skipped = reference_metrics(taskset, x, y)
    assert skipped[ENCODER_POOLED] == "no encoder given"
    with pytest.MonkeyPatch.context() as mp:  # a cap of 8 rows per source: another (worse) fit, of those rows only
        mp.setattr(references, "POOL_ROWS", 32)
        capped, _ = reference_metrics(taskset, x, y, encoder=torch.nn.Identity())
        _, h_s, n_s = references.encoded_sources(torch.nn.Identity(), taskset)
    assert h_s.shape[:2] == (4, 8) and n_s.tolist() == [8] * 4
    assert capped[ENCODER_POOLED] > 1.05 * same[ENCODER_POOLED]


def test_readout_error_is_zero_for_an_affine_change_of_basis_and_near_one_for_unrelated_features():
    """ref/h_star_readout_error: an invertible affine map of h* carries all of it; features of other directions of y
    (orthogonal to the rows of W in h* = tanh(2Wy + c)) carry almost nothing; half of h*'s coordinates carry half."""
    cfg = from_dict(Config, {"suite": {"name": "gaussian", "K": 4, "n": 512,
                                       "gaussian": {"d_x": 3, "D_y": 16, "d": 4, "h_star": "nonlinear"}}}, "test")
    taskset = build_taskset(cfg)
    h_star = taskset.truth.encoder()
    y = torch.randn(4000, 16, generator=torch.Generator().manual_seed(1))
    mix = torch.randn(4, 4, generator=torch.Generator().manual_seed(2)) + 3 * torch.eye(4)
    assert readout_error(lambda v: h_star(v) @ mix + 1.5, h_star, y) < 1e-10
    W = taskset.truth.W
    other = torch.linalg.svd(W, full_matrices=True).Vh[4:8].T  # 4 directions of y orthogonal to W's rows
    assert readout_error(lambda v: torch.tanh(v @ other), h_star, y) > 0.95
    half = readout_error(lambda v: h_star(v)[:, :2], h_star, y)
    assert 0.3 < half < 0.7
    broken = readout_error(lambda v: h_star(v).masked_fill(v[:, :4] > 3, float("nan")), h_star, y)  # a diverged h
    assert math.isnan(broken)  # nothing read out (least squares would raise on it)
