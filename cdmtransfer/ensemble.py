"""What averaging a sweep's encoders would buy (`sweep --pretrain-seeds N`): per (mode, m, seed), the N cells that
adapted the same target samples on N pretrained encoders, scored as one model whose ε̂ is the mean of theirs.

The mean of N score fields is a score field; by Jensen's inequality its squared error to the true score, on the same
draws, is at most the members' mean error (with equality only when they agree), so ensembling can only help the
score error; it helps by how much the encoders' errors differ. Scored like metrics.score_metrics (the evaluator's
draws and seed, so each member reproduces its own run's test_dsm and score_error): test_dsm on any suite,
score_error where the suite has exact scores. No samples are drawn and no ensemble model is exported: this measures
the gain, it does not build the model.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch
from torch import nn

from cdmtransfer.config import PRETRAINED_MODES, Config
from cdmtransfer.diffusion import OUProcess
from cdmtransfer.metrics import score_metrics

METRICS = ("score_error", "test_dsm")


class MeanPrediction(nn.Module):
    """ε̂(x_t, y, t) = mean over the members of theirs (members: ScoreModels with the same x and y)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    @torch.no_grad()
    def forward(self, x_t: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x_t, y, t) for member in self.members]).mean(0)


def ensemble_rows(rows: list[dict], load: Callable[[str], nn.Module], taskset, cfg: Config) -> list[dict]:
    """One row per (mode, m, seed) of a pretrained mode whose cells ran on at least two encoders: the members' run
    ids (in encoder order), the ensemble's METRICS, each member's (`each`) and their mean (`load`: run id → its
    model in eval mode)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["mode"] in PRETRAINED_MODES:
            groups.setdefault((row["mode"], row["m"], row["seed"]), []).append(row)
    process = OUProcess(cfg.diffusion.T0, cfg.diffusion.T)

    def scored(model: nn.Module) -> dict[str, float]:
        values = score_metrics(model, taskset, process, cfg.evaluate.t_draws,
                               torch.Generator().manual_seed(cfg.evaluate.seed))
        return {k: values[k] for k in METRICS if k in values}

    out = []
    for (mode, m, seed), group in groups.items():
        if len(group) < 2:
            continue
        group = sorted(group, key=lambda r: r.get("pretrain", 0))
        members = [load(row["run_id"]) for row in group]
        each = [scored(member) for member in members]
        out.append({"mode": mode, "m": m, "seed": seed, "members": [row["run_id"] for row in group],
                    "metrics": scored(MeanPrediction(members)), "each": each,
                    "members_mean": {k: statistics.fmean(e[k] for e in each) for k in each[0]}})
    return out


def ensemble_summary(rows: list[dict]) -> list[dict]:
    """Per (mode, m): the number of encoders and seeds, and mean ± sd over seeds of the ensemble's and the members'
    mean METRICS ({"ensemble": {k: {mean, std}}, "members": {...}})."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["mode"], row["m"]), []).append(row)

    def stats(values: list[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    return [{"mode": mode, "m": m, "seeds": len(group), "encoders": max(len(r["members"]) for r in group),
             "ensemble": {k: stats([r["metrics"][k] for r in group]) for k in group[0]["metrics"]},
             "members": {k: stats([r["members_mean"][k] for r in group]) for k in group[0]["members_mean"]}}
            for (mode, m), group in groups.items()]
