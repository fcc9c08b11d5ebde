"""Training to convergence: held-out splits, the validation loss, early stopping with the best weights kept, stacked
fold encoders, and the EDM preconditioning's implied score."""

import math

import pytest
import torch
from torch import nn

from cdmtransfer.config import TrainConfig
from cdmtransfer.diffusion import OUProcess, dsm_loss
from cdmtransfer.models import ConvEncoder, MLPEncoder, Preconditioning, ScoreModel
from cdmtransfer.train import train
from cdmtransfer.validation import StackedEncoder, dsm_validation, fold_split, holdout_split


def test_holdout_split_is_disjoint_capped_and_ignores_padding():
    counts = torch.tensor([10, 40, 3000])
    train_rows, val_rows = holdout_split(counts, 0.2, seed=0)
    assert not (train_rows.mask & val_rows.mask).any()
    assert (train_rows.mask | val_rows.mask).sum(1).tolist() == counts.tolist()  # padding rows in neither
    assert val_rows.mask.sum(1).tolist() == [2, 8, 256]  # 20%, capped at MAX_VAL_ROWS
    x = torch.arange(3 * 3000, dtype=torch.float).view(3, 3000, 1)
    xv, yv, nv = val_rows.gather(x, x)
    assert nv.tolist() == [2, 8, 256]
    picked = set(xv[1, :8, 0].tolist())
    assert picked == set(x[1][val_rows.mask[1]][:, 0].tolist())
    assert holdout_split(counts, 0.0, seed=0)[1] is None


def test_folds_hold_out_each_sample_exactly_once():
    folds = fold_split(10, 4)
    x = torch.arange(10, dtype=torch.float)[:, None]
    (xt, _, nt), (xv, _, nv) = folds.gather(x, x)
    assert nt.tolist() == [7, 7, 8, 8] and nv.tolist() == [3, 3, 2, 2]
    held = sorted(v for f in range(4) for v in xv[f, : nv[f], 0].tolist())
    assert held == list(range(10))
    for f in range(4):
        assert not set(xv[f, : nv[f], 0].tolist()) & set(xt[f, : nt[f], 0].tolist())
    assert fold_split(1, 4) is None and fold_split(3, 4).count == 3


@pytest.mark.parametrize("kind", ["mlp", "mlp-linear", "conv"])  # mlp: batched matmuls; conv: torch.func's vmap
def test_stacked_encoder_copies_are_independent_and_match_the_single_encoder(kind):
    torch.manual_seed(0)
    enc = (MLPEncoder(16, 3, 16, 2, linear=kind == "mlp-linear") if kind != "conv"
           else ConvEncoder(16, 3, 4, 1, (1, 4, 4)))
    stacked = StackedEncoder(enc, 3)
    y = torch.randn(3, 5, 16)
    out = stacked(y)
    for f in range(3):
        torch.testing.assert_close(out[f], enc(y[f]))
    stacked.active = torch.tensor([0, 2])  # only these copies run
    torch.testing.assert_close(stacked(y[[0, 2]]), out[[0, 2]])
    stacked.active = None
    loss = out[0].pow(2).sum()
    loss.backward()
    for p in stacked.stacked:
        assert p.grad[0].abs().sum() > 0 and p.grad[1:].abs().sum() == 0  # copy 0's loss reaches copy 0 only
    with torch.no_grad():
        stacked.stacked[0][1].add_(1.0)  # change copy 1
    out2 = stacked(y)
    assert torch.equal(out2[0], out[0]) and torch.equal(out2[2], out[2]) and not torch.equal(out2[1], out[1])


def test_preconditioned_model_fed_the_exact_denoiser_gives_the_exact_score():
    # x_0 ~ N(μ, s² I): E[x_0 | x_t] is linear in x_t, so the exact score is known in closed form.
    mu, s2, sd = 0.7, 0.4, 0.9
    pre = Preconditioning(sd)
    t = torch.tensor([0.01, 0.1, 0.5, 1.0, 3.0, 4.0])
    x_t = torch.randn(6, 5)
    alpha, sigma2 = torch.exp(-t)[:, None], -torch.expm1(-2 * t)[:, None]
    var = alpha**2 * s2 + sigma2
    score = -(x_t - alpha * mu) / var
    denoiser = mu + alpha * s2 / var * (x_t - alpha * mu)  # E[x_0 | x_t]
    v = alpha**2 * sd**2 + sigma2
    c_skip, c_out = alpha * sd**2 / v, torch.sqrt(sigma2) * sd / v.sqrt()
    F = (denoiser - c_skip * x_t) / c_out  # what an exact network would output
    eps = pre.eps(x_t, F, t)
    torch.testing.assert_close(-eps / torch.sqrt(sigma2), score, rtol=1e-4, atol=1e-4)
    # and the EDM weight turns the ε-loss into the F-space loss: w ‖ε̂ − ε‖² = ‖F − F*‖²
    F_other = F + torch.randn_like(F)
    lhs = pre.loss_weight(t) * (pre.eps(x_t, F_other, t) - eps).pow(2).sum(-1)
    torch.testing.assert_close(lhs, (F_other - F).pow(2).sum(-1), rtol=1e-4, atol=1e-4)


