"""Source-calibrated learning curves for `estimate`: source tasks stand in for a target that has no data yet.

For L source tasks held out in turn (chosen reproducibly from the recipe's seed): pretrain on the other K − 1
sources (capped at `steps`), then sweep the held-out task (suite.holdout = k, tasks/holdout.py) over a ladder of m
in the modes asked for. Each is an ordinary pretrain run and sweep run in MLflow, tagged with a key of its resolved
config (cdmtransfer.holdout_key, cdmtransfer.pretrain_key), so a later estimate reads a finished sweep back, resumes
an interrupted one and reuses a finished pretrain instead of training again. Only the statistics (curve_fit.py)
turn these curves into a prediction.

Why not reuse the recipe's own pretrain (`--encoder`)? It saw every source, the held-out one included, so its frozen
curves on a pseudo-target would be optimistic. The held-out pretrains are fresh and capped instead; the cap's bias
is measured in the README ("How many samples do I need?").
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from cdmtransfer.config import Config, flatten, from_dict
from cdmtransfer.curve_fit import Curve, Epsilon
from cdmtransfer.errors import ConfigError
from cdmtransfer.metrics import SAMPLE_METRICS
from cdmtransfer.tracking import TAG, open_tracker

LADDER = (8, 16, 32, 64, 128, 256)  # capped at the rows a held-out source leaves (source_estimate)
HOLDOUT_STEPS = None  # held-out pretrains keep the recipe's cap and stop by validation (a 1,000-step cap biased
# Langevin's prediction 13x: validation DSM 0.87 at the cap against 0.63 converged; README "How many samples")


def default_holdouts(K: int) -> int:
    return max(0, min(3, K - 1))


def choose_holdouts(K: int, L: int, seed: int) -> list[int]:
    """L distinct source tasks (1..K), a reproducible draw from `seed`."""
    if L > K:
        raise ConfigError(f"--holdout {L}: the suite has only K = {K} source tasks")
    rng = np.random.default_rng(seed)
    return sorted(int(k) for k in rng.choice(np.arange(1, K + 1), size=L, replace=False))


def holdout_config(cfg: Config, k: int, ladder, modes, seeds: int, steps: int | None) -> Config:
    """The recipe with source k as the target, the ladder as its sweep, pretrain capped at `steps`, no artifacts."""
    data = cfg.to_dict()
    data["suite"]["holdout"] = k
    if steps:
        data["pretrain"]["steps"] = min(cfg.pretrain.steps, int(steps))
    data["sweep"] = {"modes": list(modes), "m": [int(m) for m in ladder], "seeds": int(seeds)}
    data["tracking"]["log_artifacts"] = False  # local model files suffice; no figures, no registered models
    return from_dict(Config, data, f"{cfg.name} (held-out source {k})")


def config_key(cfg: Config, skip: tuple[str, ...] = ()) -> str:
    """A short hash of the resolved config, tracking settings and `skip` prefixes left out."""
    items = {k: v for k, v in flatten(cfg.to_dict()).items()
             if not k.startswith("tracking.") and not k.startswith(skip)}
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass
class Holdout:
    """One pseudo-target: its sweep's rows, the runs behind them and what they cost."""

    k: int
    sweep_run_id: str
    pretrain_run_id: str | None
    rows: list[dict]
    reused: bool
    seconds: dict = field(default_factory=dict)  # pretrain, sweep (0 when reused)
    pretrain_val_loss: float | None = None


def _find(tracker, tag: str, key: str, stage: str):
    runs = tracker.client.search_runs([tracker.experiment_id],
                                      filter_string=f"tags.`{TAG}{tag}` = '{key}' and tags.`{TAG}stage` = '{stage}'",
                                      order_by=["attributes.start_time DESC"], max_results=20)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    return finished[0] if finished else None, [r for r in runs if r.info.status != "FINISHED"]


