"""Batched evaluation (metrics.evaluate_models, model_stack.py, issue #12): several adapted models evaluated at once,
one sampler run for all of them, each with the metrics it gets alone."""

import copy
import dataclasses
import math

import pytest
import torch

from cdmtransfer import metrics
from cdmtransfer.diffusion import OUProcess
from cdmtransfer.ensemble import MeanPrediction
from cdmtransfer.metrics import conditional_samples, evaluate_model, evaluate_models, stacked_conditional_samples
from cdmtransfer.model_stack import stackable
from cdmtransfer.models import MLPEncoder, ScoreModel
from cdmtransfer.stages import score_model
from test_batched_cells import _setup


def _models(cfg, taskset, n: int = 3, full: bool = False) -> list[ScoreModel]:
    """n adapted-like models of one head shape: own encoder weights, heads, σ_d (and linear mean, covariance)."""
    out = []
    for i in range(n):
        torch.manual_seed(10 + i)
        enc = MLPEncoder(taskset.D_y, 2, 16, 1)
        model = score_model(cfg, enc, 1, taskset, taskset.target_x[:12] * (1 + 0.3 * i))
        with torch.no_grad():
            for p in model.heads.parameters():
                p.add_(0.1 * torch.randn_like(p))
            if full:
                model.heads.mean.basis.copy_(torch.linalg.qr(torch.randn(1, model.d_x, model.d_x))[0])
                model.heads.mean.scale.uniform_(0.3, 1.5)
        out.append(model.eval())
    return out


FULL = ("model.linear_mean=true", "model.parametrization=edm", "model.mean_covariance=full")
SCALAR = ("model.mean_covariance=scalar",)  # EDM with one σ_d per model: per head in the stack


@pytest.mark.parametrize("sets, method", [(FULL, "sde"), (FULL, "ode"), (SCALAR, "sde"),
                                          (("model.parametrization=eps", "model.linear_mean=false"), "sde")])
def test_stacked_samples_equal_each_models_own(sets, method):
    cfg, taskset, _, _ = _setup("frozen", sets=sets)
    models = _models(cfg, taskset, full="model.mean_covariance=full" in sets)
    assert stackable(models)
    process, y = OUProcess(cfg.diffusion.T0, cfg.diffusion.T), taskset.test_y[:5]
    for denoise in (False, True):
        together = stacked_conditional_samples(models, y, 7, process, 12, method, torch.Generator().manual_seed(3),
                                               denoise=denoise)
        for model, got in zip(models, together):
            alone = conditional_samples(model, y, 7, process, 12, method, torch.Generator().manual_seed(3),
                                        denoise=denoise)
            torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
    assert (together[0] - together[1]).abs().max() > 1e-2  # the models differ, so their samples do


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-6) or (math.isnan(a[key]) and math.isnan(b[key])), key


@pytest.mark.parametrize("sets", [FULL, SCALAR])
def test_evaluate_models_equals_evaluate_model_on_each(sets, monkeypatch):
    cfg, taskset, _, _ = _setup("frozen", sets=sets)
    models = _models(cfg, taskset, full=sets == FULL)
    cfgs = [dataclasses.replace(cfg, seed=s, adapt=dataclasses.replace(cfg.adapt, m=m))  # own target subsets
            for s, m in ((0, 12), (1, 12), (2, 20))]
    alone = [evaluate_model(copy.deepcopy(m), taskset, c, keep=k) for m, c, k in zip(models, cfgs, [{}, {}, {}])]
    runs = []  # one sampler run per sampling, for all three models at once
    sample = metrics.sample
    monkeypatch.setattr(metrics, "sample", lambda *a, **k: runs.append(k.get("copies")) or sample(*a, **k))
    keeps = [{}, {}, {}]
    together = evaluate_models(models, taskset, cfgs, keeps=keeps, device="cpu")
    assert runs == [3, 3]  # the posterior mean's samples and the distribution distance's
    for (got, got_skipped), (want, want_skipped) in zip(together, alone):
        _same(got, want)
        assert got_skipped == want_skipped
    assert together[0][0]["ref/linear_target_mse"] != together[2][0]["ref/linear_target_mse"]  # m = 12 vs 20
    assert together[0][0]["score_error"] != together[1][0]["score_error"]
    for keep in keeps:
        assert keep["model"].shape == (cfg.evaluate.dist_conditions, cfg.evaluate.dist_samples, taskset.d_x)


def test_models_that_do_not_stack_are_evaluated_one_after_the_other():
    cfg, taskset, _, _ = _setup("frozen")
    models = _models(cfg, taskset, n=2)
    wider = score_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, head_width=8)),
                        MLPEncoder(taskset.D_y, 2, 16, 1), 1, taskset, taskset.target_x[:12]).eval()
    for group in ([models[0], wider], [models[0], MeanPrediction(models)]):
        assert not stackable(group)
        together = evaluate_models(group, taskset, [cfg, cfg])
        for model, (got, _) in zip(group, together):
            _same(got, evaluate_model(model, taskset, cfg)[0])


def test_models_evaluated_together_share_their_evaluation_settings():
    cfg, taskset, _, _ = _setup("frozen")
    other = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, sampler_steps=9))
    with pytest.raises(ValueError, match="evaluate"):
        evaluate_models(_models(cfg, taskset, n=2), taskset, [cfg, other])
