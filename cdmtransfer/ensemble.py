"""What averaging a sweep's encoders would buy (`sweep --pretrain-seeds N`): per (mode, m, seed), the N cells that
adapted the same target samples on N pretrained encoders, scored as one model whose ε̂ is the mean of theirs.

The mean of N score fields is a score field; by Jensen's inequality its squared error to the true score, on the same
draws, is at most the members' mean error (with equality only when they agree), so ensembling can only help the
score error and the held-out DSM; it helps by how much the encoders' errors differ. The ensemble is evaluated like
any adapted model (metrics.evaluate_model: the evaluator's draws and seed, so its score metrics use the members'
draws; its samples come from the averaged ε̂), and compared with its members' own evaluations. The sweep exports
it as a child run of its own (record_ensemble), which `evaluate` and `sample` load like any adapt run
(models.model_spec / build_model: {"ensemble": [member specs]}; weights members.<i>.*).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from cdmtransfer.adaptation import adapt_tags, record_adapt
from cdmtransfer.checkpoint import export_model
from cdmtransfer.config import PRETRAINED_MODES, Config, flatten
from cdmtransfer.metrics import FLAGS, HEADLINE, SAMPLE_METRICS, evaluate_model, mean_sd
from cdmtransfer.models import model_spec
from cdmtransfer.tracking import TAG, tracked_run


class ConcatEncoder(nn.Module):
    """The members' codes side by side: [.., Σ d_i], member i's in its own slice (`widths`)."""

    def __init__(self, encoders: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(encoders)
        self.widths = [int(e.d) for e in encoders]
        self.d = sum(self.widths)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([e(y) for e in self.parts], -1)


class MeanPrediction(nn.Module):
    """ε̂(x_t, y, t) = mean over the members of theirs (members: adapted ScoreModels of one task, K = 1 head).

    Also what metrics.evaluate_model, conditional_samples and the diagnostics use of a model: `encoder`
    (ConcatEncoder), `d_x`, `head_sees_y`, `eps_from_code` and `sampling_eps` (each member's on its slice of the
    code, averaged), and `linear_mean` = False (the members' linear means are not one model's)."""

    linear_mean = False

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if len({member.d_x for member in members}) != 1:
            raise ValueError(f"ensemble members generate different d_x: {[member.d_x for member in members]}")
        self.members = nn.ModuleList(members)
        # Not a registered submodule: its parts are the members' encoders, so the state dict (the export) holds each
        # weight once, under members.<i>.*; .to() and .eval() reach them through `members`.
        object.__setattr__(self, "encoder", ConcatEncoder([member.encoder for member in members]))
        self.d_x = members[0].d_x
        self.head_sees_y = any(member.head_sees_y for member in members)

    @torch.no_grad()
    def forward(self, x_t: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x_t, y, t) for member in self.members]).mean(0)

    @torch.no_grad()
    def eps_from_code(self, x_t: torch.Tensor, code: torch.Tensor, t: torch.Tensor,
                      y: torch.Tensor | None = None) -> torch.Tensor:
        """The members' ScoreModel.eps_from_code on their slices of `code`, averaged (the consistency diagnostics)."""
        parts = code.split(self.encoder.widths, -1)
        return torch.stack([member.eps_from_code(x_t, part, t, y if member.head_sees_y else None)
                            for member, part in zip(self.members, parts)]).mean(0)

    @torch.no_grad()
    def sampling_eps(self, code: torch.Tensor, y: torch.Tensor | None = None, head: int = 0):
        """eps(x, t, out=None): the mean of the members' ScoreModel.sampling_eps on their slices of `code`."""
        steps = [member.sampling_eps(part, y if member.head_sees_y else None, head)
                 for member, part in zip(self.members, code.split(self.encoder.widths, -1))]

        def eps(x, t, out=None):
            total = torch.stack([step(x, t) for step in steps]).mean(0)
            return total if out is None else out.copy_(total)

        return eps