def test_edm_model_returns_the_same_eps_interface():
    torch.manual_seed(0)
    model = ScoreModel(MLPEncoder(4, 2, 8, 1), 2, 3, 16, 1, 4, parametrization="edm", sigma_data=0.5)
    x, y, t = torch.randn(2, 7, 3), torch.randn(2, 7, 4), torch.rand(2, 7) + 0.01
    assert model(x, y, t).shape == (2, 7, 3)
    assert torch.all(model.dsm_weight(t) >= 1)


class _Quadratic(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))


def _run(tmp_path, cfg, validate, name="a", **kw):
    model = _Quadratic()

    def loss_fn(m, gen):  # pulls w towards 10 with noise
        return (m.w - 10.0 + 0.01 * torch.randn((), generator=gen)).pow(2)[None]

    return train(model, [{"params": list(model.parameters())}], loss_fn, cfg, seed=0, ckpt_dir=tmp_path / name,
                 meta={}, validate=validate, **kw)


def test_early_stopping_keeps_the_best_ema_weights_and_says_it_converged(tmp_path):
    cfg = TrainConfig(steps=2000, lr=0.05, warmup_steps=1, val_every=10, patience=5, ema_decay=0.9,
                      checkpoint_every=10_000)
    seen = {}

    def validate(ema):  # best where w is closest to 3: training overshoots towards 10, so validation turns up
        value = (ema.w - 3.0).abs()
        seen[float(ema.w)] = float(value)
        return value

    result = _run(tmp_path, cfg, validate)
    assert result.converged is True and result.steps_run < 2000
    assert result.steps_run == max(result.step + 5 * 10, 10 * math.ceil(1.5 * result.step / 10))  # patience
    assert abs(float(result.ema.w) - 3.0) == pytest.approx(min(seen.values()))
    assert result.val_loss == pytest.approx(min(seen.values()))


def test_a_run_still_improving_at_the_cap_is_not_converged(tmp_path):
    cfg = TrainConfig(steps=60, lr=0.01, warmup_steps=1, val_every=10, patience=5, checkpoint_every=10_000)
    result = _run(tmp_path, cfg, lambda ema: (ema.w - 10.0).abs())
    assert result.converged is False and result.step == 60 and result.steps_run == 60


def test_resumed_run_stops_where_an_uninterrupted_one_does(tmp_path):
    cfg = TrainConfig(steps=2000, lr=0.05, warmup_steps=1, val_every=10, patience=5, ema_decay=0.9,
                      checkpoint_every=30)
    full = _run(tmp_path, cfg, lambda ema: (ema.w - 3.0).abs(), name="full")
    _run(tmp_path, cfg, lambda ema: (ema.w - 3.0).abs(), name="part", stop_at=40)
    resumed = _run(tmp_path, cfg, lambda ema: (ema.w - 3.0).abs(), name="part", resume=True)
    assert (resumed.step, resumed.steps_run) == (full.step, full.steps_run)
    assert float(resumed.ema.w) == float(full.ema.w)


def test_dsm_validation_is_deterministic_ignores_padding_and_is_lowest_for_the_true_noise_predictor():
    process = OUProcess(0.01, 4.0)
    x = torch.randn(2, 6, 3) * 0.1  # nearly a point mass at 0: the ideal ε̂ is x_t / σ_t
    counts = torch.tensor([6, 4])
    y = torch.zeros(2, 6, 1)
    validate = dsm_validation(x, y, counts, process, draws=8, seed=0)

    class Ideal(nn.Module):
        def forward(self, x_t, y, t):
            return x_t / process.sigma(t)[..., None]

    class Zero(nn.Module):
        def forward(self, x_t, y, t):
            return torch.zeros_like(x_t)

    assert float(validate(Ideal())) == float(validate(Ideal()))
    assert float(validate(Ideal())) < 0.1 * float(validate(Zero()))
    x2 = x.clone()
    x2[1, 4:] = 1e6  # padding rows of task 1
    assert math.isclose(float(dsm_validation(x2, y, counts, process, 8, 0)(Ideal())), float(validate(Ideal())),
                        rel_tol=1e-6)
    assert float(validate(Zero())) == pytest.approx(3.0, rel=0.3)  # E‖ε‖² = d_x
    assert dsm_loss(torch.zeros(1, 3), torch.ones(1, 3)).item() == 3.0


def test_head_init_copies_the_chosen_source_head_into_every_fold_head():
    from cdmtransfer.models import model_spec
    from cdmtransfer.adaptation import pick_source_head
    from cdmtransfer.stages import SourceHeads, load_head

    torch.manual_seed(0)
    pretrained = ScoreModel(MLPEncoder(5, 2, 8, 1), 3, 4, 16, 2, 4, parametrization="edm", sigma_data=0.7)
    source = SourceHeads(model_spec(pretrained), pretrained.state_dict())
    target = ScoreModel(pretrained.encoder, 4, 4, 16, 2, 4, parametrization="edm", sigma_data=0.7)
    load_head(target, source, task=2)
    x, y, t = torch.randn(1, 6, 4), torch.randn(1, 6, 5), torch.rand(1, 6) + 0.1
    want = pretrained(x.expand(3, -1, -1), y.expand(3, -1, -1), t.expand(3, -1))[1]  # source task 2 = head index 1
    got = target(x.expand(4, -1, -1), y.expand(4, -1, -1), t.expand(4, -1))
    for k in range(4):
        torch.testing.assert_close(got[k], want)
    # the head that generated the data scores best on it: make task 3's head exact for a point mass at 0 ...
    process = OUProcess(0.01, 4.0)

    class Exact(nn.Module):  # ε̂ = x_t/σ_t for head 2 (task 3), noise for the others
        def __init__(self):
            super().__init__()
            self.heads = nn.Module()
            self.heads.K = 3

        def forward(self, x_t, y, t):
            eps = x_t / process.sigma(t)[..., None]
            return eps + torch.tensor([1.0, -0.5, 0.0])[:, None, None]

    import cdmtransfer.adaptation as adaptation

    real = adaptation.rebuild
    adaptation.rebuild = lambda spec, what: Exact()
    Exact.load_state_dict = lambda self, w: None
    try:
        from cdmtransfer.config import AdaptConfig
        choice = pick_source_head(source, torch.zeros(8, 4), torch.zeros(8, 5), process, AdaptConfig())
    finally:
        adaptation.rebuild = real
    assert choice == 3


