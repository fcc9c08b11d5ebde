"""The batched MCMC sampler (cdmtransfer/mcmc.py) and the Langevin suite's MCMC reference posterior."""

import math

import torch

from cdmtransfer.config import load_config
from cdmtransfer.mcmc import autograd_log_prob, ess, run_chains, split_rhat
from cdmtransfer.tasks import build_taskset
from cdmtransfer.tasks.langevin import LangevinTruth, linear_posterior, posterior_log_prob_grad

D_X, D_Y, OBS = 10, 12, 0.5


def _problem(C: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(D_Y, D_X, generator=g, dtype=torch.float64) / D_X**0.5
    y = torch.randn(C, D_Y, generator=g, dtype=torch.float64)
    return M, y, g


def _closed_form(M, y):
    """β = 0, written independently of the code under test: prior N(0, Δ·min(i, j)), likelihood N(Mx, σ²I)."""
    idx = torch.arange(1, D_X + 1, dtype=torch.float64)
    prior = torch.minimum(idx[:, None], idx[None, :]) / D_X
    Sigma = torch.linalg.inv(torch.linalg.inv(prior) + M.T @ M / OBS**2)
    return y @ M @ Sigma / OBS**2, Sigma  # μ_c = Σ Mᵀ y_c / σ²


def test_beta0_posterior_matches_the_closed_form():
    # Tolerance: 5 Monte-Carlo standard errors, with the standard error from the chains' own ESS (of w for the mean,
    # of w² for the variance, Gaussian: Var(ŝ²) = 2σ⁴/ESS). The run is seeded, so this never flakes; a sampler off by
    # 10% of a posterior sd in the mean, or by ~10% in a variance, fails it.
    C, S = 3, 16
    M, y, g = _problem(C)
    mu, Sigma = _closed_form(M, y)
    L = torch.linalg.cholesky(Sigma)
    mu0, Sigma0 = linear_posterior(M, OBS, y)  # the code's own closed form (its start and preconditioner)
    assert torch.allclose(mu0, mu, atol=1e-10) and torch.allclose(Sigma0, Sigma, atol=1e-10)
    x0 = mu[:, None] + 2.0 * torch.randn(C, S, D_X, generator=g, dtype=torch.float64) @ L.T
    for method in ("hmc", "mala"):
        r = run_chains(posterior_log_prob_grad(0.0, M, OBS, y), x0, L, 150, 400, g, method)
        w = torch.linalg.solve_triangular(L, (r.samples - mu[:, None, None]).unsqueeze(-1), upper=False)[..., 0]
        n = S * 400
        ess_w, ess_w2 = ess(w), ess((w - w.mean((1, 2), keepdim=True)) ** 2)  # [C, d]
        assert (ess_w > 0.1 * n).all() and (ess_w < 4 * n).all() and (ess_w2 > 0.05 * n).all()
        mean_err = (w.mean((1, 2)) * ess_w.sqrt()).abs()  # whitened mean error in standard errors
        assert mean_err.max() < 5, (method, mean_err.max())
        var_err = (w.var((1, 2)) - 1).abs() / (2 / ess_w2).sqrt()
        assert var_err.max() < 5, (method, var_err.max())
        rel_var = r.samples.flatten(1, 2).var(1) / Sigma.diagonal() - 1  # diagonal in the original coordinates
        assert rel_var.abs().max() < 0.15, (method, rel_var)  # ≈ 4.5 standard errors (ESS of x² ≥ 1800)
        assert torch.allclose(r.mean, r.samples.mean((1, 2)), atol=5e-3)  # the running mean averages every step
        assert (r.rhat < 1.02).all()
        assert ((r.accept - (0.65 if method == "hmc" else 0.57)).abs() < 0.1).all()


def test_rhat_detects_chains_that_have_not_mixed():
    C, S = 2, 8
    M, y, g = _problem(C, seed=1)
    mu, Sigma = _closed_form(M, y)
    L = torch.linalg.cholesky(Sigma)
    lpg = posterior_log_prob_grad(0.0, M, OBS, y)
    side = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(S // 2)[None, :, None]  # half the chains each way
    x0 = mu[:, None] + 30 * side * Sigma.diagonal().sqrt()
    short = run_chains(lpg, x0, L, 2, 8, g, "mala")
    assert (short.rhat > 1.1).all(), short.rhat
    long = run_chains(lpg, x0, L, 150, 600, g, "mala")
    assert (long.rhat < 1.05).all(), long.rhat  # the convergence threshold LangevinTruth uses
    # the diagnostics themselves: iid draws give R̂ ≈ 1 and ESS ≈ S·N; AR(1) with φ: ESS ≈ S·N (1 − φ)/(1 + φ)
    iid = torch.randn(1, 4, 2000, 3, generator=g, dtype=torch.float64)
    assert (split_rhat(iid) - 1).abs().max() < 0.01
    assert ((ess(iid) / 8000 - 1).abs() < 0.15).all()
    shifted = iid + torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)[None, :, None, None]
    assert (split_rhat(shifted) > 1.05).all()
    trend = iid + torch.linspace(-1, 1, 2000, dtype=torch.float64)[None, None, :, None]  # every chain still drifting
    assert (split_rhat(trend) > 1.05).all()  # only the split (first vs second half) sees it
    phi, ar = 0.9, torch.empty_like(iid)
    ar[:, :, 0] = iid[:, :, 0] / (1 - phi**2) ** 0.5
    for t in range(1, 2000):
        ar[:, :, t] = phi * ar[:, :, t - 1] + iid[:, :, t]
    assert ((ess(ar) / (8000 * (1 - phi) / (1 + phi)) - 1).abs() < 0.25).all(), ess(ar)


def test_langevin_log_density_and_gradient():
    # log p(x | y) = Σ_i log N(u_i; u_{i−1} + β f(u_{i−1}) Δ, Δ) + log N(y; Mx, σ²I), written out with Normal
    M, y, g = _problem(2, seed=2)
    beta, dt = 7.0, 1 / D_X
    x = torch.randn(2, 5, D_X, generator=g, dtype=torch.float64)

    def reference(x):
        u_prev = torch.cat([torch.zeros_like(x[..., :1]), x[..., :-1]], -1)
        loc = u_prev + beta * u_prev * (1 - u_prev**2) / (1 + u_prev**2) * dt
        prior = torch.distributions.Normal(loc, dt**0.5).log_prob(x).sum(-1)
        return prior + torch.distributions.Normal(x @ M.T, OBS).log_prob(y[:, None]).sum(-1)

    lp, grad = posterior_log_prob_grad(beta, M, OBS, y)(x)
    ref = reference(x)
    assert torch.allclose(lp - lp[:, :1], ref - ref[:, :1], atol=1e-8)  # equal up to a constant per condition
    assert torch.allclose(grad, autograd_log_prob(reference)(x)[1], atol=1e-8)


def test_langevin_truth_mean_sample_and_cache(tmp_path):
    torch.manual_seed(0)
    overrides = ["suite.name=langevin", f"suite.langevin.d_x={D_X}", f"suite.langevin.D_y={D_Y}", "suite.K=2",
                 "suite.n=16", "suite.n_target_pool=8", "suite.n_test=24", "suite.langevin.beta_target=8",
                 "suite.langevin.mcmc_steps=128", f"tracking.home={tmp_path}"]
    ts = build_taskset(load_config(None, overrides))
    truth = ts.truth
    assert isinstance(truth, LangevinTruth) and truth.reference_diagnostics() == {}
    m = truth.mean(0, ts.test_y)
    assert m.shape == (24, D_X) and m.dtype == ts.test_y.dtype and truth.runs == 1
    assert torch.equal(truth.mean(0, ts.test_y), m) and truth.runs == 1  # memory cache
    files = list((tmp_path / "cache" / "langevin-mcmc").glob("*.pt"))
    assert len(files) == 1 and not list(files[0].parent.glob("*.tmp"))
    again = build_taskset(load_config(None, overrides)).truth  # a fresh process: the disk cache
    assert torch.equal(again.mean(0, ts.test_y), m) and again.runs == 0
    other = build_taskset(load_config(None, overrides + ["suite.langevin.mcmc_warmup=100"])).truth
    other.mean(0, ts.test_y)
    assert other.runs == 1  # chain settings are part of the key
    nodisk = build_taskset(load_config(None, overrides + ["suite.langevin.mcmc_cache=false"])).truth
    assert torch.equal(nodisk.mean(0, ts.test_y), m) and torch.equal(nodisk.mean(0, ts.test_y), m)
    assert nodisk.runs == 1 and len(list(files[0].parent.glob("*.pt"))) == 2  # memory cache alone; nothing written
    # the posterior mean beats the prior mean (0: the drift is odd and u_0 = 0) by far
    mse, prior_mse = (m - ts.test_x).pow(2).mean(), ts.test_x.pow(2).mean()
    assert mse < 0.25 * prior_mse, (mse, prior_mse)
    diag = truth.reference_diagnostics()
    assert diag["mcmc_rhat_max"] < 1.05 and diag["mcmc_ess_min"] > 100 and truth.diagnostics["mcmc_converged"]

    y = ts.test_y[:3].repeat_interleave(64, 0)  # as evaluate_model calls it
    gen = torch.Generator().manual_seed(0)
    a, b = truth.sample(0, y, gen), truth.sample(0, y, gen)
    assert a.shape == (192, D_X) and truth.runs == 2  # one run for the three distinct rows, reused by the 2nd call
    for s in (a, b):
        s = s.view(3, 64, D_X)
        # repeated rows get different draws (a chain repeats its state when it rejects, so a few may coincide)
        assert all(len(torch.unique(s[c], dim=0)) >= 56 for c in range(3))
        # 64 draws average to the posterior mean within ~5 standard errors (posterior sd ≤ 0.3 here)
        assert (s.mean(1) - m[:3]).abs().max() < 5 * 0.3 / 8
    shared = sum(len(set(map(tuple, a[i * 64:(i + 1) * 64].tolist())) & set(map(tuple, b[i * 64:(i + 1) * 64]
                                                                                   .tolist()))) for i in range(3))
    assert shared < 0.1 * 192  # two calls: (nearly) independent sets from a pool of chains·steps = 2048 per row
    assert torch.equal(truth.sample(0, y, torch.Generator().manual_seed(0)), a)  # reproducible from the generator
    assert truth.runs == 2
    assert math.isfinite(truth.reference_diagnostics()["mcmc_ess_min"])
