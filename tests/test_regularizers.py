"""Companion-paper regularisers: unbiasedness of the consistency estimator against a closed form, MMD/HSIC against
closed forms and known (in)dependence, subspace metrics at their extremes, the LSGMM suite's exact scores, and a
short end-to-end pretrain/adapt with each term on."""

import math

import pytest
import torch
from mlflow import MlflowClient
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

import cdmtransfer
from cdmtransfer.config import load_config
from cdmtransfer.diagnostics import active_subspace, subspace_error
from cdmtransfer.diffusion import OUProcess
from cdmtransfer.errors import ConfigError
from cdmtransfer.models import FixedEncoder, MLPEncoder, ScoreModel
from cdmtransfer.regularizers import (RegularizedObjective, consistency_loss, hsic, make_objective, mmd2,
                                      mixmatch_penalty, pairwise_gap, reverse_chain, swapped_heads_eps,
                                      x0_prediction)
from cdmtransfer.stages import dsm_objective
from cdmtransfer.tasks import build_taskset

# --------------------------------------------------------------------------------------------------------------
# §D consistency: an affine ε-model has affine Euler–Maruyama chains, so E[a | x_t] is the noise-free chain's x̂₀


MU, S2 = torch.tensor([1.0, -0.5, 0.3]), 0.25  # data x₀ ~ N(μ, s² I)


def gaussian_eps(scale: float):
    """ε̂ = scale · σ_t (x − α μ)/(α² s² + σ²): scale 1 is the exact noise predictor of N(μ, s² I)."""

    def eps_fn(x, t):
        a, s = OUProcess.alpha(t)[..., None], OUProcess.sigma(t)[..., None]
        return scale * s * (x - a * MU) / (a**2 * S2 + s**2)

    return eps_fn


def mean_chain_gap(eps_fn, x_t, t, t_to, steps):
    """‖E[a] − b‖² in closed form: the chain's mean follows the drift alone (affine drift), x̂₀ is affine too."""
    x, h = x_t.clone(), (t - t_to) / steps
    for i in range(steps):
        tt = t - i * h
        x = x + h[:, None] * (x - 2 * eps_fn(x, tt) / OUProcess.sigma(tt)[:, None])
    b = x0_prediction(x_t, eps_fn(x_t, t), t)
    return (x0_prediction(x, eps_fn(x, t_to), t_to) - b).pow(2).sum(-1)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_consistency_estimator_is_unbiased(scale):
    g = torch.Generator().manual_seed(0)
    eps_fn = gaussian_eps(scale)
    t0 = torch.tensor([0.3, 0.8])
    x_t0 = torch.tensor([[0.5, 0.2, -1.0], [1.5, -0.3, 0.4]])
    t_to0 = t0 - 0.25
    R = 20000  # independent estimator draws per point
    x_t, t, t_to = x_t0.repeat(R, 1), t0.repeat(R), t_to0.repeat(R)
    b = x0_prediction(x_t, eps_fn(x_t, t), t)
    lc = consistency_loss(eps_fn, x_t, t, b, t_to, 4, g).view(R, 2)
    exact = mean_chain_gap(eps_fn, x_t0, t0, t_to0, 4)
    se = lc.std(0) / math.sqrt(R)
    assert torch.all((lc.mean(0) - exact).abs() < 4 * se + 1e-4), (lc.mean(0), exact, se)
    # and the many-chain pairwise estimator (used by the diagnostic) agrees
    chains = 2000
    ends = reverse_chain(eps_fn, x_t0.repeat(chains, 1), t0.repeat(chains), t_to0.repeat(chains), 4, g)
    a = x0_prediction(ends, eps_fn(ends, t_to0.repeat(chains)), t_to0.repeat(chains)).view(chains, 2, 3)
    assert torch.allclose(pairwise_gap(a, b[:2]), exact, atol=6 * float(se.max()) + 1e-4)


def test_consistency_gap_is_small_for_the_true_model_and_large_for_a_wrong_one():
    t, x_t = torch.full((2,), 0.6), torch.tensor([[0.5, 0.2, -1.0], [1.5, -0.3, 0.4]])
    right = mean_chain_gap(gaussian_eps(1.0), x_t, t, t - 0.3, 8).max()
    wrong = mean_chain_gap(gaussian_eps(0.5), x_t, t, t - 0.3, 8).min()
    assert right < 1e-3 and wrong > 0.05, (right, wrong)


# --------------------------------------------------------------------------------------------------------------
# MMD and HSIC


