"""The one training loop every stage uses: AdamW, warm-up + cosine learning rate, gradient clipping, EMA,
validation with early stopping, atomic checkpoints, exact resume, batched metric logging and progress.

A stage supplies the model, its parameter groups, a `loss_fn(model, generator) -> per-sample losses` and, to train to
convergence, a `validate(ema_model) -> loss` on held-out data; the loop owns everything else. `cfg.steps` is a cap:
every `cfg.val_every` steps the EMA weights are validated, the best are kept, and after `cfg.patience` checks
without improvement the run stops and reports that it converged. All randomness after the model's initialisation
flows through one torch.Generator whose state is checkpointed (with the validation state), so a resumed run
continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from cdmtransfer import distributed
from cdmtransfer.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from cdmtransfer.config import TrainConfig
from cdmtransfer.distributed import Dist
from cdmtransfer.errors import DataError, TrainingError, check_stop
from cdmtransfer.optim import AdamW
from cdmtransfer.progress import Progress
from cdmtransfer.validation import RowLosses

LossFn = Callable[[nn.Module, torch.Generator], torch.Tensor]
# EMA model -> held-out loss (deterministic given the weights): a scalar, or one value per candidate [G] when the
# model stacks G candidate settings (each keeps its own best and stops by its own patience; the run ends when all have),
# or the check row by row (validation.RowLosses: G candidates' rows, so that an improvement must exceed its noise)
ValFn = Callable[[nn.Module], torch.Tensor]


@dataclass
class TrainResult:
    model: nn.Module
    ema: nn.Module  # with validation: the best EMA weights (those of `step`), else the last
    step: int  # the step whose EMA weights `ema` holds
    final_loss: float
    seconds: float
    checkpoint: Path | None
    steps_run: int = 0
    val_loss: float | None = None  # the best validation loss (None without validation)
    converged: bool | None = None  # stopped because validation stopped improving (False: hit the step cap first)
    candidates: list | None = None  # per-candidate validation: [(best loss, its step)] (None for a scalar loss)
    rows: RowLosses | None = None  # each candidate's best check row by row (a RowLosses validation)
    candidate_states: list | None = None  # with keep_candidates: each candidate's weights at its own best step


@dataclass
class Validation:
    """Early-stopping state; lives in the checkpoint so a resumed run stops where an uninterrupted one would."""

    best: float = math.inf
    best_step: int = 0
    bad: int = 0  # checks since the last improvement
    stopped: bool = False
    best_state: dict | None = None  # EMA weights at best_step
    candidates: list | None = None  # per candidate: [best loss, best step, bad, stopped], when the loss is a vector
    best_rows: RowLosses | None = None  # per candidate, its best check row by row (a RowLosses validation)
    candidate_states: list | None = None  # per candidate, keep(ema, g) at its best step (train's keep_candidates)

    def update(self, value: float, step: int, ema: nn.Module, cfg: TrainConfig, per: list | None = None,
               rows: RowLosses | None = None, keep=None) -> None:
        """Record one check: an improvement over the best by more than min_delta (relative) and min_delta_se standard
        errors (of the paired gain over the rows, when `rows` gives them) keeps these EMA weights as the best.

        `per`: G candidates' losses (`value` is their minimum). Each candidate keeps its own best loss and step and
        stops by the same rule as a run of its own would, its later checks ignored; the run stops when all have.
        `keep(ema, g)`, when given, is what to keep of candidate g's weights at its best step.
        """
        se = [0.0] * len(per or [value])
        if rows is not None:
            if self.best_rows is None:
                self.best_rows = RowLosses(rows.values.clone(), rows.weights)
            se = rows.gain_se(self.best_rows.values).tolist()
        for g, (c, v) in enumerate(zip(self.candidates or [], per or [])):
            if not c[3]:
                better = _improves(v, c[0], cfg, se[g])
                c[:3] = [v, step, 0] if better else [c[0], c[1], c[2] + 1]
                c[3] = _stops(c[2], step, c[1], cfg)
                if better and rows is not None:
                    self.best_rows.values[g] = rows.values[g]
                if better and keep is not None:
                    self.candidate_states = self.candidate_states or [{} for _ in self.candidates]
                    self.candidate_states[g] = {k: v.detach().clone() for k, v in keep(ema, g).items()}
        if _improves(value, self.best, cfg, 0.0 if self.candidates else se[0]):
            self.best, self.best_step, self.bad = value, step, 0
            self.best_state = {k: v.detach().clone() for k, v in ema.state_dict().items()}
            if rows is not None and not self.candidates:
                self.best_rows.values[0] = rows.values[0]
        else:
            self.bad += 1
        self.stopped = (all(c[3] for c in self.candidates) if self.candidates
                        else _stops(self.bad, step, self.best_step, cfg))

    def to_state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad, "stopped": self.stopped,
                "best_state": self.best_state or {}, "candidates": self.candidates or [],
                "best_rows": vars(self.best_rows) if self.best_rows is not None else {},
                "candidate_states": self.candidate_states or []}

    @classmethod
    def from_state(cls, state: dict | None) -> "Validation":
        if not state:
            return cls()
        return cls(float(state["best"]), int(state["best_step"]), int(state["bad"]), bool(state["stopped"]),
                   state["best_state"] or None, [list(c) for c in state.get("candidates", [])] or None,
                   RowLosses(**state["best_rows"]) if state.get("best_rows") else None,
                   state.get("candidate_states") or None)


def _improves(value: float, best: float, cfg: TrainConfig, se: float) -> bool:
    """A finite value improves on the best by more than min_delta (relative) and min_delta_se × `se` (the standard
    error of the gain); the first finite value always does."""
    margin = max(cfg.min_delta * abs(best), cfg.min_delta_se * se) if math.isfinite(best) else 0.0
    return math.isfinite(value) and (not math.isfinite(best) or value < best - margin)


def _stops(bad: int, step: int, best_step: int, cfg: TrainConfig) -> bool:
    """Patience in checks, and never before 1.5× the best step: a long run is not cut on a short plateau."""
    return cfg.patience > 0 and bad >= cfg.patience and step >= 1.5 * best_step


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to 10% (a pure function of the step)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, step: int, decay: float) -> None:
    """θ_ema ← θ_ema + (1 − β)(θ − θ_ema), with β warmed up as min(decay, (1 + step)/(10 + step))."""
    beta = min(decay, (1 + step) / (10 + step))
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1 - beta)


def train(model: nn.Module, param_groups: list[dict], loss_fn: LossFn, cfg: TrainConfig, *, seed: int,
          ckpt_dir: Path, meta: dict, metrics=None, progress: Progress | None = None, resume: bool = False,
          label: str = "train", device: torch.device | None = None, dist: Dist = Dist(),
          validate: ValFn | None = None, stop_at: int | None = None,
          clip: Callable[[], torch.Tensor] | None = None,
          on_step: Callable[[int, Validation, nn.Module], None] | None = None,
          keep_candidates: Callable[[nn.Module, int], dict] | None = None) -> TrainResult:
    """Train for at most `cfg.steps` steps (continuing from the newest checkpoint in `ckpt_dir` when `resume`).

    With `validate`, stop early by validation and return the best EMA weights. `stop_at` ends the run at that step
    with the learning-rate schedule of the full `cfg.steps` (a refit to a length chosen elsewhere). `clip()`, when
    given, replaces the global gradient clipping (stacked candidates clip each its own: validation.unit_clipper)
    and returns the norm to log. `on_step(done, validation, ema)`, when given, is called after every step (batched cells:
    cells.py snapshots a cell at its own stop and refit steps). `keep_candidates(ema, g)`, with a per-candidate
    validation, gives what to keep of candidate g's EMA weights whenever it improves (result.candidate_states).
    Under torchrun (`dist.active`) gradients are averaged by DistributedDataParallel and only rank 0 logs,
    shows progress and writes checkpoints; every rank validates the same EMA weights, so all stop together.
    """
    generator = torch.Generator(device=device or "cpu").manual_seed(seed)
    optimizer = AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)  # optim.py: torch's fused AdamW
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    ema = copy.deepcopy(model).requires_grad_(False)
    last = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    start, val = 0, Validation()
    if resume:
        start, val = _restore(ckpt_dir, model, ema, optimizer, generator)
    elif validate is not None:  # the starting point competes too (a head started from a source head may be best)
        _check(validate, ema, val, 0, cfg, keep_candidates)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    net = nn.parallel.DistributedDataParallel(model) if dist.active else model
    if not dist.is_main:
        metrics, progress = None, None
    progress = progress or Progress(total=last, label=label, enabled=False)
    progress.start(start)
    t0, last_path, loss_value = time.perf_counter(), None, float("nan")
    running = torch.zeros((), device=device)
    done = start
    for step in range(start, last):
        if val.stopped:
            break
        check_stop()  # SIGTERM: stop here even if its KeyboardInterrupt was swallowed elsewhere
        scale = lr_at(step, cfg)
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * scale
        losses = loss_fn(net, generator)
        loss = losses.mean() if getattr(loss_fn, "reduce", None) is None else loss_fn.reduce(losses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            grad_norm = clip()
        else:
            grad_norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else torch.zeros(())
        running += loss.detach()
        done = step + 1
        if done % cfg.log_every == 0 or done == last:
            count = done % cfg.log_every or cfg.log_every
            loss_value = float(distributed.mean(running, dist)) / count  # one host sync per logging interval
            running.zero_()
            if not math.isfinite(loss_value):
                raise _non_finite(label, done, ckpt_dir)
            if metrics is not None:
                metrics.log_metrics({"loss": loss_value, "lr": base_lrs[0] * scale,
                                     "grad_norm": float(grad_norm)}, step=done)
            progress.update(done, loss_value)
        optimizer.step()
        ema_update(ema, model, step, cfg.ema_decay)
        if validate is not None and (done % cfg.val_every == 0 or done == last):
            logged = _check(validate, ema, val, done, cfg, keep_candidates)
            if metrics is not None:
                metrics.log_metrics(logged, step=done)
        if on_step is not None:
            on_step(done, val, ema)
        end = done == last or val.stopped
        if done % cfg.checkpoint_every == 0 or end:
            if not math.isfinite(float(distributed.mean(running, dist))):  # never checkpoint diverged weights
                raise _non_finite(label, done, ckpt_dir)
        if dist.is_main and (done % cfg.checkpoint_every == 0 or end):
            last_path = save_checkpoint(ckpt_dir, done, model.state_dict(), ema.state_dict(),
                                        _train_state(optimizer, generator, done, val), meta)
            if metrics is not None:
                metrics.flush()
    progress.finish()
    if last_path is None:  # nothing left to run after a resume
        last_path = _newest(ckpt_dir)
    result = TrainResult(model, ema, done, loss_value, time.perf_counter() - t0, last_path, steps_run=done)
    if validate is not None and val.best_state is not None:
        ema.load_state_dict(val.best_state)
        result.step, result.val_loss, result.converged = val.best_step, val.best, val.stopped
        result.candidates = [(c[0], c[1]) for c in val.candidates] if val.candidates else None
        result.rows, result.candidate_states = val.best_rows, val.candidate_states
    return result


def _check(validate: ValFn, ema: nn.Module, val: Validation, step: int, cfg: TrainConfig, keep=None) -> dict:
    """One validation check; returns what to log (val_loss, and val_loss_<g> per candidate)."""
    with torch.no_grad():
        result = validate(ema)
    rows = result if isinstance(result, RowLosses) else None
    values = (result.mean() if rows is not None else result).reshape(-1).tolist()
    if len(values) == 1:
        val.update(values[0], step, ema, cfg, rows=rows)
        return {"val_loss": values[0]}
    if val.candidates is None:
        val.candidates = [[math.inf, 0, 0, False] for _ in values]
    # a candidate that stopped counts with its best: its later weights are not trained (stages._run_only, cells)
    values = [c[0] if c[3] else v for c, v in zip(val.candidates, values)]
    value = min((v for v in values if math.isfinite(v)), default=math.nan)
    val.update(value, step, ema, cfg, per=values, rows=rows, keep=keep)
    return {"val_loss": value, **{f"val_loss_{g}": v for g, v in enumerate(values)}}


def _non_finite(label: str, step: int, ckpt_dir: Path) -> TrainingError:
    last = _newest(ckpt_dir)
    return TrainingError(f"{label}: the loss became NaN or infinite by step {step} (lower the learning rate?); "
                         f"last good checkpoint: {last or 'none'}")


def _train_state(optimizer, generator, step: int, val: Validation) -> dict:
    return {"optimizer": optimizer.state_dict(), "generator": generator.get_state(), "step": step,
            "validation": val.to_state()}


def _newest(ckpt_dir: Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def _restore(ckpt_dir: Path, model, ema, optimizer, generator) -> tuple[int, Validation]:
    path = _newest(ckpt_dir)
    if path is None:
        raise DataError(f"{ckpt_dir}: no checkpoint to resume from")
    model_state, ema_state, train_state, _ = load_checkpoint(path)
    try:
        model.load_state_dict(model_state)
        ema.load_state_dict(ema_state)
        optimizer.load_state_dict(train_state["optimizer"])
        generator.set_state(train_state["generator"])
        val = Validation.from_state(train_state.get("validation"))
    except (RuntimeError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: checkpoint does not fit this model ({str(exc).splitlines()[0]})") from None
    return int(train_state["step"]), val
