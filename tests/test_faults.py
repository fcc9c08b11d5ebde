"""Faults for real: kill -9 in the middle of pretrain and adapt, then --resume; SIGTERM marks the run KILLED."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient
from safetensors.torch import load_file

from cdmtransfer.checkpoint import list_checkpoints, load_checkpoint
from test_pipeline import TINY

# patience 0: validation still runs and picks the weights kept, but never stops a run before the cap, so a run is
# long enough to be killed mid-way (adapt is killed in its cross-validation phase, whose checkpoints are checkpoints-cv)
LONG = ["--set", "pretrain.steps=400", "--set", "pretrain.checkpoint_every=50", "--set", "pretrain.patience=0",
        "--set", "adapt.steps=400", "--set", "adapt.checkpoint_every=50", "--set", "adapt.patience=0"]


def cli(store, *args, **kwargs):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # it would win over the home
    env["CDMTRANSFER_HOME"] = str(store)
    return subprocess.Popen([sys.executable, "-m", "cdmtransfer", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for_checkpoint(store, before: set, timeout=120) -> str:
    """Block until a new run has written at least two checkpoints; return its run id."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for run_dir in (store / "work").glob("*") if (store / "work").exists() else []:
            found = [*(run_dir / "checkpoints").glob("step_*"), *(run_dir / "checkpoints-cv").glob("step_*")]
            if run_dir.name not in before and len(found) >= 2:
                return run_dir.name
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def weights(store, run_id):
    return load_file(str(store / "work" / run_id / "model" / "model.safetensors"))


@pytest.mark.parametrize("stage", ["pretrain", "adapt"])
def test_kill_9_then_resume_matches_uninterrupted(stage, tmp_path, store):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY)
    args = [stage, recipe, *LONG, "--quiet", "--json"] + (["--mode", "scratch"] if stage == "adapt" else [])
    full = cli(store, *args)
    out, err = full.communicate(timeout=300)
    assert full.returncode == 0, err
    full_id = json.loads(out)["run_id"]

    victim = cli(store, *args)
    run_id = wait_for_checkpoint(store, {full_id})
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    assert client.get_run(run_id).info.status == "RUNNING"  # kill -9 leaves no chance to say otherwise
    for folder in ("checkpoints", "checkpoints-cv"):  # every visible checkpoint is whole
        for path in list_checkpoints(store / "work" / run_id / folder):
            load_checkpoint(path)

    resumed = cli(store, *args, "--resume", run_id)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert json.loads(out)["run_id"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "cdmtransfer.resumed_at" in run.data.tags
    a, b = weights(store, full_id), weights(store, run_id)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    history = [m.step for m in client.get_metric_history(run_id, "loss" if stage == "pretrain" else "cv/loss")]
    assert history[-1] == 400


def test_sigterm_marks_run_killed(tmp_path, store):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY)
    proc = cli(store, "pretrain", recipe, *LONG, "--quiet")
    run_id = wait_for_checkpoint(store, set())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err, err
    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    assert client.get_run(run_id).info.status == "KILLED"


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_a_stopped_sweep_stops_the_workers_without_waiting_for_their_cells(how, tmp_path, store):
    """A scratch cell trains in a worker while the sweep pretrains; SIGTERM to the sweep (or Ctrl-C: SIGINT to its
    whole process group, workers included, as a terminal sends it) marks every run KILLED and ends the worker at
    once: the cell (20,000 CV steps, about 40 s here) is never finished and exported. (Before, the sweep waited for
    the worker's cell, which was then exported.)"""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY)
    proc = cli(store, "sweep", recipe, "--m", 8, "--modes", "frozen,scratch", "--jobs", 2, "--quiet",
               "--set", "pretrain.steps=8000", "--set", "pretrain.patience=0",
               "--set", "adapt.steps=20000", "--set", "adapt.patience=0", start_new_session=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    deadline, reached = time.time() + 120, 0
    while time.time() < deadline and reached < 3000:  # the pretrain 3,000 steps in: the worker is on the cell
        time.sleep(0.2)
        steps = [int(p.name[5:11]) for p in (store / "work").glob("*/checkpoints/step_*")] if (store / "work").exists() \
            else []
        reached = max(steps, default=0)
    assert reached >= 3000 and proc.poll() is None
    scratch = [r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
               if r.data.tags.get("cdmtransfer.mode") == "scratch"]
    assert len(scratch) == 1
    scratch = scratch[0]
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err, err
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.data.tags.get("cdmtransfer.stage") for r in runs} == {"sweep", "pretrain", "adapt"}
    assert {r.info.status for r in runs} == {"KILLED"}
    assert not (store / "work" / scratch / "model").exists()  # the worker was stopped, not waited for


