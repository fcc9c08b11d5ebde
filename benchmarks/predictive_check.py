"""Predictive check of `estimate --calibrate` (issue 3): fit the learning curve on m ∈ {8, 16, 32, 64}, predict the
target score error at m = 256 with a bootstrap interval over seeds, then measure it with the same encoder and seeds.

    .venv/bin/python benchmarks/predictive_check.py [--recipes recipes/gaussian-linear.yaml ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

import cdmtransfer as cdm
from cdmtransfer import theory
from cdmtransfer.estimate import sweep_curves

FIT_M = [8, 16, 32, 64]
CHECK_M = 256
MODES = ["frozen", "finetune", "scratch"]


def check(recipe: str, seeds: int, metric: str, home: str) -> list[dict]:
    base = [f"tracking.home={home}", f"sweep.seeds={seeds}", f"sweep.modes=[{','.join(MODES)}]"]
    fit = cdm.sweep(recipe, base + [f"sweep.m=[{','.join(map(str, FIT_M))}]"])
    check_run = cdm.sweep(recipe, base + [f"sweep.m=[{CHECK_M}]"], encoder=fit.pretrain_run_id)
    curves = sweep_curves({"rows": fit.rows}, metric)
    out = []
    for mode in MODES:
        m_values, errors = curves[mode]
        measured = [r["metrics"][metric] for r in check_run.rows if r["mode"] == mode]
        for kind in ("score", "power"):  # the theory's 1/m rate, and a free exponent
            boot = theory.bootstrap_fit(m_values, errors, kind=kind, n_boot=400, seed=0)
            point, lo, hi = boot["predict"](CHECK_M)
            out.append({"recipe": recipe, "mode": mode, "fit": kind, "predicted": point, "interval": [lo, hi],
                        "measured_mean": float(np.mean(measured)), "measured_sd": float(np.std(measured, ddof=1)),
                        "inside": bool(lo <= np.mean(measured) <= hi), "floor": boot["fit"].floor,
                        "A": boot["fit"].A, "p": boot["fit"].p})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipes", nargs="+", default=["recipes/gaussian-linear.yaml", "recipes/gaussian-nonlinear.yaml"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--metric", default="score_error")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as home:
        for recipe in args.recipes:
            rows += check(recipe, args.seeds, args.metric, home)
    print(f"| recipe | mode | fit | predicted {args.metric} at m={CHECK_M} [95% CI] | measured (mean ± sd) | inside |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        fit = "floor + A/m" if r["fit"] == "score" else f"floor + A m^-{r['p']:.2f}"
        print(f"| {r['recipe']} | {r['mode']} | {fit} | {r['predicted']:.3f} [{r['interval'][0]:.3f}, "
              f"{r['interval'][1]:.3f}] | {r['measured_mean']:.3f} ± {r['measured_sd']:.3f} | "
              f"{'yes' if r['inside'] else 'no'} |")
    print(f"wall time: {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