def test_each_candidate_stops_as_a_run_of_its_own_would(tmp_path):
    # two candidate losses on the same weights: |w − 3| is best early, |w − 8| later (training pulls w to 10)
    cfg = TrainConfig(steps=2000, lr=0.05, warmup_steps=1, val_every=10, patience=5, ema_decay=0.9,
                      checkpoint_every=10_000)
    alone = [_run(tmp_path, cfg, lambda ema, c=c: (ema.w - c).abs(), name=f"alone{c}") for c in (3.0, 8.0)]
    both = _run(tmp_path, cfg, lambda ema: torch.stack([(ema.w - 3.0).abs(), (ema.w - 8.0).abs()]), name="both")
    assert [step for _, step in both.candidates] == [r.step for r in alone]
    assert [loss for loss, _ in both.candidates] == pytest.approx([r.val_loss for r in alone])
    assert both.converged and both.steps_run == max(r.steps_run for r in alone)  # stops when the last one stops
    cfg.checkpoint_every = 30  # and a resumed run keeps every candidate's state
    _run(tmp_path, cfg, lambda ema: torch.stack([(ema.w - 3.0).abs(), (ema.w - 8.0).abs()]), name="part", stop_at=40)
    resumed = _run(tmp_path, cfg, lambda ema: torch.stack([(ema.w - 3.0).abs(), (ema.w - 8.0).abs()]), name="part",
                   resume=True)
    assert resumed.candidates == both.candidates and resumed.steps_run == both.steps_run


def test_choose_prefers_the_simplest_setting_within_the_margin():
    from cdmtransfer.validation import choose

    assert choose([1.0, 0.99, 0.97], 0.02) == 2  # a clear win for the third
    assert choose([1.0, 0.99, 0.985], 0.02) == 0  # a near tie: the simplest
    assert choose([float("nan"), 0.5, 0.4], 0.0) == 2 and choose([0.5, 0.5], 0.0) == 0


def test_row_losses_mean_is_the_validation_loss_and_the_gain_has_the_paired_standard_error():
    from cdmtransfer.validation import RowLosses

    process = OUProcess(0.01, 4.0)
    x, y, counts = torch.randn(3, 5, 2), torch.zeros(3, 5, 1), torch.tensor([5, 3, 4])
    model = lambda x_t, y, t: 0.5 * x_t  # noqa: E731
    rows = dsm_validation(x, y, counts, process, draws=4, seed=1, rows=True)(model)
    assert float(rows.mean()) == pytest.approx(float(dsm_validation(x, y, counts, process, 4, 1)(model)), rel=1e-6)
    assert (rows.weights > 0).sum() == 12 and float(rows.weights.sum()) == pytest.approx(1.0)
    # equal weights: the standard error of a mean of paired differences, s / √n
    before = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    now = RowLosses(torch.tensor([[0.5, 2.0, 2.0, 4.5]]), torch.full((1, 4), 0.25))
    diff = (before - now.values)[0]
    assert float(now.gain_se(before)) == pytest.approx(float(diff.std() / 2.0))


def test_an_improvement_within_its_noise_does_not_count_and_a_clear_one_does():
    from cdmtransfer.train import Validation
    from cdmtransfer.validation import RowLosses

    ema = nn.Linear(1, 1)
    w = torch.full((1, 4), 0.25)
    start = RowLosses(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), w)
    noisy = RowLosses(torch.tensor([[0.2, 1.5, 0.3, 1.6]]), w)  # mean 0.9: a gain of 0.1 ± 0.35
    clear = RowLosses(torch.tensor([[0.8, 0.9, 0.8, 0.9]]), w)  # mean 0.85: a gain of 0.15 ± 0.03
    for se_margin, best_step in ((1.0, 0), (0.0, 1)):
        cfg, val = TrainConfig(min_delta_se=se_margin), Validation()
        val.update(float(start.mean()), 0, ema, cfg, rows=start)
        val.update(float(noisy.mean()), 1, ema, cfg, rows=noisy)
        assert val.best_step == best_step
    val.update(float(clear.mean()), 2, ema, cfg, rows=clear)
    assert val.best_step == 2
    # the same rule per candidate: candidate 0 has the noisy gain, candidate 1 the clear one
    val = Validation(candidates=[[math.inf, 0, 0, False] for _ in range(2)])
    two = lambda a, b: RowLosses(torch.cat([a.values, b.values]), w.expand(2, 4))  # noqa: E731
    for step, rows in enumerate((two(start, start), two(noisy, clear))):
        val.update(float(rows.mean().min()), step, ema, TrainConfig(min_delta_se=1.0), per=rows.mean().tolist(),
                   rows=rows)
    assert [c[1] for c in val.candidates] == [0, 1]


