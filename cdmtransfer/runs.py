"""Working with a finished run: reload its model, evaluate it again, draw conditional samples from it."""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from cdmtransfer import data_checks
from cdmtransfer.checkpoint import load_export
from cdmtransfer.config import Config, TrackingConfig, apply_override, check_consistency, from_dict
from cdmtransfer.diffusion import OUProcess
from cdmtransfer.errors import ConfigError, DataError
from cdmtransfer.metrics import conditional_samples, divergence_warning, evaluate_model
from cdmtransfer.models import ScoreModel, rebuild
from cdmtransfer.progress import note
from cdmtransfer.tasks import build_taskset
from cdmtransfer.tracking import TAG, Run, RunSummary, Tracker, find_model_dir, resolve_store


def load_run(source: str, *, tracking_uri: str | None = None, overrides: list[str] = (),
             home: str | None = None) -> tuple[ScoreModel, Config, dict, Tracker]:
    """The EMA model of a run (id, runs:/ or models:/ URI, or local model directory) and its resolved config."""
    tracking = TrackingConfig()
    tracker = Tracker(resolve_store(tracking_uri, None, home or tracking.home), tracking.experiment)
    with tempfile.TemporaryDirectory(prefix="cdmtransfer-") as tmp:
        model_dir, _ = find_model_dir(tracker, source, Path(tmp))
        model, cfg, meta = load_model_dir(model_dir, source, overrides)
    return model, cfg, meta, tracker


def load_model_dir(model_dir: Path, source: str, overrides: list[str] = ()) -> tuple[ScoreModel, Config, dict]:
    """The EMA model and resolved config of an exported model directory; a damaged one is a DataError."""
    weights, meta = load_export(model_dir)
    data = meta.get("config")
    if not isinstance(data, dict):
        raise DataError(f"{source}: checkpoint holds no config")
    for item in overrides:
        apply_override(data, item)
    cfg = from_dict(Config, data, f"config of {source}")
    check_consistency(cfg, f"config of {source}")
    model = rebuild(meta.get("model"), source)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise DataError(f"{source}: weights do not fit the stored model spec ({str(exc).splitlines()[0]})") from None
    return model.eval(), cfg, meta


def evaluate_run(source: str, *, tracking_uri: str | None = None, overrides: list[str] = (),
                 home: str | None = None, quiet: bool = False, progress: bool = False) -> RunSummary:
    """Recompute the target metrics of an adapt run (evaluation settings can be changed with overrides).

    Diverged samples: the run gets the tag cdmtransfer.diverged = "true" and, unless `quiet`, one warning line on
    stderr, as adapt does; degenerate data (data_checks) likewise. The reference estimators use the run's own m
    target samples (adapt.m and seed of its config). `progress`: a line on stderr when evaluation starts and ends.
    """
    model, cfg, meta, tracker = load_run(source, tracking_uri=tracking_uri, overrides=overrides, home=home)
    if meta.get("stage") != "adapt":
        raise ConfigError(f"{source}: evaluate takes an adapt run; a {meta.get('stage')} run has no target head")
    taskset = build_taskset(cfg)
    data_warnings = data_checks.for_stage(taskset.data_warnings, ("adapt",))
    if not quiet:
        data_checks.echo(cfg, data_warnings)
    e, start = cfg.evaluate, time.perf_counter()
    note("evaluate", f"{source}: {taskset.test_x.shape[0]} test pairs, {e.posterior_samples} samples per condition "
                     f"({e.sampler}, {e.sampler_steps} steps), seed {e.seed}", progress)
    metrics, skipped = evaluate_model(model, taskset, cfg)
    note("evaluate", f"done in {time.perf_counter() - start:.1f} s", progress)
    run_id = meta.get("run_id", "")
    warning = divergence_warning(f"evaluate {run_id or source}", metrics, skipped, cfg.evaluate.divergence_ratio)
    if run_id:
        run = tracker.get_run(run_id)
        step = int(run.data.metrics.get("eval/count", 0)) + 1
        live = Run(tracker, run_id)
        live.log_metrics({f"eval/{k}": v for k, v in metrics.items()} | {"eval/count": step}, step=step)
        live.flush()
        if data_warnings:
            live.set_tags(data_checks.tags(data_warnings))
        if warning:
            live.set_tags({TAG + "diverged": "true"})
    if warning and not quiet:
        print(warning, file=sys.stderr, flush=True)
    return RunSummary(run_id, "evaluate", metrics, {}, {"mode": meta.get("mode"), "skipped": skipped},
                      tracker.store.uri)