def _results(tracker, run_id: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = tracker.client.download_artifacts(run_id, "results.json", tmp)
        with open(path) as fh:
            return json.load(fh)["rows"]


def run_holdouts(cfg: Config, ks: list[int], *, ladder=LADDER, modes=("frozen", "scratch"), seeds: int = 1,
                 steps: int | None = HOLDOUT_STEPS, tracking_uri: str | None = None, quiet: bool = True,
                 jobs: int = 0) -> list[Holdout]:
    """Train (or find) the pseudo-target sweeps of the held-out tasks `ks`."""
    from cdmtransfer.curves import sweep
    from cdmtransfer.pretraining import pretrain

    tracker = open_tracker(cfg, tracking_uri)
    out = []
    for k in ks:
        hc = holdout_config(cfg, k, ladder, modes, seeds, steps)
        key, pre_key = config_key(hc), config_key(hc, ("adapt.", "sweep.", "evaluate."))
        done, unfinished = _find(tracker, "holdout_key", key, "sweep")
        if done is not None:
            tags = done.data.tags
            pre_id = tags.get(TAG + "encoder_source")
            out.append(Holdout(k, done.info.run_id, pre_id, _results(tracker, done.info.run_id), True,
                               {"pretrain": 0.0, "sweep": 0.0}, _val_loss(tracker, pre_id)))
            _say(quiet, f"held-out source {k}: reusing sweep run {done.info.run_id}")
            continue
        seconds, pre_id = {"pretrain": 0.0}, None
        if any(m in ("frozen", "finetune") for m in modes):
            pre, _ = _find(tracker, "pretrain_key", pre_key, "pretrain")
            if pre is not None:
                pre_id = pre.info.run_id
                _say(quiet, f"held-out source {k}: reusing pretrain run {pre_id}")
            else:
                _say(quiet, f"held-out source {k}: pretraining on the other sources (cap {hc.pretrain.steps} steps)")
                start = time.perf_counter()
                pre_id = pretrain(hc, tracking_uri=tracking_uri, quiet=quiet).run_id
                seconds["pretrain"] = time.perf_counter() - start
                tracker.client.set_tag(pre_id, TAG + "pretrain_key", pre_key)
                tracker.client.set_tag(pre_id, TAG + "holdout", str(k))
        _say(quiet, f"held-out source {k}: sweep over m = {', '.join(map(str, ladder))} ({', '.join(modes)})")
        start = time.perf_counter()
        resume = unfinished[0].info.run_id if unfinished else None
        result = sweep(hc, encoder=pre_id, tracking_uri=tracking_uri, quiet=quiet, jobs=jobs, resume=resume,
                       tags={TAG + "holdout_key": key, TAG + "holdout": k})
        seconds["sweep"] = time.perf_counter() - start
        out.append(Holdout(k, result.run_id, pre_id, result.rows, False, seconds, _val_loss(tracker, pre_id)))
    return out


def _val_loss(tracker, run_id: str | None) -> float | None:
    if not run_id:
        return None
    try:
        value = tracker.get_run(run_id).data.metrics.get("val_loss")
    except ConfigError:
        return None
    return None if value is None else float(value)


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(f"[estimate] {text}", file=sys.stderr, flush=True)


def curves_of(rows: list[dict], metric: str, min_m: int = 2) -> dict[str, Curve]:
    """mode -> Curve of one metric from a sweep's rows (modes with at least `min_m` values of m); sample-based
    metrics of diverged cells are left out."""
    out = {}
    for mode in sorted({r["mode"] for r in rows}):
        cells = [r for r in rows if r["mode"] == mode and _usable(r["metrics"], metric)]
        if not cells:
            continue
        ms, seeds = sorted({r["m"] for r in cells}), sorted({r["seed"] for r in cells})
        table = np.full((len(seeds), len(ms)), np.nan)
        for r in cells:
            table[seeds.index(r["seed"]), ms.index(r["m"])] = r["metrics"][metric]
        if len(ms) >= min_m:
            out[mode] = Curve.of(ms, table)
    return out


def _usable(metrics: dict, metric: str) -> bool:
    value = metrics.get(metric)
    if value is None or not math.isfinite(value) or value <= 0:
        return False
    return not (metric in SAMPLE_METRICS and metrics.get("diverged"))


def source_estimate(cfg: Config, eps: Epsilon, error: str, *, holdouts: int, ladder=LADDER,
                    modes=("frozen", "scratch"), seeds: int = 1, steps: int | None = HOLDOUT_STEPS,
                    level: float = 0.8, target_rows: list[dict] | None = None, tracking_uri: str | None = None,
                    quiet: bool = True, jobs: int = 0) -> tuple[dict, dict]:
    """(prediction per mode, evidence): the held-out curves of `error` fitted and pooled, updated with the
    target's own sweep rows when given (estimate.predict)."""
    from cdmtransfer.estimate import predict, suite_dims

    dims = suite_dims(cfg)
    K, n = dims["K"], dims["n"]
    pool = n - min(cfg.suite.n_test, n // 4)  # rows a held-out source leaves for adaptation (tasks/holdout.py)
    usable = [m for m in ladder if m <= pool]
    if len(usable) < 2:
        raise ConfigError(f"--ladder {','.join(map(str, ladder))}: a held-out source has {pool} rows to adapt on; "
                          f"give at least two sizes <= {pool}")
    if len(usable) < len(ladder):
        _say(quiet, f"ladder: m > {pool} dropped (a held-out source has {pool} rows to adapt on)")
    ladder = usable
    ks = choose_holdouts(K, holdouts, cfg.seed)
    start = time.perf_counter()
    found = run_holdouts(cfg, ks, ladder=ladder, modes=modes, seeds=seeds, steps=steps, tracking_uri=tracking_uri,
                         quiet=quiet, jobs=jobs)
    curves = {mode: [] for mode in modes}
    for h in found:
        got = curves_of(h.rows, error)
        for mode in modes:
            if mode not in got:
                raise ConfigError(f"held-out source {h.k}: no usable {error!r} at two or more m in mode {mode} "
                                  f"(the suite may not provide it, or every cell diverged); try --error "
                                  f"{'posterior_mean_mse' if error != 'posterior_mean_mse' else 'test_dsm'}")
            curves[mode].append(got[mode])
    target = None
    if target_rows is not None:
        target = {mode: c for mode, c in curves_of(target_rows, error, min_m=1).items() if mode in modes}
        if not target:
            raise ConfigError(f"--calibrate: the target sweep has no {error!r} in the modes {', '.join(modes)}")
    fit_start = time.perf_counter()
    predicted = predict(curves, ks, eps, level=level, target=target, error=error)
    evidence = {"holdout_tasks": ks, "ladder": [int(m) for m in ladder], "seeds": seeds, "modes": list(modes),
                "pretrain_steps_cap": min(steps, cfg.pretrain.steps) if steps else cfg.pretrain.steps, "K": K,
                "runs": [{"task": h.k, "sweep_run_id": h.sweep_run_id, "pretrain_run_id": h.pretrain_run_id,
                          "reused": h.reused, "seconds": h.seconds, "pretrain_val_loss": h.pretrain_val_loss}
                         for h in found],
                "seconds": {"training": fit_start - start, "statistics": time.perf_counter() - fit_start}}
    return predicted, evidence
