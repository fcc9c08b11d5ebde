"""The `cdmtransfer` command line: parse, build the Config, call the stage, print. No maths here.

torch and mlflow are imported only inside commands, so `cdmtransfer --help` stays fast.
Exit codes: 0 ok, 1 runtime failure, 2 usage or config error, 3 data error, 130 interrupted.
"""

from __future__ import annotations

import atexit
import functools
import gc
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer

from cdmtransfer import __version__
from cdmtransfer.errors import CdmError, ConfigError, one_line, request_stop, stop_requested

app = typer.Typer(name="cdmtransfer", no_args_is_help=True, rich_markup_mode="rich", add_completion=True,
                  pretty_exceptions_enable=False,
                  help="Few-shot transfer for conditional diffusion models: pretrain a shared condition encoder on "
                       "K source tasks, adapt it to a small target set, and measure how many target samples you need.")

RECIPE = "Recipe"
OUTPUT = "Output"
TRACK = "Tracking"

RecipeArg = Annotated[str, typer.Argument(metavar="RECIPE", help="Recipe YAML, e.g. recipes/quickstart.yaml.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="KEY=VALUE", rich_help_panel=RECIPE,
    help="Override a recipe key, e.g. --set adapt.steps=500 (repeatable; values parsed as YAML).")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Run seed (training noise, target subset).",
                                                 rich_help_panel=RECIPE)]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and exit.",
                                          rich_help_panel=RECIPE)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout (run ids, metrics, paths).",
                                        rich_help_panel=OUTPUT)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines (warnings and errors still print).",
                                       rich_help_panel=OUTPUT)]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.",
                                           rich_help_panel=OUTPUT)]
