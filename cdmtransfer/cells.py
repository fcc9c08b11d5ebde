"""Batched cells (issue #12): the adapt runs of a sweep that share a training schedule train as one stacked model
in the one loop of train.py, each as it would alone.

A cell is one (mode, m, seed) adapt run. Its cross-validation trains G candidate settings × F folds (adaptation.train_adapt);
here every cell's G·F models, or its one refit model, are *units* of one model: heads stacked like the K source heads
(models.BatchedHeads), encoders grouped into parts (one shared call per fixed encoder, one vmapped StackedEncoder per
learning rate for trainable ones), units ordered part by part. Per cell, as in its own run:
- its own m samples and folds ([rows, n_max, ·] task arrays with counts), its own random stream (a generator seeded
  with its seed draws its rows, times and noise in the order `stages.dsm_objective` does), its own validation noise;
- its own head start, gradient clipping (validation.unit_clipper) and early stopping (train.Validation candidates:
  a cell's length is the step its last candidate stopped; later steps do not change its result);
- its own refit length: the refit runs to the longest and keeps each cell's EMA weights at its own step;
- a cell whose loss turns NaN or infinite is masked out of the loss (its blocks alone go bad), named and failed;
  the others go on.
The cells' final models are then evaluated together (adaptation.evaluate_adapted: one sampler run for all of them,
each with the metrics it gets alone). One cell alone trains exactly as adaptation.train_adapt
(tests/test_batched_cells.py). Tracking stays with the caller
(curves.py): each cell gets its metrics by step, its exported single-head model and its metrics, as run_cell gives.
"""

from __future__ import annotations

import copy
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cdmtransfer.checkpoint import export_model
from cdmtransfer.config import FROM_PRETRAIN, Config
from cdmtransfer.diffusion import OUProcess
from cdmtransfer.models import encoder_spec, model_spec
from cdmtransfer.regularizers import make_objective
from cdmtransfer.head_start import adapt_scale, complete_code, stack_copies, start_scratch
from cdmtransfer.adaptation import (adapt_candidates, adapt_values, candidate_heads, candidate_rate, choice_info,
                                    code_completion_basis, evaluate_adapted, pick_source_head, scratch_ok)
from cdmtransfer.stages import SourceHeads, fresh_encoder, resolve_scale, score_model, training_loss
from cdmtransfer.tasks import TaskSet
from cdmtransfer.train import Validation, lr_at, train
from cdmtransfer.validation import (Candidate, GridEncoder, RowLosses, StackedEncoder, choose, fold_split,
                                    held_out_dsm, unit_clipper, validation_draws)

LOOP_KEYS = ("steps", "batch_size", "lr", "weight_decay", "grad_clip", "ema_decay", "warmup_steps", "log_every",
             "checkpoint_every", "val_every", "patience", "min_delta", "min_delta_se", "val_draws")


def group_key(cfg: Config) -> tuple | None:
    """Cells with equal keys share one loop (the same steps, batch, schedule, folds and model); None: this cell
    trains on its own (adaptation.train_adapt), as regularisers, m < 2 (no folds) and, for now, conv / U-Net heads do."""
    a = cfg.adapt
    folds = fold_split(a.m, a.val_folds)
    if folds is None or make_objective(cfg.regularize, "adapt", OUProcess(1e-3, 1.0), None) is not None \
            or cfg.model.head != "mlp":  # conv / U-Net heads: not yet tested stacked across cells
        return None
    others = {k: v for k, v in cfg.to_dict().items() if k not in ("adapt", "seed", "name", "tracking", "sweep")}
    oracle = a.mode == "oracle"  # its heads read h*(y), whose width need not be the learned code's (Langevin: 50 vs 10)
    return (tuple(getattr(a, k) for k in LOOP_KEYS), folds.count, oracle, repr(sorted(others.items())))


def cell_heads(cfg: Config) -> int:
    """How many heads a cell stacks in cross-validation: its candidate settings × its folds. (A completed encoder,
    compared only where the pretrained code has empty directions the m samples fill, adds one setting's folds to
    this: it is known once the cell's data and encoder are, after the cells are grouped.)"""
    a = cfg.adapt
    folds = fold_split(a.m, a.val_folds)
    return len(adapt_candidates(a, a.mode in FROM_PRETRAIN, scratch_ok(cfg))) * (folds.count if folds else 1)