def test_mmd_unbiased_matches_closed_form_for_shifted_gaussians():
    g = torch.Generator().manual_seed(1)
    d, s, n, reps = 2, 0.7, 200, 60
    shift = torch.tensor([0.8, 0.0])
    same = torch.stack([mmd2(s * torch.randn(n, d, generator=g), s * torch.randn(n, d, generator=g))
                        for _ in range(reps)])
    moved = torch.stack([mmd2(s * torch.randn(n, d, generator=g), shift + s * torch.randn(n, d, generator=g))
                         for _ in range(reps)])
    # E k(a, b), a − b ~ N(Δ, 2s² I), k = exp(−‖·‖²/γ): (1 + 4s²/γ)^{−d/2} exp(−‖Δ‖²/(γ + 4s²)), γ = d
    gamma = float(d)
    closed = 2 * (1 + 4 * s**2 / gamma) ** (-d / 2) * (1 - math.exp(-float(shift @ shift) / (gamma + 4 * s**2)))
    assert abs(float(same.mean())) < 3 * float(same.std()) / math.sqrt(reps)
    assert abs(float(moved.mean()) - closed) < 3 * float(moved.std()) / math.sqrt(reps) + 1e-3, (moved.mean(), closed)
    assert float(moved.mean()) > 10 * float(same.std())


def test_hsic_zero_for_independent_positive_for_dependent_and_scale_free():
    g = torch.Generator().manual_seed(2)
    n = 300
    a = torch.randn(n, 3, generator=g)
    indep = torch.stack([hsic(torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g)) for _ in range(30)])
    weak = hsic(a, a[:, :2] + 2.0 * torch.randn(n, 2, generator=g))
    strong = hsic(a, a[:, :2] + 0.1 * torch.randn(n, 2, generator=g))
    assert abs(float(indep.mean())) < 3 * float(indep.std()) / math.sqrt(30)
    assert strong > 3 * weak and weak > 5 * indep.std()
    b = a[:, :1] ** 2
    assert torch.allclose(hsic(7.0 * a, 0.1 * b), hsic(a, b), rtol=1e-4)  # median heuristic: scale-free
    assert hsic(a, b, unbiased=False) > 0
    onehot = torch.eye(3)[torch.arange(n) % 3]  # the 'task' nuisance
    assert hsic(a + 3 * onehot, onehot) > 10 * hsic(a, onehot).abs()


# --------------------------------------------------------------------------------------------------------------
# Subspace metrics


def test_subspace_error_extremes():
    Q = torch.linalg.qr(torch.randn(10, 6, generator=torch.Generator().manual_seed(3)))[0]
    U, V = Q[:, :3], Q[:, 3:]
    mix = torch.randn(3, 3, generator=torch.Generator().manual_seed(4))
    assert subspace_error(U, U @ mix) < 1e-6  # same span, another basis
    assert abs(subspace_error(U, V) - 1.0) < 1e-6  # orthogonal spans


def lsgmm_cfg(*extra):
    return load_config(None, ["suite.name=lsgmm", "suite.K=3", "suite.n=64", "suite.n_target_pool=64",
                              "suite.n_test=64", "suite.lsgmm.d_x=6", "suite.lsgmm.D_y=6", *extra])


def test_active_subspace_recovers_true_and_orthogonal_encoders():
    truth = build_taskset(lsgmm_cfg()).truth
    y = torch.randn(50, 6)
    for W, err in ((truth.content_basis().T, 0.0), (truth.style_basis().T, 1.0)):
        C = active_subspace(FixedEncoder(W, torch.zeros(2)), y)
        top = torch.linalg.eigh(C.double())[1][:, -2:]
        assert abs(subspace_error(top, truth.content_basis()) - err) < 1e-5


# --------------------------------------------------------------------------------------------------------------
# LSGMM suite


