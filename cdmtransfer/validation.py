"""Held-out data for training to convergence: which rows validate, the validation loss, and fold models.

pretrain holds out `val_fraction` of each source task's rows; adapt splits its m samples into F folds and trains F
fold models at once (heads stacked like the K source heads, encoders stacked with torch.func where they train), for
each of G candidate settings (G·F models in one batch) when it also chooses settings (`Candidate`, `choose`).
The validation loss is the held-out DSM of theory.md §1.3 in ε-space, ‖ε̂ − ε‖² averaged over t ~ Unif[T0, T],
with noise drawn once, so it is a deterministic function of the weights.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vmap

from cdmtransfer.diffusion import OUProcess, dsm_loss
from cdmtransfer.models import MLPEncoder

MAX_VAL_ROWS = 256  # per source task: enough for a stable mean, cheap to evaluate every val_every steps


@dataclass
class RowSplit:
    """A subset of the rows of [K, n_max, ·] task arrays: mask [K, n_max]."""

    mask: torch.Tensor

    def gather(self, x: torch.Tensor, y: torch.Tensor):
        """The selected rows packed to the front of each task: ([K, n', d_x], [K, n', D_y], counts [K])."""
        counts = self.mask.sum(1)
        order = torch.argsort((~self.mask).to(torch.int8), dim=1, stable=True)[:, : int(counts.max())]
        pick = lambda a: torch.gather(a, 1, order[..., None].expand(-1, -1, a.shape[-1]))  # noqa: E731
        return pick(x), pick(y), counts


def holdout_split(counts: torch.Tensor, fraction: float, seed: int) -> tuple[RowSplit, RowSplit | None]:
    """Hold out round(fraction · n_k) rows of each task (at most MAX_VAL_ROWS, at least one training row left).

    The rows are drawn by a permutation fixed by `seed`; fraction 0 validates nothing (None).
    """
    K, n_max = len(counts), int(counts.max())
    g = torch.Generator().manual_seed(seed)
    keys = torch.rand(K, n_max, generator=g)
    valid = torch.arange(n_max)[None] < counts[:, None]
    rank = torch.argsort(torch.argsort(keys.masked_fill(~valid, 2.0), dim=1), dim=1)  # random rank of each row
    held = torch.clamp((fraction * counts).round().long(), max=MAX_VAL_ROWS).minimum(counts - 1).clamp_min(0)
    val = valid & (rank < held[:, None])
    if fraction <= 0 or not bool(held.all()):
        return RowSplit(valid), None
    return RowSplit(valid & ~val), RowSplit(val)


@dataclass
class Folds:
    """m samples in F interleaved folds: fold f validates on rows f, f + F, … and trains on the rest."""

    m: int
    count: int

    def gather(self, x: torch.Tensor, y: torch.Tensor):
        """((x, y, n) training, (x, y, n) held out), each stacked over folds as [F, rows, ·] task arrays."""
        fold = torch.arange(self.m) % self.count
        held = fold[None] == torch.arange(self.count)[:, None]  # [F, m]
        xs, ys = x.expand(self.count, *x.shape), y.expand(self.count, *y.shape)
        return RowSplit(~held).gather(xs, ys), RowSplit(held).gather(xs, ys)


def fold_split(m: int, folds: int) -> Folds | None:
    """F = min(folds, m) folds of the m samples; None when m < 2 leaves nothing to hold out, or folds = 1 (off)."""
    return Folds(m, min(folds, m)) if m >= 2 and folds >= 2 else None


def dsm_validation(x: torch.Tensor, y: torch.Tensor, counts: torch.Tensor, process: OUProcess, draws: int,
                   seed: int, chunk_rows: int = 8192, per_task: bool = False, repeat: int = 1, rows: bool = False):
    """validate(model) → mean over tasks of the held-out ε-space DSM, E_t ‖ε̂_k(x_t, y, t) − ε‖² (theory.md §1.3)
    (`per_task`: the [K] values instead; `rows`: the check row by row, `RowLosses`, whose mean is the same value).

    x [K, n, d_x], y [K, n, D_y], counts [K] (rows past counts[k] are padding). `draws` (t, ε) pairs per row are
    drawn once here, so the value depends on the weights alone; evaluated in chunks of draws to bound memory.
    `repeat` = G: the model stacks G candidates of K heads each (head g·K + k), all scored on task k's rows with the
    same noise, so candidates compare on equal terms; per_task then gives [G·K] values, else the [G] means.
    """
    K = x.shape[0]
    per_row = held_out_dsm(*validation_draws(x, process, draws, seed), y, counts,
                           torch.arange(K, device=x.device).repeat(repeat), chunk_rows)
    head_counts = counts.repeat(repeat)

    def validate(model: nn.Module):
        per = per_row(model)
        if per_task:
            return per.sum(1) / head_counts  # padding rows hold 0
        losses = RowLosses.of_heads(per, head_counts, repeat)
        return losses if rows else (losses.mean() if repeat > 1 else losses.mean()[0])

    return validate


def validation_draws(x: torch.Tensor, process: OUProcess, draws: int, seed: int):
    """The fixed (x_t, t, ε) of a validation on rows x [K, n, d_x]: t [draws, K, n], ε and x_t [draws, K, n, d_x]."""
    K, n, _ = x.shape
    g = torch.Generator().manual_seed(seed)
    t = process.sample_t((draws, K, n), g).to(x.device)
    noise = torch.randn((draws, *x.shape), generator=g).to(x.device)
    return process.perturb(x, t, noise), t, noise


def held_out_dsm(x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, y: torch.Tensor, counts: torch.Tensor,
                 select: torch.Tensor, chunk_rows: int = 8192):
    """validate(model) → [H, n]: head h's held-out DSM on each data row of task select[h] (`validation_draws`),
    averaged over the row's draws, 0 on rows past counts (padding); chunked over draws, each chunk batched over
    heads and rows."""
    draws, K, n = t.shape
    H = len(select)
    mask = (torch.arange(n, device=t.device)[None] < counts[:, None]).float()[select]  # [H, n]
    per_chunk = max(1, chunk_rows // max(1, H * n))

    @torch.no_grad()
    def validate(model: nn.Module) -> torch.Tensor:
        total = torch.zeros(H, n, device=t.device)
        for i in range(0, draws, per_chunk):  # a loop over chunks of noise draws, each batched over tasks and rows
            j = min(draws, i + per_chunk)
            r = j - i
            eps = model(x_t[i:j].transpose(0, 1).reshape(K, r * n, -1)[select], y.repeat(1, r, 1)[select],
                        t[i:j].transpose(0, 1).reshape(K, r * n)[select])
            target = noise[i:j].transpose(0, 1).reshape(K, r * n, -1)[select]
            total += dsm_loss(eps, target).view(H, r, n).sum(1)
        return total * mask / draws

    return validate


@dataclass
class RowLosses:
    """One validation check row by row: values [G, R], each held-out row's DSM averaged over its noise draws, and
    weights [G, R] (each candidate's sum to 1; 0 on padding), so that candidate g's loss is its weighted mean. Two
    checks score the same rows with the same noise, so their difference is a paired mean with a standard error."""

    values: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def of_heads(cls, per_row: torch.Tensor, counts: torch.Tensor, groups: int) -> "RowLosses":
        """Per-row losses of H heads [H, n] (rows past counts[h] padding) as `groups` candidates of H/groups heads
        each: a candidate's loss is the mean over its heads (tasks, or folds) of each head's mean over its rows."""
        H, n = per_row.shape
        mask = torch.arange(n, device=per_row.device)[None] < counts[:, None]
        weights = mask / counts.clamp_min(1)[:, None] / (H // groups)
        return cls(per_row.reshape(groups, -1), weights.reshape(groups, -1))

    def mean(self) -> torch.Tensor:
        return (self.values * self.weights).sum(1)

    def gain_se(self, before: torch.Tensor) -> torch.Tensor:
        """[G] the standard error of the gain mean(before) − mean(self), from the rows' paired differences
        (`before`: an earlier check's values [G, R] on the same rows and noise)."""
        diff = before - self.values
        gain = (self.weights * diff).sum(1, keepdim=True)
        rows = (self.weights > 0).sum(1)
        var = (self.weights**2 * (diff - gain) ** 2).sum(1) * rows / (rows - 1).clamp_min(1)
        return var.sqrt()


class StackedEncoder(nn.Module):
    """F independent copies of an encoder, each applied to its own slice of a [F, B, D_y] batch in one vmapped call
    (torch.func.functional_call over stacked parameters): fold models that train their encoders never share one."""

    def __init__(self, encoder: nn.Module, copies: int):
        super().__init__()
        params = dict(encoder.named_parameters())
        self.names = list(params)
        self.stacked = nn.ParameterList(
            nn.Parameter(p.detach().clone().expand(copies, *p.shape).clone()) for p in params.values())
        self.__dict__["_base"] = copy.deepcopy(encoder).requires_grad_(False)  # the function; not a submodule
        self.d, self.D_y, self.copies = encoder.d, encoder.D_y, copies
        self.active: torch.Tensor | None = None  # when set, only these copies run (batched cells still training)

    @classmethod
    def of(cls, encoders: list[nn.Module], copies: int) -> "StackedEncoder":
        """`copies` copies of each of several encoders of one architecture, encoder i owning copies i·copies, …
        (batched cells: every cell's own encoder, from its own start)."""
        stacked = cls(encoders[0], copies * len(encoders))
        with torch.no_grad():
            for k, name in enumerate(stacked.names):
                rows = [dict(e.named_parameters())[name].detach().expand(copies, *stacked.stacked[k].shape[1:])
                        for e in encoders]
                stacked.stacked[k].copy_(torch.cat(rows))
        return stacked

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        params = tuple(self.stacked) if self.active is None else tuple(p[self.active] for p in self.stacked)
        if isinstance(self._base, MLPEncoder):  # the common case, as batched matmuls (vmap costs ~4x more per call)
            linear = self._base.linear is not None  # its linear path: the last two parameters
            net = params[:-2] if linear else params
            z, last = y, len(net) // 2 - 1
            for i in range(0, len(net), 2):  # nn.Linear layout: weight [copies, out, in], bias [copies, out]
                z = torch.baddbmm(net[i + 1][:, None], z, net[i].transpose(1, 2))
                if i // 2 < last:
                    z = nn.functional.silu(z)
            return torch.baddbmm(z + params[-1][:, None], y, params[-2].transpose(1, 2)) if linear else z

        def one(params, rows):
            return functional_call(self._base, dict(zip(self.names, params)), (rows,))

        return vmap(one)(params, y)


class GridEncoder(nn.Module):
    """The encoders of G stacked candidates, each owning `copies` consecutive rows of a [G·copies, B, D_y] batch:
    a trainable candidate is a StackedEncoder (its own parameter group, so its own learning rate), a frozen one the
    plain encoder (no parameters to train). Adapt's cross-validation trains every candidate setting at once."""

    def __init__(self, parts: list[nn.Module], copies: int, sizes: list[int] | None = None):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.copies, self.d, self.D_y = copies, parts[0].d, parts[0].D_y
        self.sizes = sizes  # rows of each part when they differ (batched cells), else `copies` each

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        sizes = self.sizes or [self.copies] * len(self.parts)
        return torch.cat([part(rows) for part, rows, n in zip(self.parts, y.split(sizes), sizes) if n])


@dataclass(frozen=True)
class Candidate:
    """One setting adapt's cross-validation compares: the encoder's learning rate as a multiple of the head's (0: the
    encoder stays frozen; None: it is not the pretrained encoder's to train, scratch/oracle) and the head's start;
    fresh: a new encoder trained at the head's rate, as scratch trains it (auto's scratch candidate, and scratch);
    complete: the pretrained encoder with its empty code directions filled from the rows (head_start.complete_code),
    then fixed."""

    encoder_mult: float | None = None
    head_init: str = "random"
    fresh: bool = False
    complete: bool = False

    @property
    def mode(self) -> str:
        """What the setting amounts to: scratch (a new encoder), frozen (encoder fixed) or finetune (trained, or
        completed from the target rows)."""
        return "scratch" if self.fresh else "finetune" if self.encoder_mult or self.complete else "frozen"

    def label(self) -> str:
        enc = "new encoder" if self.fresh else "completed encoder" if self.complete else "" if (
            self.encoder_mult is None) else ("frozen encoder" if not self.encoder_mult else
                                             f"encoder lr {self.encoder_mult:g}x")
        return ", ".join(p for p in (enc, f"head {self.head_init}") if p)


def unit_clipper(model: nn.Module, parts: list[tuple[list[nn.Parameter], torch.Tensor]], U: int, max_norm: float):
    """clip() for U stacked units (adapt's candidate settings; batched cells: cell × candidate) trained on the mean
    loss over all of them, each clipped as clip_grad_norm_ would clip it alone: unit u owns block u of every head
    tensor and, for each trainable part (params, ids), block k of its tensors where ids[k] = u. Each unit's gradient is scaled by U (what a run of its own gets from its own mean
    loss; clip.count when only that many units are in the loss) and clipped by its own norm; the norms stay in
    clip.norms; returns the largest finite one."""
    heads = list(model.heads.parameters())

    @torch.no_grad()
    def clip() -> torch.Tensor:
        n = clip.count  # units in the loss (those still training; their mean loss is the loop's)
        grads = [p.grad for p in heads if p.grad is not None]
        sq = sum(_row_norms(g, U).square() for g in grads) * n**2
        for params, ids in parts:
            owned = [_row_norms(p.grad, len(ids)).square() for p in params if p.grad is not None]
            if owned:
                sq = sq.index_add(0, ids, sum(owned) * n**2)
        norms = sq.sqrt()
        scale = n * ((max_norm / (norms + 1e-6)).clamp(max=1.0) if max_norm > 0 else torch.ones_like(norms))
        for g in grads:
            g.view(U, -1).mul_(scale[:, None])
        for params, ids in parts:
            for p in params:
                if p.grad is not None:
                    p.grad.view(len(ids), -1).mul_(scale[ids][:, None])
        clip.norms = norms
        return norms.nan_to_num(0.0, 0.0, 0.0).max()

    clip.count = U
    return clip


def _row_norms(grad: torch.Tensor, rows: int) -> torch.Tensor:
    """‖block r‖ of a gradient split into `rows` equal blocks: one pass, no squared copy (3.5× faster than pow/sum)."""
    return torch.linalg.vector_norm(grad.view(rows, -1), dim=1)


def choose(losses: list[float], margin: float = 0.0, rows: RowLosses | None = None,
           se_margin: float = 0.0) -> int:
    """The first (simplest) candidate whose cross-validated loss is within `margin` (relative) of the lowest, and,
    given each candidate's best check row by row (`rows`, scored on the same rows and noise), within `se_margin`
    standard errors of their paired difference (the one-standard-error rule): a more complex setting must win by
    more than the selection noise, so that noise does not pick it on a near tie."""
    finite = [v for v in losses if math.isfinite(v)]
    if not finite:
        return 0
    best = min(finite)
    se = [0.0] * len(losses)
    if rows is not None:
        se = rows.gain_se(rows.values[losses.index(best)].expand_as(rows.values)).tolist()
    return next(i for i, v in enumerate(losses) if math.isfinite(v) and v <= best + max(margin * best,
                                                                                         se_margin * se[i]))


class Prefixed:
    """A metrics sink that prefixes every name (the fold models' curves go under cv/)."""

    def __init__(self, sink, prefix: str):
        self.sink, self.prefix = sink, prefix

    def log_metrics(self, values: dict, step: int) -> None:
        if self.sink is not None:
            self.sink.log_metrics({self.prefix + k: v for k, v in values.items()}, step=step)

    def flush(self) -> None:
        if self.sink is not None:
            self.sink.flush()


def convergence_metrics(result, prefix: str = "") -> dict[str, float]:
    """What a run reports about its length: the step it kept, whether validation stopped it, the best loss."""
    if result.val_loss is None:
        return {f"{prefix}steps_run": float(result.steps_run)}
    return {f"{prefix}best_step": float(result.step), f"{prefix}steps_run": float(result.steps_run),
            f"{prefix}val_loss": result.val_loss if math.isfinite(result.val_loss) else float("nan"),
            f"{prefix}converged": float(bool(result.converged))}