@dataclass
class Cell:
    """One adapt run of a batched group: its resolved config, data, starting encoder and where its run lives."""

    cfg: Config
    x: torch.Tensor  # its m target samples
    y: torch.Tensor
    enc: torch.nn.Module  # the encoder it starts from (shared by cells that share it: the pretrained one, h*)
    run_id: str = ""
    work_dir: Path = Path(".")
    lineage: dict = field(default_factory=dict)
    source_heads: SourceHeads | None = None
    sink: object = None  # its metrics (MetricRecorder)
    candidates: list = field(default_factory=list)
    start: int | None = None  # the source head its heads start from
    sigma_data: float | None = None  # its heads' σ_d (head_start.adapt_scale); None: its m samples' RMS
    sigma_fresh: float | None = None  # σ_d of its new encoder's heads (cell.fresh; scratch's rule)
    error: str | None = None  # why it failed (a NaN loss), else None
    fresh: torch.nn.Module | None = None  # the encoder a scratch candidate trains (scratch: enc; auto: a new one)
    basis: torch.Tensor | None = None  # the empty code directions its completed candidate fills, if it has one
    eval_cache: Path | None = None  # evaluations shared with the sweep's other cells (eval_cache.py)


def prepare_cells(cells: list[Cell], taskset: TaskSet, process: OUProcess) -> None:
    """Each cell's candidate settings, source head, σ_d and new encoder, as adaptation.train_adapt computes them."""
    for cell in cells:
        a = cell.cfg.adapt
        cell.basis = code_completion_basis(cell.cfg, taskset, cell.enc, cell.source_heads is not None, cell.x,
                                           cell.y)
        cell.candidates = adapt_candidates(a, cell.source_heads is not None, scratch_ok(cell.cfg),
                                           cell.basis is not None)
        uses_source = any(c.head_init == "source" for c in cell.candidates)
        cell.start = pick_source_head(cell.source_heads, cell.x, cell.y, process, a) if uses_source else None
        cell.sigma_data = adapt_scale(cell.cfg, taskset, cell.source_heads if uses_source else None, (cell.x, cell.y))
        if a.mode == "scratch":  # its own encoder is the new one
            cell.fresh, cell.sigma_fresh = cell.enc, cell.sigma_data
        elif any(c.fresh for c in cell.candidates):  # auto's scratch candidate
            cell.fresh = fresh_encoder(cell.cfg, taskset)
            cell.sigma_fresh = adapt_scale(cell.cfg, taskset, None, (cell.x, cell.y), scratch=True)


@dataclass
class Unit:
    cell: int
    cand: Candidate
    rate: float  # the encoder's learning rate (0: fixed)


def _base(cell: Cell, c: Candidate) -> torch.nn.Module:
    """The encoder a candidate of this cell starts from: the new one for a scratch candidate, else cell.enc."""
    return cell.fresh if c.fresh else cell.enc


def _parts(units: list[Unit], cells: list[Cell]) -> list[tuple[tuple, list[int]]]:
    """Units grouped into encoder parts, in order of first appearance: a fixed encoder (one call for all its units),
    or one learning rate and architecture (one stacked encoder, its own parameter group), or fixed copies of one
    architecture (completed encoders: one stacked encoder, not trained)."""
    parts: dict[tuple, list[int]] = {}
    for i, u in enumerate(units):
        enc = _base(cells[u.cell], u.cand)
        key = ("completed", repr(encoder_spec(enc))) if u.cand.complete else ("fixed", id(enc)) if u.rate == 0 else (
            "train", u.rate, repr(encoder_spec(enc)))
        parts.setdefault(key, []).append(i)
    return list(parts.items())


@dataclass
class Stage:
    """A stacked model of units, each of `copies` heads, with what the loop needs to train it."""

    model: torch.nn.Module
    units: list[Unit]
    copies: int
    groups: list[dict]
    trainable: list[tuple[list, torch.Tensor]]  # (parameters, unit ids) of each trainable encoder part
    part_of: list[tuple[int, int]]  # per unit: (its part, its index within the part)
    sd: torch.Tensor | None = None  # per head σ_d (EDM) when cells differ, else None
    on: list[int] = field(default_factory=list)  # the units still training (run_only)
    live_cells: list[int] = field(default_factory=list)  # the cells they belong to, in order
    select: torch.Tensor | None = None  # data row of every running head, rows of live cells stacked in order


