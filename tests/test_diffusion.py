"""OU forward process, DSM loss and the two samplers (cdmtransfer/diffusion.py; theory.md §1.2–1.3)."""

import math

import pytest
import torch

from cdmtransfer.diffusion import OUProcess, dsm_loss, sample, sample_ode, sample_sde, time_grid, tweedie_denoise

# A fixed 3-D Gaussian with a full covariance, used by the DSM and sampler tests.
MU = torch.tensor([1.0, -0.5, 0.8], dtype=torch.float64)
_B = torch.tensor([[0.9, 0.0, 0.0], [0.5, 0.6, 0.0], [-0.3, 0.4, 0.5]], dtype=torch.float64)
SIGMA = _B @ _B.T + 0.05 * torch.eye(3, dtype=torch.float64)  # eigenvalues spread over ~[0.1, 1.5]


def noisy_law(mu, Sigma, t):
    """x_t ~ N(α_t μ, α_t² Σ + σ_t² I) when x_0 ~ N(μ, Σ) under dX = −X dt + √2 dW."""
    a = math.exp(-t)
    s2 = -math.expm1(-2 * t)
    return a * mu, a**2 * Sigma + s2 * torch.eye(len(mu), dtype=Sigma.dtype)


def gaussian_score(mu, Sigma):
    """Exact ∇log p_t(x_t) of the OU-noised N(μ, Σ), batched over rows with a per-row t."""
    lam, U = torch.linalg.eigh(Sigma.float())
    mu = mu.float()

    def score(x, t):
        a = torch.exp(-t)[:, None]
        s2 = -torch.expm1(-2 * t)[:, None]
        r = (x - a * mu) @ U
        return -(r / (a**2 * lam + s2)) @ U.T

    return score


