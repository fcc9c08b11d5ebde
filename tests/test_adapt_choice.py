"""What adapt's cross-validation chooses: the encoder's learning rate (finetune), frozen vs finetune (auto), the heads'
start, and the m-aware defaults of the keys a recipe leaves unset. Constructed cases where one answer must win."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cdmtransfer.config import adapt_defaults, load_config, resolve_adapt
from cdmtransfer.curves import summarise
from cdmtransfer.models import MLPEncoder, ScoreModel, model_spec
from cdmtransfer.adaptation import adapt_candidates, train_adapt
from cdmtransfer.stages import SourceHeads, fresh_encoder, load_head, score_model
from cdmtransfer.tasks import build_taskset

TINY = ["suite.K=3", "suite.n=128", "suite.n_target_pool=64", "suite.n_test=64", "suite.gaussian.d_x=3",
        "suite.gaussian.D_y=8", "suite.gaussian.d=2", "suite.gaussian.noise=0.1", "model.d=2",
        "model.encoder_width=32", "model.encoder_depth=1", "model.head_width=32", "model.head_depth=1",
        "model.time_dim=8", "adapt.steps=160", "adapt.batch_size=32", "adapt.m=16", "adapt.val_every=20",
        "adapt.patience=4", "adapt.warmup_steps=5", "adapt.checkpoint_every=1000", "evaluate.t_draws=2",
        "evaluate.posterior_samples=4", "evaluate.posterior_conditions=8", "evaluate.sampler_steps=8",
        "evaluate.dist_conditions=2", "evaluate.dist_samples=8"]


def _adapt(tmp_path: Path, encoder: str, sets: list[str]):
    """train_adapt on the tiny linear-h* suite with a constructed 'pretrained' encoder:
    exact: h(y) = h*(y) (a linear encoder holding the true map), so nothing is gained by training it;
    blind: an MLP encoder whose output layer is zero, h(y) = 0, so the head cannot see y until the encoder learns;
    partial: h(y) = (h*_1(y), 0) through the linear path, the second code direction left empty (what the sources of
    an out-of-span suite teach, as the pretrain's start leaves it)."""
    cfg = resolve_adapt(load_config(None, TINY + sets))
    taskset = build_taskset(cfg)
    torch.manual_seed(0)
    if encoder == "exact":
        enc = MLPEncoder(taskset.D_y, 2, 2, 0)  # one linear layer
        with torch.no_grad():
            enc.net[0].weight.copy_(taskset.truth.W)
            enc.net[0].bias.zero_()
    elif encoder == "partial":
        enc = MLPEncoder(taskset.D_y, 2, 8, 1, linear=True)
        enc.start_linear(taskset.truth.W * torch.tensor([[1.0], [0.0]]), torch.zeros(taskset.D_y))
    else:
        enc = MLPEncoder(taskset.D_y, 2, 32, 1)
        with torch.no_grad():
            enc.net[-1].weight.zero_()
            enc.net[-1].bias.zero_()
    pretrained = score_model(cfg, enc, taskset.K, taskset, taskset.source_x[0])
    source = SourceHeads(model_spec(pretrained), pretrained.state_dict())
    if cfg.adapt.mode == "scratch":  # as adaptation.prepare_encoder: a new encoder, no sources
        enc, source = fresh_encoder(cfg, taskset), None
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    values, _, model_dir, choice = train_adapt(cfg, taskset, enc, {}, "test", tmp_path, None, source_heads=source)
    exported = load_file(model_dir / "model.safetensors")
    moved = any(not torch.equal(exported["encoder." + k], v) for k, v in before.items())
    return values, choice, moved


def test_finetune_picks_the_encoder_rate_validation_prefers(tmp_path):
    # a blind encoder must be trained: the largest rate wins, and the final model's encoder did train at it
    values, choice, moved = _adapt(tmp_path / "blind", "blind",
                                   ["adapt.mode=finetune", "adapt.encoder_lr_grid=[0, 0.01, 1]"])
    losses = [c["cv_loss"] for c in choice["candidates"]]
    assert choice["mode"] == "finetune" and values["encoder_lr_mult"] == 1.0 and moved
    assert losses[2] < 0.9 * min(losses[:2])
    assert values["encoder_lr"] == pytest.approx(2e-3) and "chose finetune (encoder lr 1x" in choice["reason"]
    # an exact encoder wrecked by a huge rate: validation falls back to 0, i.e. frozen, and the encoder is untouched
    values, choice, moved = _adapt(tmp_path / "exact", "exact",
                                   ["adapt.mode=finetune", "adapt.encoder_lr_grid=[0, 1000]"])
    assert choice["mode"] == "frozen" and values["encoder_lr_mult"] == 0.0 and not moved
    assert choice["candidates"][0]["cv_loss"] < choice["candidates"][1]["cv_loss"]
    # ... and falling back is being frozen: each stacked candidate trains as a run of its own would (same start,
    # draws, gradient, clipping, stopping), so the frozen candidate's length and the final model are frozen's
    frozen, frozen_choice, _ = _adapt(tmp_path / "frozen", "exact", ["adapt.mode=frozen"])
    assert choice["candidates"][0]["cv_step"] == frozen["cv_best_step"] and values["steps"] == frozen["steps"]
    assert choice["candidates"][0]["cv_loss"] == pytest.approx(frozen["cv_val_loss"], rel=1e-4)
    for key in ("score_error", "test_dsm", "posterior_mean_mse"):
        assert values[key] == pytest.approx(frozen[key], rel=1e-4), key


def test_a_stopped_candidate_stops_computing_and_the_others_are_unchanged(tmp_path, monkeypatch):
    import cdmtransfer.stages as stages

    sets = ["adapt.mode=finetune", "adapt.encoder_lr_grid=[0, 100000]", "adapt.steps=400"]
    calls, real = [], stages._run_only
    monkeypatch.setattr(stages, "_run_only", lambda model, live, *a: calls.append(list(live)) or real(model, live, *a))
    values, choice, _ = _adapt(tmp_path / "skip", "exact", sets)
    assert calls and calls[0] == [0]  # the wrecked encoder rate stopped first, and from then on did not compute
    monkeypatch.setattr(stages, "_run_only", lambda *a: None)  # every candidate runs to the end, as before
    everyone, everyone_choice, _ = _adapt(tmp_path / "all", "exact", sets)
    assert [c["cv_step"] for c in choice["candidates"]] == [c["cv_step"] for c in everyone_choice["candidates"]]
    assert [c["cv_loss"] for c in choice["candidates"]] == pytest.approx(
        [c["cv_loss"] for c in everyone_choice["candidates"]], rel=1e-5)
    for key in ("score_error", "posterior_mean_mse"):
        assert values[key] == pytest.approx(everyone[key], rel=1e-5), key


def test_auto_chooses_the_mode_that_must_win(tmp_path):
    values, choice, moved = _adapt(tmp_path / "blind", "blind", ["adapt.mode=auto", "adapt.encoder_lr_grid=[1]",
                                                                 "adapt.head_init=source", "adapt.auto_scratch=false"])
    assert [c["encoder_lr_mult"] for c in choice["candidates"]] == [0.0, 1.0]  # auto always has frozen to fall back on
    assert choice["mode"] == "finetune" and moved and values["head_from_source"] == 1.0
    assert choice["reason"].startswith("auto chose finetune")
    values, choice, moved = _adapt(tmp_path / "exact", "exact",
                                   ["adapt.mode=auto", "adapt.encoder_lr_grid=[1000]", "adapt.head_init=source"])
    assert [c["setting"] for c in choice["candidates"]][-1] == "new encoder, head random"
    assert choice["mode"] == "frozen" and not moved and values["encoder_lr_mult"] == 0.0
    assert values["new_encoder"] == 0.0


def test_auto_chooses_scratch_when_the_pretrained_encoder_is_blind_and_trains_it_as_scratch_would(tmp_path):
    # a blind encoder kept frozen cannot see y; scratch's new encoder can: auto must choose it, and its candidate is
    # scratch itself (the same new encoder, start, draws and stopping), so the exported model is scratch's
    values, choice, moved = _adapt(tmp_path / "auto", "blind",
                                   ["adapt.mode=auto", "adapt.encoder_lr_grid=[0]", "adapt.head_init=source"])
    assert [(c["encoder_lr_mult"], c["head_init"]) for c in choice["candidates"]] == [(0.0, "source"),
                                                                                       (None, "random")]
    assert choice["mode"] == "scratch" and values["new_encoder"] == 1.0 and moved
    assert choice["reason"].startswith("auto chose scratch (new encoder, head random)")
    assert choice["candidates"][1]["cv_loss"] < 0.9 * choice["candidates"][0]["cv_loss"]
    scratch, scratch_choice, _ = _adapt(tmp_path / "scratch", "blind", ["adapt.mode=scratch"])
    assert choice["candidates"][1]["cv_step"] == scratch["cv_best_step"] and values["steps"] == scratch["steps"]
    assert choice["candidates"][1]["cv_loss"] == pytest.approx(scratch["cv_val_loss"], rel=1e-5)
    for key in ("score_error", "test_dsm", "posterior_mean_mse"):
        assert values[key] == pytest.approx(scratch[key], rel=1e-5), key
    auto = load_file(tmp_path / "auto" / "model" / "model.safetensors")
    alone = load_file(tmp_path / "scratch" / "model" / "model.safetensors")
    assert auto.keys() == alone.keys()
    for name in auto:
        torch.testing.assert_close(auto[name], alone[name], rtol=1e-5, atol=1e-6)


def test_finetune_completes_the_empty_code_direction_an_out_of_span_target_needs(tmp_path):
    # the target reads h*'s second coordinate, which no source reads and the encoder leaves empty: the completed
    # encoder (that direction fitted from each fold's own rows) must win cross-validation and beat frozen
    sets = ["suite.gaussian.target=out_of_span", "suite.n_target_pool=128", "adapt.m=96", "adapt.mode=finetune",
            "adapt.encoder_lr_grid=[0]"]
    values, choice, moved = _adapt(tmp_path / "finetune", "partial", sets)
    assert [c["setting"] for c in choice["candidates"]] == ["frozen encoder, head source",
                                                            "completed encoder, head source"]
    assert choice["mode"] == "finetune" and values["code_completed"] == 1.0 and moved
    assert choice["candidates"][1]["cv_loss"] < 0.9 * choice["candidates"][0]["cv_loss"]
    frozen, _, _ = _adapt(tmp_path / "frozen", "partial", sets[:-2] + ["adapt.mode=frozen"])
    assert values["score_error"] < 0.5 * frozen["score_error"]
    assert values["ref/h_star_readout_error"] < 0.05 < frozen["ref/h_star_readout_error"]
    off, off_choice, moved = _adapt(tmp_path / "off", "partial", sets + ["adapt.code_completion=false"])
    assert len(off_choice["candidates"]) == 1 and not moved and "code_completed" not in off


def test_candidates_by_mode_and_pins():
    a = load_config(None, ["adapt.mode=auto"]).adapt
    got = [(c.encoder_mult, c.head_init) for c in adapt_candidates(a, has_sources=True)]
    assert got == [(m, h) for m in (0.0, 0.03, 0.1, 0.3) for h in ("source", "random")] + [(None, "random")]
    assert [c.fresh for c in adapt_candidates(a, True)] == [False] * 8 + [True]
    assert not any(c.fresh for c in adapt_candidates(a, True, scratch_ok=False))
    completed = adapt_candidates(a, True, complete=True)  # the completed encoder right after the frozen ones
    assert [(c.encoder_mult, c.complete) for c in completed[:4]] == [(0.0, False), (0.0, False), (0.0, True),
                                                                     (0.03, False)]
    finetune = load_config(None, ["adapt.mode=finetune"]).adapt
    assert [c.complete for c in adapt_candidates(finetune, True, complete=True)] == [False, True, False, False, False]
    a = resolve_adapt(load_config(None, ["adapt.mode=finetune", "adapt.encoder_lr=2e-4"])).adapt
    assert [(c.encoder_mult, c.head_init) for c in adapt_candidates(a, True)] == [(pytest.approx(0.1), "source")]
    assert len(adapt_candidates(a, True, complete=True)) == 1  # a pinned rate is that rate, nothing else
    a = load_config(None, ["adapt.mode=frozen", "adapt.head_init=random"]).adapt
    assert [(c.encoder_mult, c.head_init) for c in adapt_candidates(a, True)] == [(0.0, "random")]
    assert [c.encoder_mult for c in adapt_candidates(load_config(None, ["adapt.mode=scratch"]).adapt, False)] == [None]


def test_source_heads_load_into_their_candidates_block_only():
    torch.manual_seed(0)
    pretrained = ScoreModel(MLPEncoder(5, 2, 8, 1), 3, 4, 16, 2, 4, parametrization="edm", sigma_data=0.7)
    source = SourceHeads(model_spec(pretrained), pretrained.state_dict())
    grid = ScoreModel(pretrained.encoder, 4, 4, 16, 2, 4, parametrization="edm", sigma_data=0.7)  # 2 candidates × 2
    untouched = {k: v.clone() for k, v in grid.heads.state_dict().items()}
    load_head(grid, source, task=3, into=range(2, 4))  # the second candidate starts from source head 3
    x, y, t = torch.randn(1, 6, 4), torch.randn(1, 6, 5), torch.rand(1, 6) + 0.1
    want = pretrained(x.expand(3, -1, -1), y.expand(3, -1, -1), t.expand(3, -1))[2]
    got = grid(x.expand(4, -1, -1), y.expand(4, -1, -1), t.expand(4, -1))
    for k in (2, 3):
        torch.testing.assert_close(got[k], want)
    for name, tensor in grid.heads.state_dict().items():  # the first candidate's heads keep their own start
        torch.testing.assert_close(tensor.reshape(4, -1)[:2], untouched[name].reshape(4, -1)[:2])


def test_unset_adapt_keys_follow_the_m_rule_and_pinned_keys_stay():
    for m in (8, 32, 128, 512, 4096):
        rule = adapt_defaults(m)
        cfg = resolve_adapt(load_config(None, [f"adapt.m={m}"]))
        assert (cfg.adapt.steps, cfg.adapt.batch_size, cfg.adapt.lr, cfg.adapt.patience) == (
            rule["steps"], rule["batch_size"], rule["lr"], rule["patience"])
    assert adapt_defaults(512)["batch_size"] > adapt_defaults(32)["batch_size"]
    assert adapt_defaults(4096)["steps"] > adapt_defaults(32)["steps"]
    cfg = resolve_adapt(load_config(None, ["adapt.m=512", "adapt.batch_size=64", "adapt.lr=1e-3"]))
    assert (cfg.adapt.batch_size, cfg.adapt.lr) == (64, 1e-3)  # pinned by the recipe
    assert cfg.adapt.steps == adapt_defaults(512)["steps"]  # unset: the rule
    assert adapt_defaults(128)["patience"] < adapt_defaults(512)["patience"]
    assert resolve_adapt(load_config(None, ["adapt.m=512", "adapt.patience=2"])).adapt.patience == 2
    assert load_config(None, []).adapt.steps is None  # unresolved until adapt knows its m


def test_sweep_summary_reports_excess_over_a_fitted_floor_where_no_exact_floor_exists():
    rows = [{"mode": "frozen", "m": m, "seed": s, "metrics": {"test_dsm": 0.3 + 2.0 / m + 0.001 * s},
             "choice": "frozen"} for m in (8, 32, 128) for s in (0, 1)]
    summary = summarise(rows)
    entry = next(e for e in summary if e["m"] == 8)
    assert entry["fitted_floor"]["test_dsm"] == pytest.approx(0.3005, abs=2e-3)
    assert entry["test_dsm_fitted_excess"]["mean"] == pytest.approx(2.0 / 8, abs=3e-3)
    assert entry["choices"] == ["frozen", "frozen"]