def run_only(stage: Stage, on: list[int], rows: int) -> None:
    """From now on only units `on` run (forward, backward, loss): a unit that stopped (its candidate in
    cross-validation, its cell in the refit) costs no more compute. Its weights still take optimizer steps without
    gradients, which nothing reads: its results (best loss and step; refit weights) were kept when it stopped."""
    model, units, copies = stage.model, stage.units, stage.copies
    everyone = len(on) == len(units)
    if not everyone and not hasattr(model.heads, "active"):  # conv / U-Net heads: every unit runs to the end
        return
    device = next(model.heads.parameters()).device
    heads = torch.cat([torch.arange(u * copies, (u + 1) * copies) for u in on]).to(device)
    if hasattr(model.heads, "active"):
        model.heads.active = None if everyone else heads
    parts = list(model.encoder.parts) if isinstance(model.encoder, GridEncoder) else [model.encoder]
    sizes = []
    for p, part in enumerate(parts):
        mine = [(u, j) for u, (q, j) in enumerate(stage.part_of) if q == p]
        live = [j for u, j in mine if u in on]
        sizes.append(len(live) * copies)
        if isinstance(part, StackedEncoder):
            part.active = None if len(live) == len(mine) or not live else torch.cat(
                [torch.arange(j * copies, (j + 1) * copies) for j in live]).to(device)
    if isinstance(model.encoder, GridEncoder):
        model.encoder.sizes = sizes
    if stage.sd is not None:
        model.precond.sd = stage.sd if everyone else stage.sd[heads]
    stage.on = list(on)
    stage.live_cells = sorted({units[u].cell for u in on})
    where = {c: k for k, c in enumerate(stage.live_cells)}
    stage.select = torch.cat([torch.arange(rows) + where[units[u].cell] * rows for u in on]).to(device)


def build_stage(cells: list[Cell], units: list[Unit], copies: int, taskset: TaskSet, device, data: list) -> Stage:
    """The stacked model: unit u owns heads u·copies … (u + 1)·copies − 1, started as its cell's run starts them
    (torch seed cfg.seed + 2, or the chosen source head; linear means fitted to the cell's `data`[c] = (x, y, counts)
    of its `copies` heads), and its cell's encoder (a copy where it trains)."""
    parts = _parts(units, cells)
    order = [i for _, ids in parts for i in ids]
    units = [units[i] for i in order]
    encoders, sizes, trainable, part_of, k = [], [], [], [None] * len(units), 0
    starts = [start_scratch(_base(cells[u.cell], u.cand), *data[u.cell]) if u.cand.fresh else
              complete_code(cells[u.cell].enc, cells[u.cell].basis, *data[u.cell]) if u.cand.complete else None
              for u in units]  # scratch's copies, each started on its own rows (head_start.start_scratch); likewise
    # the completed encoders (head_start.complete_code)
    for p, (key, ids) in enumerate(parts):
        bases = [_base(cells[u.cell], u.cand) for u in units[k:k + len(ids)]]
        if key[0] == "fixed":
            enc = bases[0]
        elif any(starts[k + j] is not None for j in range(len(ids))):
            enc = stack_copies([e for j in range(len(ids)) for e in (starts[k + j] or [bases[j]] * copies)])
        elif len(ids) * copies == 1:
            enc = copy.deepcopy(bases[0]).requires_grad_(True)  # a lone run trains its plain encoder
        else:
            enc = StackedEncoder.of(bases, copies) if len(set(map(id, bases))) > 1 else StackedEncoder(bases[0],
                                                                                                      len(ids) * copies)
        encoders.append(enc)
        sizes.append(len(ids) * copies)
        for j in range(len(ids)):
            part_of[k + j] = (p, j)
        if key[0] == "train":
            trainable.append((list(enc.parameters()), torch.arange(k, k + len(ids), device=device)))
        k += len(ids)
    first = cells[units[0].cell]
    encoder = encoders[0] if len(encoders) == 1 else GridEncoder(encoders, copies, sizes)
    scales = [_sigma_data(cells[u.cell], u.cand) for u in units]
    model = score_model(first.cfg, encoder, len(units) * copies, taskset, first.x, scales[0])
    sd = None
    if model.precond is not None and len(set(scales)) > 1:  # EDM: each head keeps its cell and candidate's σ_d
        sd = model.precond.sd = torch.tensor(scales).repeat_interleave(copies)[:, None, None].to(device)
    heads = [_unit_heads(cells[u.cell], u.cand, copies, taskset, data[u.cell], start)
             for u, start in zip(units, starts)]
    model.heads.load_state_dict({name: torch.cat([h[name] for h in heads]) for name in heads[0]})
    for enc, (key, _) in zip(encoders, parts):
        enc.requires_grad_(key[0] == "train")
    groups = [{"params": list(model.heads.parameters()), "lr": first.cfg.adapt.lr}]
    groups += [{"params": params, "lr": key[1]} for (params, _), (key, _) in
               zip(trainable, [p for p in parts if p[0][0] == "train"])]
    stage = Stage(model.to(device), units, copies, groups, trainable, part_of, sd)
    run_only(stage, list(range(len(units))), copies)
    return stage


