"""Synthetic task suites: the Gaussian suite's exact scores and sampler, its span structure and seeding, TaskSet
subsets, and the Langevin (conditioned-diffusion) suite."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from cdmtransfer.config import load_config
from cdmtransfer.errors import DataError
from cdmtransfer.tasks import build_taskset, gaussian, langevin
from cdmtransfer.tasks.langevin import langevin_paths

SMALL = ["suite.K=3", "suite.n=64", "suite.n_test=32", "suite.n_target_pool=64",
         "suite.gaussian.d_x=3", "suite.gaussian.D_y=6", "suite.gaussian.d=2"]


def gauss_cfg(*extra):
    return load_config(None, SMALL + list(extra))


def gauss(*extra):
    return gaussian.build(gauss_cfg(*extra))


def tensors(ts):
    return [ts.source_x, ts.source_y, ts.source_n, ts.target_x, ts.target_y, ts.test_x, ts.test_y]


# --------------------------------------------------------------------------------------------------------------
# Gaussian suite: exact score and sampler


def reference_score(truth, task, x_t, y, t):
    """Autograd ∇_x log N(x; α μ_k(y), α² Σ_k + σ² I), in float64, with Σ_k rebuilt from its eigenpairs."""
    U, lam = truth.evecs[task].double(), truth.evals[task].double()
    Sigma = U @ torch.diag(lam) @ U.T
    mu = truth.h_star(y).double() @ truth.A[task].double().T + truth.b[task].double()
    t = t.double()
    a = torch.exp(-t)[:, None, None]
    s2 = (1 - torch.exp(-2 * t))[:, None, None]
    cov = a**2 * Sigma + s2 * torch.eye(len(lam), dtype=torch.float64)
    x = x_t.double().clone().requires_grad_(True)
    logp = MultivariateNormal(a[:, :, 0] * mu, covariance_matrix=cov).log_prob(x).sum()
    (grad,) = torch.autograd.grad(logp, x)
    return grad


@pytest.mark.parametrize("h_star", ["linear", "nonlinear"])
@pytest.mark.parametrize("target", ["in_span", "out_of_span"])
def test_gaussian_score_is_gradient_of_noisy_log_density(h_star, target):
    ts = gauss(f"suite.gaussian.h_star={h_star}", f"suite.gaussian.target={target}")
    truth = ts.truth
    g = torch.Generator().manual_seed(0)
    B = 40
    y = torch.randn(B, 6, generator=g)
    x_t = 1.5 * torch.randn(B, 3, generator=g)
    t = torch.logspace(-2, math.log10(3.0), B)  # a different t on every row
    for task in (0, 2):
        got = truth.score(task, x_t, y, t)
        want = reference_score(truth, task, x_t, y, t)
        assert got.shape == (B, 3)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_gaussian_score_differs_between_tasks():
    """A score that ignored `task` would pass the check above only if tasks coincided; make sure they don't."""
    truth = gauss().truth
    g = torch.Generator().manual_seed(0)
    y, x_t, t = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g), torch.full((16,), 0.3)
    assert not torch.allclose(truth.score(0, x_t, y, t), truth.score(1, x_t, y, t), atol=1e-3)


@pytest.mark.parametrize("h_star", ["linear", "nonlinear"])
def test_h_star_matches_documented_form(h_star):
    truth = gauss(f"suite.gaussian.h_star={h_star}").truth
    y = torch.randn(10, 6, generator=torch.Generator().manual_seed(1))
    W = truth.W
    if h_star == "linear":
        assert torch.allclose(W @ W.T, torch.eye(2), atol=1e-5)  # orthonormal rows
        assert torch.allclose(truth.h_star(y), y @ W.T, atol=1e-6)
    else:
        assert torch.allclose(W @ W.T, 4 * torch.eye(2), atol=1e-5)  # 2 × orthonormal rows
        assert torch.allclose(truth.h_star(y), torch.tanh(y @ W.T + truth.c), atol=1e-6)
        assert truth.h_star(100 * y).abs().max() <= 1.0


@pytest.mark.parametrize("task", [0, 1, 3])
def test_gaussian_sample_conditional_mean_and_covariance(task):
    truth = gauss("suite.gaussian.h_star=nonlinear").truth
    g = torch.Generator().manual_seed(2)
    y1 = torch.randn(1, 6, generator=g)
    n = 40_000
    x = truth.sample(task, y1.expand(n, 6), g).double()
    mu = (truth.h_star(y1) @ truth.A[task].T + truth.b[task])[0].double()
    U, lam = truth.evecs[task].double(), truth.evals[task].double()
    Sigma = U @ torch.diag(lam) @ U.T
    se = (torch.diag(Sigma) / n).sqrt()
    assert ((x.mean(0) - mu).abs() < 5 * se).all(), (x.mean(0), mu)
    assert (torch.cov(x.T) - Sigma).abs().max() < 0.05 * Sigma.abs().max(), (torch.cov(x.T), Sigma)


