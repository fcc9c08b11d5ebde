"""Learning curves: pretrain once (or reuse an encoder), then adapt for every (mode, m, seed).

One MLflow parent run holds the table (results.csv, results.json) and per-mode metrics with m as the step; every
cell is a child run. Seeds change the target subset, the head's initialisation and the training noise; the task
world (suite.seed) stays fixed. With one pretrained encoder the spread is that of the adaptation alone; with
`sweep.pretrain_seeds` = P the sweep pretrains P encoders (seeds seed + 1000·p) and runs every pretrained-mode cell
on each, with the same target subsets, so the spread includes the encoder's, and `pretrain_std` (the sd of the P
encoders' means) says how much of it is the encoder's.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from cdmtransfer import data_checks
from cdmtransfer.cells import cell_heads, group_key
from cdmtransfer.config import FROM_PRETRAIN, PRETRAINED_MODES, Config, flatten, oracle_config, resolve_adapt
from cdmtransfer.ensemble import ensemble_rows, ensemble_summary, record_ensemble
from cdmtransfer.errors import CdmError, ConfigError, stop_requested
from cdmtransfer.metrics import HEADLINE, mean_sd
from cdmtransfer.plots import learning_curves
from cdmtransfer.schedule import WorkQueue, Workers, default_jobs
from cdmtransfer.adaptation import adapt_tags, oracle_truth, record_adapt
from cdmtransfer.pretraining import pretrain
from cdmtransfer.runs import load_model_dir
from cdmtransfer.stages import load_encoder, setup_torch
from cdmtransfer.tasks import build_taskset
from cdmtransfer.tracking import TAG, close_run, find_model_dir, open_run, open_tracker, tracked_run

PRETRAIN_SEED_STRIDE = 1000  # encoder p of a sweep is pretrained with seed + 1000·p (apart from the cells' seeds)


@dataclass
class SweepResult:
    run_id: str
    pretrain_run_id: str | None
    rows: list[dict]  # one per (mode, m, seed, pretrain): run_id and metrics
    summary: list[dict]  # one per (mode, m): mean and std over seeds of each metric
    skipped_modes: dict = field(default_factory=dict)
    tracking_uri: str = ""
    plots: dict = field(default_factory=dict)  # metric -> artifact path of its learning-curve PNG
    pretrain_run_ids: list = field(default_factory=list)  # the sweep's own pretrains, encoder p at index p
    oracle_pretrain_run_id: str | None = None  # the pretrain on h* that the oracle cells adapt
    ensembles: list = field(default_factory=list)  # with several encoders: ensemble.ensemble_summary of the cells
    ensemble_runs: list = field(default_factory=list)  # per (mode, m, seed): its ensemble's run id, members, metrics

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds (and encoders) for every (mode, m) and metric; what cross-validation
    chose per seed (`choices`); and where a metric has no exact floor, its excess over a fitted one
    (`fitted_excess`). Over several encoders (`pretrains` > 1), each metric also has `pretrain_std`: the standard
    deviation of the encoders' means, the part of the spread the encoder brings."""
    groups: dict[tuple, list[dict]] = {}
    choices: dict[tuple, list[str]] = {}
    for row in rows:
        groups.setdefault((row["mode"], row["m"]), []).append(row)
        choices.setdefault((row["mode"], row["m"]), []).append(row.get("choice") or "")
    out = []
    for (mode, m), group in groups.items():
        cells = [r["metrics"] for r in group]
        encoders = sorted({r.get("pretrain", 0) for r in group})
        entry = {"mode": mode, "m": m, "seeds": len(cells), "choices": choices[(mode, m)]}
        if len(encoders) > 1:
            entry["pretrains"] = len(encoders)
        for key in sorted(set().union(*cells)):
            entry[key] = mean_sd([c[key] for c in cells if key in c])
            if len(encoders) > 1:
                means = [mean_sd(v)["mean"] for v in ([r["metrics"][key] for r in group
                                                          if r.get("pretrain", 0) == p and key in r["metrics"]]
                                                         for p in encoders) if v]
                entry[key]["pretrain_std"] = mean_sd(means)["std"]
        out.append(entry)
    fitted_excess(rows, out)
    return out