def _sigma_data(cell: Cell, cand: Candidate) -> float:
    """The σ_d of a cell's candidate's models (adaptation.train_adapt): its new encoder's (a scratch candidate), the
    source heads', else its m samples' second moment."""
    return resolve_scale(cell.sigma_fresh if cand.fresh else cell.sigma_data, cell.x)


def _unit_heads(cell: Cell, cand: Candidate, copies: int, taskset: TaskSet, data: tuple,
                started: list | None = None) -> dict:
    """The `copies` heads a lone run of this cell and candidate starts from (adaptation.candidate_heads), on `data` =
    (x, y, counts) of those heads; `started`: scratch's encoder copies, when start_scratch started them."""
    enc = _base(cell, cand) if started is None else stack_copies(started)
    return candidate_heads(cell.cfg, taskset, cand, copies, data, _sigma_data(cell, cand), enc,
                           fit=not cand.fresh or started is not None, source_heads=cell.source_heads, start=cell.start)


def _pack(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], device):
    """Task arrays of several cells, [rows_c, n_c, ·] each, stacked as [Σ rows, max n, ·] with their counts."""
    n = max(x.shape[1] for x, _, _ in parts)
    pad = lambda a: torch.nn.functional.pad(a, (0, 0, 0, n - a.shape[1]))  # noqa: E731
    x = torch.cat([pad(x) for x, _, _ in parts]).to(device)
    y = torch.cat([pad(y) for _, y, _ in parts]).to(device)
    return x, y, torch.cat([c for _, _, c in parts]).to(device)


def cell_clipper(stage: Stage, U: int, max_norm: float):
    """Per-unit clipping (validation.unit_clipper) of a loss that sums the units' own means (_loss_fn): count 1."""
    if U == 1:
        return None
    clip = unit_clipper(stage.model, stage.trainable, U, max_norm)
    clip.count = 1
    return clip


def _select(stage: Stage, rows: int, device) -> torch.Tensor:
    """Data row of every head: unit u's copy f sees row f of its cell's `rows` rows."""
    return torch.cat([torch.arange(rows) + u.cell * rows for u in stage.units]).to(device)