def read_conditions(path: Path) -> np.ndarray:
    """Conditions y from .npy ([C, D_y]), .npz (array 'y') or .csv (numbers only, one row per condition)."""
    if not path.is_file():
        raise DataError(f"{path}: conditions file not found")
    try:
        if path.suffix == ".npy":
            y = np.load(path, allow_pickle=False)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "y" not in z.files:
                    raise DataError(f"{path}: no array 'y' (found {', '.join(z.files) or 'none'})")
                y = z["y"]
        elif path.suffix == ".csv":
            with warnings.catch_warnings():  # an empty file: numpy warns, then the check below refuses it
                warnings.simplefilter("ignore", UserWarning)
                y = np.loadtxt(path, delimiter=",", ndmin=2)
        else:
            raise DataError(f"{path}: unsupported conditions file; use .npy, .npz (array y) or .csv")
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 (ValueError, OSError, BadZipFile, zlib.error, ... from a damaged file)
        raise DataError(f"{path}: cannot read conditions ({(str(exc).splitlines() or [type(exc).__name__])[0]})") \
            from None
    if y.dtype.kind not in "iuf":
        raise DataError(f"{path}: conditions must be real numbers, got dtype {y.dtype}")
    y = np.asarray(y, dtype=np.float64)
    if y.ndim == 1:
        y = y[None]
    if y.ndim != 2 or not np.isfinite(y).all():
        raise DataError(f"{path}: conditions must be a finite 2-D array [C, D_y], got shape {y.shape}")
    if y.shape[0] == 0:
        raise DataError(f"{path}: no conditions (shape {y.shape})")
    if y.size and np.abs(y).max() > np.finfo(np.float32).max:  # the model computes in float32: these are inf
        raise DataError(f"{path}: conditions beyond the float32 range; rescale them")
    return y


def sample_run(source: str, n: int, out: Path | str, *, y_file: Path | str | None = None, test: bool = False,
               task: int = 0, tracking_uri: str | None = None, overrides: list[str] = (),
               home: str | None = None, seed: int = 0, progress: bool = False) -> RunSummary:
    """Draw n samples per condition and write them to `out` (.npz with arrays samples [C, n, d_x] and y).

    `progress`: a line on stderr when sampling starts and ends. Paths may be strings (the Python API)."""
    if (y_file is None) == (not test):
        raise ConfigError("give exactly one of --y FILE or --test")
    out, y_file = Path(out), None if y_file is None else Path(y_file)
    model, cfg, meta, tracker = load_run(source, tracking_uri=tracking_uri, overrides=overrides, home=home)
    head = 0 if meta.get("stage") == "adapt" else task - 1
    if meta.get("stage") == "pretrain" and not 1 <= task <= model.heads.K:
        raise ConfigError(f"{source} is a pretrain run: choose a source head with --task 1..{model.heads.K}")
    taskset = build_taskset(cfg)
    if test:
        y = taskset.test_y
    else:
        y_raw = read_conditions(y_file)
        if y_raw.shape[1] != taskset.D_y:
            raise DataError(f"{y_file}: conditions have {y_raw.shape[1]} columns, the model expects D_y = {taskset.D_y}")
        y = taskset.standardize_y(torch.as_tensor(y_raw, dtype=torch.float32))
    process = OUProcess(cfg.diffusion.T0, cfg.diffusion.T)
    e = cfg.evaluate
    start = time.perf_counter()
    note("sample", f"{y.shape[0]} conditions × {n} samples ({e.sampler}, {e.sampler_steps} steps), seed {seed}",
         progress)
    draws = conditional_samples(model, y, n, process, e.sampler_steps, e.sampler,
                                torch.Generator().manual_seed(seed), head=head)
    note("sample", f"done in {time.perf_counter() - start:.1f} s", progress)
    draws = taskset.unstandardize_x(draws)
    y_out = y if taskset.y_mean is None else y * taskset.y_std + taskset.y_mean
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, samples=draws.numpy(), y=y_out.numpy())
    tmp.replace(out)
    paths = {"samples": out}
    if taskset.preview is not None:  # image suites: a PNG grid beside the .npz (first 8 conditions, ≤ 8 samples)
        from cdmtransfer.images import save_grid

        c = min(8, y.shape[0])
        grid, labels = taskset.preview(y[:c], draws[:c, :8], taskset.test_x[:c] if test else None)
        paths["grid"] = save_grid(out.with_suffix(".png"), grid, labels, title=taskset.description)
    return RunSummary(meta.get("run_id", ""), "sample", {}, paths,
                      {"conditions": int(y.shape[0]), "per_condition": n, "sampler": e.sampler,
                       "steps": e.sampler_steps}, tracker.store.uri)