FITTED = {"posterior_mean_mse": "posterior_mean_mse_excess", "test_dsm": None}  # metric -> its exact excess, if any


def fitted_excess(rows: list[dict], summary: list[dict]) -> dict:
    """Excess over a fitted floor for metrics with no exact floor: per mode, err(m) ≈ floor + A/m (theory.Fit, the
    1/m rate of Thm 3.4) is fitted to every seed's value across the sweep's m, and each entry of `summary` gets
    `<metric>_fitted_excess` (mean and sd over seeds of value − floor). Needs 2+ values of m; returns
    {mode: {metric: {floor, A}}} (also stored as `fitted_floor` in the summary entries)."""
    from cdmtransfer.theory import fit_score_curve

    fits: dict = {}
    for mode in sorted({r["mode"] for r in rows}):
        for metric, exact in FITTED.items():
            cells = [r for r in rows if r["mode"] == mode and metric in r["metrics"]
                     and not (exact and exact in r["metrics"]) and math.isfinite(r["metrics"][metric])]
            if len({r["m"] for r in cells}) < 2:
                continue
            try:
                fit = fit_score_curve([r["m"] for r in cells], [r["metrics"][metric] for r in cells])
            except ValueError:
                continue
            fits.setdefault(mode, {})[metric] = {"floor": fit.floor, "A": fit.A}
    for entry in summary:
        for metric, fit in fits.get(entry["mode"], {}).items():
            values = [r["metrics"][metric] - fit["floor"] for r in rows
                      if r["mode"] == entry["mode"] and r["m"] == entry["m"] and metric in r["metrics"]]
            entry[f"{metric}_fitted_excess"] = mean_sd(values)
            entry.setdefault("fitted_floor", {})[metric] = fit["floor"]
    return fits


def to_csv(rows: list[dict]) -> str:
    keys = sorted(set().union(*(r["metrics"] for r in rows))) if rows else []
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["mode", "m", "seed", "pretrain", "run_id", *keys])
    for r in rows:
        writer.writerow([r["mode"], r["m"], r["seed"], r.get("pretrain", 0), r["run_id"],
                         *(r["metrics"].get(k, "") for k in keys)])
    return buf.getvalue()


class MetricRecorder:
    """Collects a training curve in memory (in a worker process) for the parent to write to MLflow."""

    def __init__(self):
        self.records: list[tuple[dict, int]] = []

    def log_metrics(self, values: dict, step: int) -> None:
        self.records.append((dict(values), step))

    def flush(self) -> None:
        pass


def run_cell(cfg_dict: dict, encoder_dir: str | None, lineage: dict, run_id: str, work_dir: str) -> dict:
    """Train and evaluate one (mode, m, seed) cell; runs in the sweep's process or in a worker process.

    Touches no tracking store: the parent process is the only writer, so parallel cells cannot lose or mix runs.
    """
    from cdmtransfer.config import from_dict
    from cdmtransfer.adaptation import prepare_encoder, train_adapt

    cfg = from_dict(Config, cfg_dict, "sweep cell")
    device = setup_torch(cfg)
    taskset = build_taskset(cfg)
    enc, _, source_heads = prepare_encoder(cfg, taskset, None, encoder_dir)
    recorder = MetricRecorder()
    metrics, skipped, model_dir, choice = train_adapt(cfg, taskset, enc, lineage, run_id, Path(work_dir), recorder,
                                                      device=device, source_heads=source_heads)
    return {"metrics": metrics, "skipped": skipped, "model_dir": str(model_dir), "history": recorder.records,
            "choice": choice}