def test_choose_by_one_standard_error_keeps_the_simpler_setting_on_a_noisy_win():
    from cdmtransfer.validation import RowLosses, choose

    w = torch.full((3, 4), 0.25)
    rows = RowLosses(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.2, 1.5, 0.3, 1.6], [0.8, 0.9, 0.8, 0.9]]), w)
    losses = rows.mean().tolist()  # [1.0, 0.9, 0.85]
    assert choose(losses[:2], 0.0) == 1 and choose(losses[:2], 0.0, RowLosses(rows.values[:2], w[:2]), 1.0) == 0
    assert choose([losses[0], losses[2]], 0.0, RowLosses(rows.values[[0, 2]], w[:2]), 1.0) == 1  # a clear win wins


def test_linear_mean_model_with_a_zero_network_is_the_exact_gaussian_denoiser():
    # model.linear_mean: with F = 0 the head is the exact score of x_0 | y ~ N(μ(h(y)), σ_d² I), μ = A h(y) + b.
    torch.manual_seed(0)
    sd = 0.6
    model = ScoreModel(MLPEncoder(4, 2, 8, 1), 2, 3, 16, 1, 4, parametrization="edm", sigma_data=sd, linear_mean=True)
    with torch.no_grad():
        model.heads.weights[-1].zero_()
        model.heads.biases[-1].zero_()  # the network F outputs 0
        model.heads.mean.weights[0].normal_()
        model.heads.mean.biases[0].normal_()
    x, y, t = torch.randn(2, 7, 3), torch.randn(2, 7, 4), torch.rand(2, 7) * 3 + 0.01
    code = model.encoder(y)
    mu = torch.baddbmm(model.heads.mean.biases[0], code, model.heads.mean.weights[0])  # per head k: b_k + w A_k
    alpha, sigma2 = torch.exp(-t)[..., None], -torch.expm1(-2 * t)[..., None]
    score = -(x - alpha * mu) / (alpha**2 * sd**2 + sigma2)  # x_t ~ N(α μ, (α² σ_d² + σ²) I)
    torch.testing.assert_close(-model(x, y, t) / sigma2.sqrt(), score, rtol=1e-4, atol=1e-4)
    # the mean map is part of each head: saved in the spec, rebuilt, and its gradient reaches A and b
    from cdmtransfer.models import build_model, model_spec

    again = build_model(model_spec(model))
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again(x, y, t), model(x, y, t))
    model(x, y, t).pow(2).sum().backward()
    assert model.heads.mean.weights[0].grad.abs().sum() > 0


def test_source_head_loads_its_linear_mean_and_a_mismatched_recipe_is_named():
    from cdmtransfer.errors import ConfigError
    from cdmtransfer.models import model_spec
    from cdmtransfer.stages import SourceHeads, load_head

    torch.manual_seed(0)
    pretrained = ScoreModel(MLPEncoder(5, 2, 8, 1), 3, 4, 16, 2, 4, parametrization="edm", sigma_data=0.7,
                            linear_mean=True)
    with torch.no_grad():
        pretrained.heads.mean.weights[0].normal_()
    source = SourceHeads(model_spec(pretrained), pretrained.state_dict())
    target = ScoreModel(pretrained.encoder, 2, 4, 16, 2, 4, parametrization="edm", sigma_data=0.7, linear_mean=True)
    load_head(target, source, task=3)
    for k in range(2):
        torch.testing.assert_close(target.heads.mean.weights[0][k], pretrained.heads.mean.weights[0][2])
    plain = ScoreModel(pretrained.encoder, 2, 4, 16, 2, 4, parametrization="edm", sigma_data=0.7)
    with pytest.raises(ConfigError, match="model.linear_mean = true"):
        load_head(plain, source, task=1)
    full = ScoreModel(pretrained.encoder, 2, 4, 16, 2, 4, parametrization="edm", sigma_data=0.7, linear_mean=True,
                      mean_covariance="full")  # a pretrain made before model.mean_covariance
    with pytest.raises(ConfigError, match="model.mean_covariance = scalar"):
        load_head(full, source, task=1)


