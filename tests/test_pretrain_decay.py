"""The pretrain's encoder weight decay, chosen by the held-out DSM: every decay of the grid trains as a pretrain pinned
to it would, the winner's weights are exported, and a pretrain whose start stays best tries no decay."""

from __future__ import annotations

import json
import signal
import time

import pytest
from mlflow import MlflowClient
from safetensors.torch import load_file

import cdmtransfer as cdm

# a nonlinear h* that a 256-row pretrain learns past its linear start (best step > 0), small enough for seconds
NONLINEAR = """
name: decay
suite:
  name: gaussian
  K: 8
  n: 256
  n_target_pool: 64
  n_test: 64
  gaussian: {d_x: 4, D_y: 16, d: 2, h_star: nonlinear}
model: {d: 2, encoder_width: 64, encoder_depth: 2, head_width: 32, head_depth: 1, time_dim: 8}
pretrain: {steps: 600, batch_size: 32, val_every: 50, patience: 4, log_every: 50, checkpoint_every: 300,
           warmup_steps: 10, encoder_decay_grid: [0.0, 0.3, 3.0]}
"""


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path}/mlflow.db"


def _pretrain(tmp_path, store, *overrides):
    recipe = tmp_path / "decay.yaml"
    recipe.write_text(NONLINEAR)
    return cdm.pretrain(str(recipe), list(overrides), tracking_uri=store)


def _candidates(store, run_id) -> dict:
    client = MlflowClient(tracking_uri=store)
    path = client.download_artifacts(run_id, "encoder_decay_candidates.json")
    with open(path) as f:
        return json.load(f)


def test_each_decay_of_the_grid_trains_as_a_pretrain_pinned_to_it(tmp_path, store):
    grid = _pretrain(tmp_path, store)
    choice = _candidates(store, grid.run_id)
    assert [c["encoder_decay"] for c in choice["candidates"]] == [0.0, 0.3, 3.0]
    assert choice["candidates"][0]["best_step"] > 0  # the start did not stay best: the other decays were tried
    losses = {c["encoder_decay"]: c["val_loss"] for c in choice["candidates"]}
    assert len(set(losses.values())) == 3  # the decay changed what was learned
    for c in choice["candidates"]:
        pinned = _pretrain(tmp_path, store, f"pretrain.encoder_decay={c['encoder_decay']}")
        assert pinned.metrics["val_loss"] == pytest.approx(c["val_loss"], rel=1e-5)
        assert pinned.metrics["best_step"] == c["best_step"]
        if c["encoder_decay"] == choice["encoder_decay"]:  # the grid exports the winner's weights
            a = load_file(str(grid.paths["model"] / "model.safetensors"))
            b = load_file(str(pinned.paths["model"] / "model.safetensors"))
            assert a.keys() == b.keys()
            assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert choice["encoder_decay"] > 0  # a candidate of the grid won: its weights were taken out of the stacked model
    assert grid.metrics["encoder_decay"] == choice["encoder_decay"] == grid.info["choice"]["encoder_decay"]
    assert grid.metrics["val_loss"] == pytest.approx(min(losses.values()), rel=0.01)  # the best, or a near tie
    tags = MlflowClient(tracking_uri=store).get_run(grid.run_id).data.tags
    chose = f"pretrain chose encoder decay {choice['encoder_decay']:g}: "
    assert tags["cdmtransfer.encoder_decay_choice"].startswith(chose) and grid.info["choice"]["reason"].startswith(chose)


def test_a_pretrain_whose_start_stays_best_tries_no_decay(tmp_path, store):
    """The linear suite: the closed-form start is the best the pretrain finds, so there is nothing to regularise."""
    recipe = tmp_path / "linear.yaml"
    recipe.write_text(NONLINEAR.replace("h_star: nonlinear", "h_star: linear").replace("K: 8", "K: 4"))
    run = cdm.pretrain(str(recipe), tracking_uri=store)
    assert run.metrics["best_step"] == 0 and run.metrics["encoder_decay"] == 0.0
    assert "cdmtransfer.encoder_decay_choice" not in MlflowClient(tracking_uri=store).get_run(run.run_id).data.tags
    assert not (run.paths["checkpoints"].parent / "checkpoints-decay").exists()


def test_kill_9_while_the_decays_train_then_resume_matches_uninterrupted(tmp_path):
    """Killed in the second phase (checkpoints-decay), the resumed pretrain ends with the uninterrupted one's weights."""
    from test_faults import cli, weights

    home = tmp_path / "home"
    recipe = tmp_path / "decay.yaml"
    recipe.write_text(NONLINEAR)
    args = ["pretrain", recipe, "--set", "pretrain.steps=400", "--set", "pretrain.patience=0",
            "--set", "pretrain.checkpoint_every=25", "--quiet", "--json"]
    full = cli(home, *args)
    out, err = full.communicate(timeout=300)
    assert full.returncode == 0, err
    full_id = json.loads(out)["run_id"]

    victim = cli(home, *args)
    deadline, run_id = time.time() + 120, None
    while time.time() < deadline and run_id is None:
        found = [p for p in (home / "work").glob("*/checkpoints-decay/step_*") if p.parent.parent.name != full_id]
        run_id = found[0].parent.parent.name if len(found) >= 2 else None
        time.sleep(0.02)
    assert run_id is not None, "the second phase never checkpointed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (home / "work" / run_id / "model" / "model.safetensors").exists()

    resumed = cli(home, *args, "--resume", run_id)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    a, b = weights(home, full_id), weights(home, run_id)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    client = MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")
    steps = [m.step for m in client.get_metric_history(run_id, "decay/loss")]
    assert steps[-1] == 400 and len(steps) == len(set(steps))  # continued from its checkpoint, not from step 0
    assert client.get_run(run_id).data.tags["cdmtransfer.encoder_decay_choice"] == \
        client.get_run(full_id).data.tags["cdmtransfer.encoder_decay_choice"]