def test_sources_and_target_data_come_from_the_right_tasks():
    """Source slot k holds task k+1 (task 0 is the target): residuals x − μ_k(y) have mean 0 and covariance Σ_k."""
    ts = gauss("suite.n=3000", "suite.n_target_pool=3000")
    truth = ts.truth

    def check(x, y, task):
        r = (x - truth.mean(task, y)).double()
        U, lam = truth.evecs[task].double(), truth.evals[task].double()
        Sigma = U @ torch.diag(lam) @ U.T
        ok_mean = bool((r.mean(0).abs() < 5 * (torch.diag(Sigma) / len(r)).sqrt()).all())
        ok_cov = bool((torch.cov(r.T) - Sigma).abs().max() < 0.15 * Sigma.abs().max())
        return ok_mean and ok_cov

    assert ts.source_x.shape == (3, 3000, 3) and ts.source_y.shape == (3, 3000, 6)
    assert ts.source_n.tolist() == [3000, 3000, 3000]
    for k in range(3):
        assert check(ts.source_x[k], ts.source_y[k], k + 1)
        assert not check(ts.source_x[k], ts.source_y[k], k + 2 if k + 2 <= 3 else 1)  # a different source
    assert check(ts.target_x, ts.target_y, 0)
    assert not check(ts.target_x, ts.target_y, 1)
    assert ts.test_x.shape == (32, 3) and ts.test_y.shape == (32, 6)


# --------------------------------------------------------------------------------------------------------------
# Gaussian suite: span structure, oracle encoder


def test_out_of_span_sources_ignore_last_coordinate_target_uses_it():
    truth = gauss("suite.gaussian.target=out_of_span").truth
    assert torch.all(truth.A[1:, :, -1] == 0)
    assert truth.A[0, :, -1].abs().max() > 1e-3
    # ...so A_0 is not a combination of the source maps
    src = truth.A[1:].reshape(3, -1).T.double()
    tgt = truth.A[0].reshape(-1, 1).double()
    resid = src @ torch.linalg.lstsq(src, tgt).solution - tgt
    assert resid.norm() > 1e-2 * tgt.norm()


def test_in_span_target_is_combination_of_source_maps():
    truth = gauss("suite.gaussian.target=in_span").truth
    assert truth.A[1:, :, -1].abs().max() > 1e-3  # sources do use every coordinate here
    src = truth.A[1:].reshape(3, -1).T.double()  # [d_x*d, K] with K=3 < d_x*d=6, so the span is a proper subspace
    tgt = truth.A[0].reshape(-1, 1).double()
    resid = src @ torch.linalg.lstsq(src, tgt).solution - tgt
    assert resid.norm() < 1e-5 * tgt.norm()
    assert tgt.norm() > 1e-3


@pytest.mark.parametrize("h_star", ["linear", "nonlinear"])
def test_oracle_encoder_reproduces_h_star(h_star):
    truth = gauss(f"suite.gaussian.h_star={h_star}").truth
    enc = truth.encoder()
    y = torch.randn(25, 6, generator=torch.Generator().manual_seed(3))
    assert enc.d == 2 and enc.D_y == 6
    assert torch.allclose(enc(y), truth.h_star(y), atol=1e-6)
    assert list(enc.parameters()) == []  # buffers only: never trained


# --------------------------------------------------------------------------------------------------------------
# Seeding


def test_same_suite_seed_same_world_different_seed_different():
    a, b = gauss("suite.seed=4"), gauss("suite.seed=4")
    for u, v in zip(tensors(a), tensors(b)):
        assert torch.equal(u, v)
    assert torch.equal(a.truth.A, b.truth.A)
    c = gauss("suite.seed=5")
    assert not torch.equal(a.source_x, c.source_x)
    assert not torch.equal(a.target_x, c.target_x)
    assert not torch.equal(a.truth.A, c.truth.A)


def test_run_seed_does_not_change_task_world():
    a, b = gauss("seed=0", "suite.seed=2"), gauss("seed=5", "suite.seed=2")
    for u, v in zip(tensors(a), tensors(b)):
        assert torch.equal(u, v)
    assert torch.equal(a.truth.W, b.truth.W)


def test_build_taskset_dispatches_on_suite_name():
    ts = build_taskset(gauss_cfg())
    assert ts.name == "gaussian" and ts.K == 3 and ts.d_x == 3 and ts.D_y == 6
    ts = build_taskset(load_config(None, ["suite.name=langevin", "suite.K=2", "suite.n=8", "suite.n_test=4",
                                          "suite.n_target_pool=4", "suite.langevin.d_x=5",
                                          "suite.langevin.D_y=7"]))
    assert ts.name == "langevin" and ts.K == 2 and ts.d_x == 5 and ts.D_y == 7


# --------------------------------------------------------------------------------------------------------------
# TaskSet.target_subset