def test_new_heads_start_their_linear_mean_at_ridge_least_squares_on_their_own_rows():
    from cdmtransfer.head_start import fit_linear_means

    torch.manual_seed(0)
    enc = MLPEncoder(5, 3, 8, 1)
    model = ScoreModel(enc, 3, 4, 16, 1, 4, parametrization="edm", sigma_data=0.7, linear_mean=True)
    y = torch.randn(2, 40, 5)
    with torch.no_grad():
        code = enc(y)
    A, b = torch.randn(2, 3, 4), torch.randn(2, 1, 4)
    x = torch.baddbmm(b, code, A) + 1e-3 * torch.randn(2, 40, 4)
    x[1, 30:] = 1e6  # rows past head 1's count are padding: they must not matter
    fit_linear_means(model, enc, x, y, torch.tensor([40, 30]), into=[2, 0])
    W, B = model.heads.mean.weights[0], model.heads.mean.biases[0]
    for k, i in ((2, 0), (0, 1)):  # head `into[i]` fitted on rows i
        torch.testing.assert_close(W[k], A[i], rtol=0, atol=0.02)
        torch.testing.assert_close(B[k], b[i], rtol=0, atol=0.02)
    assert W[1].abs().sum() == 0 and B[1].abs().sum() == 0  # a head not listed keeps its start
    # pure noise: GCV shrinks A toward the head's starting map (here a source head's); the intercept puts the fit
    # through the rows' means
    start = torch.randn(3, 4)
    with torch.no_grad():
        W[1] = start
    noise = torch.randn(1, 40, 4)
    fit_linear_means(model, enc, noise, y[:1], torch.tensor([40]), into=[1])
    assert (W[1] - start).abs().max() < 0.2 * start.abs().max()
    torch.testing.assert_close(code[0].mean(0) @ W[1] + B[1, 0], noise[0].mean(0), rtol=0, atol=1e-5)
    # a start that already predicts the rows (a source head fitted to this kind of task) is kept as it is
    with torch.no_grad():
        W[1], B[1, 0] = A[0], b[0, 0]
    kept = W[1].clone(), B[1].clone()
    near = torch.baddbmm(b[:1], code[:1, :8], A[:1]) + 0.05 * torch.randn(1, 8, 4)
    from cdmtransfer.references import ridge_gcv

    fit = ridge_gcv(code[0, :8], near[0] - code[0, :8] @ A[0])
    assert (fit.intercept - b[0, 0]).abs().max() > 1e-3  # the fit would move the map
    fit_linear_means(model, enc, near, y[:1, :8], torch.tensor([8]), into=[1])
    assert torch.equal(W[1], kept[0]) and torch.equal(B[1], kept[1])


def test_heads_with_a_linear_mean_are_scaled_to_what_a_linear_map_of_y_leaves():
    # models.Preconditioning's σ_d: with a linear mean the heads model x around μ_k(h(y)), so their scale is the
    # residual of each source's linear fit (head_start.pretrain_scale), not x's own RMS; adapt's fresh heads use the same
    # rule, source-started heads keep their source's σ_d, scratch (μ starts at 0 on a random code) x's RMS.
    from types import SimpleNamespace

    from cdmtransfer.config import load_config
    from cdmtransfer.references import residual_rms
    from cdmtransfer.head_start import adapt_scale, pretrain_scale
    from cdmtransfer.tasks import build_taskset

    sets = ["suite.K=3", "suite.n=256", "suite.gaussian.noise=0.1"]
    cfg = load_config(None, sets)
    taskset = build_taskset(cfg)
    x, y, n = taskset.source_x, taskset.source_y, taskset.source_n
    sd = pretrain_scale(cfg, x, y, n)
    assert sd == residual_rms(x, y, n)
    assert sd < 0.5 * float(x.pow(2).mean().sqrt())  # x is mostly a linear map of y here
    for off in ("model.linear_mean=false", "model.parametrization=eps"):
        assert pretrain_scale(load_config(None, sets + [off]), x, y, n) is None
    assert adapt_scale(load_config(None, sets + ["adapt.mode=oracle"]), taskset, None) == sd
    assert adapt_scale(load_config(None, sets + ["adapt.mode=scratch"]), taskset, None) is None
    source = SimpleNamespace(spec={"sigma_data": 0.7})
    assert adapt_scale(load_config(None, sets + ["adapt.mode=frozen"]), taskset, source) == 0.7


def test_full_covariance_head_with_a_zero_network_is_the_exact_gaussian_denoiser():
    # model.mean_covariance = full: with F = 0 head k is the exact score of x_0 | y ~ N(μ_k(h(y)), Σ_k), any Σ_k
    from cdmtransfer.models import build_model, model_spec
    from cdmtransfer.head_start import set_covariance

    torch.manual_seed(0)
    model = ScoreModel(MLPEncoder(4, 2, 8, 1), 2, 3, 16, 1, 4, parametrization="edm", sigma_data=0.6,
                       linear_mean=True, mean_covariance="full")
    covs = []
    with torch.no_grad():
        model.heads.weights[-1].zero_()
        model.heads.biases[-1].zero_()
        model.heads.mean.weights[0].normal_()
        model.heads.mean.biases[0].normal_()
        for k in range(2):
            L = torch.randn(3, 3, dtype=torch.float64)
            covs.append(L @ L.T + 0.1 * torch.eye(3, dtype=torch.float64))
            set_covariance(model, k, covs[-1])
    x, y, t = torch.randn(2, 7, 3), torch.randn(2, 7, 4), torch.rand(2, 7) * 3 + 0.01
    mu = torch.baddbmm(model.heads.mean.biases[0], model.encoder(y), model.heads.mean.weights[0])
    alpha, sigma2 = torch.exp(-t)[..., None, None], -torch.expm1(-2 * t)[..., None, None]
    cov_t = alpha**2 * torch.stack(covs).float()[:, None] + sigma2 * torch.eye(3)  # Cov(x_t) per head and row
    score = -torch.linalg.solve(cov_t, (x - alpha[..., 0] * mu)[..., None])[..., 0]
    torch.testing.assert_close(-model(x, y, t) / sigma2[..., 0].sqrt(), score, rtol=1e-4, atol=1e-4)
    again = build_model(model_spec(model))  # Σ_k is saved with the head
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again(x, y, t), model(x, y, t))
    spec = {k: v for k, v in model_spec(model).items() if k != "mean_covariance"}
    assert not build_model(spec).full_covariance  # models saved before the option: Σ = σ_d² I, as they were trained
    plain = ScoreModel(model.encoder, 2, 3, 16, 1, 4, parametrization="edm", sigma_data=0.6, linear_mean=True)
    built = ScoreModel(model.encoder, 2, 3, 16, 1, 4, parametrization="edm", sigma_data=0.6, linear_mean=True,
                       mean_covariance="full")
    built.load_state_dict({**plain.state_dict(), **{k: v for k, v in built.state_dict().items() if "basis" in k
                                                    or "scale" in k}})
    torch.testing.assert_close(built(x, y, t), plain(x, y, t))  # as built (U = I, s = σ_d): the scalar model


