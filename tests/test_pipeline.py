"""End to end, for real: pretrain → adapt → evaluate/sample through the CLI, a real SQLite MLflow store, real training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

import cdmtransfer
from cdmtransfer.cli import app
from cdmtransfer.tracking import TAG

TINY = """
name: tiny
suite:
  name: gaussian
  K: 3
  n: 128
  n_target_pool: 64
  n_test: 64
  gaussian: {d_x: 3, D_y: 8, d: 2}
model: {d: 2, encoder_width: 32, encoder_depth: 1, head_width: 32, head_depth: 1, time_dim: 8}
pretrain: {steps: 120, batch_size: 32, log_every: 20, checkpoint_every: 40, warmup_steps: 10}
adapt: {steps: 80, batch_size: 16, m: 8, log_every: 20, checkpoint_every: 40, warmup_steps: 10}
evaluate: {t_draws: 2, posterior_samples: 8, posterior_conditions: 16, sampler_steps: 16, dist_conditions: 4,
           dist_samples: 32}
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def ok_json(*args) -> dict:
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


def client(home) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")


def test_pretrain_adapt_evaluate_sample_with_lineage(recipe, store, tmp_path, monkeypatch):
    pre = ok_json("pretrain", recipe)
    assert pre["stage"] == "pretrain" and len(pre["run_id"]) == 32
    assert (tmp_path / "home" / "work" / pre["run_id"] / "model" / "model.safetensors").is_file()

    ada = ok_json("adapt", recipe, "--encoder", pre["run_id"], "--mode", "frozen", "--m", 8)
    for key in ("score_error", "posterior_mean_mse", "sliced_w2", "test_dsm", "posterior_mean_mse_floor"):
        assert np.isfinite(ada["metrics"][key]), key

    c = client(store)
    pre_run, ada_run = c.get_run(pre["run_id"]), c.get_run(ada["run_id"])
    assert pre_run.info.status == "FINISHED" and ada_run.info.status == "FINISHED"
    assert ada_run.data.tags[TAG + "pretrain_run_id"] == pre["run_id"]
    assert ada_run.data.tags[TAG + "mode"] == "frozen"
    assert ada_run.data.params["adapt.m"] == "8"
    assert pre_run.data.metrics["loss"] > 0  # metrics by step were written
    assert len(c.get_metric_history(pre["run_id"], "loss")) == 120 // 20
    # the fluent API's store, for this test only: mlflow.set_tracking_uri would set MLFLOW_TRACKING_URI for the rest
    # of the session, and later tests' subprocesses would log there instead of to their own store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    found = mlflow.search_runs(experiment_ids=[ada_run.info.experiment_id],
                               filter_string=f"tags.`{TAG}pretrain_run_id` = '{pre['run_id']}'",
                               output_format="list")
    assert [r.info.run_id for r in found] == [ada["run_id"]]
    assert TAG + "model_id" in pre_run.data.tags
    assert {a.path for a in c.list_artifacts(ada["run_id"], "plots")} == {"plots/samples.png"}

    # Re-evaluating the saved model reproduces the metrics computed at the end of adapt (fixed evaluation noise).
    ev = ok_json("evaluate", ada["run_id"])
    for key in ("score_error", "posterior_mean_mse", "sliced_w2"):
        assert ev["metrics"][key] == pytest.approx(ada["metrics"][key], rel=1e-5)

    out = tmp_path / "s.npz"
    ok_json("sample", ada["run_id"], "--n", 5, "--test", "--out", out)
    with np.load(out) as z:
        assert z["samples"].shape == (64, 5, 3) and z["y"].shape == (64, 8)
        assert np.isfinite(z["samples"]).all()


def test_encoder_sources_uri_and_path_agree(recipe, store):
    pre = ok_json("pretrain", recipe)
    path = store / "work" / pre["run_id"] / "model"
    by_id = ok_json("adapt", recipe, "--encoder", pre["run_id"], "--mode", "frozen")
    by_uri = ok_json("adapt", recipe, "--encoder", f"runs:/{pre['run_id']}/model", "--mode", "frozen")
    by_path = ok_json("adapt", recipe, "--encoder", path, "--mode", "frozen")
    model_id = client(store).get_run(pre["run_id"]).data.tags[TAG + "model_id"]
    by_model = ok_json("adapt", recipe, "--encoder", f"models:/{model_id}", "--mode", "frozen")
    for other in (by_uri, by_path, by_model):
        assert other["metrics"]["score_error"] == pytest.approx(by_id["metrics"]["score_error"], rel=1e-6)


