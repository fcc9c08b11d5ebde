"""The two training stages (theory.md §1.4): which parameters train, what is loaded, what is logged.

pretrain: joint DSM over the K source tasks, in the shared encoder h and the K heads f_1..f_K.
adapt:    DSM on m target samples with a new head f_0 and an encoder that is
          frozen (the pretrained ĥ; the paper's fine-tuning estimator), finetune (ĥ trained too, at a learning rate
          cross-validation chooses, 0 included), auto (frozen, finetune or scratch and the head's start, chosen
          by cross-validation), scratch (a fresh encoder; the paper's baseline) or oracle (frozen with the suite's true
          h* in place of ĥ, its source heads pretrained on h*: the ceiling of any learned representation).
Both run the one loop in train.py and end with an exported EMA model and metrics in MLflow.
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from cdmtransfer import data_checks, distributed
from cdmtransfer.checkpoint import check_writable, export_model, list_checkpoints, load_export, read_meta
from cdmtransfer.config import PRETRAINED_MODES, Config, flatten, oracle_config, resolve_adapt
from cdmtransfer.diffusion import OUProcess, dsm_loss, model_dsm_terms
from cdmtransfer.distributed import Dist
from cdmtransfer.errors import ConfigError, DataError, one_line
from cdmtransfer.head_start import (adapt_scale, fit_linear_means, pretrain_scale, set_source_covariances,
                                    stack_copies, start_pretrain, start_scratch)
from cdmtransfer.metrics import divergence_warning, evaluate_model
from cdmtransfer.models import (ConvEncoder, FixedEncoder, MLPEncoder, ScoreModel, count_parameters,
                                head_options, model_spec, rebuild)
from cdmtransfer.plots import adapt_samples_figure
from cdmtransfer.progress import Progress
from cdmtransfer.references import READOUT, source_readout
from cdmtransfer.regularizers import check_regularizers, make_objective, with_reg_metrics
from cdmtransfer.tasks import TaskSet, build_taskset
from cdmtransfer.tracking import (TAG, RunSummary, Tracker, find_model_dir, open_tracker, register_model,
                                  resolve_store, tracked_run)
from cdmtransfer.train import train
from cdmtransfer.validation import (Candidate, GridEncoder, Prefixed, StackedEncoder, choose,
                                    RowLosses, convergence_metrics, dsm_validation, fold_split, holdout_split,
                                    unit_clipper)


def setup_torch(cfg: Config) -> torch.device:
    # One thread by default: for these small networks intra-op threading costs more than it gains, and with other
    # processes on the cores (parallel sweeps, make -j) spinning OpenMP threads slow tiny ops by 100x or more.
    torch.set_num_threads(cfg.threads or 1)
    torch.set_flush_denormal(True)  # Adam's second moments underflow to subnormals, which are ~100x slower on CPU
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = cuda but no CUDA device is available (use --set device=cpu)")
    return torch.device(cfg.device)


def dsm_objective(x: torch.Tensor, y: torch.Tensor, counts: torch.Tensor, process: OUProcess, batch: int,
                  regularizer=None, shard: Dist = Dist(), repeat: int = 1):
    """Per-sample DSM losses [K, batch] on a fresh batch from every task at once (theory.md §1.4).

    x [K, n_max, d_x], y [K, n_max, D_y], counts [K]: each task draws `batch` rows uniformly from its own n_k.
    `regularizer` (regularizers.RegularizedObjective), when given, returns DSM plus its terms per sample instead.
    Under torchrun every rank draws the same global batch and keeps its slice `shard.rank::shard.world`.
    `repeat` = G: the model stacks G candidates of K heads; all G see the same rows, times and noise (common random
    numbers: the draws are those of a run of K heads alone), and the losses are [G·K, batch]. loss_fn.repeat may
    drop later to the candidates still running (`_run_only`).
    """
    K, _, d_x = x.shape
    tile = lambda a: a.repeat(loss_fn.repeat, *([1] * (a.dim() - 1))) if loss_fn.repeat > 1 else a  # noqa: E731

    def loss_fn(model: ScoreModel, gen: torch.Generator) -> torch.Tensor:
        idx = (torch.rand(K, batch, generator=gen, device=x.device) * counts[:, None]).long()
        x0 = torch.gather(x, 1, idx[..., None].expand(-1, -1, d_x))
        yb = torch.gather(y, 1, idx[..., None].expand(-1, -1, y.shape[-1]))
        t = process.sample_t((K, batch), gen, device=x.device)
        noise = torch.randn(x0.shape, generator=gen, device=x.device)
        if shard.active:
            part = slice(shard.rank, None, shard.world)
            x0, yb, t, noise = x0[:, part], yb[:, part], t[:, part], noise[:, part]
        x0, yb, t, noise = tile(x0), tile(yb), tile(t), tile(noise)
        if regularizer is not None:
            return regularizer(model, x0, yb, t, noise, gen)
        return training_loss(model, x0, yb, t, noise, process)

    loss_fn.repeat = repeat
    return loss_fn


def training_loss(model, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                  process: OUProcess) -> torch.Tensor:
    """Per-sample loss [K, B] of one batch: the DSM (theory.md §1.4; EDM-weighted or not), plus the linear mean's
    least squares when the model has one (models.ScoreModel.mean_fit_loss). `model` may be wrapped (DDP)."""
    net, x_t = getattr(model, "module", model), process.perturb(x0, t, noise)
    if net is model:
        return model_dsm_terms(model, x0, x_t, y, t, noise)[0]
    # DDP: the forward goes through the wrapper, which syncs the gradients
    loss = net.dsm_weight(t) * dsm_loss(model(x_t, y, t), noise)
    if net.linear_mean:
        with torch.no_grad():
            code = net.encoder(y)
        loss = loss + net.mean_fit_loss(code, x0)
    return loss


def score_model(cfg: Config, encoder: torch.nn.Module, K: int, taskset: TaskSet, x_train: torch.Tensor,
                sigma_data: float | None = None) -> ScoreModel:
    """A ScoreModel with the recipe's heads and parametrisation; σ_d² is the per-coordinate second moment of the
    stage's own training x (models.Preconditioning) unless given."""
    m = cfg.model
    sigma_data = resolve_scale(sigma_data, x_train)
    model = ScoreModel(encoder, K, taskset.d_x, m.head_width, m.head_depth, m.time_dim,
                       **head_options(m, taskset.image_shape), parametrization=m.parametrization,
                       sigma_data=sigma_data, linear_mean=m.linear_mean, mean_covariance=m.mean_covariance)
    model.edm_weighting = m.edm_weighting
    return model


