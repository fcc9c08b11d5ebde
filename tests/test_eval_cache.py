"""A sweep's shared evaluations (eval_cache.py): a model evaluated once however many cells end with it, and a key
that tells apart any two models or evaluation settings that could give different metrics."""

import copy
import dataclasses

import torch

from cdmtransfer import adaptation
from cdmtransfer.cells import train_cells
from cdmtransfer.eval_cache import evaluation_key
from cdmtransfer.stages import score_model
from test_batched_cells import _cell, _setup


def test_cells_that_end_with_the_same_model_share_one_evaluation(tmp_path, monkeypatch):
    calls = []  # how many models each evaluation call evaluates
    evaluate = adaptation.evaluate_models
    monkeypatch.setattr(adaptation, "evaluate_models", lambda models, *a, **k: calls.append(len(models)) or evaluate(
        models, *a, **k))
    cfg, taskset, enc, source = _setup("frozen")
    # finetune whose only encoder rate is 0: its one setting is frozen's, so it must end with frozen's model
    ft = dataclasses.replace(cfg, adapt=dataclasses.replace(cfg.adapt, mode="finetune", encoder_lr_grid=[0.0]))
    cells = [_cell(cfg, taskset, enc, source, tmp_path / "frozen"), _cell(ft, taskset, enc, source, tmp_path / "ft"),
             _cell(cfg, taskset, enc, source, tmp_path / "other", x=taskset.target_subset(12, seed=5)[0])]
    for cell in cells:
        cell.eval_cache = tmp_path / "evaluations"
    frozen, finetune, other = train_cells(cells, taskset)
    assert calls == [2]  # at once: frozen's model (finetune reuses it) and the cell trained on other data
    for key in ("score_error", "posterior_mean_mse", "test_dsm", "sliced_w2", "ref/linear_target_mse"):
        assert finetune["metrics"][key] == frozen["metrics"][key]
    assert other["metrics"]["posterior_mean_mse"] != frozen["metrics"]["posterior_mean_mse"]
    calls.clear()
    for cell in cells:
        cell.eval_cache = None
    train_cells(cells, taskset)
    assert calls == [3]  # without the cache every cell evaluates its own, all in one batched call


def test_the_key_tells_apart_any_weight_and_what_metrics_read():
    cfg, taskset, enc, _ = _setup("frozen")
    model = score_model(cfg, enc, 1, taskset, taskset.target_x[:12])
    key = evaluation_key(model, cfg)
    assert evaluation_key(copy.deepcopy(model), cfg) == key
    nudged = copy.deepcopy(model)
    with torch.no_grad():  # one weight, one ulp
        w = nudged.heads.weights[0]
        w[0, 0, 0] = torch.nextafter(w[0, 0, 0], torch.tensor(1e9))
    assert evaluation_key(nudged, cfg) != key
    scaled = copy.deepcopy(model)
    scaled.sigma_data = model.sigma_data * 2  # a float of the model's spec, not a tensor
    assert evaluation_key(scaled, cfg) != key
    assert evaluation_key(model, dataclasses.replace(cfg, adapt=dataclasses.replace(cfg.adapt, m=13))) != key
    assert evaluation_key(model, dataclasses.replace(cfg, seed=1)) != key
    evaluate = dataclasses.replace(cfg.evaluate, posterior_samples=cfg.evaluate.posterior_samples + 1)
    assert evaluation_key(model, dataclasses.replace(cfg, evaluate=evaluate)) != key
    # what the evaluation does not read: the mode, the adapt schedule, the run's name
    assert evaluation_key(model, dataclasses.replace(cfg, name="x", adapt=dataclasses.replace(
        cfg.adapt, mode="finetune", lr=1.0))) == key