TrackingOpt = Annotated[Optional[str], typer.Option(
    "--tracking-uri", metavar="URI", rich_help_panel=TRACK,
    help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the embedded store in ./cdmtransfer-runs).")]
ResumeOpt = Annotated[Optional[str], typer.Option(
    "--resume", metavar="RUN_ID", rich_help_panel=TRACK,
    help="Continue an interrupted run from its last checkpoint (same recipe).")]
EncoderOpt = Annotated[Optional[str], typer.Option(
    "--encoder", metavar="SRC", help="Pretrained encoder: a pretrain run id, runs:/ or models:/ URI, or a path.")]
SweepEncoderOpt = Annotated[Optional[str], typer.Option(
    "--encoder", metavar="SRC[,SRC..]", help="Pretrained encoder(s) in place of the sweep's own pretrain: a pretrain "
                                             "run id, runs:/ or models:/ URI, or a path; several, comma-separated, "
                                             "run every frozen/finetune/auto cell on each and also average them.")]


def handled(fn):
    """Turn known errors into one line on stderr and the right exit code; tracebacks only with --verbose."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CdmError as exc:
            if kwargs.get("verbose"):
                traceback.print_exc()
            print(f"error: {one_line(str(exc))}", file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # a bug or an environment failure: say what, keep the traceback for --verbose
            if stop_requested():  # SIGTERM's KeyboardInterrupt, turned into another exception by library code
                print("interrupted", file=sys.stderr)
                raise typer.Exit(130) from None
            if kwargs.get("verbose"):
                traceback.print_exc()
            first = (str(exc).strip().splitlines() or [""])[0]
            print(f"error: {type(exc).__name__}: {one_line(first)} (run with --verbose for the traceback)",
                  file=sys.stderr)
            raise typer.Exit(1) from None

    return wrapper


def _config(recipe: str, sets: list[str] | None, flags: dict | None = None):
    """The recipe with `--set` overrides, then explicit flags (recipe key -> value; None means not given) on top."""
    from cdmtransfer.config import load_config

    overrides = list(sets or [])
    overrides += [f"{key}={value}" for key, value in (flags or {}).items() if value is not None]
    return load_config(recipe, overrides)


def _dry_run(cfg) -> None:
    from cdmtransfer.config import dump_config

    sys.stdout.write(dump_config(cfg))


def _print_summary(summary, json_out: bool, title: str) -> None:
    from cdmtransfer import report

    if json_out:
        report.emit_json(summary.to_dict())
        return
    out = report.console()
    skipped = dict(summary.info.get("skipped") or {})
    flagged = skipped.pop("flags", None) or {}  # metrics.FLAGS: metrics from diverged samples, marked in the table
    if summary.metrics:
        out.print(report.metrics_table(title, summary.metrics, flagged))
    for key, path in summary.paths.items():
        out.print(f"{key}: {path}")
    for key, why in skipped.items():
        out.print(f"skipped {key}: {why}")
    choice = summary.info.get("choice") or {}
    if choice.get("reason"):  # what adapt's cross-validation or the pretrain's decay grid chose, and why
        out.print(choice["reason"])
    if summary.run_id:
        out.print(f"run id: {summary.run_id}")
    report.store_footer(out, summary.tracking_uri)


def _show_version(value: bool) -> None:
    if value:  # eager: runs while parsing, before typer asks for a command
        print(f"cdmtransfer {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_show_version,
                                                help="Show the version and exit.")] = False):
    """Few-shot transfer for conditional diffusion models."""


@app.command(epilog="Example: cdmtransfer pretrain recipes/gaussian-linear.yaml --set pretrain.steps=500")
@handled
def pretrain(recipe: RecipeArg, set_: SetOpt = None, seed: SeedOpt = None, resume: ResumeOpt = None,
             tracking_uri: TrackingOpt = None, dry_run: DryRunOpt = False, json_out: JsonOpt = False,
             quiet: QuietOpt = False, verbose: VerboseOpt = False):
    """Learn the shared encoder h(y) jointly with K source score heads (joint DSM over the source tasks)."""
    cfg = _config(recipe, set_, {"seed": seed})
    if dry_run:
        return _dry_run(cfg)
    from cdmtransfer.pretraining import pretrain as run_pretrain

    summary = run_pretrain(cfg, tracking_uri=tracking_uri, resume=resume, quiet=quiet or json_out)
    if summary.info.get("rank"):  # torchrun ranks other than 0 stay silent
        return
    _print_summary(summary, json_out, f"pretrain {cfg.name}")


@app.command(epilog="Example: cdmtransfer adapt recipes/gaussian-linear.yaml --encoder RUN_ID --mode frozen --m 16")
@handled
def adapt(recipe: RecipeArg,
          encoder: EncoderOpt = None,
          mode: Annotated[Optional[str], typer.Option(
              metavar="frozen|finetune|auto|scratch|oracle",
              help="How the encoder is treated (default: adapt.mode); auto: frozen, finetune or scratch, chosen "
                   "by cross-validation on the m samples; oracle: frozen with the suite's true h* in place of the "
                   "learned encoder, the ceiling of any learned one (its source heads are pretrained on h* first, "
                   "or --encoder names such a pretrain: pretrain --set model.encoder=oracle --set model.d=D)."
              )] = None,
          m: Annotated[Optional[int], typer.Option("--m", help="Target samples (default: adapt.m).")] = None,
          set_: SetOpt = None, seed: SeedOpt = None, resume: ResumeOpt = None, tracking_uri: TrackingOpt = None,
          dry_run: DryRunOpt = False, json_out: JsonOpt = False, quiet: QuietOpt = False,
          verbose: VerboseOpt = False):
    """Train a target head on m target samples with the encoder frozen, fine-tuned, chosen by validation (auto), from
    scratch or the true h*."""
    from cdmtransfer.config import resolve_adapt

    cfg = _config(recipe, set_, {"adapt.mode": mode, "adapt.m": m, "seed": seed})
    if dry_run:
        return _dry_run(resolve_adapt(cfg))  # unset steps / batch size / lr as the m-aware rule fills them
    from cdmtransfer.adaptation import adapt as run_adapt

    summary = run_adapt(cfg, encoder=encoder, tracking_uri=tracking_uri, resume=resume, quiet=quiet or json_out)
    _print_summary(summary, json_out, f"adapt {cfg.adapt.mode}, m = {cfg.adapt.m}")


@app.command(epilog="Example: cdmtransfer sweep recipes/quickstart.yaml --m 8,16,32 --modes frozen,scratch --seeds 3")
@handled
def sweep(recipe: RecipeArg,
          m: Annotated[Optional[str], typer.Option("--m", metavar="M1,M2,..", help="Target sizes.")] = None,
          modes: Annotated[Optional[str], typer.Option(
              metavar="MODE,..", help="Adaptation modes: frozen, finetune, auto, scratch, oracle.")] = None,
          seeds: Annotated[Optional[int], typer.Option(help="Seeds per (mode, m).")] = None,
          pretrain_seeds: Annotated[Optional[int], typer.Option(
              help="Encoders to pretrain (seeds seed, seed + 1000, ..): frozen/finetune/auto cells run on each, so "
                   "the spread includes the encoder's (sweep.pretrain_seeds).")] = None,
          jobs: Annotated[int, typer.Option(help="Processes that train cells, this one included (0: one per core).")] = 0,
          encoder: SweepEncoderOpt = None, set_: SetOpt = None, seed: SeedOpt = None, resume: ResumeOpt = None,
          tracking_uri: TrackingOpt = None,
          dry_run: DryRunOpt = False, json_out: JsonOpt = False, quiet: QuietOpt = False,
          verbose: VerboseOpt = False):
    """Learning curves: pretrain once, then adapt for every (mode, m, seed) as child runs of one parent run."""
    if jobs < 0:
        raise ConfigError(f"--jobs {jobs}: must be >= 0 (0: one process per core)")
    cfg = _config(recipe, set_, {"sweep.m": m and f"[{m}]", "sweep.modes": modes and f"[{modes}]",
                                 "sweep.seeds": seeds, "sweep.pretrain_seeds": pretrain_seeds, "seed": seed})
    if dry_run:
        return _dry_run(cfg)
    from cdmtransfer.schedule import Workers, default_jobs

    s = cfg.sweep
    with Workers((jobs or default_jobs(len(s.modes) * len(s.m) * s.seeds)) - 1) as workers:
        workers.warm()  # the workers import torch and MLflow while this process does
        from cdmtransfer import report
        from cdmtransfer.curves import sweep as run_sweep

        result = run_sweep(cfg, encoder=encoder, tracking_uri=tracking_uri, quiet=quiet or json_out,
                           resume=resume, workers=workers)
    if json_out:
        return report.emit_json(result.to_dict())
    out = report.console()
    encoders = len({row.get("pretrain", 0) for row in result.rows})
    over = "seeds" if encoders < 2 else f"seeds × {encoders} encoders"
    out.print(report.sweep_table(result.summary, f"{cfg.name}: target error by mode and m (mean ± sd over {over})"))
    for extra in (report.references_table(result.summary), report.ensemble_table(result.ensembles)):
        if extra is not None:
            out.print(extra)
    if result.ensemble_runs:  # their models: `evaluate RUN`, `sample RUN`
        by_cell: dict = {}
        for e in result.ensemble_runs:
            by_cell.setdefault(f"{e['mode']} m={e['m']}", []).append(e["run_id"])
        out.print("averaged models (evaluate and sample load them): "
                  + "; ".join(f"{cell}: {', '.join(ids)}" for cell, ids in by_cell.items()), soft_wrap=True)
    for mode, why in result.skipped_modes.items():
        out.print(f"skipped mode {mode}: {why}")
    if result.plots:
        out.print(f"learning curves: {', '.join(result.plots.values())} (artifacts of the sweep run)")
    own = result.pretrain_run_ids
    out.print(f"sweep run id: {result.run_id}"
              + (f"  (pretrain run{'s' * (len(own) > 1)} {', '.join(own)})" if own else ""))
    report.store_footer(out, result.tracking_uri)


@app.command(epilog="Example: cdmtransfer evaluate RUN_ID --set evaluate.posterior_samples=64")
@handled
def evaluate(run: Annotated[str, typer.Argument(metavar="RUN", help="Adapt run id, runs:/ or models:/ URI, or path.")],
             set_: SetOpt = None,
             seed: Annotated[Optional[int], typer.Option(help="Evaluation noise seed (evaluate.seed; default: the "
                                                              "run's).", rich_help_panel=RECIPE)] = None,
             tracking_uri: TrackingOpt = None, json_out: JsonOpt = False, quiet: QuietOpt = False,
             verbose: VerboseOpt = False):
    """Recompute the target metrics of an adapt run (and log them to it under eval/)."""
    from cdmtransfer.runs import evaluate_run

    overrides = list(set_ or []) + ([f"evaluate.seed={seed}"] if seed is not None else [])
    summary = evaluate_run(run, tracking_uri=tracking_uri, overrides=overrides, progress=not (quiet or json_out))
    _print_summary(summary, json_out, f"evaluate {run}")


@app.command(epilog="Example: cdmtransfer sample RUN_ID --n 64 --test --out samples.npz")
@handled
def sample(run: Annotated[str, typer.Argument(metavar="RUN", help="Run id, runs:/ or models:/ URI, or path.")],
           n: Annotated[int, typer.Option("--n", help="Samples per condition (>= 1).")] = 16,
           y: Annotated[Optional[Path], typer.Option("--y", metavar="FILE",
                                                     help="Conditions: .npy [C, D_y], .npz (array y) or .csv.")] = None,
           test: Annotated[bool, typer.Option("--test", help="Use the held-out target conditions.")] = False,
           out: Annotated[Path, typer.Option("--out", help="Output .npz (arrays samples, y); image suites also "
                                                          "write a .png grid beside it.")] = Path("samples.npz"),
           task: Annotated[int, typer.Option(help="Source head 1..K when RUN is a pretrain run.")] = 0,
           set_: SetOpt = None,
           seed: Annotated[int, typer.Option(help="Sampling seed.", rich_help_panel=RECIPE)] = 0,
           tracking_uri: TrackingOpt = None, json_out: JsonOpt = False, quiet: QuietOpt = False,
           verbose: VerboseOpt = False):
    """Draw conditional samples from a run's EMA model and write them to .npz."""
    from cdmtransfer.runs import sample_run

    if n < 1:
        raise ConfigError(f"--n {n}: must be >= 1")
    if not 0 <= seed <= 2**62:
        raise ConfigError(f"--seed {seed}: must be in 0..2**62")

    summary = sample_run(run, n, out, y_file=y, test=test, task=task, tracking_uri=tracking_uri,
                         overrides=list(set_ or []), seed=seed, progress=not (quiet or json_out))
    _print_summary(summary, json_out, "sample")


SOURCES = "Source calibration"
THEORY = "Theory"


@app.command(epilog="Examples: cdmtransfer estimate recipes/quickstart.yaml --epsilon 0.4  |  --epsilon 10% "
                    "--error test_dsm  |  --epsilon 0.4 --calibrate SWEEP_RUN_ID (a sweep at m = 8, 16)")
@handled
def estimate(recipe: RecipeArg,
             epsilon: Annotated[str, typer.Option(
                 metavar="E|P%", help="Target error: a value of --error (0.4), or a percentage over its fitted floor "
                                      "(10%: within 10% of the floor).")],
             error: Annotated[str, typer.Option(
                 metavar="posterior_mean_mse|test_dsm|score_error",
                 help="The error ε is stated in (score_error: suites with exact scores).")] = "posterior_mean_mse",
             over_floor: Annotated[bool, typer.Option("--over-floor",
                                                      help="ε is an excess over the fitted floor.")] = False,
             level: Annotated[float, typer.Option(min=0.5, max=0.99, help="Interval level.")] = 0.8,
             holdout: Annotated[Optional[int], typer.Option(
                 "--holdout", min=0, metavar="L", rich_help_panel=SOURCES,
                 help="Source tasks held out in turn as stand-in targets (default min(3, K − 1); 0: none, theory "
                      "and target-only fits).")] = None,
             holdout_steps: Annotated[Optional[int], typer.Option(
                 min=1, rich_help_panel=SOURCES,
                 help="Step cap of the held-out pretrains (default: the recipe's pretrain.steps; they stop by "
                      "validation either way).")] = None,
             ladder: Annotated[str, typer.Option(metavar="M1,M2,..", rich_help_panel=SOURCES,
                                                 help="Target sizes of the held-out sweeps (sizes above a held-out "
                                                      "source's rows are dropped).")] = "8,16,32,64,128,256",
             seeds: Annotated[int, typer.Option(min=1, rich_help_panel=SOURCES,
                                                help="Seeds per held-out (mode, m).")] = 1,
             finetune: Annotated[bool, typer.Option("--finetune", rich_help_panel=SOURCES,
                                                    help="Predict finetune too (frozen and scratch always).")] = False,
             jobs: Annotated[int, typer.Option(min=0, rich_help_panel=SOURCES,
                                               help="Processes that train cells, this one included (0: one per core).")] = 0,
             calibrate: Annotated[Optional[str], typer.Option(
                 metavar="SWEEP_RUN", help="The target's own sweep (e.g. m = 8, 16): updates the prediction; with "
                                           "--holdout 0, a fit to it alone.")] = None,
             diversity: Annotated[bool, typer.Option(
                 "--diversity", rich_help_panel=THEORY,
                 help="Measure task diversity 1/ν and Δ, ε_approx and how the floor moves with K and n (several "
                      "encoders, heads refit on each task; minutes).")] = False,
             theory_table: Annotated[bool, typer.Option("--theory", rich_help_panel=THEORY,
                                                        help="Also print the uncalibrated bounds (always with "
                                                             "--holdout 0).")] = False,
             delta: Annotated[float, typer.Option(help="Failure probability δ in (0, 1).", rich_help_panel=THEORY)] = 0.1,
             mode: Annotated[str, typer.Option(metavar="transfer|meta|scratch,..", rich_help_panel=THEORY,
                                               help="Bounds to invert.")] = "transfer,scratch",
             metric: Annotated[str, typer.Option(metavar="score|tv", help="Score error or TV distance.",
                                                 rich_help_panel=THEORY)] = "score",
             nu: Annotated[Optional[float], typer.Option(help="Task diversity ν (Def 3.1).", rich_help_panel=THEORY)] = None,
             diversity_delta: Annotated[Optional[float], typer.Option(help="Task diversity Δ (Def 3.1).",
                                                                      rich_help_panel=THEORY)] = None,
             eps_approx: Annotated[Optional[float], typer.Option(help="Misspecification ε_approx.",
                                                                 rich_help_panel=THEORY)] = None,
             constant: Annotated[Optional[float], typer.Option("--constant", help="Universal constant C (default 1).",
                                                               rich_help_panel=THEORY)] = None,
             log_factor: Annotated[Optional[float], typer.Option(
                 help="Use this constant for every log factor ι (default 1: bare rates).", rich_help_panel=THEORY)] = 1.0,
             paper_logs: Annotated[bool, typer.Option("--paper-logs", help="Use the paper's log factors instead.",
                                                      rich_help_panel=THEORY)] = False,
             set_: SetOpt = None,
             seed: Annotated[Optional[int], typer.Option(help="Seed of the held-out runs and of the target-only fit's "
                                                              "bootstrap (default: the recipe's seed).",
                                                         rich_help_panel=RECIPE)] = None,
             tracking_uri: TrackingOpt = None, json_out: JsonOpt = False, quiet: QuietOpt = False,
             verbose: VerboseOpt = False):
    """How many target samples for error ε: predicted from source tasks held out as stand-in targets (no target
    data needed), updated with a small target sweep (--calibrate), and the theory's bounds (orders of magnitude)."""
    from cdmtransfer.curve_fit import Epsilon
    from cdmtransfer.estimate import ERRORS
    from cdmtransfer.estimate import estimate as run_estimate
    from cdmtransfer.progress import note
    from cdmtransfer.theory import METRICS, MODES

    cfg = _config(recipe, set_, {"seed": seed})
    try:
        eps = Epsilon.parse(epsilon, over_floor)
        m_ladder = sorted({int(v) for v in ladder.split(",") if v.strip()})
    except ValueError as exc:
        raise ConfigError(f"--epsilon/--ladder: {exc}") from None
    if error not in ERRORS:
        raise ConfigError(f"--error {error!r} is not one of {', '.join(ERRORS)}")
    if len(m_ladder) < 2 or m_ladder[0] < 1:
        raise ConfigError(f"--ladder {ladder}: needs at least two sizes >= 1")
    modes = [m.strip() for m in mode.split(",") if m.strip()]
    for name in modes:
        if name not in MODES:
            raise ConfigError(f"--mode {name!r} is not one of {', '.join(MODES)}")
    if metric not in METRICS:
        raise ConfigError(f"--metric {metric!r} is not one of {', '.join(METRICS)}")
    overrides = {"nu": nu, "Delta": diversity_delta, "eps_approx": eps_approx, "C": constant,
                 "iota": None if paper_logs else log_factor}
    if calibrate:
        note("estimate", f"reading the curves of sweep {calibrate}", not (quiet or json_out))
    results = _sweep_results(cfg, tracking_uri, calibrate) if calibrate else None
    if holdout is None:
        from cdmtransfer.estimate import suite_dims
        from cdmtransfer.source_calibration import default_holdouts

        holdout = default_holdouts(suite_dims(cfg)["K"])
    theory_eps = eps.value if eps.kind == "absolute" else None
    curves = None
    if results is not None and holdout == 0 and theory_eps:
        from cdmtransfer.estimate import sweep_curves

        curves = sweep_curves(results, error)
    report = run_estimate(cfg, theory_eps, delta=delta, modes=modes, metric=metric, overrides=overrides,
                          calibration=curves, theory_table=theory_table or holdout == 0, seed=cfg.seed)
    report.error, report.epsilon_text = error, eps.text()
    if holdout > 0:
        from cdmtransfer.source_calibration import source_estimate

        report.predicted, report.evidence = source_estimate(
            cfg, eps, error, holdouts=holdout, ladder=m_ladder,
            modes=("frozen", "finetune", "scratch") if finetune else ("frozen", "scratch"), seeds=seeds,
            steps=holdout_steps, level=level, target_rows=results["rows"] if results else None,
            tracking_uri=tracking_uri, quiet=quiet or json_out, jobs=jobs)
    elif eps.kind != "absolute":
        report.notes.append(f"ε = {eps.text()} needs a fitted floor: use --holdout or --calibrate")
    if diversity:
        from cdmtransfer.diversity import measure

        note("estimate", "measuring task diversity (pretrains on K, K/2 sources and n, n/4 rows; heads refit per "
                         "encoder)", not (quiet or json_out))
        caps = {"pretrain_steps": min(holdout_steps, cfg.pretrain.steps)} if holdout_steps else {}  # else its own
        report.diversity = measure(cfg, **caps, quiet=quiet or json_out)
    from cdmtransfer import report as rep
    from cdmtransfer.estimate import log_estimate

    run_id = log_estimate(cfg, report, recipe, calibrate, tracking_uri)
    if json_out:
        rep.emit_json({**report.to_dict(), "run_id": run_id})
    else:
        rep.estimate_tables(rep.console(), report, quiet=quiet)
        if not quiet:
            rep.console().print(f"estimate run id: {run_id}")


def _sweep_results(cfg, tracking_uri: str | None, run_id: str) -> dict:
    import json
    import tempfile

    from cdmtransfer.tracking import open_tracker

    tracker = open_tracker(cfg, tracking_uri)
    run = tracker.get_run(run_id)
    if run.data.tags.get("cdmtransfer.stage") != "sweep":
        raise ConfigError(f"--calibrate {run_id}: not a sweep run")
    with tempfile.TemporaryDirectory() as tmp:
        path = tracker.client.download_artifacts(run_id, "results.json", tmp)
        return json.loads(open(path).read())


def _terminate(signum, frame):
    request_stop()  # kept even where the exception below is swallowed (errors.request_stop)
    raise KeyboardInterrupt  # so a run stopped with SIGTERM is marked KILLED, not left RUNNING


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    atexit.register(gc.freeze)  # exit without a final collection over torch's and MLflow's objects (~1 s)
    app()