def test_source_and_new_heads_get_the_residual_covariance_of_their_rows():
    from cdmtransfer.head_start import fit_linear_means, set_source_covariances

    torch.manual_seed(1)
    enc = MLPEncoder(5, 3, 8, 1)
    L = torch.tensor([[1.0, 0, 0, 0], [0.8, 0.3, 0, 0], [0, 0, 0.5, 0], [0, 0, 0.2, 0.1]])
    cov = L @ L.T
    n = 4000
    y = torch.randn(2, n, 5)
    with torch.no_grad():
        code = enc(y)
    A = torch.randn(2, 3, 4)
    x = torch.bmm(code, A) + torch.randn(2, n, 4) @ L.T
    model = ScoreModel(enc, 3, 4, 16, 1, 4, parametrization="edm", sigma_data=0.7, linear_mean=True,
                       mean_covariance="full")
    fit_linear_means(model, enc, x, y, torch.tensor([n, n]), into=[2, 0])
    mean = model.heads.mean
    for k in (2, 0):
        fitted = (mean.basis[k] * mean.scale[k, 0].pow(2)) @ mean.basis[k].T
        torch.testing.assert_close(fitted, cov, rtol=0, atol=0.08)
    torch.testing.assert_close(mean.basis[1], torch.eye(4))  # a head not listed keeps its start
    # pretrain: each source head's Σ_k from a ridge fit of x on y itself (here x is linear in y)
    xs = y @ torch.randn(5, 4) + torch.randn(2, n, 4) @ L.T
    set_source_covariances(model, xs, y, torch.tensor([n, n, 0]))
    for k in (0, 1):
        fitted = (mean.basis[k] * mean.scale[k, 0].pow(2)) @ mean.basis[k].T
        torch.testing.assert_close(fitted, cov, rtol=0, atol=0.08)


def test_a_kept_source_mean_still_takes_the_covariance_of_the_target_rows():
    # a source head whose map predicts the target rows keeps its mean, but not its noise: the covariance is the rows'
    # own around that mean (LSGMM: every task has its own style subspace B_k), shrunk toward the source's
    from cdmtransfer.head_start import fit_linear_means, set_covariance

    torch.manual_seed(2)
    enc = MLPEncoder(5, 3, 8, 1)
    model = ScoreModel(enc, 2, 4, 16, 1, 4, parametrization="edm", sigma_data=0.7, linear_mean=True,
                       mean_covariance="full")
    A, b = torch.randn(3, 4), torch.randn(4)
    source_cov = torch.diag(torch.tensor([1.0, 0.01, 0.01, 0.01], dtype=torch.float64))  # the source's style: x₁
    with torch.no_grad():
        model.heads.mean.weights[0][1], model.heads.mean.biases[0][1, 0] = A, b
        set_covariance(model, 1, source_cov)
    n = 4000
    y = torch.randn(1, n, 5)
    with torch.no_grad():
        code = enc(y)
    style = torch.tensor([0.1, 1.0, 0.1, 0.1])  # the target's style is x₂
    noise = torch.randn(n, 4) * style
    Q = torch.linalg.qr(torch.cat([torch.ones(n, 1), code[0]], 1))[0]
    noise = noise - Q @ (Q.T @ noise)  # nothing a refit on the code could explain: the start's map must stay
    x = (code[0] @ A + b + noise)[None]
    fit_linear_means(model, enc, x, y, torch.tensor([n]), into=[1])
    mean = model.heads.mean
    assert torch.equal(mean.weights[0][1], A) and torch.equal(mean.biases[0][1, 0], b)  # the mean is kept
    fitted = (mean.basis[1] * mean.scale[1, 0].pow(2)) @ mean.basis[1].T
    torch.testing.assert_close(fitted.diagonal(), style.pow(2), rtol=0, atol=0.05)


def test_the_linear_summary_leaves_directions_below_the_noise_edge_empty():
    # pretrain's start (noise_edge): x depends on 2 directions of y, the code has 4 dimensions; the 2 spare ones,
    # filled at unit scale with whatever the fits' noise points at, start at 0 instead
    from cdmtransfer.head_start import linear_summary

    torch.manual_seed(3)
    K, n, D_y, d_x = 4, 500, 8, 6
    B = torch.randn(2, D_y)
    y = torch.randn(K, n, D_y)
    x = torch.stack([(y[k] @ B.T) @ torch.randn(2, d_x) for k in range(K)]) + 0.3 * torch.randn(K, n, d_x)
    counts = torch.full((K,), n)
    P_all, _ = linear_summary(x, y, counts, 4)
    P, _ = linear_summary(x, y, counts, 4, noise_edge=True)
    assert bool((P_all[2:].abs().sum(1) > 0.1).all())  # without the edge: noise directions at unit scale
    assert float(P[2:].abs().max()) == 0.0
    torch.testing.assert_close(P[:2], P_all[:2])
    overlap = torch.linalg.svdvals(torch.linalg.qr(P[:2].T)[0].T @ torch.linalg.qr(B.T.double())[0])
    assert float(overlap.min()) > 0.99  # the two real directions stay