def test_resume_equals_uninterrupted(recipe, store, monkeypatch):
    cfg = cdmtransfer.load_config(recipe)
    full = cdmtransfer.pretrain(cfg)

    import cdmtransfer.pretraining as pretraining

    real = pretraining.dsm_objective

    def dying_objective(*args, **kwargs):
        loss_fn, calls = real(*args, **kwargs), {"n": 0}

        def wrapped(model, gen):
            calls["n"] += 1
            if calls["n"] == 95:  # after the checkpoint at step 80
                raise KeyboardInterrupt
            return loss_fn(model, gen)

        return wrapped

    monkeypatch.setattr(pretraining, "dsm_objective", dying_objective)
    with pytest.raises(KeyboardInterrupt):
        cdmtransfer.pretrain(cfg)
    c = client(store)
    killed = [r for r in c.search_runs([c.get_run(full.run_id).info.experiment_id]) if r.info.status == "KILLED"]
    assert len(killed) == 1
    monkeypatch.setattr(pretraining, "dsm_objective", real)
    resumed = cdmtransfer.pretrain(cfg, resume=killed[0].info.run_id)
    assert resumed.run_id == killed[0].info.run_id
    assert c.get_run(resumed.run_id).info.status == "FINISHED"

    from safetensors.torch import load_file

    a = load_file(str(full.paths["model"] / "model.safetensors"))
    b = load_file(str(resumed.paths["model"] / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert resumed.metrics["final_loss"] == pytest.approx(full.metrics["final_loss"], rel=1e-6)


def test_modes_and_oracle_and_dry_run(recipe, store):
    pre = ok_json("pretrain", recipe)
    fin = ok_json("adapt", recipe, "--encoder", pre["run_id"], "--mode", "finetune", "--set", "adapt.encoder_lr=2e-4")
    scr = ok_json("adapt", recipe, "--mode", "scratch")
    ora = ok_json("adapt", recipe, "--mode", "oracle")
    assert fin["metrics"]["trainable_parameters"] == scr["metrics"]["trainable_parameters"]
    assert ora["metrics"]["trainable_parameters"] < scr["metrics"]["trainable_parameters"]
    on_h_star = client(store).get_run(client(store).get_run(ora["run_id"]).data.tags[TAG + "pretrain_run_id"])
    assert on_h_star.data.params["model.encoder"] == "oracle"  # oracle pretrained its source heads on h* first
    bad = cli("adapt", recipe, "--mode", "oracle", "--encoder", pre["run_id"])  # a learned encoder is not h*
    assert bad.exit_code != 0 and "pretrain on the suite's h*" in bad.output and "Traceback" not in bad.output
    auto = cli("adapt", recipe, "--encoder", pre["run_id"], "--mode", "auto")  # says what it chose, and why
    assert auto.exit_code == 0 and "auto chose " in auto.stdout and "9 settings compared" in auto.stdout
    run = client(store).get_run(auto.stdout.split("run id: ")[1].split()[0])
    assert run.data.tags[TAG + "mode"] == "auto" and run.data.tags[TAG + "choice"] in ("frozen", "finetune", "scratch")
    losses = [run.data.metrics[f"cv_candidate_loss_{g}"] for g in range(9)]  # the chosen: simplest within 3%
    assert run.data.metrics["cv_val_loss"] in losses and run.data.metrics["cv_val_loss"] <= 1.03 * min(losses)
    assert "cv_candidates.json" in {a.path for a in client(store).list_artifacts(run.info.run_id)}
    dry = cli("adapt", recipe, "--mode", "scratch", "--m", 5, "--set", "adapt.steps=7", "--dry-run")
    assert dry.exit_code == 0
    assert "m: 5" in dry.stdout and "steps: 7" in dry.stdout and "mode: scratch" in dry.stdout


def test_oracle_pretrain_fits_source_heads_on_the_true_representation(recipe, store):
    """model.encoder = oracle: pretrain keeps h* fixed (no encoder parameters), frozen on it reads h* itself, and
    `--mode oracle` on it is that frozen run."""
    pre = ok_json("pretrain", recipe, "--set", "model.encoder=oracle")
    assert pre["metrics"]["encoder_parameters"] == 0
    assert "ref/h_star_readout_error" not in pre["metrics"]  # h* itself: nothing to read out
    fro = ok_json("adapt", recipe, "--encoder", pre["run_id"], "--mode", "frozen", "--set", "model.encoder=oracle")
    # least squares on the run's own features is least squares on h*: the encoder is h*
    assert fro["metrics"]["ref/encoder_ls_mse"] == pytest.approx(fro["metrics"]["ref/oracle_ls_mse"], rel=1e-5)
    ora = ok_json("adapt", recipe, "--encoder", pre["run_id"], "--mode", "oracle")  # --mode oracle is that model
    assert ora["metrics"]["score_error"] == pytest.approx(fro["metrics"]["score_error"], rel=1e-6)
    bad = cli("pretrain", recipe, "--set", "model.encoder=oracle", "--set", "model.d=3")
    assert bad.exit_code != 0 and "use --set model.d=2" in bad.output and "Traceback" not in bad.output


def test_sweep_parent_with_children(recipe, store, tmp_path):
    """The table for people, then the limits its models are held against (report.references_table); the parent run
    keeps the same rows and summary in results.json."""
    shown = cli("sweep", recipe, "--m", "4,8", "--modes", "frozen,auto", "--seeds", 2)
    assert shown.exit_code == 0, shown.output + shown.stderr
    run_id = re.search(r"sweep run id: ([0-9a-f]{32})", shown.stdout).group(1)
    res = {"run_id": run_id, **json.loads(Path(client(store).download_artifacts(run_id, "results.json",
                                                                                 str(tmp_path))).read_text())}
    limits = shown.stdout[shown.stdout.index("limits on the same test conditions"):]
    for m in (4, 8):  # every m's row: the exact posterior mean's MSE (same conditions) and least squares on h*(y)
        entry = next(e for e in res["summary"] if e["mode"] == "frozen" and e["m"] == m)
        line = next(line for line in limits.splitlines() if re.match(rf"\W*{m} ", line))
        assert f"{entry['posterior_mean_mse_floor']['mean']:.4g}" in line
        assert f"{entry['ref/oracle_ls_mse']['mean']:.4g}" in line
    assert len(res["rows"]) == 2 * 2 * 2
    assert {(r["mode"], r["m"]) for r in res["summary"]} == {("frozen", 4), ("frozen", 8), ("auto", 4), ("auto", 8)}
    for entry in res["summary"]:  # what validation chose per seed (auto only), and the DSM's excess over a fitted floor
        assert len(entry["choices"]) == 2 and "test_dsm_fitted_excess" in entry
        assert all(entry["choices"]) if entry["mode"] == "auto" else not any(entry["choices"])
    c = client(store)
    children = c.search_runs([c.get_run(res["run_id"]).info.experiment_id],
                             filter_string=f"tags.mlflow.parentRunId = '{res['run_id']}'")
    assert len(children) == 8 + 1  # the cells and the pretrain run
    assert all(r.info.status == "FINISHED" for r in children)
    assert {a.path for a in c.list_artifacts(res["run_id"])} >= {"results.csv", "results.json", "plots"}
    assert {a.path for a in c.list_artifacts(res["run_id"], "plots")} >= {"plots/curve_score_error.png"}
    for row in res["rows"][::3]:  # the cells were evaluated together; `evaluate` on one alone gives its numbers
        alone = ok_json("evaluate", row["run_id"])["metrics"]
        for key in ("score_error", "posterior_mean_mse", "sliced_w2", "test_dsm"):
            assert alone[key] == pytest.approx(row["metrics"][key], rel=1e-5), (row["mode"], row["m"], key)


def test_sweep_over_pretrain_seeds_runs_every_pretrained_cell_on_each_encoder(recipe, store, tmp_path):
    """sweep.pretrain_seeds = 2: two pretrains (seeds 0 and 1000); every frozen cell runs on both with the same
    target subset, scratch and oracle once (oracle on the sweep's own pretrain on h*); the summary's spread covers
    seeds × encoders and says the encoders' part; the cells of both encoders are also scored averaged, each average
    a child run with its model exported (evaluate and sample load it); a resume finds every cell, pretrain and
    ensemble done (the keys include the encoder) and trains and records nothing. (Random encoder starts: the closed-form
    start of model.encoder_linear is the same for every seed, and this short pretrain would keep it.)"""
    args = ["--m", "4,8", "--modes", "frozen,scratch,oracle", "--seeds", 2, "--pretrain-seeds", 2,
            "--set", "model.encoder_linear=false"]
    res = ok_json("sweep", recipe, *args)
    own = res["pretrain_run_ids"]
    assert len(own) == 2 and len(set(own)) == 2 and res["pretrain_run_id"] == own[0]
    c = client(store)
    assert [c.get_run(r).data.params["seed"] for r in own] == ["0", "1000"]
    assert len(res["rows"]) == 2 * 2 * 2 + 2 * 2 * 2  # frozen: m × seeds × encoders; scratch, oracle: m × seeds
    on_h_star = res["oracle_pretrain_run_id"]
    assert on_h_star not in own and c.get_run(on_h_star).data.params["model.encoder"] == "oracle"
    assert {c.get_run(r["run_id"]).data.tags[TAG + "pretrain_run_id"] for r in res["rows"] if r["mode"] == "oracle"} \
        == {on_h_star}
    frozen = [r for r in res["rows"] if r["mode"] == "frozen"]
    for row in frozen:
        assert c.get_run(row["run_id"]).data.tags[TAG + "pretrain_run_id"] == own[row["pretrain"]]
    pairs = {}
    for row in frozen:
        pairs.setdefault((row["m"], row["seed"]), []).append(row["metrics"]["score_error"])
    assert all(len(v) == 2 for v in pairs.values()) and any(v[0] != v[1] for v in pairs.values())
    entries = {(e["mode"], e["m"]): e for e in res["summary"]}
    assert entries[("frozen", 8)]["seeds"] == 4 and entries[("frozen", 8)]["pretrains"] == 2
    assert entries[("frozen", 8)]["score_error"]["pretrain_std"] >= 0.0
    assert "pretrains" not in entries[("scratch", 8)] and "pretrain_std" not in entries[("scratch", 8)]["score_error"]
    # the two encoders' cells averaged (ensemble.py), evaluated like a cell: per m, the members' mean is the summary's,
    # the ensemble's score error and test DSM never worse (Jensen, same draws) and better where the members differ;
    # logged on the sweep run
    ensembles = {(e["mode"], e["m"]): e for e in res["ensembles"]}
    assert set(ensembles) == {("frozen", 4), ("frozen", 8)}
    for (mode, m), e in ensembles.items():
        assert e["encoders"] == 2 and e["seeds"] == 2
        assert set(e["ensemble"]) == {"score_error", "posterior_mean_mse", "sliced_w2", "test_dsm"}  # sampled too
        assert e["members"]["score_error"]["mean"] == pytest.approx(entries[(mode, m)]["score_error"]["mean"],
                                                                    rel=1e-5)
        assert e["ensemble"]["score_error"]["mean"] <= e["members"]["score_error"]["mean"] * (1 + 1e-6)
        assert e["ensemble"]["test_dsm"]["mean"] <= e["members"]["test_dsm"]["mean"] * (1 + 1e-6)
    assert any(e["ensemble"]["score_error"]["mean"] < 0.999 * e["members"]["score_error"]["mean"]
               for e in ensembles.values())
    logged = c.get_metric_history(res["run_id"], "ensemble.frozen.score_error")
    assert {(h.step, h.value) for h in logged} == {(m, e["ensemble"]["score_error"]["mean"])
                                                   for (_, m), e in ensembles.items()}
    # each (mode, m, seed)'s average is a child run of its own: members and encoders as lineage, its metrics, its
    # model exported; evaluate reproduces the metrics from the export, sample draws from it, adapt refuses it
    assert len(res["ensemble_runs"]) == 2 * 2
    for e in res["ensemble_runs"]:
        run = c.get_run(e["run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == res["run_id"]
        assert run.data.tags[TAG + "stage"] == "ensemble" and run.data.tags[TAG + "mode"] == e["mode"] == "frozen"
        assert run.data.tags[TAG + "members"].split(",") == e["members"]
        assert run.data.tags[TAG + "pretrain_run_ids"].split(",") == own
        assert run.data.metrics["score_error"] == e["metrics"]["score_error"]
    e = res["ensemble_runs"][-1]
    assert ok_json("evaluate", e["run_id"])["metrics"]["score_error"] == pytest.approx(e["metrics"]["score_error"],
                                                                                      rel=1e-6)
    ok_json("sample", e["run_id"], "--n", 3, "--test", "--out", tmp_path / "ensemble.npz")
    with np.load(tmp_path / "ensemble.npz") as draws:
        assert draws["samples"].shape[1:] == (3, 3) and np.isfinite(draws["samples"]).all()
    refused = cli("adapt", recipe, "--encoder", e["run_id"], "--mode", "frozen", "--m", 4)
    assert refused.exit_code != 0 and "ensemble" in refused.output and "Traceback" not in refused.output
    before = len(c.search_runs([c.get_run(res["run_id"]).info.experiment_id]))
    again = ok_json("sweep", recipe, *args, "--resume", res["run_id"])
    assert len(c.search_runs([c.get_run(res["run_id"]).info.experiment_id])) == before
    assert [r["run_id"] for r in again["rows"]] == [r["run_id"] for r in res["rows"]]
    assert again["oracle_pretrain_run_id"] == on_h_star and again["pretrain_run_ids"] == own
    assert again["ensembles"] == res["ensembles"] and again["ensemble_runs"] == res["ensemble_runs"]
    bad = cli("sweep", recipe, "--pretrain-seeds", 2, "--encoder", own[0])
    assert bad.exit_code != 0 and "sweep.pretrain_seeds" in bad.output and "Traceback" not in bad.output
    # the same two encoders given by the user (--encoder A,B): the same cells and ensembles, to the last digit; the
    # cells name their encoder; a resume takes the encoders from the sweep run (not hidden by its pretrain on h*)
    # and finds everything done
    given = ["--m", "4,8", "--modes", "frozen,oracle", "--seeds", 2, "--set", "model.encoder_linear=false",
             "--encoder", ",".join(own)]
    mine = cdmtransfer.sweep(str(recipe), ["sweep.m=[4,8]", "sweep.modes=[frozen,oracle]", "sweep.seeds=2",
                                           "model.encoder_linear=false"], encoder=own).to_dict()  # the API takes a list
    assert mine["pretrain_run_ids"] == [] and mine["oracle_pretrain_run_id"]
    assert len([r for r in mine["rows"] if r["mode"] == "frozen"]) == len(frozen)
    twins = {(r["m"], r["seed"], r["pretrain"]): r for r in frozen}
    for row in (r for r in mine["rows"] if r["mode"] == "frozen"):
        assert row["metrics"]["score_error"] == twins[row["m"], row["seed"], row["pretrain"]]["metrics"]["score_error"]
        assert c.get_run(row["run_id"]).data.tags[TAG + "encoder_source"] == own[row["pretrain"]]
    assert [e["metrics"] for e in mine["ensemble_runs"]] == [e["metrics"] for e in res["ensemble_runs"]]
    assert c.get_run(mine["ensemble_runs"][0]["run_id"]).data.tags[TAG + "pretrain_run_ids"].split(",") == own
    before = len(c.search_runs([c.get_run(res["run_id"]).info.experiment_id]))
    again = ok_json("sweep", recipe, *given[:-2], "--resume", mine["run_id"])  # the encoders from the sweep's tag
    assert len(c.search_runs([c.get_run(res["run_id"]).info.experiment_id])) == before
    assert [(r["run_id"], r["pretrain"]) for r in again["rows"]] == [(r["run_id"], r["pretrain"]) for r in mine["rows"]]
    assert again["ensemble_runs"] == mine["ensemble_runs"]
    shown = cli("sweep", recipe, *given[:-2], "--resume", mine["run_id"])  # the table names the averaged models
    assert shown.exit_code == 0 and "averaged models" in shown.stdout
    assert all(e["run_id"] in shown.stdout for e in mine["ensemble_runs"])
    twice = cli("sweep", recipe, "--encoder", f"{own[0]},{own[0]}")
    assert twice.exit_code != 0 and "several different ones" in twice.output and "Traceback" not in twice.output


def test_a_sweep_pretrains_on_h_star_in_a_worker_with_the_same_results(recipe, store):
    """With a worker (--jobs 2) the pretrain on h* runs beside the learned encoder's and the cells are shared
    between the two processes; every run is recorded once, FINISHED, with the numbers of --jobs 1."""
    args = ("sweep", recipe, "--m", "4,8", "--modes", "frozen,scratch,oracle")
    seq = ok_json(*args, "--jobs", 1)
    par = ok_json(*args, "--jobs", 2)
    c = client(store)
    for res in (seq, par):
        children = c.search_runs([c.get_run(res["run_id"]).info.experiment_id],
                                 filter_string=f"tags.mlflow.parentRunId = '{res['run_id']}'")
        pretrains = {r.data.params["model.encoder"]: r.info.run_id for r in children
                     if r.data.tags[TAG + "stage"] == "pretrain"}
        assert pretrains == {"mlp": res["pretrain_run_id"], "oracle": res["oracle_pretrain_run_id"]}
        assert len(children) == 2 + len(res["rows"]) and all(r.info.status == "FINISHED" for r in children)
    assert par["oracle_pretrain_run_id"] != seq["oracle_pretrain_run_id"]
    key = lambda r: (r["mode"], r["m"], r["seed"])  # noqa: E731
    assert [key(r) for r in seq["rows"]] == [key(r) for r in par["rows"]]
    for a, b in zip(seq["rows"], par["rows"]):
        assert b["metrics"]["score_error"] == pytest.approx(a["metrics"]["score_error"], rel=1e-6), key(a)


def test_transfer_beats_scratch_on_gaussian_suite(store):
    """The paper's claim at small m: a frozen pretrained encoder beats training from scratch.

    Measured on the posterior mean, which needs the condition: at m = 8 an early-stopped scratch model stays close
    to its preconditioned starting point (the score of N(0, σ_d² I)), whose score error is low at small t although it
    ignores y."""
    overrides = ["suite.K=6", "suite.n=256", "suite.gaussian.d_x=4", "suite.gaussian.D_y=24", "suite.gaussian.d=2",
                 "model.d=2", "model.encoder_width=64", "model.encoder_depth=2", "model.head_width=64",
                 "pretrain.steps=600", "pretrain.batch_size=64", "adapt.steps=300", "adapt.m=8",
                 "evaluate.posterior_conditions=64", "evaluate.sampler_steps=16", "evaluate.dist_samples=32"]
    pre = cdmtransfer.pretrain(None, overrides)
    assert pre.metrics["ref/h_star_readout_error"] < 0.05  # the learned h carries the linear h* (Assumption 3.2)
    frozen = cdmtransfer.adapt(None, overrides + ["adapt.mode=frozen"], encoder=pre.run_id)
    scratch = cdmtransfer.adapt(None, overrides + ["adapt.mode=scratch"])
    assert frozen.metrics["posterior_mean_mse"] < 0.7 * scratch.metrics["posterior_mean_mse"]
    assert frozen.metrics["test_dsm"] < scratch.metrics["test_dsm"]


def test_parallel_sweep_equals_sequential(recipe, store):
    """--jobs 2 runs cells in worker processes; the parent is the only store writer, so nothing is lost or mixed."""
    pre = ok_json("pretrain", recipe)
    args = ("sweep", recipe, "--m", "4,8", "--modes", "frozen,scratch", "--encoder", pre["run_id"])
    seq = ok_json(*args, "--jobs", 1)
    par = ok_json(*args, "--jobs", 2)
    key = lambda r: (r["mode"], r["m"], r["seed"])  # noqa: E731
    assert [key(r) for r in seq["rows"]] == [key(r) for r in par["rows"]]
    for a, b in zip(seq["rows"], par["rows"]):
        assert a["run_id"] != b["run_id"]
        assert b["metrics"]["score_error"] == pytest.approx(a["metrics"]["score_error"], rel=1e-6)
    c = client(store)
    for res in (seq, par):
        children = c.search_runs([c.get_run(res["run_id"]).info.experiment_id],
                                 filter_string=f"tags.mlflow.parentRunId = '{res['run_id']}'")
        assert sorted(r.info.run_id for r in children) == sorted(r["run_id"] for r in res["rows"])
        assert all(r.info.status == "FINISHED" for r in children)
        for r in children:  # each child has its own training curve (its CV folds run to the 80-step cap here)
            assert len(c.get_metric_history(r.info.run_id, "cv/loss")) == 80 // 20
            if r.data.tags[TAG + "mode"] == "frozen":
                assert r.data.tags[TAG + "pretrain_run_id"] == pre["run_id"]


def test_api_functions_are_not_shadowed_by_submodules():
    import importlib
    import inspect

    for module in ("stages", "metrics", "curves", "runs", "estimate", "theory", "tracking", "checkpoint"):
        importlib.import_module(f"cdmtransfer.{module}")
    for name in cdmtransfer.__all__:
        if name != "__version__":
            assert inspect.isfunction(getattr(cdmtransfer, name)), name


def test_estimate_from_theory_and_calibrated_on_a_sweep(recipe, store):
    theory_only = ok_json("estimate", recipe, "--epsilon", 50.0, "--holdout", 0)  # no held-out sources: theory only
    assert set(theory_only["theory"]) == {"transfer", "scratch"}
    for mode in ("transfer", "scratch"):
        r = theory_only["theory"][mode]
        assert r["feasible"] == (r["m"] is not None)
    assert theory_only["inputs"]["d_x"] == 3 and theory_only["inputs"]["D_y"] == 8 and theory_only["inputs"]["K"] == 3

    longer = ["--set", "pretrain.steps=600", "--set", "adapt.steps=400"]
    res = ok_json("sweep", recipe, "--m", "4,8,16", "--modes", "frozen,scratch", "--seeds", 2, *longer)
    errors = {(r["mode"], r["m"]): r["score_error"]["mean"] for r in res["summary"]}
    assert errors[("frozen", 16)] < errors[("frozen", 4)]  # a learning curve, not noise
    # a level between the frozen curve's ends, which it crosses inside the measured range (at these tiny sizes one
    # seed's m = 8 can be worse than m = 4: the middle point is not always inside the range)
    eps = (errors[("frozen", 4)] * errors[("frozen", 16)]) ** 0.5
    est = ok_json("estimate", recipe, "--epsilon", eps, "--calibrate", res["run_id"], "--holdout", 0,
                  "--error", "score_error")
    frozen = est["calibrated"]["frozen"]
    assert frozen["reachable"] and 2 <= frozen["m"] <= 32
    lo, hi = frozen["m_interval"]
    assert lo is None or lo <= frozen["m"]
    c = client(store)
    runs = c.search_runs([c.get_run(res["run_id"]).info.experiment_id],
                         filter_string="tags.`cdmtransfer.stage` = 'estimate'")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert any(r.data.tags.get(TAG + "sweep_run_id") == res["run_id"] for r in runs)
    bad = cli("estimate", recipe, "--epsilon", 1.0, "--calibrate", runs[0].info.run_id, "--holdout", 0)
    assert bad.exit_code == 2 and "not a sweep run" in bad.stderr


def test_scratch_cells_train_in_a_worker_while_the_sweep_pretrains(recipe, store):
    """Cells that start from no pretrain go to a worker at once: with --jobs 2, scratch's models are written while
    the sweep's own process is still pretraining its encoder (a long one here), not after it."""
    res = ok_json("sweep", recipe, "--m", "4,8", "--modes", "frozen,scratch", "--jobs", 2,
                  "--set", "pretrain.steps=3000", "--set", "pretrain.patience=0")
    pretrain_end = client(store).get_run(res["pretrain_run_id"]).info.end_time / 1000
    scratch = [r for r in res["rows"] if r["mode"] == "scratch"]
    written = [(store / "work" / r["run_id"] / "model" / "model.safetensors").stat().st_mtime for r in scratch]
    assert len(written) == 2 and max(written) < pretrain_end - 1.0
    assert {r["mode"] for r in res["rows"]} == {"frozen", "scratch"} and len(res["rows"]) == 4


def test_transfer_beats_scratch_on_lsgmm_with_the_default_model(store):
    # The regulariser recipes pin the linear paths off; with the defaults, the pretrain's closed-form summary once
    # filled its spare code directions with y's task-shifted nuisance (style leakage 0.35) and a kept source head kept
    # its own style covariance, so frozen lost to scratch (score error 0.96 against 0.77 here). Both fixed: head_start.
    res = cdmtransfer.sweep("recipes/regularize-off.yaml", [
        "model.linear_mean=true", "model.encoder_linear=true", "pretrain.encoder_decay=0", "sweep.seeds=1",
        "evaluate.posterior_conditions=16", "evaluate.dist_conditions=2", "evaluate.dist_samples=64",
        "tracking.log_artifacts=false"], quiet=True, jobs=1)
    got = {r["mode"]: r["metrics"] for r in res.rows}
    assert got["frozen"]["score_error"] < 0.9 * got["scratch"]["score_error"]
    assert got["frozen"]["style_leakage"] < 0.01