class CellSink:
    """The one loop's metrics split into each cell's own curves, as its own run would log them: its loss is the
    mean over its running units' rows (fed by the loss; its own run also averages in candidates that have stopped,
    which here no longer run), its grad_norm its units' largest (the clipper's norms), its val_loss the lowest of
    its units' (and val_loss_<g> per candidate when it has several)."""

    def __init__(self, cells: list[Cell], stage: Stage, prefix: str, cfg, clip):
        self.cells, self.prefix, self.cfg, self.clip = cells, prefix, cfg, clip
        self.unit_cell = torch.tensor([u.cell for u in stage.units])
        self.of_cell = [[i for i, u in enumerate(stage.units) if u.cell == c] for c in range(len(cells))]
        self.sum, self.steps = torch.zeros(len(cells)), 0
        self.bad = torch.zeros(len(cells), dtype=torch.long)  # steps with a non-finite loss (one host sync per log)
        self.stage, self.on = stage, None
        self.done: dict[int, int] = {}  # cell -> the step its training ended
        self.final = [math.nan] * len(cells)
        self.logged = [0] * len(cells)

    def add(self, losses: torch.Tensor) -> torch.Tensor:
        """Record one step's per-sample losses [running units · copies, B]; returns them with non-finite values
        zeroed, so one cell's NaN reaches neither the others nor the loop's check (its own blocks go bad: it fails)."""
        if self.unit_cell.device != losses.device:  # the accumulators live where the losses do (no sync per step)
            self.unit_cell, self.sum, self.bad = (a.to(losses.device) for a in (self.unit_cell, self.sum, self.bad))
        if self.on is not self.stage.on:  # the running units changed (run_only)
            self.on = self.stage.on
            self.on_cell = self.unit_cell[torch.tensor(self.on, device=losses.device)]
            self.per_cell = torch.bincount(self.on_cell, minlength=len(self.cells)).clamp_min(1)
        finite = torch.isfinite(losses)
        per_unit = losses.detach().view(len(self.on), -1)
        ok = finite.view(len(self.on), -1).all(1)
        self.bad.index_add_(0, self.on_cell, (~ok).long())
        self.sum += torch.zeros_like(self.sum).index_add(0, self.on_cell, per_unit.mean(1)) / self.per_cell
        self.steps += 1
        return torch.where(finite, losses, torch.zeros((), dtype=losses.dtype))

    def _emit(self, c: int, values: dict, step: int) -> None:
        if c not in self.done or step == self.done[c]:
            self.cells[c].sink.log_metrics({self.prefix + k: v for k, v in values.items()}, step=step)

    def _train_values(self, c: int, step: int, grad_norm: float) -> dict:
        loss = float(self.sum[c]) / max(1, self.steps)
        self.final[c], self.logged[c] = loss, step
        norms = getattr(self.clip, "norms", None)
        if norms is not None:
            grad_norm = float(norms[self.of_cell[c]].max())
        return {"loss": loss, "lr": self.cfg.lr * lr_at(step - 1, self.cfg), "grad_norm": grad_norm}

    def log_metrics(self, values: dict, step: int) -> None:
        if "loss" in values:
            for c in range(len(self.cells)):
                if c not in self.done:  # an ended cell's last values (end) stay its own
                    self._emit(c, self._train_values(c, step, values["grad_norm"]), step)
            self.sum.zero_()
            self.steps = 0
            self.check()
        if "val_loss" in values:
            for c, units in enumerate(self.of_cell):
                own = [values[f"val_loss_{u}"] for u in units] if f"val_loss_{units[0]}" in values \
                    else [values["val_loss"]]
                out = {"val_loss": min((v for v in own if math.isfinite(v)), default=math.nan)}
                if len(own) > 1:
                    out.update({f"val_loss_{g}": v for g, v in enumerate(own)})
                self._emit(c, out, step)

    def end(self, c: int, step: int) -> None:
        """Cell c's training ends at `step`: its last partial interval is logged as its own run's last step is."""
        if c in self.done:
            return
        if self.logged[c] != step:
            self.done[c] = step
            # the mean since the last log: the loop's running sum is shared, so log this cell's from its own
            self._emit(c, self._train_values(c, step, math.nan), step)
        self.done[c] = step

    def check(self) -> None:
        """Name and fail the cells whose loss went non-finite (they stop logging)."""
        for c in torch.nonzero(self.bad).flatten().cpu().tolist():
            if self.cells[c].error is None:
                self.cells[c].error = (f"adapt {self.cells[c].cfg.adapt.mode} m={self.cells[c].cfg.adapt.m} "
                                       f"seed={self.cells[c].cfg.seed}: the loss became NaN or infinite by step "
                                       f"{self.logged[c] or '?'}; the other cells went on")
                self.done.setdefault(c, -1)

    def flush(self) -> None:
        pass