def test_pretrain_starts_from_the_summary_with_the_lower_held_out_dsm():
    # LSGMM: x depends on y through 2 directions, the code has 4; the spare two of the full summary carry y's
    # task-shifted nuisance, and the start without them scores lower on the held-out source rows
    from cdmtransfer.config import load_config
    from cdmtransfer.pretraining import started_pretrain_model
    from cdmtransfer.tasks import build_taskset
    from cdmtransfer.validation import holdout_split

    cfg = load_config("recipes/regularize-off.yaml", ["model.linear_mean=true", "model.encoder_linear=true"])
    taskset = build_taskset(cfg)
    fit, val = holdout_split(taskset.source_n, cfg.pretrain.val_fraction, cfg.suite.seed)
    model, info = started_pretrain_model(cfg, taskset, fit, val)
    assert info["start_val_loss_edge"] < info["start_val_loss_every"] and info["start_directions"] == 2
    assert int((model.encoder.linear.weight.abs().sum(1) > 0).sum()) == 2
    every, none = started_pretrain_model(cfg, taskset, fit)  # no held-out rows: every direction, nothing compared
    assert none == {} and int((every.encoder.linear.weight.abs().sum(1) > 0).sum()) == 4


def test_linear_summary_finds_the_shared_subspace_and_pretrain_starts_at_the_closed_form_fit_on_it():
    from cdmtransfer.head_start import linear_summary, start_pretrain
    from cdmtransfer.models import build_encoder, encoder_spec
    from cdmtransfer.references import ridge_gcv

    torch.manual_seed(0)
    K, n, D_y, d, d_x = 3, 400, 6, 2, 4
    B = torch.randn(d, D_y)  # x depends on y only through B y, by a different map per source
    y = torch.randn(K, n, D_y) * torch.linspace(0.5, 2.0, D_y) + 3.0
    x = torch.stack([(y[k] @ B.T) @ torch.randn(d, d_x) for k in range(K)]) + 0.05 * torch.randn(K, n, d_x)
    counts = torch.full((K,), n)
    P, centre = linear_summary(x, y, counts, d)
    overlap = torch.linalg.svdvals(torch.linalg.qr(P.T)[0].T @ torch.linalg.qr(B.T.double())[0])
    assert float(overlap.min()) > 0.999  # P spans B's row space
    features = (y.reshape(-1, D_y).double() - centre) @ P.T
    torch.testing.assert_close(features.T @ features / (K * n), torch.eye(d, dtype=torch.float64), atol=0.1, rtol=0)
    enc = MLPEncoder(D_y, d, 16, 2, linear=True)
    model = ScoreModel(enc, K, d_x, 16, 1, 4, parametrization="edm", sigma_data=0.5, linear_mean=True,
                       mean_covariance="full")
    start_pretrain(model, x, y, counts)
    code = enc(y)
    torch.testing.assert_close(code.double(), (y.double() - centre) @ P.T, atol=1e-4, rtol=0)
    assert float(model.heads.weights[-1].detach().abs().sum()) == 0.0  # F = 0: step 0 is the closed-form model
    for k in range(K):
        fit = ridge_gcv(code[k].detach(), x[k])
        torch.testing.assert_close(model.mean_of_code(code.detach())[k].double(), fit.predict(code[k].detach()),
                                   atol=1e-3, rtol=0)
    assert build_encoder(encoder_spec(enc)).linear is not None
    assert build_encoder({k: v for k, v in encoder_spec(enc).items() if k != "linear"}).linear is None


def test_scratch_starts_each_fold_model_on_its_own_training_rows_only():
    """start_scratch: copy i's linear path is the linear summary of row set i's first counts[i] rows (a fold's
    training rows), nothing else; the MLP part starts at 0; without a linear path there is no start."""
    from cdmtransfer.head_start import linear_summary, stack_copies, start_scratch

    torch.manual_seed(0)
    n, D_y, d, d_x = 30, 6, 2, 4
    B = torch.randn(d, D_y)
    y = torch.randn(3, n, D_y)
    x = (y @ B.T) @ torch.randn(d, d_x) + 0.05 * torch.randn(3, n, d_x)
    counts = torch.tensor([30, 20, 25])
    enc = MLPEncoder(D_y, d, 16, 2, linear=True)
    started = start_scratch(enc, x, y, counts)
    assert len(started) == 3 and all(e is not enc for e in started)
    for i, e in enumerate(started):
        P, centre = linear_summary(x[i:i + 1], y[i:i + 1], counts[i:i + 1], d)
        torch.testing.assert_close(e(y[i]).double(), (y[i].double() - centre) @ P.T, atol=1e-4, rtol=0)
        overlap = torch.linalg.svdvals(torch.linalg.qr(P.T)[0].T @ torch.linalg.qr(B.T.double())[0])
        assert float(overlap.min()) > 0.99  # each copy finds the shared subspace from its own rows
    x2, y2 = x.clone(), y.clone()
    x2[1, 20:] += 5.0  # rows past copy 1's count (its held-out fold) and another copy's rows
    y2[0] += 1.0
    again = start_scratch(enc, x2, y2, counts)
    torch.testing.assert_close(again[1].linear.weight, started[1].linear.weight)
    assert not torch.allclose(again[0].linear.bias, started[0].linear.bias)
    stacked = stack_copies(started)
    torch.testing.assert_close(stacked(y), torch.stack([e(y[i]) for i, e in enumerate(started)]), atol=1e-5, rtol=0)
    assert stack_copies(started[:1]) is started[0]
    assert start_scratch(MLPEncoder(D_y, d, 16, 2), x, y, counts) is None
    assert start_scratch(enc, x.masked_fill(x > 1, float("nan")), y, counts) is None  # NaN rows: training names them