def test_a_stop_request_whose_interrupt_was_swallowed_still_stops_training_and_marks_the_run_killed(tmp_path, store):
    """SIGTERM's KeyboardInterrupt can be lost (raised inside a garbage-collector callback, Python ignores it: seen
    here as a run that went on to exit 0); the flag the handler also sets stops the loop at its next step."""
    from cdmtransfer import errors
    from cdmtransfer.config import load_config
    from cdmtransfer.pretraining import pretrain

    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY)
    cfg = load_config(str(recipe), ["pretrain.steps=400", "pretrain.patience=0"])
    errors.request_stop()
    try:
        with pytest.raises(KeyboardInterrupt):
            pretrain(cfg, tracking_uri=f"sqlite:///{store}/mlflow.db")
    finally:
        errors.clear_stop()
    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["KILLED"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_in_the_middle_of_a_store_write_waits_for_the_write_and_the_run_is_still_closed(signum, tmp_path):
    """SIGTERM (the CLI's handler) or Ctrl-C (Python's) arriving while SQLite executes a write: the write completes,
    then KeyboardInterrupt. (Raised mid-write, it left the transaction open: the database stayed locked and marking
    the runs KILLED waited 20 s per try and failed; a CI run of the sweep's SIGTERM test hung on it.)"""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from cdmtransfer import cli as cli_module
    from cdmtransfer import errors
    from cdmtransfer.tracking import Store, Tracker, close_run, open_run

    tracker = Tracker(Store(f"sqlite:///{tmp_path}/mlflow.db", tmp_path, embedded=True), "signals")
    run = open_run(tracker, "r", {})
    run.log_metrics({"loss": 0.5}, 7)

    def signal_mid_write(conn, cursor, statement, *rest):
        if statement.lstrip().upper().startswith("INSERT INTO METRICS"):
            signal.raise_signal(signum)  # its Python handler runs here, inside the write, unless deferred

    handler = cli_module._terminate if signum == signal.SIGTERM else signal.default_int_handler
    previous = signal.signal(signum, handler)
    event.listen(Engine, "before_cursor_execute", signal_mid_write)
    try:
        with pytest.raises(KeyboardInterrupt):
            run.flush()
    finally:
        event.remove(Engine, "before_cursor_execute", signal_mid_write)
        signal.signal(signum, previous)
        errors.clear_stop()
    assert signal.getsignal(signum) is previous  # the deferral put the handler back
    close_run(run, "KILLED")
    closed = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_run(run.run_id)
    assert closed.info.status == "KILLED" and closed.data.metrics == {"loss": 0.5}


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path, store, monkeypatch):
    import math

    import cdmtransfer
    import cdmtransfer.pretraining as pretraining
    from cdmtransfer.errors import TrainingError

    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY)
    real = pretraining.dsm_objective

    def poisoned(*args, **kwargs):
        loss_fn, calls = real(*args, **kwargs), {"n": 0}

        def wrapped(model, gen):
            calls["n"] += 1
            losses = loss_fn(model, gen)
            return losses * float("nan") if calls["n"] == 93 else losses  # between checkpoints 80 and 120

        return wrapped

    monkeypatch.setattr(pretraining, "dsm_objective", poisoned)
    with pytest.raises(TrainingError, match="NaN or infinite by step 100.*step_000080"):
        cdmtransfer.pretrain(recipe)
    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"
    ckpts = list_checkpoints(store / "work" / run.info.run_id / "checkpoints")
    assert [p.name for p in ckpts] == ["step_000040", "step_000080"]
    model_state, ema_state, _, _ = load_checkpoint(ckpts[-1])
    assert all(math.isfinite(float(v.abs().max())) for v in [*model_state.values(), *ema_state.values()])


