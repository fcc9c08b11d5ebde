"""ensemble.py: a sweep's cells on several encoders evaluated as one model whose ε̂ is the mean of theirs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cdmtransfer.config import Config
from cdmtransfer.diffusion import OUProcess
from cdmtransfer.ensemble import MeanPrediction, ensemble_rows, ensemble_summary
from cdmtransfer.metrics import conditional_samples, evaluate_model
from cdmtransfer.models import MLPEncoder, ScoreModel
from cdmtransfer.tasks import build_taskset
from cdmtransfer.typed import from_dict


def member(seed: int, d: int) -> ScoreModel:
    """A random adapted-size model (one head, EDM, linear mean, full covariance) on the suite's D_y = 8, d_x = 3."""
    torch.manual_seed(seed)
    model = ScoreModel(MLPEncoder(8, d, 16, 1, linear=True), 1, 3, 16, 1, 4, parametrization="edm",
                       linear_mean=True, mean_covariance="full")
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(0.3 * torch.randn_like(p))  # a non-zero linear mean and output layer
    return model.eval()


@pytest.fixture(scope="module")
def world():
    cfg = from_dict(Config, {"suite": {"name": "gaussian", "K": 2, "n": 64, "n_target_pool": 64, "n_test": 32,
                                       "gaussian": {"d_x": 3, "D_y": 8, "d": 2}},
                             "evaluate": {"t_draws": 2, "posterior_samples": 8, "posterior_conditions": 8,
                                          "sampler_steps": 8, "dist_conditions": 4, "dist_samples": 16}}, "test")
    return cfg, build_taskset(cfg)


def test_the_mean_prediction_and_its_sampler_step_are_the_mean_of_the_members():
    """forward: the members' ε̂ averaged; eps_from_code and sampling_eps on the concatenated code (members of
    different code widths): the same; conditional_samples runs on it."""
    members = [member(0, 2), member(1, 3), member(2, 2)]
    ensemble = MeanPrediction(members)
    y, x = torch.randn(5, 8), torch.randn(5, 3)
    t = torch.tensor(0.3)
    mean = torch.stack([m(x[None], y[None], t.expand(1, 5)) for m in members]).mean(0)
    assert torch.allclose(ensemble(x[None], y[None], t.expand(1, 5)), mean, atol=1e-6)
    assert ensemble.encoder(y).shape == (5, 7) and ensemble.encoder.widths == [2, 3, 2]
    assert torch.allclose(ensemble.eps_from_code(x[None], ensemble.encoder(y)[None], t.expand(1, 5)), mean, atol=1e-6)
    step = ensemble.sampling_eps(ensemble.encoder(y))
    assert torch.allclose(step(x, t), mean[0], atol=1e-5)
    out = torch.empty(5, 3)
    assert step(x, t, out=out) is out and torch.allclose(out, mean[0], atol=1e-5)
    draws = conditional_samples(ensemble, y[:2], 4, OUProcess(0.01, 4.0), 8, "sde", torch.Generator().manual_seed(0))
    assert draws.shape == (2, 4, 3) and torch.isfinite(draws).all()


def test_rows_group_the_pretrained_cells_of_one_target_subset_and_evaluate_their_mean(world):
    """Only pretrained modes with two or more encoders, members in encoder order; the ensemble evaluated like a cell
    (evaluate_model on the same target subset and seed): its score error and test DSM never above the members' mean
    (Jensen, same draws), below it where they differ; a summary over seeds."""
    cfg, taskset = world
    models = {"a": member(0, 2), "b": member(1, 2), "s": member(2, 2), "lone": member(3, 2)}
    cell = dataclasses.replace(cfg, seed=5, adapt=dataclasses.replace(cfg.adapt, m=8))

    def row(mode, run_id, pretrain):
        return {"mode": mode, "m": 8, "seed": 5, "pretrain": pretrain, "run_id": run_id,
                "metrics": evaluate_model(models[run_id], taskset, cell)[0]}

    rows = [row("frozen", "b", 1), row("frozen", "a", 0), row("scratch", "s", 0), row("finetune", "lone", 0)]
    out = ensemble_rows(rows, models.__getitem__, taskset, cfg)
    assert len(out) == 1 and out[0]["members"] == ["a", "b"]
    e = out[0]
    assert set(e["metrics"]) == {"score_error", "posterior_mean_mse", "sliced_w2", "test_dsm"}
    assert e["each"][0]["score_error"] == rows[1]["metrics"]["score_error"]  # the members' own evaluations
    for k in ("score_error", "test_dsm"):
        assert e["metrics"][k] < e["members_mean"][k]
    summary = ensemble_summary(out + [dict(e, seed=6)])
    assert len(summary) == 1 and summary[0]["seeds"] == 2 and summary[0]["encoders"] == 2
    assert summary[0]["ensemble"]["score_error"]["mean"] == pytest.approx(e["metrics"]["score_error"])


def test_an_exported_ensemble_reloads_as_the_same_model_with_each_weight_stored_once(tmp_path):
    """model_spec / build_model round trip through export_model and load_model_dir: the state dict holds the members'
    weights once each (members.<i>.*, nothing under the unregistered code concatenation), the rebuilt model predicts
    what the original does, and a spec with one member or members of different d_x is refused with a DataError."""
    from cdmtransfer.checkpoint import export_model
    from cdmtransfer.errors import DataError
    from cdmtransfer.models import model_spec, rebuild
    from cdmtransfer.runs import load_model_dir

    ensemble = MeanPrediction([member(0, 2), member(1, 3)])
    state = ensemble.state_dict()
    assert state and all(k.startswith(("members.0.", "members.1.")) for k in state)
    assert len(state) == len(member(0, 2).state_dict()) + len(member(1, 3).state_dict())
    spec = model_spec(ensemble)
    assert [s["encoder"]["d"] for s in spec["ensemble"]] == [2, 3]
    cfg = from_dict(Config, {"suite": {"name": "gaussian", "gaussian": {"d_x": 3, "D_y": 8, "d": 2}}}, "test")
    export_model(tmp_path / "model", state, {"stage": "adapt", "model": spec, "config": cfg.to_dict()})
    loaded, _, meta = load_model_dir(tmp_path / "model", "test")
    assert isinstance(loaded, MeanPrediction) and meta["stage"] == "adapt"
    torch.manual_seed(7)
    x, y, t = torch.randn(1, 5, 3), torch.randn(1, 5, 8), torch.rand(1, 5) + 0.1
    assert torch.equal(loaded(x, y, t), ensemble(x, y, t))
    with pytest.raises(DataError, match="at least two member specs"):
        rebuild({"ensemble": spec["ensemble"][:1]}, "one.json")
    other = model_spec(ScoreModel(MLPEncoder(8, 2, 16, 1), 1, 4, 16, 1, 4))
    with pytest.raises(DataError, match="different d_x"):
        rebuild({"ensemble": [spec["ensemble"][0], other]}, "mixed.json")
