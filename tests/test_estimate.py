"""`estimate` end to end on a tiny recipe: held-out source tasks as stand-in targets, a real MLflow store, reuse."""

from __future__ import annotations

import json

import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from cdmtransfer.cli import app
from cdmtransfer.config import load_config
from cdmtransfer.tasks import build_taskset
from cdmtransfer.tracking import TAG

TINY = """
name: tiny-estimate
suite:
  name: gaussian
  K: 3
  n: 96
  n_test: 64
  gaussian: {d_x: 3, D_y: 8, d: 2}
model: {d: 2, encoder_width: 16, encoder_depth: 1, head_width: 16, head_depth: 1, time_dim: 8}
pretrain: {steps: 40, batch_size: 32, log_every: 20, checkpoint_every: 40, warmup_steps: 5, val_every: 20}
adapt: {steps: 20, batch_size: 16, log_every: 10, checkpoint_every: 20, warmup_steps: 5, val_folds: 1}
evaluate: {t_draws: 2, posterior_samples: 4, posterior_conditions: 8, sampler_steps: 8, dist_conditions: 2,
           dist_samples: 8}
"""


def test_holdout_makes_a_source_the_target_with_relabelled_truth(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    base = build_taskset(load_config(path))
    held = build_taskset(load_config(path, ["suite.holdout=2"]))
    assert held.K == 2 and torch.equal(held.source_x[1], base.source_x[2])  # sources 1 and 3 remain
    rows = torch.cat([held.target_x, held.test_x])
    assert rows.shape[0] == 96 and held.test_x.shape[0] == 24  # test: at most a quarter of the task's rows
    assert torch.equal(rows.sort(0).values, base.source_x[1].sort(0).values)
    x, y, t = held.test_x[:5], held.test_y[:5], torch.full((5,), 0.3)
    assert torch.allclose(held.truth.score(0, x, y, t), base.truth.score(2, x, y, t))  # task 0 is source 2 now
    assert torch.allclose(held.truth.score(2, x, y, t), base.truth.score(3, x, y, t))
    assert torch.allclose(held.truth.mean(0, y), base.truth.mean(2, y))


def test_estimate_from_held_out_sources_table_json_and_mlflow_run(tmp_path, store):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    args = ["estimate", str(path), "--epsilon", "10%", "--error", "test_dsm", "--ladder", "4,8,16", "--holdout", "2"]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    out = json.loads(result.stdout)
    assert set(out["predicted"]) == {"frozen", "scratch"} and out["epsilon_text"] == "floor × 1.1"
    for mode, r in out["predicted"].items():
        assert len(r["tasks"]) == 2 and [len(t["points"]) for t in r["tasks"]] == [3, 3]
        lo, hi = r["interval"]
        assert lo is None or lo >= 1
        assert r["m"] is None or (lo <= r["m"] and (hi is None or r["m"] <= hi))
    runs = out["evidence"]["runs"]
    assert [r["task"] for r in runs] == out["evidence"]["holdout_tasks"] and not any(r["reused"] for r in runs)

    c = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    est = c.get_run(out["run_id"])
    assert est.info.status == "FINISHED" and est.data.tags[TAG + "stage"] == "estimate"
    assert est.data.tags[TAG + "holdout_sweep_runs"].split(",") == [r["sweep_run_id"] for r in runs]
    for r in runs:
        sweep = c.get_run(r["sweep_run_id"])
        assert sweep.info.status == "FINISHED" and sweep.data.params["suite.holdout"] == str(r["task"])
        assert c.get_run(r["pretrain_run_id"]).data.params["suite.n"] == "96"

    assert {a.path for a in c.list_artifacts(out["run_id"], "plots")} == {"plots/estimate.png"}

    again = CliRunner().invoke(app, [*args, "--quiet"])  # the same held-out runs: found, not trained again
    assert again.exit_code == 0, again.output + again.stderr
    assert "predicted from held-out source tasks" in again.stdout and "frozen" in again.stdout
    assert "uncalibrated theory" not in again.stdout  # --quiet: the answer only
    estimates = c.search_runs([est.info.experiment_id], filter_string=f"tags.`{TAG}stage` = 'estimate'")
    sweeps = c.search_runs([est.info.experiment_id], filter_string=f"tags.`{TAG}stage` = 'sweep'")
    assert len(estimates) == 2 and len(sweeps) == 2


def test_sizes_read_for_every_suite():
    from cdmtransfer.estimate import suite_dims

    assert suite_dims(load_config("recipes/quickstart.yaml")) == {"d_x": 8, "D_y": 32, "K": 8, "n": 512}
    digits = suite_dims(load_config("recipes/digits-inpaint.yaml"))  # an image suite: built, then read
    assert digits["d_x"] == 64 and digits["D_y"] == 128 and digits["K"] == 9 and 150 < digits["n"] <= 512
    lsgmm = suite_dims(load_config("recipes/regularize-off.yaml"))
    assert lsgmm["d_x"] == 16 and lsgmm["K"] == 4
    held = suite_dims(load_config("recipes/quickstart.yaml", ["suite.holdout=1"]))
    assert held["K"] == 7


def test_a_ladder_beyond_the_held_out_rows_is_refused_before_training(tmp_path, store):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)  # 96 rows per source: a held-out source keeps 72 to adapt on
    result = CliRunner().invoke(app, ["estimate", str(path), "--epsilon", "0.5", "--ladder", "4,100,200"])
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [
        "error: --ladder 4,100,200: a held-out source has 72 rows to adapt on; give at least two sizes <= 72"]
    c = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    assert not c.search_runs([e.experiment_id for e in c.search_experiments()])  # nothing trained
