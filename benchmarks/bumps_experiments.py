"""Percolation vs accuracy over the kept-site density λ (companions.md §B.2, §B.3 item 5, §B.4).

For each λ in LAMBDAS, train a conditional diffusion model from scratch on the target task with every kept lattice
site (adapt --mode scratch, m = all kept sites: the paper's setting, no source tasks), then measure centre accuracy
(one bump within 1 px) on held-out lattice sites, next to the training set's largest-cluster fraction (sites linked
when their bumps' normalised overlap exp(−Δ²/(4σ²)) exceeds τ = 0.005, bump_metrics.largest_cluster_fraction).
Expected (§B.3): accuracy jumps where the overlap graph percolates.

Setting: 16×16 images, σ = 1.0, centres on the 1-px lattice in [1, 14]² (196 sites), connection radius
2σ√(ln 200) = 4.60 px: random λ-subsets percolate between λ = 0.02 and 0.1. D_y = 18, d = 4 (as the bumps recipes),
conv score head (model.head = conv), lr 2e-3, each run's length chosen by cross-validation on its kept sites under
the m-aware cap (`--steps N` pins it). Caveat: m = λ·196 grows with λ, so accuracy also rises with the sample count;
the paper separates the two with 32×32 images (1024 sites), too slow here.

Results (1 seed, default arguments; 919 s wall, 1 thread, another job beside it; 2026-12-02):

| λ | kept sites | largest cluster (train) | largest cluster (20 draws) | centre accuracy | posterior mean MSE | steps (converged) |
|---|---|---|---|---|---|---|
| 0.02 | 4 | 0.50 | 0.49 | 0.00 | 0.0812 | 34 (1) |
| 0.05 | 10 | 0.50 | 0.72 | 0.02 | 0.0599 | 67 (1) |
| 0.1 | 20 | 1.00 | 0.93 | 0.15 | 0.0456 | 267 (1) |
| 0.2 | 39 | 1.00 | 1.00 | 0.30 | 0.0355 | 500 (1) |
| 0.4 | 78 | 1.00 | 1.00 | 1.00 | 0.0015 | 1367 (1) |
| 1.0 | 196 | 1.00 | 1.00 | 1.00 | 0.0002 | 4000 (0: the cap) |

The training graph percolates at λ ≈ 0.1 but accuracy jumps between λ = 0.2 and 0.4: at this scale it follows the
number of training sites more than percolation. (With 3,000 steps pinned for every λ, the release before: 0.04,
0.16, 0.16, 0.42, 0.79, 0.71.)

Earlier attempts (2 seeds each, then D_y = 2 and d = 2), all at accuracy ≈ 0 even at λ = 1, so no transition to see:
σ = 0.5 on the 1-px lattice (--sigma 0.5, λ 0.1–1: 0.00 everywhere, 508 s wall), σ = 0.8 on a 2-px lattice (49 sites,
--sigma 0.8 --spacing 2: 0.10 / 0.04 / 0.03 / 0.01 / 0.03 at λ = 0.1 / 0.2 / 0.4 / 0.6 / 1.0, 619 s; 0.10 at λ = 0.1 is
its 5 memorised sites of 49) and σ = 0.8 on the 1-px lattice (0.04 / 0.01 / 0.00 / 0.01 / 0.01 at λ = 0.05 / 0.1 / 0.2 /
0.4 / 1.0 while the largest cluster went 0.50 → 1.00; 621 s). The 2-D code was the culprit: at λ = 1, seed 0, σ = 1
gave 0.016 with d = 2 and D_y = 2; σ = 0.8 gave 0.086 with d = 4 and D_y = 18 (single runs, ≈ 70 s each). As for
oracle mode (h* = μ, 2-D), a 2-D code is hard for the head's conditioning MLP to render a bump from.

    CDMTRANSFER_HOME=/tmp/somewhere .venv/bin/python benchmarks/bumps_experiments.py [--seeds 1] [--sigma 1.0]

Also `--heads RECIPE`: the conv-vs-MLP head comparison of the bumps recipes' headers (see compare_heads).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

import cdmtransfer
from cdmtransfer import bump_metrics
from cdmtransfer.config import PRETRAINED_MODES
from cdmtransfer.tasks.bumps import lattice

ROOT = Path(__file__).resolve().parents[1]
LAMBDAS = [0.02, 0.05, 0.1, 0.2, 0.4, 1.0]
N = 16
BASE = ["suite.name=bumps", f"suite.bumps.N={N}", "suite.bumps.D_y=18", "suite.n=16", "suite.n_target_pool=196",
        "suite.n_test=196", "suite.bumps.accuracy_conditions=64", "suite.bumps.accuracy_samples=2",
        "model.d=4", "model.encoder_width=128", "model.encoder_depth=2", "model.head=conv", "model.head_width=32",
        "model.head_depth=2", "adapt.mode=scratch", "adapt.batch_size=32", "adapt.lr=2.0e-3",
        "evaluate.sampler=ode", "evaluate.sampler_steps=100", "evaluate.posterior_conditions=32",
        "evaluate.posterior_samples=2", "tracking.log_artifacts=false"]


def setting(sigma: float, spacing: float) -> list[str]:
    """The recipe overrides for one (σ, lattice spacing); the target alone is trained, so sources are a stub."""
    return BASE + [f"suite.bumps.target_sigma={sigma}", f"suite.bumps.source_sigmas=[{sigma}]",
                   f"suite.bumps.spacing={spacing}"]


def kept_sites(lam: float, sets: list[str]) -> int:
    """Number of kept training sites at density λ (as tasks/bumps.py keeps them)."""
    cfg = cdmtransfer.load_config(None, sets)
    return max(1, round(lam * len(lattice(cfg.suite.bumps))))


def run_one(lam: float, seed: int, steps: int, sets: list[str]) -> dict:
    """One scratch run on the kept sites; its length chosen by cross-validation under the m-aware cap, or pinned
    at `steps` (> 0)."""
    sets = sets + [f"suite.bumps.density={lam}", f"adapt.m={kept_sites(lam, sets)}", f"suite.seed={seed}",
                   f"seed={seed}"] + ([f"adapt.steps={steps}"] if steps > 0 else [])
    res = cdmtransfer.adapt(None, sets)
    return {k: res.metrics.get(k, math.nan) for k in ("centre_accuracy_id", "train_largest_cluster",
                                                      "posterior_mean_mse", "steps", "converged")}


def reference_cluster(lam: float, sets: list[str], sigma: float, reps: int = 20) -> float:
    """Mean largest-cluster fraction of random λ-subsets of this lattice (the curve behind the measured points)."""
    cfg = cdmtransfer.load_config(None, sets)
    sites, rng = lattice(cfg.suite.bumps).numpy(), np.random.default_rng(0)
    keep, r = kept_sites(lam, sets), bump_metrics.connection_radius(sigma)
    return float(np.mean([bump_metrics.largest_cluster_fraction(sites[rng.choice(len(sites), keep, replace=False)], r)
                          for _ in range(reps)]))


def plot(rows: list[dict], path: Path, sigma: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam = [r["lambda"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.errorbar(lam, [r["acc"] for r in rows], yerr=[r["acc_sd"] for r in rows], marker="o", capsize=3,
                label="centre accuracy (scratch, conv head)")
    ax.plot(lam, [r["cluster"] for r in rows], "s--", label="largest-cluster fraction (train sites)")
    ax.set_xscale("log")
    ax.set_xlabel("λ (fraction of lattice sites kept)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"bumps {N}×{N}, σ = {sigma}: accuracy vs percolation", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


HEAD_KEYS = ["centre_accuracy_id", "centre_accuracy_ood", "posterior_mean_mse", "h_effective_dim",
             "h_xy_orthogonality", "h_xx_parallelism", "h_yy_parallelism"]


def compare_heads(recipe: str, modes: list[str], ms: list[int], seeds: int, sets: list[str]) -> None:
    """The head comparison behind the bumps recipes' headers: per seed, pretrain (seed s) then adapt every (mode, m);
    prints one JSON line per run and a mean ± sd table. Run it once per head, e.g. with --set model.head=mlp."""
    import json

    sets = sets + ["tracking.log_artifacts=false"]
    rows: dict[tuple, list[dict]] = {}
    for seed in range(seeds):
        pre = cdmtransfer.pretrain(recipe, sets + [f"seed={seed}"]) if set(PRETRAINED_MODES) & set(modes) else None
        on_h_star = None  # oracle's pretrain on h*: the first oracle adapt runs it, the others reuse it
        for mode in modes:
            for m in ms:
                encoder = on_h_star if mode == "oracle" else pre.run_id if pre and mode in PRETRAINED_MODES else None
                res = cdmtransfer.adapt(recipe, sets + [f"seed={seed}", f"adapt.mode={mode}", f"adapt.m={m}"],
                                        encoder=encoder)
                if mode == "oracle":
                    on_h_star = res.info["pretrain_run_id"]
                rows.setdefault((mode, m), []).append(res.metrics)
                print(json.dumps({"seed": seed, "mode": mode, "m": m, **{k: round(res.metrics[k], 4)
                                  for k in HEAD_KEYS if k in res.metrics}}), flush=True)
    keys = [k for k in HEAD_KEYS if k in next(iter(rows.values()))[0]]
    print("\n| mode | m | " + " | ".join(keys) + " |\n|---|---|" + "---|" * len(keys))
    for (mode, m), runs in rows.items():
        cells = [np.array([r[k] for r in runs]) for k in keys]
        print(f"| {mode} | {m} | " + " | ".join(f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}"
                                               for v in cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=0, help="pin adapt.steps (default 0: chosen by cross-validation)")
    ap.add_argument("--lambdas", default=",".join(map(str, LAMBDAS)))
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--spacing", type=float, default=1.0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bumps-percolation.png"))
    ap.add_argument("--heads", metavar="RECIPE", help="instead: compare modes on RECIPE (see compare_heads)")
    ap.add_argument("--modes", default="frozen,scratch,oracle")
    ap.add_argument("--m", default="4,16")
    ap.add_argument("--set", action="append", default=[], help="recipe override for --heads (repeatable)")
    args = ap.parse_args()
    if args.heads:
        start = time.time()
        compare_heads(args.heads, args.modes.split(","), [int(v) for v in args.m.split(",")], args.seeds, args.set)
        print(f"wall {time.time() - start:.0f} s")
        return
    start, rows, sets = time.time(), [], setting(args.sigma, args.spacing)
    for lam in map(float, args.lambdas.split(",")):
        runs = [run_one(lam, seed, args.steps, sets) for seed in range(args.seeds)]
        acc = [r["centre_accuracy_id"] for r in runs]
        rows.append({"lambda": lam, "sites": kept_sites(lam, sets), "acc": float(np.mean(acc)),
                     "acc_sd": float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0,
                     "cluster": float(np.mean([r["train_largest_cluster"] for r in runs])),
                     "cluster_ref": reference_cluster(lam, sets, args.sigma),
                     "mse": float(np.mean([r["posterior_mean_mse"] for r in runs])),
                     "steps": [r["steps"] for r in runs], "converged": [r["converged"] for r in runs]})
        print(f"λ={lam}: {rows[-1]} ({time.time() - start:.0f} s)", flush=True)
    print(f"\n| λ | kept sites | largest cluster (train) | largest cluster (20 draws) | centre accuracy "
          f"(mean ± sd, {args.seeds} seeds) | posterior mean MSE | steps (converged) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        trained = ", ".join(f"{s:.0f} ({c:.0f})" for s, c in zip(r["steps"], r["converged"]))
        print(f"| {r['lambda']} | {r['sites']} | {r['cluster']:.2f} | {r['cluster_ref']:.2f} | "
              f"{r['acc']:.2f} ± {r['acc_sd']:.2f} | {r['mse']:.4f} | {trained} |")
    plot(rows, Path(args.out), args.sigma)
    print(f"\nwrote {args.out}; connection radius {bump_metrics.connection_radius(args.sigma):.2f} px; "
          f"wall {math.floor(time.time() - start)} s")


if __name__ == "__main__":
    main()