def test_lsgmm_scores_are_gradients_of_noisy_log_densities():
    ts = build_taskset(lsgmm_cfg())
    tr = ts.truth
    g = torch.Generator().manual_seed(5)
    B = 30
    y = ts.test_y[:B].double()
    x_t = 1.5 * torch.randn(B, 6, generator=g, dtype=torch.float64)
    t = torch.logspace(-2, math.log10(3.0), B, dtype=torch.float64)
    a, s2 = torch.exp(-t)[:, None, None], (1 - torch.exp(-2 * t))[:, None, None]
    eye = torch.eye(6, dtype=torch.float64)
    A, Mz, means = tr.A.double(), tr.M_z.double(), tr.means.double()
    for task in (0, 2):
        Bk = tr.B[task].double()
        Sigma = Bk @ Bk.T + tr.noise**2 * eye
        x = x_t.clone().requires_grad_(True)
        mean = (y @ Mz) @ A.T
        logp = MultivariateNormal(a[:, :, 0] * mean, covariance_matrix=a**2 * Sigma + s2 * eye).log_prob(x).sum()
        (ref,) = torch.autograd.grad(logp, x)
        got = tr.score(task, x_t.float(), y.float(), t.float()).double()
        assert torch.allclose(got, ref, rtol=1e-3, atol=1e-3)
        # unconditional: the GMM convolved with the OU kernel
        cov = a**2 * (tr.scale**2 * A @ A.T + Sigma) + s2 * eye
        mix = MixtureSameFamily(Categorical(torch.ones(B, len(means), dtype=torch.float64)),
                                MultivariateNormal(a * (means @ A.T)[None], covariance_matrix=cov[:, None]))
        x = x_t.clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(mix.log_prob(x).sum(), x)
        got = tr.marginal_score(task, x_t.float(), t.float()).double()
        assert torch.allclose(got, ref, rtol=1e-3, atol=1e-3)


def test_lsgmm_sampler_is_the_stated_gaussian_and_h_star_is_content():
    ts = build_taskset(lsgmm_cfg())
    tr = ts.truth
    y = ts.test_y[:1].repeat(20000, 1)
    x = tr.sample(1, y, torch.Generator().manual_seed(6))
    Bk = tr.B[1]
    assert torch.allclose(x.mean(0), tr.mean(1, y[:1])[0], atol=0.03)
    assert torch.allclose(torch.cov(x.T), Bk @ Bk.T + tr.noise**2 * torch.eye(6), atol=0.03)
    # A ⟂ B_k, orthonormal; the oracle encoder returns z, the style map returns u
    full = torch.cat([tr.A, Bk], dim=1)
    assert torch.allclose(full.T @ full, torch.eye(4), atol=1e-5)
    assert torch.allclose(tr.encoder()(ts.test_y), tr.h_star(ts.test_y))


# --------------------------------------------------------------------------------------------------------------
# Wiring into the one loop


def test_zero_weights_give_the_plain_dsm_path_exactly():
    cfg = lsgmm_cfg()
    process = OUProcess(0.01, 4.0)
    assert make_objective(cfg.regularize, "pretrain", process) is None
    ts = build_taskset(cfg)
    torch.manual_seed(0)
    model = ScoreModel(MLPEncoder(6, 2, 16, 1), 3, 6, 16, 1, 8)
    plain = dsm_objective(ts.source_x, ts.source_y, ts.source_n, process, 8)
    reg = dsm_objective(ts.source_x, ts.source_y, ts.source_n, process, 8,
                        regularizer=RegularizedObjective(cfg.regularize, process))
    assert torch.equal(plain(model, torch.Generator().manual_seed(1)), reg(model, torch.Generator().manual_seed(1)))


FAST = ["pretrain.steps=20", "pretrain.batch_size=16", "pretrain.log_every=10", "pretrain.warmup_steps=2",
        "adapt.steps=20", "adapt.batch_size=16", "adapt.m=8", "adapt.log_every=10", "adapt.warmup_steps=2",
        "model.d=2", "model.encoder_width=16", "model.encoder_depth=1", "model.head_width=16",
        "model.head_depth=1", "model.time_dim=8", "evaluate.t_draws=1", "evaluate.posterior_samples=4",
        "evaluate.posterior_conditions=8", "evaluate.sampler_steps=8", "evaluate.dist_conditions=2",
        "evaluate.dist_samples=8"]
TERMS = {"consistency": ["regularize.consistency.weight=1.0"], "mmd": ["regularize.mmd.weight=1.0"],
         "info": ["regularize.info.weight=1.0"],
         "hsic": ["regularize.hsic.weight=1.0", "regularize.hsic.nuisance=style"]}


@pytest.mark.parametrize("term", list(TERMS))
def test_adapt_with_each_regulariser_runs_and_logs(term, store):
    over = FAST + ["adapt.mode=scratch", "adapt.val_folds=1"] + TERMS[term]  # no cross-validation: all 20 steps run
    out = cdmtransfer.adapt(lsgmm_cfg(*over))
    key = {"consistency": "reg_consistency", "mmd": "reg_mmd", "info": "reg_info_gap", "hsic": "reg_hsic"}[term]
    assert math.isfinite(out.metrics[key]) and math.isfinite(out.metrics["final_loss"])
    for diag in ("subspace_error", "style_leakage", "probe_r2", "consistency_gap_t0.5", "mmd_to_prior"):
        assert math.isfinite(out.metrics[diag]), diag
    logged = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db").get_run(out.run_id).data
    assert key in logged.metrics and logged.params[f"regularize.{term}.weight"] == "1.0"