def _loss_fn(stage: Stage, x, y, counts, rows: int, process: OUProcess, batch: int, sink, gens):
    """Per-sample DSM losses [running units · copies, batch]: every live cell draws its rows, times and noise from
    its own generator as stages.dsm_objective draws them for its `rows` tasks; its units (candidates) share them."""
    d_x = x.shape[-1]

    def loss_fn(model, _gen):
        idx, ts, noises = [], [], []
        for c in stage.live_cells:  # a loop over cells (few), each drawing its whole batch at once
            gen, part = gens[c], slice(c * rows, (c + 1) * rows)
            idx.append((torch.rand(rows, batch, generator=gen, device=x.device) * counts[part, None]).long())
            ts.append(process.sample_t((rows, batch), gen, device=x.device))
            noises.append(torch.randn((rows, batch, d_x), generator=gen, device=x.device))
        live = torch.cat([torch.arange(c * rows, (c + 1) * rows) for c in stage.live_cells]).to(x.device)
        idx = torch.cat(idx)
        x0 = torch.gather(x[live], 1, idx[..., None].expand(-1, -1, d_x))[stage.select]
        yb = torch.gather(y[live], 1, idx[..., None].expand(-1, -1, y.shape[-1]))[stage.select]
        t, noise = torch.cat(ts)[stage.select], torch.cat(noises)[stage.select]
        return sink.add(training_loss(model, x0, yb, t, noise, process))

    # Σ over running units of each unit's own mean loss: every unit's gradient is bit for bit its lone run's, however
    # many units still run (a mean over all of them, undone by ×n in the clipper, rounds differently for each n)
    loss_fn.reduce = lambda losses: losses.view(len(stage.on), -1).mean(1).sum()
    return loss_fn


def _generators(cells: list[Cell], device) -> list[torch.Generator]:
    return [torch.Generator(device=device or "cpu").manual_seed(c.cfg.seed) for c in cells]


def _unit_state(val: Validation, u: int) -> tuple[float, int, bool]:
    """(best loss, its step, stopped) of unit u; a lone unit is the loop's scalar validation."""
    if val.candidates is None:
        return val.best, val.best_step, val.stopped
    c = val.candidates[u]
    return c[0], c[1], c[3]


def train_cells(cells: list[Cell], taskset: TaskSet, *, device=None) -> list[dict | None]:
    """Cross-validate and refit every cell in two stacked loops, export and evaluate each; per cell the dict
    curves.run_cell returns (metrics, skipped, model_dir, history via its sink, choice), or None for a failed cell
    (`Cell.error` says why). All cells share group_key."""
    a = cells[0].cfg.adapt
    process = OUProcess(cells[0].cfg.diffusion.T0, cells[0].cfg.diffusion.T)
    prepare_cells(cells, taskset, process)
    folds = fold_split(a.m, a.val_folds)
    F = folds.count
    with tempfile.TemporaryDirectory(prefix="cdmtransfer-cells-") as tmp:
        cv = _cross_validate(cells, taskset, process, F, device, Path(tmp) / "cv")
        live = [c for c in range(len(cells)) if cells[c].error is None]
        refit = _refit([cells[c] for c in live], [cv[c] for c in live], taskset, process, device, Path(tmp) / "fit")
    done = [(c, got) for c, got in zip(live, refit) if got is not None]
    evaluated = evaluate_adapted([ema for _, (ema, _) in done], taskset, [cells[c].cfg for c, _ in done],
                                 eval_cache=cells[0].eval_cache, device=device)  # every cell's model at once
    out: list[dict | None] = [None] * len(cells)
    for (c, (ema, fit)), evaluation in zip(done, evaluated):
        cell = cells[c]
        chosen, losses, cv_stats = cv[c]
        model_dir = export_model(cell.work_dir / "model", ema.state_dict(), _meta(cell, ema, taskset))
        values, skipped = adapt_values(cell.cfg, taskset, ema, cell.work_dir, cv_stats, cell.candidates, chosen,
                                       losses, cell.start, evaluated=evaluation, **fit)
        out[c] = {"metrics": values, "skipped": skipped, "model_dir": str(model_dir),
                  "history": getattr(cell.sink, "records", []),
                  "choice": choice_info(cell.cfg.adapt.mode, cell.candidates, chosen, losses,
                                        cell.cfg.adapt.select_margin, cell.cfg.adapt.min_delta_se)}
    return out


def _meta(cell: Cell, model, taskset: TaskSet) -> dict:
    """The exported model's meta.json, as adaptation.train_adapt writes it."""
    return {"stage": "adapt", "mode": cell.cfg.adapt.mode, "model": model_spec(model), "config": cell.cfg.to_dict(),
            "run_id": cell.run_id, "lineage": cell.lineage, "taskset": taskset.summary()}


