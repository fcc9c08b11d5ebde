"""Learning curves: pretrain once (or reuse an encoder), then adapt for every (mode, m, seed).

One MLflow parent run holds the table (results.csv, results.json) and per-mode metrics with m as the step; every
cell is a child run. Seeds change the target subset, the head's initialisation and the training noise; the task
world (suite.seed) and the pretrained encoder stay fixed, so the spread is that of the adaptation alone.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from dataclasses import dataclass, field

from cdmtransfer.config import Config, flatten
from cdmtransfer.errors import ConfigError
from cdmtransfer.stages import adapt, open_tracker, pretrain
from cdmtransfer.tracking import TAG, tracked_run

HEADLINE = ("score_error", "posterior_mean_mse", "sliced_w2", "test_dsm")  # in the order tables show them


@dataclass
class SweepResult:
    run_id: str
    pretrain_run_id: str | None
    rows: list[dict]  # one per (mode, m, seed): run_id and metrics
    summary: list[dict]  # one per (mode, m): mean and std over seeds of each metric
    skipped_modes: dict = field(default_factory=dict)
    tracking_uri: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds for every (mode, m) and metric."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["mode"], row["m"]), []).append(row["metrics"])
    out = []
    for (mode, m), cells in groups.items():
        entry = {"mode": mode, "m": m, "seeds": len(cells)}
        for key in sorted(set().union(*cells)):
            values = [c[key] for c in cells if key in c]
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
            entry[key] = {"mean": mean, "std": math.sqrt(var) if len(values) > 1 else 0.0}
        out.append(entry)
    return out


def to_csv(rows: list[dict]) -> str:
    keys = sorted(set().union(*(r["metrics"] for r in rows))) if rows else []
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["mode", "m", "seed", "run_id", *keys])
    for r in rows:
        writer.writerow([r["mode"], r["m"], r["seed"], r["run_id"], *(r["metrics"].get(k, "") for k in keys)])
    return buf.getvalue()


def sweep(cfg: Config, *, encoder: str | None = None, tracking_uri: str | None = None,
          quiet: bool = True) -> SweepResult:
    s = cfg.sweep
    tracker = open_tracker(cfg, tracking_uri)
    modes, skipped = list(s.modes), {}
    if "oracle" in modes:
        from cdmtransfer.tasks import build_taskset

        if build_taskset(cfg).truth.encoder() is None:
            modes.remove("oracle")
            skipped["oracle"] = f"suite '{cfg.suite.name}' has no true representation h*"
    if not modes:
        raise ConfigError("sweep: no mode left to run")
    tags = {TAG + "stage": "sweep", TAG + "recipe": cfg.name, TAG + "suite": cfg.suite.name}
    with tracked_run(tracker, f"{cfg.name}-sweep", tags) as parent:
        parent.log_params({**flatten(cfg.to_dict()), "sweep.modes": ",".join(modes)})
        pre_id = None
        if any(mode in ("frozen", "finetune") for mode in modes) and not encoder:
            pre = pretrain(cfg, tracking_uri=tracking_uri, quiet=quiet, parent_run_id=parent.run_id)
            encoder = pre_id = pre.run_id
        if encoder:
            parent.set_tags({TAG + "encoder_source": encoder})
        rows = []
        for mode in modes:
            for m in s.m:
                for offset in range(s.seeds):
                    cell = dataclasses.replace(cfg, seed=cfg.seed + offset,
                                               adapt=dataclasses.replace(cfg.adapt, mode=mode, m=m))
                    res = adapt(cell, encoder=encoder if mode in ("frozen", "finetune") else None,
                                tracking_uri=tracking_uri, quiet=quiet, parent_run_id=parent.run_id)
                    rows.append({"mode": mode, "m": m, "seed": cell.seed, "run_id": res.run_id,
                                 "metrics": res.metrics})
        summary = summarise(rows)
        for entry in summary:
            parent.log_metrics({f"{entry['mode']}.{k}": entry[k]["mean"] for k in HEADLINE if k in entry},
                               step=entry["m"])
        parent.log_dict({"rows": rows, "summary": summary, "skipped_modes": skipped}, "results.json")
        parent.client.log_text(parent.run_id, to_csv(rows), "results.csv")
    return SweepResult(parent.run_id, pre_id, rows, summary, skipped, tracker.store.uri)
