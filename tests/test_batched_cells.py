"""Batched cells (cells.py, issue #12): many adapt runs in one stacked model and one loop, each as it would alone.

One cell batched equals adaptation.train_adapt; cells are independent (another cell's data does not change a cell's
result, bit for bit); one cell's NaN fails that cell alone; per-cell clipping."""

import copy
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cdmtransfer.cells import Cell, group_key, train_cells
from cdmtransfer.config import load_config, resolve_adapt
from cdmtransfer.curves import MetricRecorder
from cdmtransfer.models import MLPEncoder, model_spec
from cdmtransfer.adaptation import train_adapt
from cdmtransfer.stages import SourceHeads, new_encoder, score_model
from cdmtransfer.tasks import build_taskset

TINY = ["suite.K=3", "suite.n=128", "suite.n_target_pool=64", "suite.n_test=64", "suite.gaussian.d_x=3",
        "suite.gaussian.D_y=8", "suite.gaussian.d=2", "suite.gaussian.noise=0.1", "model.d=2",
        "model.encoder_width=16", "model.encoder_depth=1", "model.head_width=16", "model.head_depth=1",
        "model.time_dim=8", "adapt.steps=120", "adapt.batch_size=16", "adapt.m=12", "adapt.val_every=10",
        "adapt.patience=3", "adapt.warmup_steps=5", "adapt.checkpoint_every=1000", "adapt.log_every=10",
        "evaluate.t_draws=2", "evaluate.posterior_samples=4", "evaluate.posterior_conditions=8",
        "evaluate.sampler_steps=8", "evaluate.dist_conditions=2", "evaluate.dist_samples=8",
        "tracking.log_artifacts=false", "adapt.encoder_lr_grid=[0, 0.3]"]


# an out-of-span target whose encoder leaves h*'s second direction empty: finetune and auto compare the completed
# encoder (head_start.complete_code), which wins here
PARTIAL = ("suite.gaussian.target=out_of_span", "suite.n_target_pool=128", "adapt.m=48")


def _setup(mode: str, seed: int = 0, sets=()):
    cfg = resolve_adapt(load_config(None, TINY + [f"adapt.mode={mode}", f"seed={seed}", *sets]))
    taskset = build_taskset(cfg)
    torch.manual_seed(7)  # a stand-in 'pretrained' encoder and heads (oracle: heads on h*)
    enc = taskset.truth.encoder() if mode == "oracle" else MLPEncoder(taskset.D_y, 2, 16, 1)
    if cfg.suite.gaussian.target == "out_of_span":  # h(y) = (h*_1(y), 0): the second direction left empty
        enc = MLPEncoder(taskset.D_y, 2, 16, 1, linear=True)
        enc.start_linear(taskset.truth.W * torch.tensor([[1.0], [0.0]]), torch.zeros(taskset.D_y))
    pretrained = score_model(cfg, enc, taskset.K, taskset, taskset.source_x[0])
    return cfg, taskset, enc, SourceHeads(model_spec(pretrained), pretrained.state_dict())


def _start(cfg, taskset, enc):
    """The encoder a mode starts from (adaptation.prepare_encoder without a store)."""
    if cfg.adapt.mode == "scratch":
        torch.manual_seed(cfg.seed + 1)
        return new_encoder(cfg, taskset)
    return enc


def _cell(cfg, taskset, enc, source, work: Path, x=None):
    x_m, y_m = taskset.target_subset(cfg.adapt.m, seed=cfg.seed)
    pretrained = cfg.adapt.mode != "scratch"
    return Cell(cfg, x_m if x is None else x, y_m, _start(cfg, taskset, enc), run_id="test", work_dir=work,
                source_heads=source if pretrained else None, sink=MetricRecorder())


@pytest.mark.parametrize("mode, sets", [("frozen", ()), ("finetune", ()), ("auto", ()), ("scratch", ()),
                                        ("oracle", ()), ("auto", ("model.linear_mean=true",)),
                                        ("finetune", PARTIAL)])
def test_one_cell_batched_equals_train_adapt(tmp_path, mode, sets):
    cfg, taskset, enc, source = _setup(mode, sets=sets)
    lone_enc = copy.deepcopy(_start(cfg, taskset, enc))
    rec = MetricRecorder()
    values, skipped, model_dir, choice = train_adapt(cfg, taskset, lone_enc, {}, "test", tmp_path / "lone", rec,
                                                     source_heads=source if mode != "scratch" else None)
    [out] = train_cells([_cell(cfg, taskset, enc, source, tmp_path / "cells")], taskset)
    lone, batched = load_file(model_dir / "model.safetensors"), load_file(Path(out["model_dir"]) / "model.safetensors")
    assert lone.keys() == batched.keys()
    for k in lone:
        torch.testing.assert_close(batched[k], lone[k], rtol=1e-5, atol=1e-5, msg=k)
    for k in ("score_error", "test_dsm", "posterior_mean_mse", "steps", "cv_best_step", "cv_steps_run",
              "converged", "cv_val_loss", "final_loss", "trainable_parameters"):
        assert (k in out["metrics"]) == (k in values), k  # final_loss: skipped by both when no step ran
        if k in values:
            assert out["metrics"][k] == pytest.approx(values[k], rel=1e-5, abs=1e-6), k
    assert out["skipped"] == skipped
    # the same choice; the cross-validated losses to rounding (candidates of different σ_d: auto's scratch candidate)
    losses = lambda c: [g.pop("cv_loss") for g in c["candidates"]]  # noqa: E731
    assert losses(out["choice"]) == pytest.approx(losses(choice), rel=1e-5) and out["choice"] == choice
    if sets == PARTIAL:
        assert choice["setting"] == "completed encoder, head source" and values["code_completed"] == 1.0
    assert [s for _, s in out["history"]] == [s for _, s in rec.records]  # the same curves, at the same steps
    for (a, _), (b, _) in zip(out["history"], rec.records):
        assert a.keys() == b.keys()
        for k in a:
            if k != "grad_norm":
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6, nan_ok=True), k