def started_pretrain_model(cfg: Config, taskset: TaskSet, train_rows) -> ScoreModel:
    """The pretrain stage's model before its first step: a fresh encoder and K heads at the residual scale of the
    sources' training rows, each head's covariance fitted to its source, and the closed-form start (head_start)."""
    rows = train_rows.gather(taskset.source_x, taskset.source_y)
    model = score_model(cfg, new_encoder(cfg, taskset), taskset.K, taskset, taskset.source_x[train_rows.mask],
                        pretrain_scale(cfg, *rows))
    set_source_covariances(model, *rows)
    start_pretrain(model, *rows)
    return model


def _progress(cfg_steps: int, label: str, quiet: bool) -> Progress:
    return Progress(total=cfg_steps, label=label, enabled=not quiet)


def _check_resume(run_dir: Path, cfg: Config, stage: str) -> None:
    found = list_checkpoints(run_dir / "checkpoints") or list_checkpoints(run_dir / "checkpoints-cv")
    if not found:
        raise ConfigError(f"--resume: run has no checkpoint under {run_dir / 'checkpoints'}")
    meta = read_meta(found[-1])
    if meta.get("stage") != stage:
        raise ConfigError(f"--resume: that run is a {meta.get('stage')} run, not {stage}")
    if not isinstance(meta.get("config"), dict):
        raise DataError(f"{found[-1]}: checkpoint holds no config")
    stored = flatten({k: v for k, v in meta["config"].items() if k != "tracking"})
    now = flatten({k: v for k, v in cfg.to_dict().items() if k != "tracking"})
    diff = sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))
    if diff:
        where = one_line(", ".join(diff[:5]))  # keys from the checkpoint's file: any text
        raise ConfigError(f"--resume: the recipe differs from the run being resumed at {where}")


def _finish(run, model_dir: Path, cfg: Config, stage: str) -> str | None:
    if not cfg.tracking.log_artifacts:
        return None
    run.log_artifacts(model_dir, "model")
    model_id = register_model(run, model_dir, f"{cfg.name}-{stage}", {"stage": stage})
    if model_id:
        run.set_tags({TAG + "model_id": model_id})
    return model_id