def _cross_validate(cells, taskset, process, F, device, ckpt: Path) -> list:
    """Stage 1: every cell's G candidates × F folds; per cell (chosen candidate, [(loss, step)], cv_stats)."""
    a = cells[0].cfg.adapt
    units = [Unit(c, cand, candidate_rate(cand, cell.cfg.adapt.lr)) for c, cell in enumerate(cells)
             for cand in cell.candidates]
    split = [fold_split(cell.cfg.adapt.m, a.val_folds).gather(cell.x, cell.y) for cell in cells]
    stage = build_stage(cells, units, F, taskset, device, [s[0] for s in split])
    x, y, n = _pack([s[0] for s in split], device)
    draws = [validation_draws(xv, process, a.val_draws, cell.cfg.seed + 17) for (_, (xv, _, _)), cell in
             zip(split, cells)]  # each cell's own fixed validation noise, as its own run draws it
    n_v = max(d[1].shape[2] for d in draws)
    pad = torch.nn.functional.pad  # padding rows (masked out) get zeros, and t = 1 so that log t stays finite
    x_t = torch.cat([pad(d[0], (0, 0, 0, n_v - d[0].shape[2])) for d in draws], 1).to(device)
    t = torch.cat([pad(d[1], (0, n_v - d[1].shape[2]), value=1.0) for d in draws], 1).to(device)
    noise = torch.cat([pad(d[2], (0, 0, 0, n_v - d[2].shape[2])) for d in draws], 1).to(device)
    _, yv, nv = _pack([s[1] for s in split], device)
    select = _select(stage, F, device)
    per_head = held_out_dsm(x_t, t, noise, yv, nv, select)
    head_counts = nv[select]
    U = len(stage.units)

    def validate(model):
        return RowLosses.of_heads(per_head(model), head_counts, U)

    clip = cell_clipper(stage, U, a.grad_clip)
    sink = CellSink(cells, stage, "cv/", a, clip)
    of_cell = sink.of_cell

    seen: dict = {}

    def on_step(done: int, val: Validation, _ema) -> None:  # a cell stops when its last candidate has
        seen["val"] = val
        for c, ids in enumerate(of_cell):
            if c not in sink.done and all(_unit_state(val, u)[2] for u in ids):
                sink.end(c, done)
        on = [u for u in stage.on if not _unit_state(val, u)[2] and units_cell_live(u)]
        if on and on != stage.on:
            run_only(stage, on, F)

    def units_cell_live(u: int) -> bool:
        return cells[stage.units[u].cell].error is None

    loss_fn = _loss_fn(stage, x, y, n, F, process, a.batch_size, sink, _generators(cells, device))
    result = train(stage.model, stage.groups, loss_fn, a, seed=cells[0].cfg.seed, ckpt_dir=ckpt,
                   meta={"stage": "adapt-cells"}, metrics=sink, validate=validate, device=device, clip=clip,
                   on_step=on_step)
    sink.check()
    val = seen["val"]
    out = []
    for c, ids in enumerate(of_cell):
        cell = cells[c]
        by_cand = {stage.units[u].cand: _unit_state(val, u) for u in ids}
        losses = [by_cand[cand][:2] for cand in cell.candidates]  # (best loss, its step) in candidate order
        order = [next(u for u in ids if stage.units[u].cand == cand) for cand in cell.candidates]
        rows = val.best_rows and RowLosses(val.best_rows.values[order], val.best_rows.weights[order])
        chosen = choose([loss for loss, _ in losses], cell.cfg.adapt.select_margin, rows,
                        cell.cfg.adapt.min_delta_se)
        stopped = all(by_cand[cand][2] for cand in cell.candidates)
        best, best_step = losses[0]  # a lone candidate's; several: the chosen one's replaces it (adapt_values)
        cv_stats = {"cv_best_step": float(best_step), "cv_steps_run": float(sink.done.get(c, result.steps_run)),
                    "cv_val_loss": best if math.isfinite(best) else float("nan"),
                    "cv_converged": float(bool(stopped)), "cv_seconds": result.seconds}
        out.append((chosen, losses, cv_stats))
    return out