def test_target_subset_reproducible_nested_and_bounded():
    ts = gauss()
    x1, y1 = ts.target_subset(10, seed=3)
    x2, y2 = ts.target_subset(10, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (10, 3) and y1.shape == (10, 6)
    x_small, y_small = ts.target_subset(4, seed=3)
    assert torch.equal(x_small, x1[:4]) and torch.equal(y_small, y1[:4])
    x_other, _ = ts.target_subset(10, seed=4)
    assert not torch.equal(x_other, x1)
    # rows are pool rows, paired (x, y) correctly, drawn without replacement
    xa, ya = ts.target_subset(64, seed=3)
    pool = {tuple(r.tolist()): tuple(s.tolist()) for r, s in zip(ts.target_x, ts.target_y)}
    assert len({tuple(r.tolist()) for r in xa}) == 64
    for r, s in zip(xa, ya):
        assert pool[tuple(r.tolist())] == tuple(s.tolist())
    with pytest.raises(DataError, match="65") as exc:
        ts.target_subset(65, seed=3)
    assert exc.value.exit_code == 3


# --------------------------------------------------------------------------------------------------------------
# Langevin suite

LANGEVIN = ["suite.name=langevin", "suite.langevin.d_x=10", "suite.langevin.D_y=12", "suite.K=2", "suite.n=32",
            "suite.n_target_pool=16", "suite.n_test=8"]


def test_langevin_shapes_and_observation_noise():
    ts = langevin.build(load_config(None, LANGEVIN))
    assert ts.source_x.shape == (2, 32, 10) and ts.source_y.shape == (2, 32, 12)
    assert ts.source_n.tolist() == [32, 32]
    assert ts.target_x.shape == (16, 10) and ts.target_y.shape == (16, 12)
    assert ts.test_x.shape == (8, 10) and ts.test_y.shape == (8, 12)
    M = ts.truth.M
    assert M.shape == (12, 10)
    for obs_std in (0.5, 0.2):
        ts = langevin.build(load_config(None, LANGEVIN + [f"suite.langevin.obs_std={obs_std}"]))
        M = ts.truth.M
        resid = torch.cat([(ts.source_y - ts.source_x @ M.T).reshape(-1),
                           (ts.target_y - ts.target_x @ M.T).reshape(-1)])
        assert abs(resid.std().item() - obs_std) < 0.1 * obs_std
        assert abs(resid.mean().item()) < 0.1 * obs_std


def test_langevin_oracle_encoder_is_scaled_Mt_y():
    ts = langevin.build(load_config(None, LANGEVIN))
    y = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ts.truth.encoder()(y), y @ ts.truth.M / math.sqrt(12), atol=1e-6)


def test_langevin_paths_start_at_zero_with_step_one_over_steps():
    g = torch.Generator().manual_seed(0)
    steps = 10
    p = langevin_paths(3.0, 20_000, steps, g)
    assert p.shape == (20_000, steps)
    # u_0 = 0 so the first drift is 0: u_Δ ~ N(0, Δ)
    assert abs(p[:, 0].mean().item()) < 0.01
    assert abs(p[:, 0].var().item() - 1 / steps) < 0.005
    # with β = 0 the path is Brownian motion: Var u_1 = 1
    p0 = langevin_paths(0.0, 20_000, steps, g)
    assert abs(p0[:, -1].var().item() - 1.0) < 0.05


def test_larger_beta_concentrates_paths_near_wells():
    g = torch.Generator().manual_seed(1)
    ends = {b: langevin_paths(b, 6000, 50, g)[:, -1] for b in (1.0, 4.0, 15.0)}
    abs_mean = {b: u.abs().mean().item() for b, u in ends.items()}
    spread = {b: ((u.abs() - 1) ** 2).mean().item() for b, u in ends.items()}  # distance² to the wells ±1
    assert abs_mean[1.0] < abs_mean[4.0] < abs_mean[15.0]
    assert abs_mean[15.0] - abs_mean[1.0] > 0.1
    assert spread[1.0] > spread[4.0] > spread[15.0]
    assert spread[15.0] < 0.5 * spread[1.0]


def test_langevin_sources_differ_by_beta():
    """Source k has β = k and the target β = beta_target: the last source and a β=15 target sit nearer ±1."""
    cfg = load_config(None, ["suite.name=langevin", "suite.langevin.d_x=20", "suite.langevin.D_y=4", "suite.K=8",
                             "suite.n=3000", "suite.n_target_pool=3000", "suite.n_test=4",
                             "suite.langevin.beta_target=15"])
    ts = langevin.build(cfg)
    spread = [((ts.source_x[k, :, -1].abs() - 1) ** 2).mean().item() for k in range(8)]
    target_spread = ((ts.target_x[:, -1].abs() - 1) ** 2).mean().item()
    assert spread[7] < 0.6 * spread[0]
    assert target_spread < 0.6 * spread[7]
