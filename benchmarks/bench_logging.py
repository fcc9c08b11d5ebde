"""Benchmark 2 (`logging`): the share of training wall time spent writing metrics to MLflow in a real `pretrain`.
Run from the repository root:

    .venv/bin/python benchmarks/bench_logging.py [--quick] [--threads N] [--pretrain-steps N]

Runs cdmtransfer.pretraining.pretrain twice on a temporary store (cold, then warm) and splits its wall time with timing
wrappers around a few functions, restored afterwards. Prints markdown tables on stdout; progress goes to stderr.
See benchmarks/README.md.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from _common import log, main, status, table

NAME = "logging"
GOAL_LOGGING_SHARE = 3.0  # % of train wall time spent in MLflow writes
OPTIONS = [("--pretrain-steps", {"type": int, "help": "steps of the real pretrain (default 1000; quick 200)"})]


def defaults(args) -> None:
    args.pretrain_steps = args.pretrain_steps or (200 if args.quick else 1000)


class Timings:
    """Wrap attributes with cumulative wall-time counters; restored on exit. Missing attributes are skipped."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._undo = []

    def wrap(self, owner, attr: str, label: str) -> None:
        fn = getattr(owner, attr, None)
        if fn is None:
            return
        self.seconds.setdefault(label, 0.0)
        self.calls.setdefault(label, 0)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[label] += time.perf_counter() - t0
                self.calls[label] += 1

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, fn))

    def restore(self) -> None:
        for owner, attr, fn in reversed(self._undo):
            setattr(owner, attr, fn)
        self._undo.clear()


def run(args) -> dict:
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the store must be the temporary one
    import mlflow

    from cdmtransfer import pretraining, tracking
    from cdmtransfer import train as train_mod
    from cdmtransfer.config import load_config

    runs = []
    with tempfile.TemporaryDirectory(prefix="cdm-bench-mlflow-") as home:
        for label in ("cold store", "warm store"):
            cfg = load_config(None, [f"tracking.home={home}", f"pretrain.steps={args.pretrain_steps}",
                                     "pretrain.log_every=25", f"threads={args.threads}", "name=bench"])
            t = Timings()
            t.wrap(pretraining, "build_taskset", "build task set")
            t.wrap(pretraining, "open_tracker", "open store + experiment")
            t.wrap(mlflow.MlflowClient, "create_run", "create run")
            t.wrap(tracking.Run, "log_params", "log params")
            t.wrap(tracking.Run, "log_dict", "log config.json")
            t.wrap(pretraining, "train", "train() (= train_seconds)")
            t.wrap(train_mod, "save_checkpoint", "  of which checkpoints")
            t.wrap(tracking.Run, "flush", "metric flushes (= logging_seconds)")
            t.wrap(pretraining, "export_model", "export model")
            t.wrap(pretraining, "finish_run", "log artifacts + register model")
            t.wrap(mlflow.MlflowClient, "set_terminated", "set terminated")
            log(f"logging: pretrain {args.pretrain_steps} steps ({label})")
            t0 = time.perf_counter()
            try:
                summary = pretraining.pretrain(cfg, quiet=True)
            finally:
                t.restore()
            total = time.perf_counter() - t0
            train_s = float(summary.metrics["train_seconds"])
            logging_s = float(summary.info.get("logging_seconds", float("nan")))
            breakdown = {k: {"seconds": v, "calls": t.calls[k]} for k, v in t.seconds.items()}
            accounted = sum(v for k, v in t.seconds.items()
                            if not k.startswith("  ") and k != "metric flushes (= logging_seconds)")
            # flushes inside train() are already in train(); the final one (in tracked_run) is not
            runs.append({"store": label, "steps": args.pretrain_steps, "log_every": 25,
                         "checkpoint_every": cfg.pretrain.checkpoint_every,
                         "total_seconds": total, "train_seconds": train_s, "logging_seconds": logging_s,
                         "logging_share_pct": 100 * logging_s / train_s,
                         "ms_per_step_in_pretrain": 1e3 * train_s / args.pretrain_steps,
                         "outside_train_seconds": total - train_s,
                         "breakdown": breakdown, "unaccounted_seconds": total - accounted})
    return {"runs": runs}


def summary(res: dict) -> list[list]:
    lg = res.get(NAME)
    if not lg:
        return []
    cold = lg["runs"][0]
    return [["MLflow logging share of train time",
             f"{cold['logging_share_pct']:.2f}% ({cold['logging_seconds']:.3f} s of "
             f"{cold['train_seconds']:.2f} s)", f"<= {GOAL_LOGGING_SHARE}%",
             status(cold["logging_share_pct"] <= GOAL_LOGGING_SHARE)],
            [f"pretrain() total wall, {cold['steps']} steps (cold store)",
             f"{cold['total_seconds']:.2f} s ({cold['outside_train_seconds']:.2f} s outside train())",
             "-", "info"]]


def details(res: dict) -> list[str]:
    lg, tr = res.get(NAME), res.get("train")
    if not lg:
        return []
    lines = ["", "## 2. MLflow logging in a real pretrain", ""]
    rows = []
    for r in lg["runs"]:
        rows.append([r["store"], r["steps"], f"{r['total_seconds']:.2f}", f"{r['train_seconds']:.2f}",
                     f"{r['ms_per_step_in_pretrain']:.2f}", f"{r['logging_seconds']:.3f}",
                     f"{r['logging_share_pct']:.2f}%", f"{r['outside_train_seconds']:.2f}"])
    lines.append(table(["Store", "Steps", "pretrain() wall (s)", "train_seconds", "ms/step",
                        "logging_seconds", "logging share", "outside train() (s)"], rows))
    if tr:  # section `train` ran in this invocation
        cold = lg["runs"][0]
        quiet_train = cold["steps"] * tr["ms_per_step_min_block"]["train()"] / 1e3
        lines += ["", f"Background load inflates train_seconds and so deflates the share. Against an undisturbed "
                      f"train time estimated from section 1 ({cold['steps']} steps x best-block "
                      f"{tr['ms_per_step_min_block']['train()']:.2f} ms = {quiet_train:.2f} s) the cold-store "
                      f"logging share would be {100 * cold['logging_seconds'] / quiet_train:.2f}%."]
    lines += ["", "Where the pretrain() wall time goes (seconds; calls):", ""]
    keys = list(lg["runs"][0]["breakdown"])
    rows = [[k.replace("  of which", "&nbsp;&nbsp;of which")] +
            [f"{r['breakdown'][k]['seconds']:.3f} ({r['breakdown'][k]['calls']})" for r in lg["runs"]]
            for k in keys]
    rows.append(["other (imports done, setup_torch, model build, final flush overlap...)"] +
                [f"{r['unaccounted_seconds']:.3f}" for r in lg["runs"]])
    lines.append(table(["Part"] + [r["store"] for r in lg["runs"]], rows))
    return lines


if __name__ == "__main__":
    sys.exit(main([sys.modules[__name__]], __doc__))