def _refit(cells: list[Cell], cv: list, taskset, process, device, ckpt: Path) -> list:
    """Stage 2: every cell's chosen setting on all its m samples, for its own s*·F/(F − 1) steps (stop_at), in one
    loop run to the longest; each cell's EMA weights are kept at its own last step. Per cell (ema model, fit
    values) or None when it failed."""
    if not cells:
        return []
    a = cells[0].cfg.adapt
    F = fold_split(a.m, a.val_folds).count
    picks = [cell.candidates[cv[c][0]] for c, cell in enumerate(cells)]
    units = [Unit(c, pick, candidate_rate(pick, cell.cfg.adapt.lr)) for c, (cell, pick) in enumerate(zip(cells, picks))]
    stop = [min(cell.cfg.adapt.steps, math.ceil(cv[c][1][cv[c][0]][1] * F / (F - 1))) for c, cell in enumerate(cells)]
    data = [(cell.x[None], cell.y[None], torch.tensor([len(cell.x)])) for cell in cells]
    stage = build_stage(cells, units, 1, taskset, device, data)
    x, y, n = _pack(data, device)
    U = len(stage.units)
    clip = cell_clipper(stage, U, a.grad_clip)
    sink = CellSink(cells, stage, "", a, clip)
    unit_of = {u.cell: i for i, u in enumerate(stage.units)}
    kept: dict[int, object] = {c: _extract(stage, unit_of[c], cells[c], taskset, stage.model)
                               for c in range(len(cells)) if stop[c] == 0}
    for c in kept:  # chosen at step 0 (the start beat every trained step): nothing to train, nothing more to log
        sink.end(c, 0)
    if kept and len(kept) < len(cells):
        run_only(stage, [u for u in range(U) if stop[stage.units[u].cell] > 0], 1)

    def on_step(done: int, _val, ema) -> None:  # a cell's refit ends at its own step: keep its EMA weights then
        for c in range(len(cells)):
            if stop[c] == done:
                kept[c] = _extract(stage, unit_of[c], cells[c], taskset, ema)
                sink.end(c, done)
        on = [u for u in stage.on if stop[stage.units[u].cell] > done and cells[stage.units[u].cell].error is None]
        if on and on != stage.on:
            run_only(stage, on, 1)

    loss_fn = _loss_fn(stage, x, y, n, 1, process, a.batch_size, sink, _generators(cells, device))
    result = None
    if max(stop) > 0:
        result = train(stage.model, stage.groups, loss_fn, a, seed=cells[0].cfg.seed, ckpt_dir=ckpt,
                       meta={"stage": "adapt-cells"}, metrics=sink, device=device, clip=clip, stop_at=max(stop),
                       on_step=on_step)
    sink.check()
    out = []
    for c, cell in enumerate(cells):
        if cell.error is not None:
            out.append(None)
            continue
        ema = kept[c]
        rate = stage.units[unit_of[c]].rate
        trainable = sum(p.numel() for p in ema.heads.parameters()) + (
            sum(p.numel() for p in ema.encoder.parameters()) if rate > 0 else 0)
        out.append((ema, {"final_loss": sink.final[c], "seconds": result.seconds if result else 0.0,
                          "steps": stop[c], "trainable": trainable}))
    return out


def _extract(stage: Stage, u: int, cell: Cell, taskset: TaskSet, source) -> torch.nn.Module:
    """Unit u (one head) of a stacked model as the single-head model its own run would export."""
    cand = stage.units[u].cand
    model = score_model(cell.cfg, copy.deepcopy(_base(cell, cand)), 1, taskset, cell.x, _sigma_data(cell, cand))
    U = len(stage.units)
    heads = {k: v.detach().reshape(U, -1)[u].reshape(model.heads.state_dict()[k].shape).clone()
             for k, v in source.heads.state_dict().items()}
    p, j = stage.part_of[u]
    part = source.encoder.parts[p] if isinstance(source.encoder, GridEncoder) else source.encoder
    if isinstance(part, StackedEncoder):
        enc = {name: tensor[j].detach().clone() for name, tensor in zip(part.names, part.stacked)}
    else:
        enc = {k: v.detach().clone() for k, v in part.state_dict().items()}
    model.heads.load_state_dict(heads)
    model.encoder.load_state_dict(enc)
    return model.requires_grad_(False)