def pretrain(cfg: Config, *, tracking_uri: str | None = None, resume: str | None = None,
             quiet: bool = True, parent_run_id: str | None = None) -> RunSummary:
    """Pretrain the shared encoder and K source heads; returns the run id, final metrics and model path."""
    dist = distributed.from_env()
    distributed.check_batch(dist, cfg.pretrain.batch_size)
    device = distributed.init(dist, setup_torch(cfg))
    taskset = build_taskset(cfg)
    torch.manual_seed(cfg.seed)
    train_rows, val_rows = holdout_split(taskset.source_n, cfg.pretrain.val_fraction, cfg.suite.seed)
    model = started_pretrain_model(cfg, taskset, train_rows).to(device)
    check_regularizers(cfg.regularize, "pretrain", taskset)
    if not dist.is_main:  # other torchrun ranks train in lockstep; rank 0 alone tracks and writes
        return _pretrain_rank(cfg, taskset, model, dist, device, tracking_uri, resume, train_rows, val_rows)
    tracker = open_tracker(cfg, tracking_uri)
    if resume:
        _check_resume(tracker.store.work_dir(resume), cfg, "pretrain")
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
                   "encoder_decay": choice["encoder_decay"], **convergence_metrics(result)}
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
        model_id = _finish(run, model_dir, cfg, "pretrain")
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
            on_step = _stop_finished(net, K, loss_fn, clip)
            keep = lambda ema, g: decay_candidate(ema, g, K)  # noqa: E731
        return train(net, groups, loss_fn, cfg.pretrain, seed=cfg.seed, ckpt_dir=ckpt,
                     meta={**meta, "encoder_decays": tried} if meta else meta, metrics=with_reg_metrics(sink, reg),
                     progress=_progress(cfg.pretrain.steps, label, quiet), resume=again,
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
        best, runner = _compared_with(cv, chosen)
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


@dataclass
class SourceHeads:
    """The pretrained model's spec and EMA weights: its K source heads can start the target head (head_init)."""

    spec: dict
    weights: dict


def load_encoder(tracker: Tracker, source: str, taskset: TaskSet, cfg: Config,
                 h_star: FixedEncoder | None = None) -> tuple[torch.nn.Module, dict, SourceHeads]:
    """The pretrained encoder ĥ from a run id, an MLflow URI or a local path, checked against the recipe; with
    its lineage and the source heads. `h_star` (--mode oracle): the encoder must be this h*, fixed."""
    with tempfile.TemporaryDirectory(prefix="cdmtransfer-") as tmp:
        model_dir, run_id = find_model_dir(tracker, source, Path(tmp))
        weights, meta = load_export(model_dir)
    spec = meta["model"].get("encoder") if isinstance(meta.get("model"), dict) else None
    if h_star is not None and isinstance(spec, dict) and spec.get("kind") != "fixed":
        raise ConfigError(f"--encoder {source}: --mode oracle adapts a pretrain on the suite's h* (cdmtransfer "
                          f"pretrain RECIPE --set model.encoder=oracle --set model.d={h_star.d}), not a learned encoder")
    encoder, heads = encoder_from_export(weights, meta, source, taskset.D_y, cfg.model.d)
    if h_star is not None and not _same_h_star(encoder, h_star):
        raise ConfigError(f"--encoder {source}: its fixed encoder is not this suite's h* (another suite setting)")
    lineage = {"encoder_source": source, "pretrain_run_id": run_id or str(meta.get("run_id", ""))}
    return encoder, lineage, heads


def _same_h_star(encoder: torch.nn.Module, h_star: FixedEncoder) -> bool:
    return (isinstance(encoder, FixedEncoder) and encoder.activation == h_star.activation
            and torch.equal(encoder.weight, h_star.weight) and torch.equal(encoder.bias, h_star.bias))


def encoder_from_export(weights: dict, meta: dict, source: str, D_y: int,
                        d: int) -> tuple[torch.nn.Module, SourceHeads]:
    """The encoder of an exported model (weights, meta.json), checked to take D_y and give d; and its source heads."""
    model = meta.get("model")
    spec = model.get("encoder") if isinstance(model, dict) else None
    if not spec or not isinstance(spec, dict):
        raise ConfigError(f"{source}: checkpoint holds no encoder")
    if spec.get("D_y") != D_y:
        raise ConfigError(f"{source}: encoder takes D_y = {spec.get('D_y')} but the recipe's suite has D_y = {D_y}")
    if spec.get("d") != d:
        raise ConfigError(f"{source}: encoder outputs d = {spec.get('d')} but the recipe has model.d = {d} "
                          f"(use --set model.d={spec.get('d')})")
    encoder = rebuild(spec, source, "encoder")
    state = {k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")}
    try:
        encoder.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"{source}: encoder weights do not fit ({str(exc).splitlines()[0]})") from None
    return encoder, SourceHeads(model, weights)


def new_encoder(cfg: Config, taskset: TaskSet) -> torch.nn.Module:
    """A fresh encoder h per model.encoder: an MLP on y, a small CNN on y viewed as the suite's condition image, or
    the suite's true h* (fixed: buffers only)."""
    m = cfg.model
    if m.encoder == "oracle":
        truth = taskset.truth.encoder()
        if truth is None:
            raise ConfigError(f"model.encoder = oracle: suite '{taskset.name}' has no true representation h*")
        if truth.d != m.d:
            raise ConfigError(f"model.encoder = oracle: the suite's h* has d = {truth.d}, the recipe model.d = {m.d} "
                              f"(use --set model.d={truth.d})")
        return truth
    if m.encoder == "conv":
        if taskset.condition_shape is None:
            raise ConfigError(f"model.encoder = conv needs image conditions; suite '{taskset.name}' has none "
                              f"(use model.encoder=mlp)")
        return ConvEncoder(taskset.D_y, m.d, m.encoder_width, m.encoder_depth, taskset.condition_shape)
    return MLPEncoder(taskset.D_y, m.d, m.encoder_width, m.encoder_depth, m.encoder_linear)


def fresh_encoder(cfg: Config, taskset: TaskSet) -> torch.nn.Module:
    """The new encoder scratch trains (and auto's scratch candidate: the same weights), seeded by cfg.seed."""
    torch.manual_seed(cfg.seed + 1)
    return new_encoder(cfg, taskset)


def prepare_encoder(cfg: Config, taskset: TaskSet, tracker: Tracker | None,
                    encoder: str | None) -> tuple[torch.nn.Module, dict, SourceHeads | None]:
    """The encoder adapt starts from, by mode, its lineage (empty unless it came from a pretrain run) and the
    pretrained source heads (None unless it did)."""
    mode = cfg.adapt.mode
    if mode in PRETRAINED_MODES:
        if not encoder:
            raise ConfigError(f"--mode {mode} needs --encoder (a pretrain run id, MLflow model URI or path)")
        return load_encoder(tracker, encoder, taskset, cfg)
    if mode == "scratch":
        return fresh_encoder(cfg, taskset), {}, None
    truth = oracle_truth(taskset)
    if not encoder:
        raise ConfigError(f"--mode oracle needs --encoder: a pretrain on h* (cdmtransfer pretrain RECIPE --set "
                          f"model.encoder=oracle --set model.d={truth.d})")
    return load_encoder(tracker, encoder, taskset, cfg, h_star=truth)


def oracle_truth(taskset: TaskSet) -> FixedEncoder:
    """The suite's true h*, which `--mode oracle` reads; a ConfigError where the suite has none."""
    truth = taskset.truth.encoder()
    if truth is None:
        raise ConfigError(f"--mode oracle: suite '{taskset.name}' has no true representation h*")
    return truth


def adapt_tags(cfg: Config, taskset: TaskSet, lineage: dict, parent_run_id: str | None) -> dict:
    a = cfg.adapt
    tags = {TAG + "stage": "adapt", TAG + "recipe": cfg.name, TAG + "suite": taskset.name, TAG + "mode": a.mode,
            TAG + "m": a.m, TAG + "seed": cfg.seed, **{TAG + k: v for k, v in lineage.items()},
            **data_checks.tags(data_checks.for_stage(taskset.data_warnings, ("adapt",)))}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return tags


def adapt_candidates(a, has_sources: bool, scratch_ok: bool = True) -> list[Candidate]:
    """The settings adapt's cross-validation compares, simplest first (ties go to the earlier one).

    frozen: the frozen encoder. finetune: the encoder's learning rate, encoder_lr_grid × lr (0 keeps it frozen, so
    validation can always fall back to frozen) unless encoder_lr pins it. auto: the same rates plus 0, each with the
    head started from the best source head and from a random initialisation, unless head_init pins it; and, last,
    scratch's setting (a new encoder; with adapt.auto_scratch, where the recipe's encoder can train: `scratch_ok`).
    oracle: as frozen, on h*. scratch: one setting (nothing pretrained to choose).
    """
    if a.mode == "scratch" or not has_sources:
        return [Candidate(None if a.mode in ("scratch", "oracle") else 0.0, "random", fresh=a.mode == "scratch")]
    inits = [a.head_init] if a.head_init else (["source", "random"] if a.mode == "auto" else ["source"])
    if a.mode in ("frozen", "oracle"):
        mults = [0.0]
    else:
        mults = [a.encoder_lr / a.lr] if a.encoder_lr is not None else sorted(set(a.encoder_lr_grid))
        if a.mode == "auto" and 0.0 not in mults:
            mults = [0.0, *mults]
    scratch = [Candidate(None, "random", fresh=True)] if a.mode == "auto" and a.auto_scratch and scratch_ok else []
    return [Candidate(mult, init) for mult in mults for init in inits] + scratch


def scratch_ok(cfg: Config) -> bool:
    """Whether the recipe's encoder can train from scratch (model.encoder = oracle is h*, fixed)."""
    return cfg.model.encoder != "oracle"


def train_adapt(cfg: Config, taskset: TaskSet, enc: torch.nn.Module, lineage: dict, run_id: str, work_dir: Path,
                metrics, *, quiet: bool = True, resume: bool = False, device=None,
                source_heads: SourceHeads | None = None) -> tuple[dict, dict, Path, dict]:
    """Train the target head (and encoder, per mode) on m target samples, export the EMA model, evaluate it.

    The length and the settings (`adapt_candidates`: the encoder's learning rate, the head's start) are chosen by
    cross-validation on the m samples: for each of the G candidate settings, `val_folds` fold models (each trained
    on the other folds, validated on its own) train at once in one batched model of G·F heads; they stop together
    when no candidate's mean held-out DSM has improved for `patience` checks. The candidate with the lowest
    cross-validated DSM wins, at its best step s*; the final model then trains on all m samples with its settings for
    s*·F/(F − 1) steps, the same number of passes over each sample. `metrics` receives the training curves (an MLflow
    Run, or a recorder in a sweep worker; the folds' under cv/). `cfg` must be resolved (config.resolve_adapt).
    Returns (metrics, skipped metrics with reasons, exported model directory, the choice: `choice_info`).
    """
    a = cfg.adapt
    x_m, y_m = taskset.target_subset(a.m, seed=cfg.seed)
    process = OUProcess(cfg.diffusion.T0, cfg.diffusion.T)
    reg = make_objective(cfg.regularize, "adapt", process, taskset.truth)
    folds = fold_split(a.m, a.val_folds)
    candidates = adapt_candidates(a, source_heads is not None, scratch_ok(cfg))
    uses_source = any(c.head_init == "source" for c in candidates)
    start = pick_source_head(source_heads, x_m, y_m, process, a) if uses_source else None
    sigma_data = adapt_scale(cfg, taskset, source_heads if uses_source else None, (x_m, y_m))
    fresh = enc if a.mode == "scratch" else fresh_encoder(cfg, taskset) if any(c.fresh for c in candidates) else None
    sigma_fresh = adapt_scale(cfg, taskset, None, (x_m, y_m), scratch=True) if fresh is not None else None
    scale = lambda c: resolve_scale(sigma_fresh if c.fresh else sigma_data, x_m)  # noqa: E731 (each candidate's σ_d)

    def run_stage(cands: list[Candidate], copies: int, x, y, n, ckpt: Path, label: str, sink, **kw):
        """Train len(cands) × copies heads, candidate g owning heads g·copies … (g + 1)·copies − 1, each candidate
        exactly as a run of its own would train (same start, draws, gradient and clipping: `unit_clipper`)."""
        G = len(cands)
        parts, started = zip(*[_candidate_encoder(fresh if c.fresh else enc, c, copies, x, y, n) for c in cands])
        sigmas = [scale(c) for c in cands]
        encoder = parts[0] if G == 1 else GridEncoder(list(parts), copies)
        model = score_model(cfg, encoder, G * copies, taskset, x_m, sigmas[0]).to(device)
        heads = [candidate_heads(cfg, taskset, c, copies, (x, y, n), sigmas[g], parts[g] if c.fresh else enc,
                                 fit=not c.fresh or started[g], source_heads=source_heads, start=start)
                 for g, c in enumerate(cands)]
        model.heads.load_state_dict({name: torch.cat([h[name] for h in heads]) for name in heads[0]})
        sd = None
        if model.precond is not None and len(set(sigmas)) > 1:  # EDM: each candidate's heads keep their own σ_d
            sd = model.precond.sd = torch.tensor(sigmas).repeat_interleave(copies)[:, None, None].to(device)
        groups = _candidate_groups(model, list(parts), cands, a)
        meta = {"stage": "adapt", "mode": a.mode, "model": model_spec(model), "config": cfg.to_dict(),
                "run_id": run_id, "lineage": lineage, "taskset": taskset.summary()}
        loss_fn = dsm_objective(x.to(device), y.to(device), n.to(device), process, a.batch_size, regularizer=reg,
                                repeat=G)
        clip, on_step = None, None
        if G > 1:
            owned = [(params, torch.full((copies,), g, device=device))  # a trainable encoder: `copies` blocks of g
                     for g, part in enumerate(parts) if (params := [p for p in part.parameters() if p.requires_grad])]
            clip = unit_clipper(model, owned, G, a.grad_clip)
            on_step = _stop_finished(model, copies, loss_fn, clip, sd)
        result = train(model, groups, loss_fn, a, seed=cfg.seed, ckpt_dir=ckpt, meta=meta,
                       metrics=with_reg_metrics(sink, reg), progress=_progress(a.steps, label, quiet),
                       resume=resume and bool(list_checkpoints(ckpt)), label=label, device=device, clip=clip,
                       on_step=on_step, **kw)
        return model, groups, meta, result

    cv_result, chosen, cv = None, 0, []
    if folds is not None:  # choose the settings and the length on the folds
        G = len(candidates)
        (xt, yt, nt), (xv, yv, nv) = folds.gather(x_m, y_m)
        validate = dsm_validation(xv.to(device), yv.to(device), nv.to(device), process, a.val_draws,
                                  seed=cfg.seed + 17, repeat=G, rows=True)
        _, _, _, cv_result = run_stage(candidates, folds.count, xt, yt, nt,
                                       work_dir / "checkpoints-cv", f"adapt {a.mode} (cv)", Prefixed(metrics, "cv/"),
                                       validate=validate)
        cv = cv_result.candidates or [(cv_result.val_loss, cv_result.step)]
        chosen = choose([loss for loss, _ in cv], a.select_margin, cv_result.rows, a.min_delta_se)
        refit_steps = min(a.steps, math.ceil(cv[chosen][1] * folds.count / (folds.count - 1)))
    else:
        refit_steps = a.steps
    pick = candidates[chosen]
    model, groups, meta, result = run_stage([pick], 1, x_m[None], y_m[None], torch.tensor([a.m]),
                                            work_dir / "checkpoints", f"adapt {a.mode}", metrics,
                                            stop_at=refit_steps)
    model_dir = export_model(work_dir / "model", result.ema.state_dict(), meta)
    trainable = sum(p.numel() for g in groups for p in g["params"])
    cv_stats = None
    if cv_result is not None:
        cv_stats = {**convergence_metrics(cv_result, prefix="cv_"), "cv_seconds": cv_result.seconds}
    values, skipped = adapt_values(cfg, taskset, result.ema, work_dir, cv_stats, candidates, chosen, cv, start,
                                   final_loss=result.final_loss, seconds=result.seconds, steps=result.steps_run,
                                   trainable=trainable)
    if reg is not None:
        values.update(reg.summary())  # mean of each regulariser term over the steps run
    return values, skipped, model_dir, choice_info(a.mode, candidates, chosen, cv, a.select_margin,
                                                      a.min_delta_se)


def adapt_values(cfg: Config, taskset: TaskSet, ema: ScoreModel, work_dir: Path, cv_stats: dict | None,
                 candidates: list[Candidate], chosen: int, cv: list, start: int | None, *, final_loss: float,
                 seconds: float, steps: int, trainable: int) -> tuple[dict, dict]:
    """An adapted model's metrics (evaluate_model) and what its training reports: the refit's loss, steps and
    seconds, cross-validation's `cv_stats` (convergence_metrics with prefix cv_, and cv_seconds; None without folds),
    the candidates' losses and the chosen setting; with the skipped metrics' reasons. Also draws the samples figure."""
    a = cfg.adapt
    pick = candidates[chosen]
    values, skipped = evaluate_model(ema.cpu(), taskset, cfg)
    if cfg.tracking.log_artifacts:  # the figure is only ever an artifact
        adapt_samples_figure(ema, taskset, cfg, work_dir / "plots" / "samples.png")
    values.update(train_seconds=seconds + (cv_stats["cv_seconds"] if cv_stats else 0),
                  trainable_parameters=trainable, steps=steps)
    if steps > 0:
        values["final_loss"] = final_loss
    else:
        skipped["final_loss"] = "cross-validation chose the starting weights (best step 0): no training step ran"
    if cv_stats is not None:
        values.update(cv_stats)
        values["converged"] = values.pop("cv_converged")
        if len(candidates) > 1:  # the chosen candidate's own best, and every candidate's
            values["cv_val_loss"], values["cv_best_step"] = cv[chosen]
            values.update({f"cv_candidate_loss_{g}": loss for g, (loss, _) in enumerate(cv)})
    else:
        skipped["converged"] = (f"m = {a.m} is too small to hold out a validation fold" if a.m < 2 else
                                "adapt.val_folds = 1: no cross-validation, trained to the step cap")
    if start is not None:
        values["source_head"] = float(start)
    if pick.encoder_mult is not None:
        values.update(encoder_lr_mult=pick.encoder_mult, encoder_lr=pick.encoder_mult * a.lr,
                      head_from_source=float(pick.head_init == "source"))
    if any(c.fresh for c in candidates) and a.mode == "auto":  # auto chose scratch's new encoder (1) or not (0)
        values["new_encoder"] = float(pick.fresh)
    return values, skipped


def choice_info(mode: str, candidates: list[Candidate], chosen: int, cv: list, margin: float = 0.0,
                se_margin: float = 0.0) -> dict:
    """What adapt chose and why: the candidates' cross-validated DSM (loss, best step) and one line for people."""
    pick = candidates[chosen]
    info = {"mode": pick.mode if mode in ("finetune", "auto") else mode, "setting": pick.label(),
            "short": _short(pick) if len(candidates) > 1 else "", "candidates": [
                {"setting": c.label(), "encoder_lr_mult": c.encoder_mult, "head_init": c.head_init,
                 **({"cv_loss": cv[g][0], "cv_step": int(cv[g][1])} if g < len(cv) else {})}
                for g, c in enumerate(candidates)]}
    if len(candidates) < 2:
        return info
    if not cv:
        info["reason"] = f"{mode} used {pick.label()} (no cross-validation: the first setting)"
        return info
    best, other = _compared_with(cv, chosen)
    within = f"the simplest within {margin:.0%}" + (f" or {se_margin:g} standard error" if se_margin else "")
    info["reason"] = (f"{mode} chose {info['mode']} ({pick.label()}): cross-validated DSM {cv[chosen][0]:.4g} at "
                      f"step {int(cv[chosen][1])}, " + (within + " of the lowest, " if other == best else "next best ")
                      + f"{cv[other][0]:.4g} ({candidates[other].label()}); {len(candidates)} settings compared")
    return info


def _compared_with(cv: list, chosen: int) -> tuple[int, int]:
    """For a choice's reason among candidates' (loss, step): the lowest loss, and the candidate the chosen one is
    compared with (the lowest when it was not chosen, else the next lowest)."""
    best = min(range(len(cv)), key=lambda g: cv[g][0])
    return best, best if best != chosen else min((g for g in range(len(cv)) if g != chosen), key=lambda g: cv[g][0])


def _short(c: Candidate) -> str:
    """A compact label for tables: frozen / ft×0.1 (+rand when the head started at random) / scratch."""
    if c.fresh:
        return "scratch"
    encoder = "frozen" if not c.encoder_mult else f"ft×{c.encoder_mult:g}"
    return encoder + ("+rand" if c.head_init == "random" else "")


def _stop_finished(model: ScoreModel, copies: int, loss_fn, clip, sd: torch.Tensor | None = None):
    """on_step for G stacked candidates of `copies` heads each: a candidate that stopped stops computing (its best
    loss, step and weights were kept when it stopped). `sd`: every head's σ_d when candidates differ, else None."""
    def on_step(done, val, ema):
        live = [g for g, c in enumerate(val.candidates or []) if not c[3]]
        if live and len(live) < loss_fn.repeat:
            _run_only(model, live, copies, loss_fn, clip, sd)

    return on_step


def _run_only(model: ScoreModel, live: list[int], copies: int, loss_fn, clip, sd: torch.Tensor | None = None) -> None:
    """From now on only candidates `live` of a stacked cross-validation run (forward, backward, loss): each is
    unaffected, since the candidates share draws and clip their own gradients; a stopped one's weights take
    optimizer steps without gradients, which nothing reads (its best loss and step were kept when it stopped).
    Conv / U-Net heads have no head subset: every candidate runs to the end."""
    if not hasattr(model.heads, "active"):
        return
    G = len(model.encoder.parts)
    device = next(model.heads.parameters()).device
    model.heads.active = torch.cat([torch.arange(g * copies, (g + 1) * copies) for g in live]).to(device)
    if sd is not None:
        model.precond.sd = sd[model.heads.active]
    model.encoder.sizes = [copies if g in live else 0 for g in range(G)]
    loss_fn.repeat = clip.count = len(live)


def _candidate_encoder(enc: torch.nn.Module, c: Candidate, copies: int, x, y, n) -> tuple[torch.nn.Module, bool]:
    """The encoder of one candidate's `copies` models, and whether scratch's closed form started it: shared and fixed
    when it does not train (frozen, oracle), else `copies` independent trainable copies (one plain copy when
    copies = 1); a new encoder (c.fresh) starts each copy on its own rows (x, y, n) where it can (start_scratch)."""
    if not (c.fresh or c.encoder_mult):
        return enc, False
    if c.fresh and (started := start_scratch(enc, x, y, n)) is not None:
        return stack_copies(started), True
    return StackedEncoder(enc, copies) if copies > 1 else enc, False


def candidate_rate(c: Candidate, lr: float) -> float:
    """A candidate's encoder learning rate: the head's for a new encoder (scratch), encoder_mult × lr, or 0 (fixed)."""
    return lr if c.fresh else (c.encoder_mult or 0.0) * lr


def _candidate_groups(model: ScoreModel, parts: list[torch.nn.Module], cands: list[Candidate], a) -> list[dict]:
    """Parameter groups: the heads at lr; each candidate's encoder at its rate (candidate_rate), or fixed."""
    groups = [{"params": list(model.heads.parameters()), "lr": a.lr}]
    for part, c in zip(parts, cands):
        rate = candidate_rate(c, a.lr)
        part.requires_grad_(rate > 0)
        if rate > 0:
            groups.append({"params": list(part.parameters()), "lr": rate})
    return groups


def candidate_heads(cfg: Config, taskset: TaskSet, c: Candidate, copies: int, data: tuple, sigma: float,
                    enc: torch.nn.Module, *, fit: bool, source_heads: SourceHeads | None = None,
                    start: int | None = None) -> dict:
    """The state of the `copies` heads a lone run of candidate c starts from: random (torch seed cfg.seed + 2, the
    same in every mode) or source head `start`, at σ_d `sigma`; with `fit`, their linear means fitted to `data` =
    (x, y, counts) of those heads on the code of `enc` (head_start.fit_linear_means)."""
    torch.manual_seed(cfg.seed + 2)
    model = score_model(cfg, enc, copies, taskset, data[0], sigma)
    if c.head_init == "source":
        load_head(model, source_heads, start)
    if fit:
        fit_linear_means(model, enc, *data, range(copies), fresh=c.head_init != "source", sources=source_heads)
    return model.heads.state_dict()


def resolve_scale(sigma: float | None, x: torch.Tensor) -> float:
    """A model's σ_d: `sigma`, else the RMS of its training x (score_model's rule)."""
    return float(sigma) if sigma is not None else float(x.pow(2).mean().sqrt().clamp_min(1e-3))


def pick_source_head(source: SourceHeads | None, x_m: torch.Tensor, y_m: torch.Tensor, process: OUProcess,
                     a) -> int | None:
    """The source head (task index 1..K) with the lowest DSM on the m target samples; None without source heads.

    Every pretrained head scores the same rows and noise (dsm_validation on K copies of the m samples).
    """
    if source is None:
        return None
    pretrained = rebuild(source.spec, "the pretrained model")
    try:
        pretrained.load_state_dict(source.weights)
    except RuntimeError as exc:
        raise DataError(f"the pretrained model's weights do not fit its spec ({str(exc).splitlines()[0]})") from None
    K = pretrained.heads.K
    losses = dsm_validation(x_m.expand(K, *x_m.shape), y_m.expand(K, *y_m.shape), torch.full((K,), len(x_m)),
                            process, a.val_draws, seed=0, per_task=True)(pretrained.eval())
    return int(losses.argmin()) + 1


def set_heads(model: ScoreModel, state: dict, into) -> None:
    """Copy the heads of a model of len(into) heads (its heads' state_dict) into heads `into` of `model`."""
    own = model.heads.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            blocks = own[name].view(model.heads.K, -1)  # head tensors are K blocks along dim 0 (see load_head)
            blocks[torch.tensor(list(into))] = tensor.reshape(len(into), -1).to(blocks)


def load_head(model: ScoreModel, source: SourceHeads, task: int, into=None) -> None:
    """Copy source head `task` (1..K) into the heads of `model` listed in `into` (default: every head); each stacked
    head tensor is K blocks along dim 0."""
    K_src = source.spec["K"]
    heads = {k[len("heads."):]: v for k, v in source.weights.items() if k.startswith("heads.")}
    own = model.heads.state_dict()
    source_linear = bool(source.spec.get("linear_mean", False))
    if source_linear != model.linear_mean:
        was = str(source_linear).lower()
        raise ConfigError(f"adapt.head_init = source: the pretrained heads have model.linear_mean = {was}; use "
                          f"--set model.linear_mean={was} (or adapt.head_init=random)")
    source_cov = source.spec.get("mean_covariance", "scalar")
    if source_cov != ("full" if model.full_covariance else "scalar"):
        raise ConfigError(f"adapt.head_init = source: the pretrained heads have model.mean_covariance = {source_cov}; "
                          f"use --set model.mean_covariance={source_cov} (or adapt.head_init=random)")
    if source.spec.get("parametrization", "eps") != model.parametrization or set(heads) != set(own):
        raise ConfigError("adapt.head_init = source: the pretrained heads differ from the recipe's (head kind, "
                          "sizes or model.parametrization); use adapt.head_init=random")
    out = {}
    for name, tensor in heads.items():
        block = tensor.reshape(K_src, -1, *tensor.shape[1:])[task - 1]
        target = own[name]
        if block.numel() * model.heads.K != target.numel():
            raise ConfigError(f"adapt.head_init = source: head tensor {name} has another shape in the pretrained "
                              f"model; use adapt.head_init=random")
        blocks = target.detach().clone().reshape(model.heads.K, *block.shape)
        blocks[torch.tensor(list(range(model.heads.K) if into is None else into))] = block
        out[name] = blocks.reshape(target.shape)
    model.heads.load_state_dict(out)


def record_adapt(run, cfg: Config, values: dict, skipped: dict, model_dir: Path, *, choice: dict | None = None,
                 quiet: bool = False) -> str | None:
    """Log an adapt run's final metrics, skipped-metric reasons, what cross-validation chose (tags
    cdmtransfer.choice / .choice_setting, cv_candidates.json) and model; returns the LoggedModel id.

    Diverged samples (metrics.evaluate_model's check): tag cdmtransfer.diverged = "true" and, unless `quiet`, one
    warning line on stderr naming the metrics that are not results.
    """
    run.log_metrics(values, step=int(values.get("steps", cfg.adapt.steps)))
    if "converged" in values:
        run.set_tags({TAG + "converged": str(bool(values["converged"])).lower()})
    if skipped:
        run.log_dict(skipped, "skipped_metrics.json")
    if choice:
        run.set_tags({TAG + "choice": choice["mode"], TAG + "choice_setting": choice["setting"]})
        if len(choice["candidates"]) > 1:  # settings were compared: what won, for tables, and every candidate
            run.set_tags({TAG + "choice_short": choice["short"]})
            run.log_dict(choice, "cv_candidates.json")
    warning = divergence_warning(f"adapt {cfg.adapt.mode} m={cfg.adapt.m} seed={cfg.seed}", values, skipped,
                                 cfg.evaluate.divergence_ratio)
    if warning:
        run.set_tags({TAG + "diverged": "true"})
        if not quiet:
            print(warning, file=sys.stderr, flush=True)
    plots = model_dir.parent / "plots"
    if cfg.tracking.log_artifacts and plots.is_dir():
        run.log_artifacts(plots, "plots")
    return _finish(run, model_dir, cfg, f"adapt-{cfg.adapt.mode}")


def adapt(cfg: Config, *, encoder: str | None = None, tracking_uri: str | None = None, resume: str | None = None,
          quiet: bool = True, parent_run_id: str | None = None) -> RunSummary:
    """Adapt to the target on m samples in mode cfg.adapt.mode, then evaluate on the held-out target split."""
    cfg = resolve_adapt(cfg)
    a = cfg.adapt
    device = setup_torch(cfg)
    taskset = build_taskset(cfg)
    taskset.target_subset(a.m, seed=cfg.seed)  # refuse an m the data cannot give before anything is created
    check_regularizers(cfg.regularize, "adapt", taskset)
    head_options(cfg.model, taskset.image_shape)  # a conv head on non-image x is refused before a run exists
    if a.mode == "oracle":
        cfg = oracle_config(cfg, oracle_truth(taskset).d)
    tracker = open_tracker(cfg, tracking_uri)
    if resume:
        _check_resume(tracker.store.work_dir(resume), cfg, "adapt")
        encoder = encoder or tracker.get_run(resume).data.tags.get(TAG + "encoder_source")
    if a.mode == "oracle" and not encoder:  # the source heads on h* first: a pretrain run of its own
        encoder = pretrain(cfg, tracking_uri=tracking_uri, quiet=quiet, parent_run_id=parent_run_id).run_id
        if not quiet:
            print(f"oracle: source heads pretrained on the suite's h* (run {encoder})", file=sys.stderr, flush=True)
    enc, lineage, source_heads = prepare_encoder(cfg, taskset, tracker, encoder)
    tags = adapt_tags(cfg, taskset, lineage, parent_run_id)
    with tracked_run(tracker, f"{cfg.name}-adapt-{a.mode}-m{a.m}", tags, resume_run_id=resume) as run:
        if not parent_run_id:
            data_checks.echo(cfg, data_checks.for_stage(taskset.data_warnings, ("adapt",)))
        check_writable(run.work_dir)
        if not resume:
            run.log_params(flatten(cfg.to_dict()))
            run.log_dict(cfg.to_dict(), "config.json")
        metrics, skipped, model_dir, choice = train_adapt(cfg, taskset, enc, lineage, run.run_id, run.work_dir, run,
                                                          source_heads=source_heads, quiet=quiet,
                                                          resume=bool(resume), device=device)
        model_id = record_adapt(run, cfg, metrics, skipped, model_dir, choice=choice)  # warnings reach stderr
    return RunSummary(run.run_id, "adapt", metrics, {"model": model_dir},
                      {"mode": a.mode, "m": a.m, "seed": cfg.seed, "skipped": skipped, "model_id": model_id,
                       "logging_seconds": run.logging_seconds, "choice": choice, **lineage}, tracker.store.uri)
