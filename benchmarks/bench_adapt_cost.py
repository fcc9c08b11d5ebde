"""Benchmark `adapt_cost`: what training to convergence by cross-validation costs per adapt run, against the run
it replaced (a fixed 1,500-step run on all m samples, no validation). Run from the repository root:

    .venv/bin/python benchmarks/bench_adapt_cost.py [--quick] [--threads N]

One pretrain of the quickstart recipe (in a temporary store), then for m in {16, 128}, interleaved: each mode as it
runs today (frozen: F = 4 fold models; finetune: 4 encoder rates × F; auto: 9 settings × F; then the refit) and the
old fixed-step run (`adapt.val_folds=1`, 1,500 steps, batch 64, lr 2e-3, finetune's encoder at the head's rate).
`auto` did not exist before; it is compared with the old finetune. Wall = the whole `cdmtransfer.adapt` call
(evaluation and MLflow included); train = its training seconds (cross-validation + refit). Goal (issue #13): a
run with validation costs at most 1.5x the old one.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from _common import ROOT, log, main, median, status, table

NAME = "adapt_cost"
OPTIONS = []
RECIPE = str(ROOT / "recipes" / "quickstart.yaml")
OLD = ["adapt.val_folds=1", "adapt.steps=1500", "adapt.batch_size=64", "adapt.lr=0.002"]
MODES = ["frozen", "finetune", "auto"]
RUNS = [("frozen", "now", []), ("frozen", "old", OLD), ("finetune", "now", []),  # (mode, kind, overrides), in order
        ("finetune", "old", [*OLD, "adapt.encoder_lr=0.002"]), ("auto", "now", [])]


def defaults(args) -> None:
    args.cost_reps = 1 if args.quick else 2
    args.cost_m = [16, 128]


def run(args) -> dict:
    import cdmtransfer as cdm

    samples: dict = {}
    before = os.environ.get("CDMTRANSFER_HOME")
    with tempfile.TemporaryDirectory(prefix="bench-adapt-cost-") as home:
        os.environ["CDMTRANSFER_HOME"] = home
        enc = cdm.pretrain(RECIPE, quiet=True).run_id
        for rep in range(args.cost_reps):
            for m in args.cost_m:
                for mode, kind, extra in RUNS:
                    t0 = time.perf_counter()
                    res = cdm.adapt(RECIPE, [f"adapt.mode={mode}", f"adapt.m={m}", *extra], encoder=enc, quiet=True)
                    wall = time.perf_counter() - t0
                    got = samples.setdefault((m, mode, kind), {"wall": [], "train": []})
                    got["wall"].append(wall)
                    got["train"].append(res.metrics["train_seconds"])
                    log(f"adapt_cost: rep {rep} m={m} {mode} {kind}: {wall:.1f} s wall, "
                        f"{res.metrics['train_seconds']:.1f} s train")
    if before is None:  # the temporary store is gone: later code in this process must not use it
        os.environ.pop("CDMTRANSFER_HOME")
    else:
        os.environ["CDMTRANSFER_HOME"] = before
    rows = []
    for m in args.cost_m:
        for mode in MODES:
            now, old = samples[(m, mode, "now")], samples[(m, "finetune" if mode == "auto" else mode, "old")]
            rows.append({"m": m, "mode": mode, "wall": median(now["wall"]), "train": median(now["train"]),
                         "old_wall": median(old["wall"]), "old_train": median(old["train"]),
                         "wall_ratio": median(now["wall"]) / median(old["wall"]),
                         "train_ratio": median(now["train"]) / median(old["train"])})
    return {"reps": args.cost_reps, "rows": rows}


def summary(res: dict) -> list[list]:
    got = res.get(NAME)
    if not got:
        return []
    out = []
    for mode in MODES:
        worst = max(r["wall_ratio"] for r in got["rows"] if r["mode"] == mode)
        out.append([f"adapt {mode} with cross-validation vs the old fixed-step run (wall, worst m)",
                    f"x{worst:.2f}", "<= x1.5", status(worst <= 1.5)])
    return out


def details(res: dict) -> list[str]:
    got = res.get(NAME)
    if not got:
        return []
    lines = ["", "## Adapt: the cost of training to convergence by cross-validation",
             "", f"Quickstart recipe, medians of {got['reps']} interleaved repetitions; `old` = 1,500 fixed steps, "
                 "no validation (auto against the old finetune).", ""]
    rows = [[r["m"], r["mode"], f"{r['wall']:.1f} / {r['train']:.1f}", f"{r['old_wall']:.1f} / {r['old_train']:.1f}",
             f"x{r['wall_ratio']:.2f}", f"x{r['train_ratio']:.2f}"] for r in got["rows"]]
    lines.append(table(["m", "mode", "now: wall / train s", "old: wall / train s", "wall ratio", "train ratio"],
                       rows))
    return lines


if __name__ == "__main__":
    sys.exit(main([sys.modules[__name__]], __doc__))
