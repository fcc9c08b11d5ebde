"""The adapt stage (theory.md §1.4): a new head f_0 (and, per mode, the encoder) trained by DSM on m target samples,
its settings and length chosen by cross-validation on the m samples (`adapt_candidates`, `train_adapt`), then
evaluated on the held-out target split and recorded in MLflow."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from cdmtransfer import data_checks
from cdmtransfer.checkpoint import check_writable, export_model, list_checkpoints
from cdmtransfer.config import PRETRAINED_MODES, Config, flatten, oracle_config, resolve_adapt
from cdmtransfer.diffusion import OUProcess
from cdmtransfer.errors import ConfigError, DataError
from cdmtransfer.head_start import (adapt_scale, complete_code, completion_basis, fit_linear_means, stack_copies,
                                    start_scratch)
from cdmtransfer.eval_cache import evaluation_key, load as eval_cache_load, store as eval_cache_store
from cdmtransfer.metrics import divergence_warning, evaluate_models
from cdmtransfer.models import FixedEncoder, ScoreModel, head_options, model_spec, rebuild
from cdmtransfer.plots import adapt_samples_figure
from cdmtransfer.pretraining import pretrain
from cdmtransfer.regularizers import check_regularizers, make_objective, with_reg_metrics
from cdmtransfer.stages import (SourceHeads, check_resume, compared_with, dsm_objective, finish_run, fresh_encoder,
                                load_encoder, load_head, progress_for, resolve_scale, score_model, setup_torch,
                                stop_finished)
from cdmtransfer.tasks import TaskSet, build_taskset
from cdmtransfer.tracking import TAG, RunSummary, Tracker, open_tracker, tracked_run
from cdmtransfer.train import train
from cdmtransfer.validation import (Candidate, GridEncoder, Prefixed, StackedEncoder, choose, convergence_metrics,
                                    dsm_validation, fold_split, unit_clipper)


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


def adapt_candidates(a, has_sources: bool, scratch_ok: bool = True, complete: bool = False) -> list[Candidate]:
    """The settings adapt's cross-validation compares, simplest first (ties go to the earlier one).

    frozen: the frozen encoder. finetune: the encoder's learning rate, encoder_lr_grid × lr (0 keeps it frozen, so
    validation can always fall back to frozen) unless encoder_lr pins it. auto: the same rates plus 0, each with the
    head started from the best source head and from a random initialisation, unless head_init pins it; and, last,
    scratch's setting (a new encoder; with adapt.auto_scratch, where the recipe's encoder can train: `scratch_ok`).
    finetune (its rate not pinned) and auto with `complete` (`code_completion_basis` found empty code directions the
    m samples fill): also the completed encoder, right after the frozen one. oracle: as frozen, on h*. scratch: one
    setting (nothing pretrained to choose).
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
    cands = [Candidate(mult, init) for mult in mults for init in inits]
    if complete and completes(a):
        frozen = sum(not c.encoder_mult for c in cands)
        cands[frozen:frozen] = [Candidate(0.0, inits[0], complete=True)]
    return cands + scratch


def completes(a) -> bool:
    """Whether adapt settings `a` compare the completed encoder: adapt.code_completion in auto, or in finetune where
    the encoder's rate is chosen (a pinned encoder_lr trains at that rate, nothing else)."""
    return a.code_completion and (a.mode == "auto" or a.mode == "finetune" and a.encoder_lr is None)


