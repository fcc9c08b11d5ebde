"""ensemble.py: a sweep's cells on several encoders scored as one model whose ε̂ is the mean of theirs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cdmtransfer.config import Config
from cdmtransfer.ensemble import MeanPrediction, ensemble_rows, ensemble_summary
from cdmtransfer.tasks import build_taskset
from cdmtransfer.typed import from_dict


class Constant(nn.Module):
    """ε̂ = c·x_t: a member whose error depends on c."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x_t, y, t):
        return self.c * x_t


@pytest.fixture(scope="module")
def world():
    cfg = from_dict(Config, {"suite": {"name": "gaussian", "K": 2, "n": 64, "n_target_pool": 64, "n_test": 64,
                                       "gaussian": {"d_x": 3, "D_y": 8, "d": 2}},
                             "evaluate": {"t_draws": 4}}, "test")
    return cfg, build_taskset(cfg)


def test_the_mean_prediction_is_the_mean_of_the_members_predictions():
    x_t, y, t = torch.randn(1, 5, 3), torch.randn(1, 5, 8), torch.rand(1, 5)
    assert torch.allclose(MeanPrediction([Constant(0.5), Constant(1.5), Constant(-2.0)])(x_t, y, t), 0.0 * x_t, atol=1e-6)
    assert torch.allclose(MeanPrediction([Constant(0.7)] * 3)(x_t, y, t), Constant(0.7)(x_t, y, t), rtol=1e-6)


def test_rows_group_the_pretrained_cells_of_one_target_subset_and_score_members_and_their_mean(world):
    cfg, taskset = world
    members = {"a": Constant(0.2), "b": Constant(1.0), "c": Constant(0.6), "s": Constant(0.0), "lone": Constant(0.3)}
    rows = [{"mode": "frozen", "m": 8, "seed": 0, "pretrain": 1, "run_id": "b"},
            {"mode": "frozen", "m": 8, "seed": 0, "pretrain": 0, "run_id": "a"},
            {"mode": "scratch", "m": 8, "seed": 0, "run_id": "s"},  # not a pretrained mode: no ensemble
            {"mode": "finetune", "m": 8, "seed": 0, "pretrain": 0, "run_id": "lone"}]  # one encoder: none
    out = ensemble_rows(rows, members.__getitem__, taskset, cfg)
    assert len(out) == 1 and out[0]["members"] == ["a", "b"]  # in encoder order
    alone = ensemble_rows([dict(rows[0], run_id="c"), dict(rows[1], run_id="c")], members.__getitem__, taskset, cfg)
    # the mean of ε̂ = 0.2 x_t and 1.0 x_t is 0.6 x_t: scored exactly as that member on the same draws
    assert out[0]["metrics"] == pytest.approx(alone[0]["metrics"], rel=1e-6)
    assert out[0]["metrics"]["score_error"] < out[0]["members_mean"]["score_error"]  # Jensen, members differ
    assert set(out[0]["metrics"]) == {"score_error", "test_dsm"}
    summary = ensemble_summary(out + [dict(out[0], seed=1)])
    assert len(summary) == 1 and summary[0]["seeds"] == 2 and summary[0]["encoders"] == 2
    assert summary[0]["ensemble"]["score_error"]["mean"] == pytest.approx(out[0]["metrics"]["score_error"])