def test_concurrent_adapts_on_a_new_sqlite_store_lose_nothing(tmp_path, monkeypatch):
    """Like `make -j4`: four processes start on a store that does not exist yet (schema migration races)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY)
    home = tmp_path / "fresh-home"
    procs = [cli(home, "adapt", recipe, "--mode", "scratch", "--seed", seed, "--set", "adapt.steps=200",
                 "--set", "adapt.log_every=10", "--set", "adapt.patience=0", "--quiet", "--json") for seed in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err for _, err in outs]
    ids = {json.loads(out)["run_id"] for out, _ in outs}
    client = MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments])
    with sqlite3.connect(home / "mlflow.db") as db:  # what the file holds, should the client's view differ (a flake
        raw = (db.execute("select experiment_id, name from experiments").fetchall(),  # seen twice, not reproduced)
               db.execute("select run_uuid, experiment_id, status from runs").fetchall())
    assert {r.info.run_id for r in runs} == ids and {r.info.status for r in runs} == {"FINISHED"}, \
        (ids, [(e.experiment_id, e.name) for e in experiments], raw, sorted(os.listdir(home)), [e for _, e in outs])
    for run_id in ids:
        assert len(client.get_metric_history(run_id, "cv/loss")) == 20  # the folds' curve, to the cap


def test_kill_9_during_a_sweep_then_resume_completes_it(tmp_path, store):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY)
    # group_heads=1: every cell is its own batched group, so the kill lands between groups and resume retrains some
    args = ["sweep", recipe, "--m", "4,8", "--modes", "frozen,scratch", "--seeds", 1, "--jobs", 1,
            "--set", "adapt.steps=300", "--set", "sweep.group_heads=1", "--quiet", "--json"]
    full = cli(store, *args)
    out, err = full.communicate(timeout=300)
    assert full.returncode == 0, err
    reference = {(r["mode"], r["m"], r["seed"]): r["metrics"]["score_error"] for r in json.loads(out)["rows"]}

    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    before = {r.info.run_id for r in client.search_runs(["1"])}
    victim = cli(store, *args)
    deadline, parent = time.time() + 120, None
    while time.time() < deadline:  # wait until the new sweep has finished two cells, then kill it
        new = [r for r in client.search_runs(["1"]) if r.info.run_id not in before]
        parent = next((r for r in new if r.data.tags.get("cdmtransfer.stage") == "sweep"), None)
        if sum(r.info.status == "FINISHED" and r.data.tags.get("cdmtransfer.stage") == "adapt" for r in new) >= 2:
            break
        time.sleep(0.1)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert parent is not None and client.get_run(parent.info.run_id).info.status == "RUNNING"

    finished = {r.info.run_id for r in client.search_runs(["1"], filter_string=f"tags.mlflow.parentRunId = "
                                                                          f"'{parent.info.run_id}'")
                if r.info.status == "FINISHED" and r.data.tags.get("cdmtransfer.stage") == "adapt"}
    assert 2 <= len(finished) < 4  # killed mid-sweep: some cells done, some left to train
    resumed = cli(store, *args, "--resume", parent.info.run_id)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    result = json.loads(out)
    assert result["run_id"] == parent.info.run_id
    got = {(r["mode"], r["m"], r["seed"]): r["metrics"]["score_error"] for r in result["rows"]}
    assert got.keys() == reference.keys()
    for key, value in reference.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key
    children = client.search_runs(["1"], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert "RUNNING" not in {r.info.status for r in children}
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


BIG_HEADS = ["--set", "model.head_width=200", "--set", "model.head_depth=2", "--set", "pretrain.steps=60",
             "--set", "pretrain.checkpoint_every=20"]  # one checkpoint ≈ 2.1 MB: the second does not fit in 4 MiB


def _can_mount_tmpfs() -> bool:
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d"
    return subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True).returncode == 0


@pytest.mark.skipif(sys.platform != "linux" or not _can_mount_tmpfs(), reason="needs unshare + tmpfs (Linux)")
def test_disk_full_during_checkpoint_keeps_last_good_one_and_resume_finishes(tmp_path, store, _migrated_db):
    """A real full disk: the home lives on a 4 MiB tmpfs in a private mount namespace (unshare -rm)."""
    recipe, disk, out = tmp_path / "r.yaml", tmp_path / "disk", tmp_path / "after"
    recipe.write_text(TINY)
    disk.mkdir()
    cmd = f"{sys.executable} -m cdmtransfer pretrain {recipe} --quiet {' '.join(BIG_HEADS)}"
    script = f"""