def code_completion_basis(cfg: Config, taskset: TaskSet, enc: torch.nn.Module, has_sources: bool,
                          x_m: torch.Tensor, y_m: torch.Tensor) -> torch.Tensor | None:
    """The empty code directions a completed-encoder candidate would fill (head_start.completion_basis), where the
    run compares one (`completes`, from a pretrained encoder); else None."""
    if not (has_sources and completes(cfg.adapt)):
        return None
    return completion_basis(enc, taskset, x_m, y_m)


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
    basis = code_completion_basis(cfg, taskset, enc, source_heads is not None, x_m, y_m)
    candidates = adapt_candidates(a, source_heads is not None, scratch_ok(cfg), basis is not None)
    uses_source = any(c.head_init == "source" for c in candidates)
    start = pick_source_head(source_heads, x_m, y_m, process, a) if uses_source else None
    sigma_data = adapt_scale(cfg, taskset, source_heads if uses_source else None, (x_m, y_m))
    fresh = enc if a.mode == "scratch" else fresh_encoder(cfg, taskset) if any(c.fresh for c in candidates) else None
    sigma_fresh = sigma_data if a.mode == "scratch" else (
        adapt_scale(cfg, taskset, None, (x_m, y_m), scratch=True) if fresh is not None else None)
    scale = lambda c: resolve_scale(sigma_fresh if c.fresh else sigma_data, x_m)  # noqa: E731 (each candidate's σ_d)

    def run_stage(cands: list[Candidate], copies: int, x, y, n, ckpt: Path, label: str, sink, **kw):
        """Train len(cands) × copies heads, candidate g owning heads g·copies … (g + 1)·copies − 1, each candidate
        exactly as a run of its own would train (same start, draws, gradient and clipping: `unit_clipper`)."""
        G = len(cands)
        parts, started = zip(*[_candidate_encoder(fresh if c.fresh else enc, c, copies, x, y, n, basis)
                               for c in cands])
        sigmas = [scale(c) for c in cands]
        encoder = parts[0] if G == 1 else GridEncoder(list(parts), copies)
        model = score_model(cfg, encoder, G * copies, taskset, x_m, sigmas[0]).to(device)
        heads = [candidate_heads(cfg, taskset, c, copies, (x, y, n), sigmas[g],
                                 parts[g] if c.fresh or c.complete else enc,
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
            on_step = stop_finished(model, copies, loss_fn, clip, sd)
        result = train(model, groups, loss_fn, a, seed=cfg.seed, ckpt_dir=ckpt, meta=meta,
                       metrics=with_reg_metrics(sink, reg), progress=progress_for(a.steps, label, quiet),
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


def evaluate_adapted(models: list[ScoreModel], taskset: TaskSet, cfgs: list[Config], *,
                     eval_cache: Path | None = None, device=None) -> list[tuple[dict, dict, dict]]:
    """(metrics, skipped, draws) of every adapted model (metrics.evaluate_models; draws: the samples its figure
    reuses), all evaluated at once; a model equal to one evaluated before in `eval_cache` (eval_cache.py), or to
    another of `models`, is evaluated once."""
    models = [model.cpu() for model in models]
    keys = [evaluation_key(model, cfg) if eval_cache else str(i) for i, (model, cfg) in enumerate(zip(models, cfgs))]
    found = {key: eval_cache_load(eval_cache, key) for key in set(keys)} if eval_cache else {}
    todo = [i for i, key in enumerate(keys) if not found.get(key) and keys.index(key) == i]
    if todo:
        keeps = [{} for _ in todo]
        results = evaluate_models([models[i] for i in todo], taskset, [cfgs[i] for i in todo], keeps=keeps,
                                  device=device)
        for i, (values, skipped), draws in zip(todo, results, keeps):
            found[keys[i]] = (values, skipped, draws)
            if eval_cache:
                eval_cache_store(eval_cache, keys[i], values, skipped, draws)
    return [(dict(found[key][0]), dict(found[key][1]), found[key][2]) for key in keys]  # each caller adds its own


def adapt_values(cfg: Config, taskset: TaskSet, ema: ScoreModel, work_dir: Path, cv_stats: dict | None,
                 candidates: list[Candidate], chosen: int, cv: list, start: int | None, *, final_loss: float,
                 seconds: float, steps: int, trainable: int, eval_cache: Path | None = None,
                 evaluated: tuple[dict, dict, dict] | None = None) -> tuple[dict, dict]:
    """An adapted model's metrics (evaluate_adapted, or `evaluated` where the caller evaluated it with others) and
    what its training reports: the refit's loss, steps and seconds, cross-validation's `cv_stats`
    (convergence_metrics with prefix cv_, and cv_seconds; None without folds), the candidates' losses and the chosen
    setting; with the skipped metrics' reasons. Also draws the samples figure. `eval_cache`: a directory of
    evaluations to reuse and add to (a sweep's cells: eval_cache.py)."""
    a = cfg.adapt
    pick = candidates[chosen]
    values, skipped, draws = evaluated or evaluate_adapted([ema], taskset, [cfg], eval_cache=eval_cache)[0]
    if cfg.tracking.log_artifacts:  # the figure is only ever an artifact
        adapt_samples_figure(ema, taskset, cfg, work_dir / "plots" / "samples.png", draws=draws or None)
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
    if any(c.complete for c in candidates):  # the completed encoder was compared: chosen (1) or not (0)
        values["code_completed"] = float(pick.complete)
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
    best, other = compared_with(cv, chosen)
    within = f"the simplest within {margin:.0%}" + (f" or {se_margin:g} standard error" if se_margin else "")
    info["reason"] = (f"{mode} chose {info['mode']} ({pick.label()}): cross-validated DSM {cv[chosen][0]:.4g} at "
                      f"step {int(cv[chosen][1])}, " + (within + " of the lowest, " if other == best else "next best ")
                      + f"{cv[other][0]:.4g} ({candidates[other].label()}); {len(candidates)} settings compared")
    return info


def _short(c: Candidate) -> str:
    """A compact label for tables: frozen / ft×0.1 / completed (+rand when the head started at random) / scratch."""
    if c.fresh:
        return "scratch"
    encoder = "completed" if c.complete else "frozen" if not c.encoder_mult else f"ft×{c.encoder_mult:g}"
    return encoder + ("+rand" if c.head_init == "random" else "")


def _candidate_encoder(enc: torch.nn.Module, c: Candidate, copies: int, x, y, n,
                       basis: torch.Tensor | None = None) -> tuple[torch.nn.Module, bool]:
    """The encoder of one candidate's `copies` models, and whether a closed form started it on their rows: shared and
    fixed when it does not train (frozen, oracle), else `copies` independent trainable copies (one plain copy when
    copies = 1); a new encoder (c.fresh) starts each copy on its own rows (x, y, n) where it can (start_scratch); a
    completed one (c.complete) fills the empty directions `basis` from each copy's own rows (complete_code)."""
    if c.complete:
        return stack_copies(complete_code(enc, basis, x, y, n)).requires_grad_(False), True
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
    return finish_run(run, model_dir, cfg, f"adapt-{cfg.adapt.mode}")


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
        check_resume(tracker.store.work_dir(resume), cfg, "adapt")
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