def test_pretrain_with_all_terms_logs_each(store):
    over = FAST + [v for vs in TERMS.values() for v in vs if "nuisance" not in v] + ["regularize.stages=pretrain"]
    out = cdmtransfer.pretrain(lsgmm_cfg(*over))
    for key in ("reg_dsm", "reg_consistency", "reg_mmd", "reg_info_gap", "reg_hsic"):
        assert math.isfinite(out.metrics[key]), key
    assert out.metrics["reg_hsic"] != 0


# --------------------------------------------------------------------------------------------------------------
# §A.2 mix-and-match on the view-LSGMM (suite.lsgmm.condition = view), per-step regulariser metrics


def view_cfg(*extra):
    return lsgmm_cfg("suite.lsgmm.condition=view", *extra)


def test_view_lsgmm_condition_gives_content_exactly_and_scores_are_exact():
    ts = build_taskset(view_cfg())
    tr = ts.truth
    g = torch.Generator().manual_seed(7)
    B = 30
    z = 2 * torch.randn(B, 2, generator=g)
    for task in (0, 2):
        y = tr.condition(task, z, g)
        assert torch.allclose(tr.h_star(y), z, atol=1e-5) and torch.allclose(tr.encoder()(y), z, atol=1e-5)
        # the view's non-content part lies in the complement of A, carries B_k u (u ~ N(c_k, I)) plus noise
        rest = y - z @ tr.A.T
        assert torch.allclose(rest @ tr.A, torch.zeros(B, 2), atol=1e-5)
        u = rest @ tr.B[task]
        assert (u.mean(0) - tr.offsets[task]).abs().max() < 4 / B**0.5 * 1.2
        # exact score vs autograd of log N(x_t; α A z, α² Σ_k + σ² I), with the true z (not h*)
        x_t = 1.5 * torch.randn(B, 6, generator=g, dtype=torch.float64)
        t = torch.logspace(-2, math.log10(3.0), B, dtype=torch.float64)
        a, s2 = torch.exp(-t)[:, None, None], (1 - torch.exp(-2 * t))[:, None, None]
        eye = torch.eye(6, dtype=torch.float64)
        Bk, A = tr.B[task].double(), tr.A.double()
        Sigma = Bk @ Bk.T + tr.noise**2 * eye
        x = x_t.clone().requires_grad_(True)
        logp = MultivariateNormal(a[:, :, 0] * (z.double() @ A.T), covariance_matrix=a**2 * Sigma + s2 * eye)
        (ref,) = torch.autograd.grad(logp.log_prob(x).sum(), x)
        got = tr.score(task, x_t.float(), y, t.float()).double()
        assert torch.allclose(got, ref, rtol=1e-3, atol=1e-3)
    # the content basis is span(A) itself and the conditions fill R^{D_y} (the view noise spans the complement of A)
    assert subspace_error(tr.content_basis(), tr.A) < 1e-6
    assert torch.allclose(tr.support_basis(), torch.eye(6))
    with pytest.raises(ConfigError, match="D_y = d_x"):
        build_taskset(view_cfg("suite.lsgmm.D_y=8"))


class TaggedHeads:
    """eps_from_code returning the head index of each slice (to check which head ran on which task's rows)."""

    def eps_from_code(self, x_t, code, t, y=None):
        return torch.arange(x_t.shape[0], dtype=x_t.dtype)[:, None, None].expand_as(x_t)


def test_swapped_heads_put_each_task_on_another_head_in_one_call():
    K = 5
    x = torch.arange(K, dtype=torch.float32)[:, None, None].expand(K, 3, 2)  # row value = its task
    for s in range(1, K):
        out = swapped_heads_eps(TaggedHeads(), x, x, x[..., 0], torch.tensor(s))
        assert torch.equal(out[:, 0, 0], (torch.arange(K) + s).float() % K)


class DecoderModel(torch.nn.Module):
    """A head family whose Tweedie x̂₀ is exactly A·code[:k] + B_{j+1} v_j: content from the code, its own style."""

    def __init__(self, encoder, truth, K):
        super().__init__()
        self.encoder, self.truth = encoder, truth
        self.styles = 3 * torch.randn(K, truth.B.shape[2], generator=torch.Generator().manual_seed(8))

    linear_mean = False  # no linear mean of the code (ScoreModel's model.linear_mean)

    def dsm_weight(self, t):  # the paper's weighting, as ScoreModel's default
        return torch.ones_like(t)

    def eps_from_code(self, x_t, code, t, y=None):
        tr, K = self.truth, x_t.shape[0]
        style = torch.einsum("kdm,km->kd", tr.B[1:K + 1], self.styles[:K])[:, None]
        x0 = code[..., : tr.A.shape[1]] @ tr.A.T + style
        return (x_t - OUProcess.alpha(t)[..., None] * x0) / OUProcess.sigma(t)[..., None]


