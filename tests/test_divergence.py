"""Diverging samples are caught (issue #10): the spread check in evaluate_model, its flags, tag and warning line.

The good model is exact: ε̂ = −σ_t · ∇log p_t(x_t | y) of the Gaussian suite (GaussianTruth.score), so its samples
follow the true posterior up to the sampler's discretisation. The broken ones are real ScoreModels whose heads are
blown up, and the exact model with its score switched off (what an untrained model does: samples grow by e^T).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from cdmtransfer.cli import app
from cdmtransfer.config import Config
from cdmtransfer.diffusion import OUProcess
from cdmtransfer.metrics import FLAGS, SampleSpread, divergence_warning, evaluate_model, flagged
from cdmtransfer.models import FixedEncoder, MLPEncoder, ScoreModel
from cdmtransfer.tasks import build_taskset
from cdmtransfer.tracking import TAG
from cdmtransfer.typed import from_dict
from test_pipeline import TINY as PIPELINE_TINY

SUITE = {"name": "gaussian", "K": 3, "n": 128, "n_target_pool": 64, "n_test": 64,
         "gaussian": {"d_x": 3, "D_y": 8, "d": 2}}
EVAL = {"t_draws": 2, "posterior_samples": 16, "posterior_conditions": 32, "sampler_steps": 32, "dist_conditions": 4,
        "dist_samples": 64}


def make_cfg(**evaluate) -> Config:
    return from_dict(Config, {"suite": SUITE, "evaluate": EVAL | evaluate}, "test")


@pytest.fixture(scope="module")
def taskset():
    return build_taskset(make_cfg())


class ExactModel(ScoreModel):
    """ε̂ = scale · (−σ_t · true score) of the target task; the code is y itself (identity encoder)."""

    def __init__(self, truth, D_y: int, d_x: int, scale: float = 1.0):
        super().__init__(FixedEncoder(torch.eye(D_y), torch.zeros(D_y)), 1, d_x, 8, 1, 4)
        self.truth, self.scale = truth, scale

    def eps_from_code(self, x_t, code, t, y=None):
        flat_t = t.reshape(-1)
        score = self.truth.score(0, x_t.reshape(-1, x_t.shape[-1]), code.reshape(-1, code.shape[-1]), flat_t)
        return (self.scale * -OUProcess.sigma(flat_t)[:, None] * score).view_as(x_t)


def blown_up(taskset, factor: float) -> ScoreModel:
    torch.manual_seed(0)
    model = ScoreModel(MLPEncoder(taskset.D_y, 2, 16, 1), 1, taskset.d_x, 16, 1, 4)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.mul_(factor)
    return model


def test_exact_model_is_not_flagged(taskset):
    metrics, skipped = evaluate_model(ExactModel(taskset.truth, taskset.D_y, taskset.d_x), taskset, make_cfg())
    assert 0.8 < metrics["sample_spread_ratio"] < 1.25  # true posterior samples spread like the data
    assert metrics["diverged"] == 0.0 and metrics["nonfinite_samples"] == 0.0
    assert FLAGS not in skipped and flagged(skipped) == {}
    assert divergence_warning("adapt", metrics, skipped, 3.0) is None
    assert metrics["posterior_mean_mse"] < 1.5 * metrics["posterior_mean_mse_floor"]  # it is the exact model


def test_blown_up_model_is_flagged(taskset):
    metrics, skipped = evaluate_model(blown_up(taskset, 10.0), taskset, make_cfg())
    assert metrics["diverged"] == 1.0
    assert metrics["sample_spread_ratio"] > 3
    assert set(flagged(skipped)) == {"posterior_mean_mse", "posterior_mean_mse_mc", "posterior_mean_mse_excess",
                                     "sliced_w2"}  # from samples only
    assert all("diverged" in why for why in flagged(skipped).values())
    assert "score_error" in metrics and "score_error" not in flagged(skipped)  # not from samples: not flagged
    line = divergence_warning("adapt scratch m=8 seed=0", metrics, skipped, 3.0)
    assert line.startswith("warning: adapt scratch m=8 seed=0: samples diverged (spread ")
    assert "threshold 3" in line
    assert line.endswith("posterior_mean_mse, posterior_mean_mse_mc, sliced_w2, posterior_mean_mse_excess "
                         "are not results")
    assert "\n" not in line


def test_nonfinite_samples_are_flagged(taskset):
    metrics, skipped = evaluate_model(blown_up(taskset, 100.0), taskset, make_cfg())
    assert metrics["nonfinite_samples"] > 0 and metrics["diverged"] == 1.0
    assert "non-finite sample" in divergence_warning("x", metrics, skipped)


def test_threshold_is_evaluate_divergence_ratio(taskset):
    """With the score switched off the samples spread by ~e^T: flagged at the default 3, not when allowed 1000."""
    model = ExactModel(taskset.truth, taskset.D_y, taskset.d_x, scale=0.0)
    loose, loose_skipped = evaluate_model(model, taskset, make_cfg(divergence_ratio=1000.0))
    strict, strict_skipped = evaluate_model(model, taskset, make_cfg())
    assert 10 < loose["sample_spread_ratio"] < 1000
    assert loose["sample_spread_ratio"] == strict["sample_spread_ratio"]  # the same evaluation noise
    assert loose["diverged"] == 0.0 and FLAGS not in loose_skipped
    assert strict["diverged"] == 1.0
    assert set(flagged(strict_skipped)) == {"posterior_mean_mse", "posterior_mean_mse_mc", "posterior_mean_mse_excess",
                                            "sliced_w2"}


def test_sample_spread_exact_values():
    data = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])  # mean 0, RMS 1
    spread = SampleSpread(data)
    spread.add(torch.tensor([[[3.0, -3.0], [float("nan"), 0.0]], [[-3.0, 3.0], [0.0, float("inf")]]]))
    assert spread.nonfinite == 2
    assert spread.ratio == pytest.approx(3.0, rel=1e-12)  # over the finite samples only
    assert SampleSpread(data).ratio == math.inf  # no finite sample at all


# The pipeline tests' tiny recipe with an adapt stage that blows up: learning rate 1, no clipping, and no
# cross-validation (it would keep the untrained start, which does not diverge).
TINY = PIPELINE_TINY.replace(
    "adapt: {steps: 80, batch_size: 16, m: 8, log_every: 20, checkpoint_every: 40, warmup_steps: 10}",
    "adapt: {steps: 20, batch_size: 16, m: 8, lr: 1.0, grad_clip: 0, log_every: 5, checkpoint_every: 20, "
    "warmup_steps: 0, val_folds: 1}")


def test_diverged_adapt_run_is_tagged_and_warned(store, tmp_path):
    """A scratch model trained at learning rate 1 without clipping: its loss stays finite but its sampler blows up
    (spread ~1e8× the data's). The run still finishes, but says so in one stderr line, carries the tag and marks the
    sample-based metrics in its table; `evaluate` does the same."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    result = CliRunner().invoke(app, ["adapt", str(recipe), "--mode", "scratch"])
    assert result.exit_code == 0, result.output + result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    assert warnings[0].startswith("warning: adapt scratch m=8 seed=0: samples diverged (spread ")
    assert warnings[0].endswith("posterior_mean_mse, posterior_mean_mse_mc, sliced_w2, posterior_mean_mse_excess "
                                "are not results")
    table = {line.split("│")[1].strip(): line.split("│")[2].strip()
             for line in result.stdout.splitlines() if line.count("│") >= 3}
    assert table["posterior_mean_mse"].endswith(" !") and table["sliced_w2"].endswith(" !")
    assert not table["score_error"].endswith("!")
    assert "skipped flags" not in result.stdout
    run_id = next(line.split()[-1] for line in result.stdout.splitlines() if line.startswith("run id:"))

    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    run = client.get_run(run_id)
    assert run.data.tags[TAG + "diverged"] == "true"
    assert run.data.metrics["diverged"] == 1.0 and run.data.metrics["sample_spread_ratio"] > 3
    assert "ref/linear_pooled_mse" in run.data.metrics

    client.delete_tag(run_id, TAG + "diverged")
    ev = CliRunner().invoke(app, ["evaluate", run_id, "--json"])
    assert ev.exit_code == 0, ev.output + ev.stderr
    ev_warnings = [line for line in ev.stderr.splitlines() if line.startswith("warning:")]
    assert len(ev_warnings) == 1 and f"evaluate {run_id}: samples diverged" in ev_warnings[0]
    out = json.loads(ev.stdout)
    assert set(out["info"]["skipped"][FLAGS]) == {"posterior_mean_mse", "posterior_mean_mse_mc", "sliced_w2",
                                                  "posterior_mean_mse_excess"}
    run = client.get_run(run_id)
    assert run.data.tags[TAG + "diverged"] == "true" and run.data.metrics["eval/diverged"] == 1.0


def test_posterior_mean_mse_mc_removes_the_sampling_noise_of_few_samples(taskset):
    # The exact model's mean of N samples is off by Var/N: with N = 2 the raw error is far above N = 32's, while the
    # estimate with posterior_mean_mse_mc taken off is the same (the error of the model's own posterior mean).
    raw, debiased = {}, {}
    for n in (2, 32):
        metrics, _ = evaluate_model(ExactModel(taskset.truth, taskset.D_y, taskset.d_x), taskset,
                                    make_cfg(posterior_samples=n, posterior_conditions=64))
        raw[n], debiased[n] = metrics["posterior_mean_mse"], metrics["posterior_mean_mse"] - metrics[
            "posterior_mean_mse_mc"]
    assert raw[2] - raw[32] > 0.05
    assert abs(debiased[2] - debiased[32]) < 0.25 * (raw[2] - raw[32])