def ensemble_rows(rows: list[dict], load: Callable[[str], nn.Module], taskset, cfg: Config, *,
                  prior: dict | None = None, record: Callable | None = None) -> list[dict]:
    """One row per (mode, m, seed) of a pretrained mode whose cells ran on at least two encoders: the members' run
    ids (in encoder order), the ensemble's headline metrics (metrics.HEADLINE) from evaluate_model on the cells'
    target subset and evaluation seed (`load`: run id → its model), each member's from its own row (`each`) and
    their mean. Sample metrics of an ensemble whose samples diverged are left out (not results).

    `record(mode, m, seed, members, model, values, skipped)` → run id: each new ensemble's own run (the row's
    `run_id`).
    `prior` ((mode, m, seed) → {"run_id", "metrics"}): ensembles an interrupted sweep recorded already; their
    metrics are taken as they were logged, not computed again."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["mode"] in PRETRAINED_MODES:
            groups.setdefault((row["mode"], row["m"], row["seed"]), []).append(row)
    out = []
    for (mode, m, seed), group in groups.items():
        if len(group) < 2:
            continue
        group = sorted(group, key=lambda r: r.get("pretrain", 0))
        if (mode, m, seed) in (prior or {}):
            run_id, values = prior[mode, m, seed]["run_id"], prior[mode, m, seed]["metrics"]
            not_results = SAMPLE_METRICS if values.get("diverged") else ()
        else:
            model = MeanPrediction([load(row["run_id"]) for row in group])
            values, skipped = evaluate_model(model, taskset, cfg, target=taskset.target_subset(m, seed=seed))
            not_results = skipped.get(FLAGS, {})
            run_id = record(mode, m, seed, [row["run_id"] for row in group], model, values, skipped) if record else None
        keys = [k for k in HEADLINE if k in values and k not in not_results
                and all(k in row["metrics"] for row in group)]
        each = [{k: row["metrics"][k] for k in keys} for row in group]
        out.append({"mode": mode, "m": m, "seed": seed, "members": [row["run_id"] for row in group],
                    "metrics": {k: values[k] for k in keys}, "each": each,
                    "members_mean": {k: mean_sd([e[k] for e in each])["mean"] for k in keys},
                    **({"run_id": run_id} if run_id else {})})
    return out


def record_ensemble(tracker, parent_id: str, cell: Config, taskset, members: list[str], pretrains: list[str],
                    model: MeanPrediction, values: dict, skipped: dict) -> str:
    """The ensemble's own child run of the sweep `parent_id`, like a cell's: the cell's config (`cell`: its mode,
    m and seed) as params, the ensemble's metrics, its exported model (`evaluate` and `sample` load it, models:/
    resolves it) and its members' and encoders' run ids as lineage (tags cdmtransfer.members, .pretrain_run_ids).
    Returns its run id."""
    lineage = {"members": ",".join(members), "pretrain_run_ids": ",".join(pretrains)}
    tags = {**adapt_tags(cell, taskset, lineage, parent_id), TAG + "stage": "ensemble"}
    with tracked_run(tracker, f"{cell.name}-ensemble-{cell.adapt.mode}-m{cell.adapt.m}", tags) as run:
        run.log_params({**flatten(cell.to_dict()), "ensemble.members": len(members)})
        run.log_dict(cell.to_dict(), "config.json")
        meta = {"stage": "adapt", "mode": cell.adapt.mode, "model": model_spec(model), "config": cell.to_dict(),
                "run_id": run.run_id, "lineage": lineage, "taskset": taskset.summary()}
        record_adapt(run, cell, values, skipped, export_model(run.work_dir / "model", model.state_dict(), meta))
    return run.run_id


def ensemble_summary(rows: list[dict]) -> list[dict]:
    """Per (mode, m): the number of encoders and seeds, and mean ± sd over seeds of the ensemble's and the members'
    mean headline metrics that every seed has ({"ensemble": {k: {mean, std}}, "members": {...}})."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["mode"], row["m"]), []).append(row)

    out = []
    for (mode, m), group in groups.items():
        keys = [k for k in HEADLINE if all(k in r["metrics"] for r in group)]  # (a diverged seed's samples: none)
        out.append({"mode": mode, "m": m, "seeds": len(group), "encoders": max(len(r["members"]) for r in group),
                    "ensemble": {k: mean_sd([r["metrics"][k] for r in group]) for k in keys},
                    "members": {k: mean_sd([r["members_mean"][k] for r in group]) for k in keys}})
    return out