def _group(tmp_path, specs, change=None):
    """train_cells on cells (mode, seed); `change` = index of a cell whose data is replaced by other rows."""
    cells, taskset = [], None
    for k, (mode, seed) in enumerate(specs):
        cfg, taskset, enc, source = _setup(mode, seed)
        x = None
        if k == change:
            x = taskset.target_subset(cfg.adapt.m, seed=seed + 100)[0]
        cells.append(_cell(cfg, taskset, enc, source, tmp_path / f"c{k}", x=x))
    return cells, train_cells(cells, taskset)


def _weights(out):
    return load_file(Path(out["model_dir"]) / "model.safetensors")


def test_cells_are_independent(tmp_path):
    specs = [("frozen", 0), ("scratch", 1), ("finetune", 2), ("frozen", 3)]
    keys = {group_key(_setup(mode, seed)[0]) for mode, seed in specs}
    assert len(keys) == 1  # one schedule: one group, one loop
    _, base = _group(tmp_path / "a", specs)
    _, other = _group(tmp_path / "b", specs, change=0)
    assert not torch.equal(_weights(base[0])["heads.weights.0"], _weights(other[0])["heads.weights.0"])
    for k in (1, 2, 3):  # the other cells: bit for bit
        w, v = _weights(base[k]), _weights(other[k])
        assert all(torch.equal(w[n], v[n]) for n in w), specs[k]
        timeless = lambda d: {n: v for n, v in d.items() if not n.endswith("seconds")}  # noqa: E731
        # identical weights; the evaluation itself repeats to ~1e-16 (diagnostics' probe_r2: a float64 solve)
        assert timeless(base[k]["metrics"]) == pytest.approx(timeless(other[k]["metrics"]), rel=1e-12)
        assert base[k]["history"] == other[k]["history"]


def test_completed_cells_batched_together_equal_each_alone(tmp_path):
    # a finetune and an auto cell that both compare the completed encoder, in one group: their completed copies form
    # one stacked part beside the frozen and trained ones, and each cell's model is the one it trains alone
    specs = [("finetune", 0), ("auto", 1)]
    setups = [_setup(mode, seed, PARTIAL) for mode, seed in specs]
    assert len({group_key(cfg) for cfg, *_ in setups}) == 1
    cells = lambda tag: [_cell(cfg, taskset, enc, source, tmp_path / f"{tag}{k}")  # noqa: E731
                         for k, (cfg, taskset, enc, source) in enumerate(setups)]
    together = train_cells(cells("t"), setups[0][1])
    assert together[0]["choice"]["short"] == "completed"  # (the auto cell may take scratch here)
    for k, cell in enumerate(cells("a")):
        [alone] = train_cells([cell], setups[0][1])
        assert together[k]["choice"]["setting"] == alone["choice"]["setting"]
        assert any(c["setting"] == "completed encoder, head source" for c in alone["choice"]["candidates"])
        w, v = _weights(together[k]), _weights(alone)
        for n in w:
            torch.testing.assert_close(w[n], v[n], rtol=1e-5, atol=1e-5, msg=n)


def test_a_nan_cell_fails_alone(tmp_path):
    specs = [("frozen", 0), ("frozen", 1)]
    cfg, taskset, enc, source = _setup("frozen", 0)
    bad = torch.full((cfg.adapt.m, taskset.d_x), float("nan"))
    cells = [_cell(cfg, taskset, enc, source, tmp_path / "c0", x=bad),
             _cell(_setup("frozen", 1)[0], taskset, enc, source, tmp_path / "c1")]
    out = train_cells(cells, taskset)
    assert out[0] is None and "frozen m=12 seed=0" in cells[0].error and "NaN" in cells[0].error
    _, alone = _group(tmp_path / "alone", specs[1:])
    w, v = _weights(out[1]), _weights(alone[0])
    for n in w:
        torch.testing.assert_close(w[n], v[n], rtol=1e-5, atol=1e-6)