mount -t tmpfs -o size=4m tmpfs {disk} && cp {_migrated_db} {disk}/mlflow.db
export CDMTRANSFER_HOME={disk}
{cmd} 2> {tmp_path}/stderr; echo $? > {tmp_path}/rc
ls {disk}/work/*/checkpoints > {tmp_path}/left
mount -o remount,size=64m {disk}
{cmd} --resume $(ls {disk}/work) > /dev/null 2>&1; echo $? > {tmp_path}/rc_resume
cp -r {disk} {out}
"""
    subprocess.run(["unshare", "-rm", "sh", "-c", script], check=True, timeout=300)
    lines = (tmp_path / "stderr").read_text().strip().splitlines()
    assert (tmp_path / "rc").read_text().strip() == "1"
    assert len(lines) == 1, lines
    assert "No space left on device" in lines[0] and "step_000040" in lines[0], lines[0]
    assert "last good checkpoint step_000020 is intact" in lines[0] and "--resume" in lines[0], lines[0]
    assert (tmp_path / "left").read_text().split() == ["step_000020"]  # no partial step_000040.tmp-* left
    assert (tmp_path / "rc_resume").read_text().strip() == "0"

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"  # the resumed attempt finished the same run
    reference = cli(store, "pretrain", recipe, "--quiet", "--json", *BIG_HEADS)
    stdout, _ = reference.communicate(timeout=300)
    resumed, uninterrupted = weights(out, run.info.run_id), weights(store, json.loads(stdout)["run_id"])
    assert max(float((resumed[k] - uninterrupted[k]).abs().max()) for k in resumed) < 1e-6


def test_a_write_that_fails_mid_checkpoint_leaves_no_partial_files(tmp_path):
    """Portable stand-in for a full disk: RLIMIT_FSIZE makes any write past 64 KiB fail (EFBIG)."""
    import resource

    import torch

    from cdmtransfer.checkpoint import save_checkpoint
    from cdmtransfer.errors import StorageError

    small, big = {"w": torch.ones(4)}, {"w": torch.ones(100_000)}
    save_checkpoint(tmp_path, 1, small, small, {"step": 1}, {"stage": "test"})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(StorageError, match="cannot write checkpoint step_000002.*File too large.*step_000001 is"):
            save_checkpoint(tmp_path, 2, big, big, {"step": 2}, {"stage": "test"})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]
    model_state, _, train_state, meta = load_checkpoint(tmp_path / "step_000001")
    assert torch.equal(model_state["w"], small["w"]) and meta["step"] == 1


def test_leftovers_of_a_killed_writer_are_cleared_and_never_listed(tmp_path):
    import torch

    from cdmtransfer.checkpoint import save_checkpoint

    (tmp_path / "step_000005.tmp-999").mkdir(parents=True)  # kill -9 mid-write
    (tmp_path / "step_000001.old-999").mkdir()  # kill -9 mid-delete
    assert list_checkpoints(tmp_path) == []
    state = {"w": torch.ones(2)}
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, state, state, {"step": step}, {"stage": "test"}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000020", "step_000030"]