def run_group(cfg_dicts: list[dict], encoder_dir: str | None, lineages: list[dict], run_ids: list[str],
              work_dirs: list[str], eval_cache: str | None = None) -> list[dict]:
    """Train and evaluate cells that share cells.group_key as one stacked model in one loop (cells.train_cells);
    like run_cell, in the sweep's process or a worker, touching no tracking store. Per cell run_cell's dict, or
    {"error": why} for a cell that failed alone (a NaN loss). `eval_cache`: the sweep's shared evaluations
    (eval_cache.py)."""
    from cdmtransfer.cells import Cell, train_cells
    from cdmtransfer.config import from_dict
    from cdmtransfer.adaptation import prepare_encoder

    cfgs = [from_dict(Config, d, "sweep cell") for d in cfg_dicts]
    device = setup_torch(cfgs[0])
    taskset = build_taskset(cfgs[0])  # the task world is the same for every cell (suite.seed)
    shared: dict = {}  # the pretrained encoder (and h*) loaded once: cells that keep it fixed share one call
    cells = []
    for cfg, lineage, run_id, work_dir in zip(cfgs, lineages, run_ids, work_dirs):
        mode = cfg.adapt.mode
        kind = "pretrained" if mode in PRETRAINED_MODES else mode
        if kind == "scratch" or kind not in shared:  # (a group's oracle cells are apart: cells.group_key)
            got = prepare_encoder(cfg, taskset, None, encoder_dir if mode in FROM_PRETRAIN else None)
            if kind != "scratch":
                shared[kind] = got
        enc, _, source_heads = got if kind == "scratch" else shared[kind]
        x, y = taskset.target_subset(cfg.adapt.m, seed=cfg.seed)
        cells.append(Cell(cfg, x, y, enc, run_id, Path(work_dir), lineage, source_heads, MetricRecorder(),
                          eval_cache=Path(eval_cache) if eval_cache else None))
    outs = train_cells(cells, taskset, device=device)
    return [out if out is not None else {"error": cell.error} for cell, out in zip(cells, outs)]