def test_each_unit_is_clipped_by_its_own_norm():
    """unit_clipper: unit u's gradient (its head block and its block of a stacked encoder) is what a run of its own
    gets from its own mean loss, clipped by its own norm, however large another unit's gradient is."""
    from cdmtransfer.models import ScoreModel
    from cdmtransfer.validation import StackedEncoder, unit_clipper

    torch.manual_seed(0)
    encs = [MLPEncoder(5, 2, 8, 1) for _ in range(3)]
    lone = [ScoreModel(copy.deepcopy(e), 1, 3, 8, 1, 4, parametrization="eps") for e in encs]
    stacked = ScoreModel(StackedEncoder.of(encs, 1), 3, 3, 8, 1, 4, parametrization="eps")
    stacked.heads.load_state_dict({k: torch.cat([m.heads.state_dict()[k] for m in lone])
                                   for k in stacked.heads.state_dict()})
    scale = torch.tensor([1.0, 100.0, 0.01])[:, None, None]  # unit 1 far above the threshold, unit 2 far below
    x, y, t = torch.randn(3, 16, 3) * scale, torch.randn(3, 16, 5), torch.rand(3, 16) * 0.5 + 0.1
    for u, m in enumerate(lone):
        m(x[u:u + 1], y[u:u + 1], t[u:u + 1]).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(list(m.parameters()), 1.0)
    stacked(x, y, t).pow(2).mean().backward()
    clip = unit_clipper(stacked, [(list(stacked.encoder.parameters()), torch.arange(3))], 3, 1.0)
    clip()
    assert clip.norms[1] > 1 > clip.norms[2]
    for u, m in enumerate(lone):
        for k, p in stacked.heads.named_parameters():
            torch.testing.assert_close(p.grad[u:u + 1], dict(m.heads.named_parameters())[k].grad, rtol=1e-4,
                                       atol=1e-7)
        for name, p in zip(stacked.encoder.names, stacked.encoder.stacked):
            torch.testing.assert_close(p.grad[u], dict(m.encoder.named_parameters())[name].grad, rtol=1e-4,
                                       atol=1e-7)


def test_a_sweep_fails_the_nan_cell_and_records_the_others(store, monkeypatch, capsys):
    """In a sweep, a cell whose loss turns NaN is named on stderr and its child run FAILED; the cells of its group
    are recorded as usual and the table holds them."""
    import cdmtransfer
    from mlflow import MlflowClient

    from cdmtransfer.tasks.base import TaskSet

    real = TaskSet.target_subset

    def poisoned(self, m, seed):
        x, y = real(self, m, seed)
        return (torch.full_like(x, float("nan")), y) if seed == 1 else (x, y)

    monkeypatch.setattr(TaskSet, "target_subset", poisoned)
    res = cdmtransfer.sweep(None, TINY + ["sweep.modes=[scratch]", "sweep.m=[8]", "sweep.seeds=2"],
                            jobs=1)  # one group in this process: the poisoned data does not reach spawned workers
    assert [(r["mode"], r["seed"]) for r in res.rows] == [("scratch", 0)]
    assert "error: adapt scratch m=8 seed=1: the loss became NaN" in capsys.readouterr().err
    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    children = client.search_runs([client.get_run(res.run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{res.run_id}'")
    assert sorted((r.data.tags["cdmtransfer.seed"], r.info.status) for r in children) == [("0", "FINISHED"),
                                                                                           ("1", "FAILED")]


def test_a_sweep_batches_oracle_cells_apart_when_h_star_is_wider_than_the_encoder(store):
    """Langevin's h*(y) has d_x = 6 coordinates, the learned encoder model.d = 2: oracle heads read a wider code, so
    they cannot stack with scratch's (this sweep failed on a shape mismatch when they shared a group)."""
    import cdmtransfer

    sets = TINY + ["suite.name=langevin", "suite.langevin.d_x=6", "suite.langevin.D_y=8", "sweep.modes=[scratch,oracle]",
                   "sweep.m=[8]", "sweep.seeds=1"]
    cfg = resolve_adapt(load_config(None, sets + ["adapt.mode=scratch"]))
    assert group_key(cfg) != group_key(resolve_adapt(load_config(None, sets + ["adapt.mode=oracle"])))
    res = cdmtransfer.sweep(None, sets)
    assert sorted(r["mode"] for r in res.rows) == ["oracle", "scratch"]
    assert all(math.isfinite(r["metrics"]["posterior_mean_mse"]) for r in res.rows), res.rows
    from mlflow import MlflowClient  # the oracle cell adapts the sweep's own pretrain on h*, a child of the sweep

    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    [oracle] = [r for r in res.rows if r["mode"] == "oracle"]
    assert client.get_run(oracle["run_id"]).data.tags["cdmtransfer.pretrain_run_id"] == res.oracle_pretrain_run_id
    on_h_star = client.get_run(res.oracle_pretrain_run_id).data
    assert on_h_star.params["model.encoder"] == "oracle" and on_h_star.params["model.d"] == "6"
    assert on_h_star.tags["mlflow.parentRunId"] == res.run_id and res.pretrain_run_id is None
