"""Which validation criterion should stop training? Train adapt's fold models to the step cap, and at every check
record candidate criteria (on the held-out folds) next to the metrics the tool reports (on the test split).

For each criterion: the step it would choose (its minimum), the test metrics there, and how far they are from the
best any step reached (regret). A criterion that tracks the reported metrics has regret near 0.

usage: .venv/bin/python benchmarks/stopping_criteria.py RECIPE --mode frozen --m 16 [--encoder RUN_ID]
       [--steps 2000] [--every 25] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
import time

import torch

from cdmtransfer.config import load_config, resolve_adapt
from cdmtransfer.diffusion import OUProcess, dsm_loss
from cdmtransfer.metrics import conditional_samples
from cdmtransfer.adaptation import (_candidate_encoder, _candidate_groups, adapt_candidates, pick_source_head,
                                    prepare_encoder)
from cdmtransfer.stages import dsm_objective, load_head, score_model, setup_torch
from cdmtransfer.tasks import build_taskset
from cdmtransfer.tracking import open_tracker
from cdmtransfer.train import train
from cdmtransfer.validation import StackedEncoder, fold_split


def criteria_fn(xv, yv, nv, process, draws, seed):
    """All candidate criteria on the held-out folds, per fold: ε-DSM over all t, over small t (σ_t² ≤ 0.5), and
    EDM-weighted; the noise is fixed once."""
    F, n, _ = xv.shape
    g = torch.Generator().manual_seed(seed)
    t = process.sample_t((F, n * draws), g)
    noise = torch.randn(F, n * draws, xv.shape[-1], generator=g)
    x0, y = xv.repeat(1, draws, 1), yv.repeat(1, draws, 1)
    mask = (torch.arange(n)[None] < nv[:, None]).float().repeat(1, draws)
    x_t = process.perturb(x0, t, noise)
    small = (process.sigma(t) ** 2 <= 0.5).float() * mask

    @torch.no_grad()
    def crit(model):
        loss = dsm_loss(model(x_t, y, t), noise)
        mean = lambda v, w: float(((v * w).sum(1) / w.sum(1).clamp_min(1)).mean())  # noqa: E731
        return {"val_dsm": mean(loss, mask), "val_dsm_small_t": mean(loss, small),
                "val_edm": mean(loss * model.dsm_weight(t), mask)}

    return crit


@torch.no_grad()
def truth_fn(taskset, process, cfg, folds: int):
    """The reported metrics on the test split, averaged over the fold heads."""
    x0 = taskset.test_x.repeat(4, 1)
    y = taskset.test_y.repeat(4, 1)
    g = torch.Generator().manual_seed(99)
    t = process.sample_t((x0.shape[0],), g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = process.perturb(x0, t, noise)
    true_score = taskset.truth.score(0, x_t, y, t)
    n_cond = min(50, taskset.test_x.shape[0])

    def truth(model):
        eps = model(x_t.expand(folds, *x_t.shape), y.expand(folds, *y.shape), t.expand(folds, *t.shape))
        out = {"test_dsm": float(dsm_loss(eps, noise).mean())}
        if true_score is not None:
            sigma = process.sigma(t)[:, None]
            out["score_error"] = float(((eps + sigma * true_score).pow(2).sum(-1) / sigma[:, 0] ** 2).mean())
        if isinstance(model.encoder, StackedEncoder):  # fold encoders: the sampler takes one encoder
            return out
        pm = []
        for head in range(folds):
            draws = conditional_samples(model, taskset.test_y[:n_cond], 16, process, 50, cfg.evaluate.sampler,
                                        torch.Generator().manual_seed(7), head=head)
            pm.append(float((draws.mean(1) - taskset.test_x[:n_cond]).pow(2).mean()))
        out["posterior_mean_mse"] = sum(pm) / len(pm)
        return out

    return truth


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--mode", default="frozen")
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--encoder")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(args.recipe, args.set + [f"adapt.mode={args.mode}", f"adapt.m={args.m}",
                                               f"adapt.steps={args.steps}", f"adapt.val_every={args.every}",
                                               "adapt.patience=0"])
    cfg = resolve_adapt(cfg)  # unset batch size / lr follow the m-aware rule
    setup_torch(cfg)
    taskset = build_taskset(cfg)
    tracker = open_tracker(cfg, None) if args.encoder else None
    enc, _, source_heads = prepare_encoder(cfg, taskset, tracker, args.encoder)
    a = cfg.adapt
    x_m, y_m = taskset.target_subset(a.m, seed=cfg.seed)
    folds = fold_split(a.m, a.val_folds)
    (xt, yt, nt), (xv, yv, nv) = folds.gather(x_m, y_m)
    process = OUProcess(cfg.diffusion.T0, cfg.diffusion.T)
    torch.manual_seed(cfg.seed + 2)
    cand = adapt_candidates(a, source_heads is not None, scratch_ok=False)[-1]  # finetune: its largest rate
    start = pick_source_head(source_heads, x_m, y_m, process, a) if cand.head_init == "source" else None
    part, _ = _candidate_encoder(enc, cand, folds.count, xt, yt, nt)
    model = score_model(cfg, part, folds.count, taskset, x_m, source_heads.spec.get("sigma_data") if start else None)
    if start is not None:
        load_head(model, source_heads, start)
    crit, truth = criteria_fn(xv, yv, nv, process, a.val_draws, cfg.seed + 17), truth_fn(taskset, process, cfg,
                                                                                       folds.count)
    rows = []

    def validate(ema):
        row = {**crit(ema), **truth(ema)}
        rows.append(row)
        return torch.tensor(row["val_dsm"])

    t0 = time.time()
    train(model, _candidate_groups(model, [part], [cand], a), dsm_objective(xt, yt, nt, process, a.batch_size), a,
          seed=cfg.seed,
          ckpt_dir=Path(tempfile.mkdtemp(prefix="stopping-")), meta={}, validate=validate)
    steps = [args.every * i for i in range(len(rows))]  # the first check scores the starting weights
    targets = [k for k in ("score_error", "posterior_mean_mse", "test_dsm") if k in rows[0]]
    print(f"{args.recipe} mode={args.mode} m={args.m} parametrization={cfg.model.parametrization} "
          f"head_init={cand.head_init} lr={a.lr} encoder lr x{cand.encoder_mult} "
          f"({time.time() - t0:.0f} s)")
    best = {k: min(r[k] for r in rows) for k in targets}
    for c in ("val_dsm", "val_dsm_small_t", "val_edm"):
        i = min(range(len(rows)), key=lambda j: rows[j][c])
        print(f"  stop by {c:16s} at step {steps[i]:5d}: " + ", ".join(
            f"{k} {rows[i][k]:.4f} (best {best[k]:.4f} at {steps[min(range(len(rows)), key=lambda j: rows[j][k])]})"
            for k in targets))
    print("  at the cap: " + ", ".join(f"{k} {rows[-1][k]:.4f}" for k in targets))
    print(json.dumps({"steps": steps, "rows": rows}))


if __name__ == "__main__":
    main()