def linear_encoder(W):
    enc = MLPEncoder(W.shape[1], W.shape[0], 1, 0)  # depth 0: one trainable Linear, set to W
    with torch.no_grad():
        enc.net[0].weight.copy_(W)
        enc.net[0].bias.zero_()
    return enc


def test_mixmatch_is_zero_for_the_content_encoder_and_positive_when_it_reads_style():
    ts = build_taskset(view_cfg("suite.lsgmm.noise=0.05"))
    tr = ts.truth
    process = OUProcess(0.01, 4.0)
    cfg = view_cfg("regularize.mixmatch.weight=1.0", "regularize.mixmatch.t_max=null")
    obj = make_objective(cfg.regularize, "pretrain", process, tr)
    assert make_objective(cfg.regularize, "adapt", process, tr) is None  # one head: nothing to swap
    loss_fn = dsm_objective(ts.source_x, ts.source_y, ts.source_n, process, 32, regularizer=obj)
    values = {}
    for name, W in (("content", tr.A.T), ("content+style", torch.cat([tr.A, tr.B[1]], dim=1).T)):
        obj.running.clear()
        loss_fn(DecoderModel(linear_encoder(W), tr, 3), torch.Generator().manual_seed(9))
        values[name] = float(obj.running["mixmatch"])
    # h = Aᵀ: h(X̂) = Aᵀ(A z + B v) = z = h(y) whatever style the swapped head adds; reading B_1 sees v ≠ u
    assert values["content"] < 1e-8 and values["content+style"] > 0.5, values
    # normalised by the codes' batch variance: rescaling h does not change the term
    W, y = torch.cat([tr.A, tr.B[1]], dim=1).T, ts.source_y[:, :16]
    x_hat = torch.randn(y.shape, generator=torch.Generator().manual_seed(10))
    p1, p3 = (mixmatch_penalty(linear_encoder(c * W), x_hat, linear_encoder(c * W)(y)) for c in (1.0, 3.0))
    assert torch.allclose(p1, p3, rtol=1e-4) and p1.mean() > 0
    # t_max masks the rows above it; the D_y = d_x requirement is a config error
    cfg = view_cfg("regularize.mixmatch.weight=1.0", "regularize.mixmatch.t_max=0.02")
    obj = make_objective(cfg.regularize, "pretrain", process, tr)
    loss_fn = dsm_objective(ts.source_x, ts.source_y, ts.source_n, process, 32, regularizer=obj)
    W = torch.cat([tr.A, tr.B[1]], dim=1).T
    loss_fn(DecoderModel(linear_encoder(W), tr, 3), torch.Generator().manual_seed(9))
    assert float(obj.running["mixmatch"]) < 0.1 * values["content+style"]


def test_mixmatch_on_a_suite_without_views_is_refused_before_any_run(store):
    bad = lsgmm_cfg(*FAST, "suite.lsgmm.D_y=8", "regularize.mixmatch.weight=1.0")
    with pytest.raises(ConfigError, match="D_y = d_x"):
        cdmtransfer.pretrain(bad)
    one = lsgmm_cfg(*FAST, "suite.K=1", "suite.lsgmm.condition=view", "regularize.mixmatch.weight=1.0")
    with pytest.raises(ConfigError, match="K >= 2"):
        cdmtransfer.pretrain(one)
    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_pretrain_with_mixmatch_logs_each_term_by_step(store):
    over = FAST + ["suite.lsgmm.condition=view", "regularize.stages=pretrain", "regularize.mixmatch.weight=1.0",
                   "regularize.hsic.weight=1.0"]
    out = cdmtransfer.pretrain(lsgmm_cfg(*over))
    assert math.isfinite(out.metrics["reg_mixmatch"]) and out.metrics["reg_mixmatch"] > 0
    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    for key in ("reg/dsm", "reg/mixmatch", "reg/hsic"):
        hist = client.get_metric_history(out.run_id, key)
        assert sorted(m.step for m in hist) == [10, 20], key
        assert all(math.isfinite(m.value) for m in hist)
    loss = {m.step: m.value for m in client.get_metric_history(out.run_id, "loss")}
    assert set(loss) == {10, 20}
