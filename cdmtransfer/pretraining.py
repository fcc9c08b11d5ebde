"""The pretrain stage (theory.md §1.4): joint DSM over the K source tasks in the shared encoder h and the K heads
f_1..f_K, from the closed-form start, stopped by held-out DSM; where it learned past its start, the encoder's weight
decay chosen among pretrain.encoder_decay_grid by the same validation (the candidates trained stacked)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from cdmtransfer import data_checks, distributed
from cdmtransfer.checkpoint import check_writable, export_model, list_checkpoints
from cdmtransfer.config import Config, flatten
from cdmtransfer.diffusion import OUProcess
from cdmtransfer.distributed import Dist
from cdmtransfer.head_start import pretrain_scale, set_source_covariances, start_pretrain
from cdmtransfer.models import ScoreModel, count_parameters, model_spec
from cdmtransfer.references import READOUT, source_readout
from cdmtransfer.regularizers import check_regularizers, make_objective, with_reg_metrics
from cdmtransfer.stages import (check_resume, compared_with, dsm_objective, finish_run, new_encoder, progress_for,
                                score_model, set_heads, setup_torch, stop_finished)
from cdmtransfer.tasks import TaskSet, build_taskset
from cdmtransfer.tracking import TAG, RunSummary, open_tracker, resolve_store, tracked_run
from cdmtransfer.train import train
from cdmtransfer.validation import (GridEncoder, Prefixed, choose, RowLosses, convergence_metrics, dsm_validation,
                                    holdout_split, unit_clipper)


def started_pretrain_model(cfg: Config, taskset: TaskSet, train_rows, val_rows=None) -> tuple[ScoreModel, dict]:
    """The pretrain stage's model before its first step: a fresh encoder and K heads at the residual scale of the
    sources' training rows, each head's covariance fitted to its source, and the closed-form start (head_start).

    Given the held-out rows, two starts of the encoder's linear summary compete on their held-out DSM where they
    differ: every direction, or only those above the noise edge (head_start.linear_summary). The lower wins: on the
    LSGMM suite the spare directions carried a task-shifted nuisance of y into the code (style leakage 0.35), on the
    8×8 digits the weakest ones still carry signal. Returns the model and what was compared (`start_*` metrics)."""
    rows = train_rows.gather(taskset.source_x, taskset.source_y)
    model = score_model(cfg, new_encoder(cfg, taskset), taskset.K, taskset, taskset.source_x[train_rows.mask],
                        pretrain_scale(cfg, *rows))
    set_source_covariances(model, *rows)
    linear = getattr(model.encoder, "linear", None) is not None  # only a linear path has a summary to compare
    edged = copy.deepcopy(model) if val_rows is not None and linear else None
    directions = start_pretrain(model, *rows)
    if edged is None:
        return model, {}
    above = start_pretrain(edged, *rows, noise_edge=True)
    info = {"start_directions": float(directions)}
    if above == directions:
        return model, info
    validate = dsm_validation(*val_rows.gather(taskset.source_x, taskset.source_y),
                              OUProcess(cfg.diffusion.T0, cfg.diffusion.T), cfg.pretrain.val_draws, seed=cfg.seed + 17)
    every, edge = float(validate(model)), float(validate(edged))
    info.update(start_val_loss_every=every, start_val_loss_edge=edge)
    if edge < every:
        model, info["start_directions"] = edged, float(above)
    return model, info


def pretrain(cfg: Config, *, tracking_uri: str | None = None, resume: str | None = None,
             quiet: bool = True, parent_run_id: str | None = None) -> RunSummary:
    """Pretrain the shared encoder and K source heads; returns the run id, final metrics and model path."""
    dist = distributed.from_env()
    distributed.check_batch(dist, cfg.pretrain.batch_size)
    device = distributed.init(dist, setup_torch(cfg))
    taskset = build_taskset(cfg)
    torch.manual_seed(cfg.seed)
    train_rows, val_rows = holdout_split(taskset.source_n, cfg.pretrain.val_fraction, cfg.suite.seed)
    model, start_info = started_pretrain_model(cfg, taskset, train_rows, val_rows)
    model = model.to(device)
    check_regularizers(cfg.regularize, "pretrain", taskset)
    if not dist.is_main:  # other torchrun ranks train in lockstep; rank 0 alone tracks and writes
        return _pretrain_rank(cfg, taskset, model, dist, device, tracking_uri, resume, train_rows, val_rows)
    tracker = open_tracker(cfg, tracking_uri)
    if resume:
        check_resume(tracker.store.work_dir(resume), cfg, "pretrain")
    data_warnings = data_checks.for_stage(taskset.data_warnings, ("pretrain",))
    tags = {TAG + "stage": "pretrain", TAG + "recipe": cfg.name, TAG + "suite": taskset.name,
            TAG + "seed": cfg.seed, **data_checks.tags(data_warnings)}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    with tracked_run(tracker, f"{cfg.name}-pretrain", tags, resume_run_id=resume) as run:
        if not parent_run_id:  # a sweep says it once, for all its runs
            data_checks.echo(cfg, data_warnings)
        check_writable(run.work_dir)
        if not resume:
            run.log_params(flatten(cfg.to_dict()))
            run.log_dict(cfg.to_dict(), "config.json")
        meta = {"stage": "pretrain", "model": model_spec(model), "config": cfg.to_dict(), "run_id": run.run_id,
                "taskset": taskset.summary()}
        process = OUProcess(cfg.diffusion.T0, cfg.diffusion.T)
        result, reg, choice = _pretrain_loop(cfg, taskset, model, process, train_rows, val_rows, dist, device,
                                             resume, run.work_dir / "checkpoints", meta, run, quiet)
        model_dir = export_model(run.work_dir / "model", result.ema.state_dict(), meta)
        metrics = {"final_loss": result.final_loss, "train_seconds": result.seconds,
                   "parameters": count_parameters(model), "encoder_parameters": count_parameters(model.encoder),
                   "encoder_decay": choice["encoder_decay"], **start_info, **convergence_metrics(result)}
        if reg is not None:
            metrics.update(reg.summary())  # mean of each regulariser term over the steps run
        if cfg.model.encoder != "oracle":  # h* itself: nothing to read out
            readout = source_readout(result.ema.encoder, taskset)
            metrics.update({READOUT: readout} if readout is not None else {})
        if dist.active:
            metrics["world_size"] = dist.world
        run.log_metrics(metrics, step=result.steps_run)
        run.set_tags({TAG + "converged": str(bool(result.converged)).lower(), TAG + "best_step": result.step})
        if "reason" in choice:  # decays were compared: what won and every candidate's held-out DSM
            run.set_tags({TAG + "encoder_decay_choice": choice["reason"]})
            run.log_dict(choice, "encoder_decay_candidates.json")
        model_id = finish_run(run, model_dir, cfg, "pretrain")
    distributed.finish(dist)
    return RunSummary(run.run_id, "pretrain", metrics, {"model": model_dir, "checkpoints": run.work_dir / "checkpoints"},
                      {"model_id": model_id, "taskset": taskset.summary(), "logging_seconds": run.logging_seconds,
                       **({"choice": choice} if "reason" in choice else {})}, tracker.store.uri)


def _pretrain_loop(cfg: Config, taskset: TaskSet, model: ScoreModel, process: OUProcess, train_rows, val_rows,
                   dist: Dist, device, resume, ckpt_dir: Path, meta: dict, metrics, quiet: bool):
    """Joint DSM on the sources' training rows, validated on their held-out rows (early stopping, best EMA kept).

    The encoder's weight decay (`pretrain_decays`, smallest first): the first trains alone. Where it learns anything
    validation keeps (best step > 0), the others then train at once from the same start, G copies of the model as
    one (`decay_grid`), each as a run of its own would (same draws, its own clipping and stopping), and the lowest
    held-out DSM wins (one-standard-error rule: a larger decay must beat a smaller one by more than the noise of
    their paired difference). Where the start stays best, decay has nothing to regularise (on the quickstart every
    decay kept step 0 with the same loss) and is not tried.
    Returns (the winner's train result, its best EMA weights in `ema`; the regulariser; the choice: `decay_choice`).
    """
    reg = make_objective(cfg.regularize, "pretrain", process, taskset.truth)
    decays = pretrain_decays(cfg, model, reg is not None, dist, val_rows is not None)
    x, y, n = train_rows.gather(taskset.source_x, taskset.source_y)
    validation = None
    if val_rows is not None:
        validation = [t.to(device) for t in val_rows.gather(taskset.source_x, taskset.source_y)]
    start = copy.deepcopy(model) if len(decays) > 1 else None

    def run(net: ScoreModel, tried: list[float], ckpt: Path, again: bool, sink, label: str):
        G, K = len(tried), model.heads.K
        loss_fn = dsm_objective(x.to(device), y.to(device), n.to(device), process, cfg.pretrain.batch_size,
                                regularizer=reg, shard=dist, repeat=G)
        validate = None if validation is None else dsm_validation(*validation, process, cfg.pretrain.val_draws,
                                                                   seed=cfg.seed + 17, rows=True, repeat=G)
        encoders = list(net.encoder.parts) if G > 1 else [net.encoder]
        own = {id(p) for p in net.encoder.parameters()}
        groups = [{"params": [p for p in net.parameters() if id(p) not in own]}]  # the heads: weight_decay
        groups += [{"params": list(e.parameters()), "weight_decay": w} for e, w in zip(encoders, tried)
                   if any(True for _ in e.parameters())]
        clip, on_step, keep = None, None, None
        if G > 1:
            clip = unit_clipper(net, [(list(e.parameters()), torch.full((1,), g, device=device))
                                      for g, e in enumerate(encoders)], G, cfg.pretrain.grad_clip)
            on_step = stop_finished(net, K, loss_fn, clip)
            keep = lambda ema, g: decay_candidate(ema, g, K)  # noqa: E731
        return train(net, groups, loss_fn, cfg.pretrain, seed=cfg.seed, ckpt_dir=ckpt,
                     meta={**meta, "encoder_decays": tried} if meta else meta, metrics=with_reg_metrics(sink, reg),
                     progress=progress_for(cfg.pretrain.steps, label, quiet), resume=again,
                     label=label if dist.is_main else f"{label}-rank{dist.rank}", device=device, dist=dist,
                     validate=validate, clip=clip, on_step=on_step, keep_candidates=keep)

    first = run(model, decays[:1], ckpt_dir, bool(resume), metrics, "pretrain")
    if len(decays) == 1 or first.step == 0:
        return first, reg, decay_choice(decays[:1], 0, None)
    more, ckpt = decays[1:], ckpt_dir.parent / "checkpoints-decay"
    net = decay_grid(cfg, taskset, start, len(more)).to(device) if len(more) > 1 else copy.deepcopy(start)
    rest = run(net, more, ckpt, bool(resume) and bool(list_checkpoints(ckpt)), Prefixed(metrics, "decay/"),
               f"pretrain (encoder decay {', '.join(f'{w:g}' for w in more)})")
    cv = [(first.val_loss, first.step), *(rest.candidates or [(rest.val_loss, rest.step)])]
    rows = RowLosses(torch.cat([first.rows.values, rest.rows.values]), torch.cat([first.rows.weights,
                                                                                  rest.rows.weights]))
    chosen = choose([loss for loss, _ in cv], 0.0, rows, DECAY_SELECT_SE)
    if chosen == 0:
        result = first
    else:
        result = rest
        if len(more) > 1:
            result.ema = copy.deepcopy(start).requires_grad_(False)
            result.ema.load_state_dict(rest.candidate_states[chosen - 1])
        result.val_loss, result.step = cv[chosen][0], int(cv[chosen][1])
    result.seconds = first.seconds + rest.seconds
    return result, reg, decay_choice(decays, chosen, cv)


DECAY_SELECT_SE = 1.0  # standard errors by which a larger encoder decay must win (validation.choose)


def pretrain_decays(cfg: Config, model: ScoreModel, regularized: bool, dist: Dist, validates: bool) -> list[float]:
    """The encoder weight decays the pretrain compares, smallest first: the pinned pretrain.encoder_decay, else
    encoder_decay_grid where validation can choose (a trainable encoder, MLP heads, held-out rows, no pretrain
    regulariser, one process), else none (0)."""
    p = cfg.pretrain
    if p.encoder_decay is not None:
        return [p.encoder_decay]
    trainable = any(q.requires_grad for q in model.encoder.parameters())
    if not trainable or model.head != "mlp" or not validates or regularized or dist.active:
        return [0.0]
    return sorted(set(p.encoder_decay_grid))


def decay_grid(cfg: Config, taskset: TaskSet, model: ScoreModel, G: int) -> ScoreModel:
    """G copies of the started pretrain model as one: encoder g (its own copy) serves heads g·K … (g + 1)·K − 1,
    each block a copy of the K started heads."""
    K = model.heads.K
    grid = score_model(cfg, GridEncoder([copy.deepcopy(model.encoder) for _ in range(G)], K), G * K, taskset, None,
                       model.sigma_data)
    heads = model.heads.state_dict()
    for g in range(G):
        set_heads(grid, heads, range(g * K, (g + 1) * K))
    return grid


def decay_candidate(grid: ScoreModel, g: int, K: int) -> dict:
    """Candidate g of a `decay_grid` model as the state dict of the K-head model it was copied from."""
    state = {"encoder." + k: v for k, v in grid.encoder.parts[g].state_dict().items()}
    state.update({"heads." + k: v[g * K:(g + 1) * K] for k, v in grid.heads.state_dict().items()})
    return state


def decay_choice(decays: list[float], chosen: int, cv: list | None) -> dict:
    """What the pretrain chose for the encoder's decay and why (the candidates' best held-out DSM and step)."""
    info = {"encoder_decay": decays[chosen], "candidates": [
        {"encoder_decay": w, **({"val_loss": cv[g][0], "best_step": int(cv[g][1])} if cv else {})}
        for g, w in enumerate(decays)]}
    if cv:
        best, runner = compared_with(cv, chosen)
        info["reason"] = (f"pretrain chose encoder decay {decays[chosen]:g}: held-out DSM {cv[chosen][0]:.4g} at step "
                          f"{int(cv[chosen][1])}, " + ("next best " if best == chosen else
                                                       "within one standard error of the lowest, ")
                          + f"{cv[runner][0]:.4g} (decay {decays[runner]:g}); {len(decays)} decays compared")
    return info


def _pretrain_rank(cfg: Config, taskset: TaskSet, model: ScoreModel, dist: Dist, device, tracking_uri, resume,
                   train_rows, val_rows):
    """A torchrun rank other than 0: the same steps on its slice of each batch; no tracking, no files written."""
    store = resolve_store(tracking_uri, cfg.tracking.uri, cfg.tracking.home)
    ckpt_dir = store.work_dir(resume) / "checkpoints" if resume else store.home / "work" / "none"
    process = OUProcess(cfg.diffusion.T0, cfg.diffusion.T)
    result, _, _ = _pretrain_loop(cfg, taskset, model, process, train_rows, val_rows, dist, device, resume,
                                  ckpt_dir, {}, None, True)
    distributed.finish(dist)
    return RunSummary("", "pretrain", {"final_loss": result.final_loss}, {}, {"rank": dist.rank}, store.uri)