def _work_items(cells: list, batch: bool, jobs: int, max_heads: int = 32) -> list[list[int]]:
    """Lists of cell indices, each trained in one call: the cells of one cells.group_key together (batch), else
    one cell each; a group is cut into runs of at most `max_heads` heads (one cell at least), and large ones are
    halved until every one of `jobs` processes has an item."""
    if not batch:
        return [[i] for i in range(len(cells))]
    groups: dict = {}
    for i, cell in enumerate(cells):
        key = group_key(cell)
        groups.setdefault(("alone", i) if key is None else key, []).append(i)
    items = []
    for ids in groups.values():
        item, heads = [], 0
        for i in ids:
            own = cell_heads(cells[i])
            if item and heads + own > max_heads:
                items.append(item)
                item, heads = [], 0
            item.append(i)
            heads += own
        items.append(item)
    while len(items) < jobs and max(map(len, items), default=0) > 1:
        big = max(items, key=len)
        items.remove(big)
        items += [big[: len(big) // 2], big[len(big) // 2:]]
    return items


def _training_work(cfg: Config) -> int:
    """A cell's training work, to schedule the largest first: its heads × the step cap × the batch."""
    return cell_heads(cfg) * cfg.adapt.steps * cfg.adapt.batch_size


def _cell_key(mode: str, m, seed, pretrain=0) -> tuple[str, int, int, int]:
    return mode, int(m), int(seed), int(pretrain)


def _pretrain_index(run, cfg: Config) -> int:
    """Which of a sweep's encoders a pretrain run is (its seed is cfg.seed + PRETRAIN_SEED_STRIDE · index)."""
    return (int(run.data.params.get("seed", cfg.seed)) - cfg.seed) // PRETRAIN_SEED_STRIDE


def _learned(pretrains: list, cfg: Config) -> list:
    """The pretrain runs of the recipe's own encoder among a sweep's (not the pretrain on h* of its oracle cells)."""
    return [r for r in pretrains if r.data.params.get("model.encoder") == cfg.model.encoder]


def _prior_work(tracker, sweep_id: str, cfg: Config) -> tuple[dict, list, dict]:
    """For --resume: the finished cells of an interrupted sweep (key -> row), its pretrain child runs and its
    finished ensembles' runs ((mode, m, seed) -> {"run_id", "metrics"}: ensemble.ensemble_rows' `prior`).

    Children left RUNNING by a killed process are marked KILLED (the truth); their cells are trained again.
    """
    parent = tracker.get_run(sweep_id)
    if parent.data.tags.get(TAG + "stage") != "sweep":
        raise ConfigError(f"--resume {sweep_id}: not a sweep run")
    now = {k: str(v) for k, v in flatten(cfg.to_dict()).items() if not k.startswith("tracking.") and k != "sweep.modes"}
    diff = sorted(k for k, v in now.items() if parent.data.params.get(k, v) != v)
    if diff:
        raise ConfigError(f"--resume: the recipe differs from the sweep being resumed at {', '.join(diff[:5])}")
    done, pretrains, ensembles = {}, [], {}
    children = tracker.client.search_runs([parent.info.experiment_id],
                                          filter_string=f"tags.mlflow.parentRunId = '{sweep_id}'")
    for run in children:
        if run.info.status == "RUNNING":
            tracker.client.set_terminated(run.info.run_id, "KILLED")
        if run.data.tags.get(TAG + "stage") == "pretrain":
            pretrains.append(run)
    own = _learned(pretrains, cfg)  # the sweep pretrained its encoders; else the user gave them (--encoder A,B,..)
    encoder_of = ({run.info.run_id: _pretrain_index(run, cfg) for run in own} if own else
                  {source: p for p, source in enumerate(parent.data.tags.get(TAG + "encoder_source", "").split(","))})
    for run in children:
        tags = run.data.tags
        if tags.get(TAG + "stage") == "ensemble" and run.info.status == "FINISHED":
            ensembles[tags[TAG + "mode"], int(tags[TAG + "m"]), int(tags[TAG + "seed"])] = {
                "run_id": run.info.run_id, "metrics": dict(run.data.metrics)}
        elif tags.get(TAG + "stage") != "pretrain" and run.info.status == "FINISHED":
            source = tags.get(TAG + "pretrain_run_id" if own else TAG + "encoder_source", "")
            key = _cell_key(tags[TAG + "mode"], tags[TAG + "m"], tags[TAG + "seed"], encoder_of.get(source, 0))
            metrics = {k: v for k, v in run.data.metrics.items() if k not in ("loss", "lr", "grad_norm")}
            done[key] = {"mode": key[0], "m": key[1], "seed": key[2], "pretrain": key[3], "run_id": run.info.run_id,
                         "metrics": metrics, "choice": tags.get(TAG + "choice_short", "")}
    return done, pretrains, ensembles


def _sweep_pretrain(cfg: Config, tracking_uri: str | None, parent_run_id: str, prior: list[tuple[str, str]],
                    quiet: bool) -> str:
    """One of a sweep's pretrains: a finished child run, an interrupted one continued from its last checkpoint, or a
    new one; `prior` holds (run id, status) of its earlier child runs (--resume). A worker process may run it."""
    for run_id, status in prior:
        if status == "FINISHED":
            return run_id
    for run_id, _ in prior:
        try:
            return pretrain(cfg, tracking_uri=tracking_uri, quiet=quiet, parent_run_id=parent_run_id,
                            resume=run_id).run_id
        except ConfigError:  # killed before its first checkpoint
            open_tracker(cfg, tracking_uri).client.set_terminated(run_id, "KILLED")
    return pretrain(cfg, tracking_uri=tracking_uri, quiet=quiet, parent_run_id=parent_run_id).run_id


def _runs(pretrains: list) -> list[tuple[str, str]]:
    return [(run.info.run_id, run.info.status) for run in pretrains]


def sweep(cfg: Config, *, encoder: str | list[str] | None = None, tracking_uri: str | None = None, quiet: bool = True,
          jobs: int = 0, resume: str | None = None, tags: dict | None = None,
          workers: Workers | None = None) -> SweepResult:
    """Learning curves over sweep.modes × sweep.m × sweep.seeds; `resume` continues an interrupted sweep run.

    `tags` are added to the sweep run (estimate finds its pseudo-target sweeps by them). `workers`: processes the
    caller started (the command line spawns them before it imports torch), in place of `jobs` − 1 new ones."""
    s = cfg.sweep
    if isinstance(encoder, (list, tuple)):  # the Python API's list of the user's encoders: as --encoder A,B,..
        encoder = ",".join(map(str, encoder))
    setup_torch(cfg)
    taskset = build_taskset(cfg)
    modes, skipped = list(s.modes), {}
    if "oracle" in modes and taskset.truth.encoder() is None:
        modes.remove("oracle")
        skipped["oracle"] = f"suite '{cfg.suite.name}' has no true representation h*"
    if not modes:
        raise ConfigError("sweep: no mode left to run")
    for m in s.m:
        taskset.target_subset(m, seed=cfg.seed)  # refuse an impossible m before anything is created
    if s.pretrain_seeds > 1 and encoder:
        raise ConfigError(f"--encoder {encoder}: sweep.pretrain_seeds = {s.pretrain_seeds} pretrains the sweep's own "
                          f"encoders; drop --encoder or set sweep.pretrain_seeds=1")
    given = encoder.split(",") if encoder else []
    if not all(given) or len(set(given)) < len(given):
        raise ConfigError(f"--encoder {encoder!r}: give one encoder, or several different ones separated by commas")
    h_star_d = oracle_truth(taskset).d if "oracle" in modes else 0
    cells = [resolve_adapt(dataclasses.replace(cfg if mode != "oracle" else oracle_config(cfg, h_star_d),
                                               seed=cfg.seed + offset,
                                               adapt=dataclasses.replace(cfg.adapt, mode=mode, m=m)))
             for mode in modes for m in s.m for offset in range(s.seeds)]  # unset adapt keys follow m's rule
    own = workers is None  # else the caller's, which it closes
    workers = workers or Workers((jobs or default_jobs(len(cells))) - 1)
    with workers if own else contextlib.nullcontext():
        if own:
            workers.warm()  # the workers import torch while this process opens the store
        return _sweep(cfg, taskset, modes, skipped, cells, encoder, tracking_uri, quiet, workers.count + 1, workers,
                      resume, tags, h_star_d)


def _sweep(cfg: Config, taskset, modes: list[str], skipped: dict, cells: list[Config], encoder: str | None,
           tracking_uri: str | None, quiet: bool, jobs: int, workers: Workers, resume: str | None, tags: dict | None,
           h_star_d: int) -> SweepResult:
    """The sweep's runs: its parent run, its pretrains and a child run per cell. Cells that start from no
    pretrain (scratch) and the pretrain on h* go to the workers first, while this process pretrains the learned
    encoder(s); the other cells follow when their encoder is ready."""
    s = cfg.sweep
    tracker = open_tracker(cfg, tracking_uri)
    done, pretrains, prior_ensembles = _prior_work(tracker, resume, cfg) if resume else ({}, [], {})
    learned = _learned(pretrains, cfg)
    if resume and not encoder:
        parent_tags = tracker.get_run(resume).data.tags
        encoder = parent_tags.get(TAG + "encoder_source") if not learned else None
    given = encoder.split(",") if encoder else []  # encoders the user pretrained: cells run on each, in this order
    data_warnings = data_checks.for_stage(taskset.data_warnings, ("pretrain", "adapt"))
    tags = {TAG + "stage": "sweep", TAG + "recipe": cfg.name, TAG + "suite": cfg.suite.name, TAG + "jobs": jobs,
            **data_checks.tags(data_warnings), **(tags or {})}
    with tempfile.TemporaryDirectory(prefix="cdmtransfer-") as tmp, \
            tracked_run(tracker, f"{cfg.name}-sweep", tags, resume_run_id=resume) as parent:
        data_checks.echo(cfg, data_warnings)  # once for the sweep; its child runs carry the tag
        if not resume:
            parent.log_params({**flatten(cfg.to_dict()), "sweep.modes": ",".join(modes)})
        own, encoders = [], [(None, {})]  # the sweep's pretrain run ids; per encoder: (model dir, lineage)
        sources = list(given)
        oracle_cfg = oracle_config(cfg, h_star_d) if "oracle" in modes else None
        oracle_prior = _runs([r for r in pretrains if r.data.params.get("model.encoder") == "oracle"
                              and _pretrain_index(r, cfg) == 0])
        uses_encoder = any(mode in PRETRAINED_MODES for mode in modes)
        pretrains_here = uses_encoder and not encoder  # this process pretrains the learned encoder(s)
        todo = {p: [c for c in cells if _cell_key(c.adapt.mode, c.adapt.m, c.seed, p) not in done
                    and (p == 0 or c.adapt.mode in PRETRAINED_MODES)]
                for p in range(len(given) if given else s.pretrain_seeds if pretrains_here else 1)}
        with _CellRuns(tracker, parent.run_id, taskset, workers, quiet, s.batch_cells,
                       sum(map(len, todo.values())), str(Path(tmp) / "evaluations")) as runs:
            early = bool(workers.count and pretrains_here)  # the workers start what needs no encoder now
            oracle_job = None  # the pretrain on h*, in a worker while this process pretrains the learned encoder(s)
            if early and oracle_cfg is not None and cfg.model.encoder != "oracle":
                oracle_job = workers.submit(_sweep_pretrain, oracle_cfg, tracking_uri, parent.run_id, oracle_prior,
                                            True)
            scratch = [c for c in todo[0] if c.adapt.mode not in FROM_PRETRAIN]  # they start from no pretrain
            scratch_items = runs.items(scratch, (None, {}), jobs=workers.count if early else workers.count + 1)
            if early:
                runs.queue.start(scratch_items)
                scratch_items = []
            if uses_encoder:
                for p in range(0 if encoder else s.pretrain_seeds):
                    mine = [r for r in learned if _pretrain_index(r, cfg) == p]
                    own.append(_sweep_pretrain(dataclasses.replace(cfg, seed=cfg.seed + PRETRAIN_SEED_STRIDE * p),
                                               tracking_uri, parent.run_id, _runs(mine), quiet))
                    sources.append(own[-1])
                encoders = []
                for source in sources:
                    model_dir, _ = find_model_dir(tracker, source, Path(tmp))
                    _, lineage, _ = load_encoder(tracker, source, taskset, cfg)  # checks it fits before cells start
                    encoders.append((str(model_dir), lineage))
                parent.set_tags({TAG + "encoder_source": encoder or sources[0],
                                 **({TAG + "pretrain_run_ids": ",".join(own)} if len(own) > 1 else {})})
            oracle_run = None  # the pretrain on h* that oracle cells adapt
            if oracle_cfg is not None and oracle_job is None:
                oracle_run = (sources[0] if cfg.model.encoder == "oracle" and sources  # one pretrain serves both
                              else _sweep_pretrain(oracle_cfg, tracking_uri, parent.run_id, oracle_prior, quiet))

            def oracle_items(run_id: str) -> list:
                """The oracle cells' work items, once their pretrain on h* (`run_id`) is done."""
                model_dir, _ = find_model_dir(tracker, run_id, Path(tmp))
                _, lineage, _ = load_encoder(tracker, run_id, taskset, oracle_cfg, h_star=oracle_truth(taskset))
                parent.set_tags({TAG + "oracle_pretrain_run_id": run_id})
                return runs.items([c for c in todo[0] if c.adapt.mode == "oracle"], (str(model_dir), lineage),
                                  jobs=workers.count + 1)

            items, later = list(scratch_items), {}
            for p, learned_encoder in enumerate(encoders):
                label = f" (encoder {p + 1}/{len(encoders)})" if len(encoders) > 1 else ""
                items += runs.items([c for c in todo[p] if c.adapt.mode in PRETRAINED_MODES], learned_encoder,
                                    pretrain=p, label=label, jobs=workers.count + 1)
            if oracle_job is not None:  # the learned encoder's cells need not wait for the worker's pretrain on h*
                later[oracle_job] = lambda: oracle_items(oracle_job.result())
            elif oracle_run is not None:
                items += oracle_items(oracle_run)
            runs.queue.run(items, later)
            if oracle_job is not None:
                oracle_run = oracle_job.result()
        plan = [(c, p) for c in cells
                for p in (range(len(encoders)) if c.adapt.mode in PRETRAINED_MODES else [0])]
        rows = list(done.values()) + runs.rows
        order = {_cell_key(c.adapt.mode, c.adapt.m, c.seed, p): k for k, (c, p) in enumerate(plan)}
        rows.sort(key=lambda r: order[_cell_key(r["mode"], r["m"], r["seed"], r.get("pretrain", 0))])
        summary = summarise(rows)
        for entry in summary:
            parent.log_metrics({f"{entry['mode']}.{k}": entry[k]["mean"] for k in HEADLINE if k in entry},
                               step=entry["m"])
        ensembles, ensemble_cells = [], []
        if len(encoders) > 1:  # what averaging the encoders' cells would buy (ensemble.py)
            def load(run_id: str):
                return load_model_dir(find_model_dir(tracker, run_id, Path(tmp))[0], run_id)[0].eval()

            pretrain_ids = [lineage.get("pretrain_run_id", "") for _, lineage in encoders]

            def record(mode: str, m: int, seed: int, members: list[str], model, values: dict, skipped: dict) -> str:
                cell = next(c for c in cells if (c.adapt.mode, c.adapt.m, c.seed) == (mode, m, seed))
                return record_ensemble(tracker, parent.run_id, cell, taskset, members, pretrain_ids, model, values,
                                       skipped)

            try:
                ensemble_cells = ensemble_rows(rows, load, taskset, cfg, prior=prior_ensembles, record=record)
                ensembles = ensemble_summary(ensemble_cells)
            except CdmError as exc:  # a member's model not reachable here: the sweep's results stand without it
                print(f"warning: the encoders' cells were not scored averaged: {exc}", file=sys.stderr, flush=True)
            for entry in ensembles:
                parent.log_metrics({f"ensemble.{entry['mode']}.{k}": v["mean"] for k, v in entry["ensemble"].items()},
                                   step=entry["m"])
        parent.log_dict({"rows": rows, "summary": summary, "skipped_modes": skipped, "ensembles": ensembles,
                         "ensemble_runs": ensemble_cells}, "results.json")
        parent.client.log_text(parent.run_id, to_csv(rows), "results.csv")
        plots = {}
        if len(s.m) > 1 and cfg.tracking.log_artifacts:
            for metric in HEADLINE:
                png = learning_curves(summary, metric, Path(tmp) / f"curve_{metric}.png",
                                      f"{cfg.name}: {metric} vs m")
                if png is not None:
                    parent.log_artifact(png, "plots")
                    plots[metric] = f"plots/{png.name}"
    return SweepResult(parent.run_id, own[0] if own else None, rows, summary, skipped, tracker.store.uri, plots,
                       own, oracle_run, ensembles, ensemble_cells)


class _OpenCell(NamedTuple):
    cfg: Config
    run: object  # its MLflow child run (tracking.Run)
    encoder: tuple  # (model dir or None, lineage) of the pretrain it starts from
    pretrain: int  # which of the sweep's encoders
    label: str  # for progress lines


class _CellRuns:
    """A sweep's cells as child runs: opened when the encoder they start from is ready (`items`), trained as work
    items here and in the sweep's workers (batched by cells.group_key: run_group; else one by one: run_cell), and
    recorded here as each item ends, the sweep's process being the only writer of cell runs. Leaving the `with`
    block by an exception closes every run not recorded (KILLED on an interrupt, else FAILED)."""

    def __init__(self, tracker, parent_id: str, taskset, workers: Workers, quiet: bool, batch: bool, total: int,
                 eval_cache: str | None = None):
        self.tracker, self.parent_id, self.taskset, self.quiet, self.batch = tracker, parent_id, taskset, quiet, batch
        self.eval_cache = eval_cache  # a directory the items' processes share: a model evaluated once (eval_cache.py)
        self.total, self.rows, self.open = total, [], {}  # cell index -> _OpenCell, until recorded
        self.opened = 0  # cells opened so far: the next cell's index
        self.queue = WorkQueue(workers, self._call, self._finish, self.work)

    def items(self, cells: list[Config], encoder: tuple[str | None, dict], pretrain: int = 0, label: str = "",
              jobs: int = 1) -> list[list[int]]:
        """Open a run for each of `cells` (all starting from `encoder`: its model dir and lineage); their work
        items, cut so that `jobs` processes have one each where the cells allow."""
        ids = []
        for cell in cells:
            run = open_run(self.tracker, f"{cell.name}-adapt-{cell.adapt.mode}-m{cell.adapt.m}",
                           adapt_tags(cell, self.taskset, encoder[1], self.parent_id))
            run.log_params(flatten(cell.to_dict()))
            run.log_dict(cell.to_dict(), "config.json")
            ids.append(self.opened)
            self.open[self.opened] = _OpenCell(cell, run, encoder, pretrain, label)
            self.opened += 1
        return [[ids[i] for i in item] for item in
                _work_items(cells, self.batch, jobs, cells[0].sweep.group_heads if cells else 32)]

    def work(self, item: list[int]) -> int:
        """An item's training work (curves._training_work of its cells), to order and share the items."""
        return sum(_training_work(self.open[i].cfg) for i in item)

    def _call(self, item: list[int]):
        """What one work item runs, and its arguments."""
        cells = [self.open[i] for i in item]
        args = [(c.cfg.to_dict(), *c.encoder, c.run.run_id, str(c.run.work_dir)) for c in cells]
        if not self.batch or group_key(cells[0].cfg) is None:
            return run_cell, args[0]
        cols = list(zip(*args))
        return run_group, (list(cols[0]), cells[0].encoder[0], list(cols[2]), list(cols[3]), list(cols[4]),
                           self.eval_cache)

    def _finish(self, item: list[int], outs) -> None:
        for i, out in zip(item, outs if isinstance(outs, list) else [outs]):
            cell, run, _, pretrain, label = self.open.pop(i)
            if "error" in out:  # this cell alone failed; the others of its group are recorded
                print(f"error: {out['error']}", file=sys.stderr, flush=True)
                close_run(run, "FAILED")
                continue
            for values, step in out["history"]:
                run.log_metrics(values, step)
            record_adapt(run, cell, out["metrics"], out["skipped"], Path(out["model_dir"]), choice=out["choice"])
            close_run(run, "FINISHED")
            self.rows.append({"mode": cell.adapt.mode, "m": cell.adapt.m, "seed": cell.seed, "pretrain": pretrain,
                              "run_id": run.run_id, "metrics": out["metrics"], "choice": out["choice"]["short"]})
            if not self.quiet:
                print(f"[sweep] {len(self.rows)}/{self.total} done{label}: {cell.adapt.mode} m={cell.adapt.m} "
                      f"seed={cell.seed}", file=sys.stderr, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is not None:
            status = "KILLED" if issubclass(kind, KeyboardInterrupt) or stop_requested() else "FAILED"
            for cell in self.open.values():
                close_run(cell.run, status)