def test_completion_fills_the_code_direction_the_sources_left_empty_from_each_row_set_alone():
    """completion_basis finds the code direction the encoder leaves empty on the sources' rows, where the target rows
    need it; complete_code fills it per row set from those rows alone (h*'s missing coordinate), leaves the others."""
    from types import SimpleNamespace

    from cdmtransfer.head_start import complete_code, completion_basis

    torch.manual_seed(0)
    D_y, d, d_x, n = 12, 3, 5, 96
    W = torch.linalg.qr(torch.randn(D_y, d))[0].T  # h*(y) = W y
    enc = MLPEncoder(D_y, d, 16, 1, linear=True)
    enc.start_linear(W * torch.tensor([[1.0], [1.0], [0.0]]), torch.zeros(D_y))  # no source reads h*_3: left empty
    sources = SimpleNamespace(source_y=torch.randn(2, 200, D_y), source_n=torch.tensor([200, 150]))
    A = torch.randn(d_x, d)
    y = torch.randn(2, n, D_y)
    x = (y @ W.T) @ A.T + 0.1 * torch.randn(2, n, d_x)  # the target reads all three
    basis = completion_basis(enc, sources, x[0], y[0])
    assert basis.shape == (d, 1) and abs(float(basis[2, 0])) > 0.999
    counts = torch.tensor([n, 64])
    completed = complete_code(enc, basis, x, y, counts)
    for i, e in enumerate(completed):
        code = e(y[i]).detach()
        assert e is not enc and not any(p.requires_grad for p in e.parameters())
        torch.testing.assert_close(code[:, :2], enc(y[i])[:, :2].detach(), atol=1e-5, rtol=0)
        assert abs(float(torch.corrcoef(torch.stack([code[:, 2], y[i] @ W[2]]))[0, 1])) > 0.95
    x2 = x.clone()
    x2[1, 64:] += 5.0  # rows past copy 1's count (its held-out fold)
    torch.testing.assert_close(complete_code(enc, basis, x2, y, counts)[1].linear.weight, completed[1].linear.weight)
    in_span = (y[0] @ W.T)[:, :2] @ A[:, :2].T + 0.1 * torch.randn(n, d_x)  # reads only what the sources fill
    assert completion_basis(enc, sources, in_span, y[0]) is None
    full = MLPEncoder(D_y, d, 16, 1, linear=True)
    full.start_linear(W, torch.zeros(D_y))
    assert completion_basis(full, sources, x[0], y[0]) is None  # nothing empty
    assert completion_basis(MLPEncoder(D_y, d, 16, 1), sources, x[0], y[0]) is None  # no linear path to fill it with


def test_a_source_started_mean_becomes_the_mixture_of_source_maps_the_rows_show():
    from cdmtransfer.head_start import source_combination
    from cdmtransfer.references import ridge_gcv
    from cdmtransfer.stages import SourceHeads

    torch.manual_seed(0)
    K, d, d_x, n = 4, 3, 5, 12
    maps, offsets = torch.randn(K, d, d_x), torch.randn(K, 1, d_x)
    sources = SourceHeads({"K": K}, {"heads.mean.weights.0": maps, "heads.mean.biases.0": offsets})
    code = torch.randn(n, d).double()
    mix = torch.tensor([0.0, 0.5, 0.5, 0.0]).double()  # the target's map lies between sources 1 and 2
    W_true = torch.einsum("k,kij->ij", mix, maps.double())
    b_true = torch.einsum("k,kj->j", mix, offsets.double()[:, 0])
    x = code @ W_true + b_true + 0.05 * torch.randn(n, d_x).double()
    start, offset = maps[1].double(), offsets[1, 0].double()
    start_error = float((x - code @ start - offset).pow(2).sum(1).mean())
    W, b, error = source_combination(code, x, sources, start, offset, start_error)
    assert error < 0.1 * start_error
    torch.testing.assert_close(W, W_true, atol=0.05, rtol=0)
    torch.testing.assert_close(b, b_true, atol=0.05, rtol=0)
    # rows that the start already explains keep it
    x_start = code @ start + offset + 0.05 * torch.randn(n, d_x).double()
    kept = source_combination(code, x_start, sources, start, offset,
                              float((x_start - code @ start - offset).pow(2).sum(1).mean()))
    assert torch.equal(kept[0], start)
    # ridge without an intercept: exact on noise-free data through the origin
    F = torch.randn(20, 3).double()
    fit = ridge_gcv(F, F @ torch.tensor([[1.0], [-2.0], [0.5]]).double(), intercept=False)
    assert float(fit.intercept.abs().max()) == 0.0
    torch.testing.assert_close(fit.coef[:, 0], torch.tensor([1.0, -2.0, 0.5]).double(), atol=1e-3, rtol=0)