@pytest.fixture
def one_thread():
    """The samplers run hundreds of steps on [20000, 3] tensors; at that size a 2-thread OpenMP split costs more in
    synchronisation than it saves (and is 20x slower when the cores are shared), so these tests use one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------------------
# OU process


def test_ou_perturb_marginals_match_alpha_sigma():
    torch.manual_seed(0)
    proc = OUProcess(0.01, 5.0)
    x0 = torch.tensor([1.5, -2.0, 0.3])
    n = 200_000
    for t_val in (0.05, 0.5, 2.0):
        t = torch.full((n,), t_val)
        xt = proc.perturb(x0.expand(n, 3), t, torch.randn(n, 3))
        assert xt.shape == (n, 3)
        mean_expected = math.exp(-t_val) * x0
        var_expected = 1 - math.exp(-2 * t_val)
        assert torch.allclose(xt.mean(0), mean_expected, atol=0.01), (t_val, xt.mean(0), mean_expected)
        assert torch.allclose(xt.var(0), torch.full((3,), var_expected), rtol=0.03), (t_val, xt.var(0))


def test_ou_perturb_uses_each_rows_own_t():
    proc = OUProcess(0.01, 5.0)
    x0 = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    noise = torch.tensor([[0.5, -1.0], [0.5, -1.0]])
    t = torch.tensor([0.1, 1.0])
    xt = proc.perturb(x0, t, noise)
    for i in range(2):
        a, s = math.exp(-t[i].item()), math.sqrt(1 - math.exp(-2 * t[i].item()))
        assert torch.allclose(xt[i], a * x0[i] + s * noise[i], atol=1e-6)


@pytest.mark.parametrize("t_val", [1e-8, 1e-6, 1e-4, 1e-2, 0.5, 3.0])
def test_sigma_alpha_accurate_including_tiny_t(t_val):
    t = torch.tensor([t_val], dtype=torch.float32)
    want_sigma = math.sqrt(-math.expm1(-2 * t_val))  # float64 reference
    got = OUProcess.sigma(t).item()
    assert got > 0
    assert abs(got - want_sigma) / want_sigma < 1e-5, (t_val, got, want_sigma)
    assert abs(OUProcess.alpha(t).item() - math.exp(-t_val)) < 1e-6


def test_alpha_sigma_satisfy_variance_preservation():
    t = torch.linspace(0.01, 5.0, 50, dtype=torch.float64)
    assert torch.allclose(OUProcess.alpha(t) ** 2 + OUProcess.sigma(t) ** 2, torch.ones_like(t), atol=1e-12)


def test_sample_t_uniform_on_T0_T():
    proc = OUProcess(0.2, 3.0)
    g = torch.Generator().manual_seed(0)
    t = proc.sample_t((50_000,), g)
    assert t.min() >= 0.2 and t.max() <= 3.0
    assert abs(t.mean().item() - 1.6) < 0.02
    assert abs(t.var().item() - 2.8**2 / 12) < 0.02


@pytest.mark.parametrize("T0,T", [(0.0, 1.0), (-0.1, 1.0), (1.0, 1.0), (2.0, 1.0)])
def test_ou_process_rejects_bad_horizon(T0, T):
    with pytest.raises(ValueError):
        OUProcess(T0, T)


# --------------------------------------------------------------------------------------------------------------
# Denoising score matching


def test_dsm_loss_is_per_sample_squared_error():
    eps_pred = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]])
    noise = torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 1.0]])
    out = dsm_loss(eps_pred, noise)
    assert out.shape == (3,)
    assert torch.allclose(out, torch.tensor([5.0, 2.0, 4.0]))


def test_dsm_loss_minimised_at_true_score_with_excess_sigma2_delta2(one_thread):
    """E‖ε̂−ε‖² = σ_t² E‖s − s*‖² + const, minimised by ε̂ = −σ_t s* (the DSM identity)."""
    g = torch.Generator().manual_seed(1)
    n, t_val = 400_000, 0.4
    proc = OUProcess(0.01, 5.0)
    L = torch.linalg.cholesky(SIGMA)
    x0 = MU + torch.randn(n, 3, generator=g, dtype=torch.float64) @ L.T
    eps = torch.randn(n, 3, generator=g, dtype=torch.float64)
    t = torch.full((n,), t_val, dtype=torch.float64)
    xt = proc.perturb(x0, t, eps)
    sig = OUProcess.sigma(t)[:, None]
    mean_t, cov_t = noisy_law(MU, SIGMA, t_val)
    s_star = -torch.linalg.solve(cov_t, (xt - mean_t).T).T

    base = dsm_loss(-sig * s_star, eps).mean().item()
    # The minimum value is E tr Cov(ε | x_t) = d − σ² tr((α²Σ + σ²I)^{-1}).
    s2 = sig[0, 0].item() ** 2
    assert abs(base - (3 - s2 * torch.linalg.inv(cov_t).trace().item())) < 0.01

    deltas = [torch.tensor([0.5, 0.0, 0.0]), torch.tensor([0.0, -1.0, 0.7]), torch.tensor([0.3, 0.3, 0.3])]
    deltas = [d.double().expand(n, 3) for d in deltas] + [0.4 * xt, -0.3 * (xt - mean_t).flip(-1)]
    for delta in deltas:
        loss = dsm_loss(-sig * (s_star + delta), eps).mean().item()
        predicted_excess = s2 * delta.pow(2).sum(-1).mean().item()
        assert loss > base
        assert abs((loss - base) - predicted_excess) < 0.05 * predicted_excess + 1e-3, (loss - base, predicted_excess)


# --------------------------------------------------------------------------------------------------------------
# Time grid and samplers


def test_time_grid_decreasing_from_T_to_T0():
    grid = time_grid(50, 0.01, 5.0)
    assert grid.shape == (51,)
    assert math.isclose(grid[0].item(), 5.0, rel_tol=1e-5)
    assert math.isclose(grid[-1].item(), 0.01, rel_tol=1e-5)
    assert (grid[1:] < grid[:-1]).all()
    ratios = grid[1:] / grid[:-1]  # documented: evenly spaced in log t
    assert torch.allclose(ratios, ratios.mean().expand_as(ratios), rtol=1e-4)


@pytest.mark.parametrize("method", ["sde", "ode"])
def test_sampler_recovers_known_gaussian(method, one_thread):
    proc = OUProcess(0.01, 5.0)
    g = torch.Generator().manual_seed(2)
    x = sample(gaussian_score(MU, SIGMA), 20_000, 3, proc, 200, method, g).double()
    assert x.shape == (20_000, 3) and torch.isfinite(x).all()
    mean_T0, cov_T0 = noisy_law(MU, SIGMA, 0.01)  # the exact law at the early-stopping time
    assert (x.mean(0) - mean_T0).abs().max() < 0.05, x.mean(0)
    assert (torch.cov(x.T) - cov_T0).abs().max() < 0.1, torch.cov(x.T)


@pytest.mark.parametrize("method", ["sde", "ode"])
def test_sampler_with_wrong_score_misses_the_target(method, one_thread):
    """Negative controls: the checks above do detect a wrong mean and a wrong covariance."""
    proc = OUProcess(0.01, 5.0)
    mean_T0, cov_T0 = noisy_law(MU, SIGMA, 0.01)
    g = torch.Generator().manual_seed(3)
    x = sample(gaussian_score(torch.zeros(3), torch.eye(3)), 20_000, 3, proc, 200, method, g).double()
    assert (x.mean(0) - mean_T0).abs().max() > 0.5
    g = torch.Generator().manual_seed(3)
    x = sample(gaussian_score(MU, torch.eye(3)), 20_000, 3, proc, 200, method, g).double()
    assert (x.mean(0) - mean_T0).abs().max() < 0.05
    assert (torch.cov(x.T) - cov_T0).abs().max() > 0.3


def test_tweedie_denoise_is_the_exact_conditional_mean():
    """E[x_0|x_t] = μ + α Σ (α²Σ + σ²I)⁻¹ (x_t − αμ) for x_0 ~ N(μ, Σ), fed the exact score."""
    t = 0.3
    a, s2 = math.exp(-t), -math.expm1(-2 * t)
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = tweedie_denoise(gaussian_score(MU, SIGMA), x.float(), t).double()
    gain = a * SIGMA @ torch.linalg.inv(a**2 * SIGMA + s2 * torch.eye(3, dtype=torch.float64))
    want = MU + (x - a * MU) @ gain.T
    assert torch.allclose(got, want, atol=1e-4)


def test_denoised_samples_keep_the_mean_and_lose_the_noise(one_thread):
    """Sampling to T0 = 0.3 leaves x_T0's law (mean αμ); denoised, the mean is μ and the spread is below Σ's."""
    proc = OUProcess(0.3, 5.0)
    score = gaussian_score(MU, SIGMA)
    raw = sample(score, 20_000, 3, proc, 200, "sde", torch.Generator().manual_seed(4)).double()
    den = sample(score, 20_000, 3, proc, 200, "sde", torch.Generator().manual_seed(4), denoise=True).double()
    assert (raw.mean(0) - MU).abs().max() > 0.2  # αμ, not μ
    assert (den.mean(0) - MU).abs().max() < 0.03, den.mean(0)
    assert (torch.diagonal(torch.cov(den.T)) < torch.diagonal(SIGMA)).all()
    assert (torch.diagonal(torch.cov(raw.T)) > torch.diagonal(torch.cov(den.T))).all()


def test_sample_reproducible_and_rejects_unknown_method():
    proc = OUProcess(0.01, 5.0)
    score = gaussian_score(MU, SIGMA)
    a = sample(score, 64, 3, proc, 20, "sde", torch.Generator().manual_seed(7))
    b = sample(score, 64, 3, proc, 20, "sde", torch.Generator().manual_seed(7))
    c = sample(score, 64, 3, proc, 20, "sde", torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(score, 4, 3, proc, 10, "euler", None)


def test_ode_is_deterministic_given_start_and_sde_is_not(one_thread):
    score = gaussian_score(MU, SIGMA)
    grid = time_grid(30, 0.01, 5.0)
    x = torch.randn(128, 3, generator=torch.Generator().manual_seed(0))
    a = sample_ode(score, x.clone(), grid, torch.Generator().manual_seed(1))
    b = sample_ode(score, x.clone(), grid, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = sample_sde(score, x.clone(), grid, torch.Generator().manual_seed(1))
    d = sample_sde(score, x.clone(), grid, torch.Generator().manual_seed(2))
    assert not torch.allclose(c, d)


@pytest.mark.parametrize("parametrization, linear_mean, covariance, per_head_sd", [
    ("eps", False, "scalar", False), ("eps", True, "scalar", False), ("edm", False, "scalar", False),
    ("edm", True, "scalar", True), ("edm", True, "full", False)])
def test_sampling_eps_equals_eps_from_code(parametrization, linear_mean, covariance, per_head_sd):
    """The sampler's fast path (row- and time-constant terms computed once) is the model's ε̂, head by head."""
    from cdmtransfer.models import MLPEncoder, ScoreModel

    torch.manual_seed(0)
    model = ScoreModel(MLPEncoder(6, 3, 16, 2), 3, 4, 16, 2, 8, parametrization=parametrization, sigma_data=0.7,
                       linear_mean=linear_mean, mean_covariance=covariance)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.normal_(0, 0.5)  # zero-initialised means and biases would hide a term left out
        if model.full_covariance:
            model.heads.mean.basis.copy_(torch.linalg.qr(torch.randn(3, 4, 4))[0])
            model.heads.mean.scale.uniform_(0.3, 2.0)
    if per_head_sd:
        model.precond.sd = torch.tensor([0.5, 1.5, 3.0])[:, None, None]
    y, x = torch.randn(10, 6), torch.randn(10, 4)
    with torch.no_grad():
        code = model.encoder(y)
        for head in range(3):
            eps = model.sampling_eps(code, head=head)
            for t in (0.01, 0.4, 3.0):
                tt = torch.full((3, 10), t)
                want = model.eps_from_code(x.expand(3, 10, 4), code.expand(3, 10, 3), tt)[head]
                out = torch.empty(10, 4)
                assert torch.allclose(eps(x, torch.tensor(t), out=out), want, rtol=1e-5, atol=1e-5)
                assert torch.allclose(out, want, rtol=1e-5, atol=1e-5)
        sd = model.precond.sd if model.precond is not None else None
        model.heads.active = torch.tensor([2])  # a stack still training (stages._run_only): the generic path
        if per_head_sd:
            model.precond.sd = sd[2:]
        got = model.sampling_eps(code)(x, torch.tensor(0.4))  # head 0 of the running heads: head 2
        model.heads.active = None
        if per_head_sd:
            model.precond.sd = sd
        want = model.eps_from_code(x.expand(3, 10, 4), code.expand(3, 10, 3), torch.full((3, 10), 0.4))
        assert torch.allclose(got, want[2], rtol=1e-5, atol=1e-5)
        model.__class__ = type("OwnEps", (ScoreModel,), {"eps_from_code": ScoreModel.eps_from_code})
        got = model.sampling_eps(code, head=1)(x, torch.tensor(0.4))  # a subclass's own ε̂: the generic path
        assert torch.allclose(got, want[1], rtol=1e-6, atol=1e-6)


def test_sde_sampler_leaves_its_start_alone():
    x = torch.randn(32, 3)
    start = x.clone()
    sample_sde(gaussian_score(MU, SIGMA), x, time_grid(10, 0.01, 5.0), torch.Generator().manual_seed(0))
    assert torch.equal(x, start)
