"""Benchmark `cells`: what one training step of U stacked adapt units costs (batched cells, cdmtransfer/cells.py),
per unit, against a unit of its own. Run from the repository root:

    .venv/bin/python benchmarks/bench_cells.py [--quick] [--threads N]

A unit is one fold model of the default recipe's adapt (a head of model.head_width × model.head_depth on
d_x + d + time_dim inputs, the frozen pretrained encoder, EDM, batch 64 per head, AdamW): forward, backward and
optimizer step of U·4 heads at once, U in {1, 2, 4, ..., 64}, in interleaved ~50 ms blocks. `per unit` is the
step's time divided by U; `x vs 1` is how much cheaper a unit's step is in a stack of U than alone — the most
batching cells can save on the training steps of this machine. `share of peak`: the step's matmul FLOPs (the rule
of bench_matmul.step_flops: 3 × the heads' forward, they train; 1 × the frozen encoder's forward) per second,
against this machine's fp32 torch.mm peak (bench_matmul.matmul_peak, n = 1024 and 2048). Prints a markdown table
on stdout.
"""

from __future__ import annotations

import sys
import time

from _common import log, main, median, status, table

NAME = "cells"
OPTIONS = []


def defaults(args) -> None:
    args.cells_units = [1, 2, 4, 8, 16, 32] if args.quick else [1, 2, 4, 8, 16, 32, 64]
    args.cells_blocks = 5 if args.quick else 11


def run(args) -> dict:
    import torch

    from cdmtransfer.config import load_config
    from cdmtransfer.models import MLPEncoder, ScoreModel
    from cdmtransfer.optim import AdamW

    from bench_matmul import matmul_peak

    torch.set_num_threads(args.threads)
    peak = max(p["gflops_median"] for p in matmul_peak([1024, 2048], 3 if args.quick else 5))
    cfg = load_config(None, [])
    m, g = cfg.model, cfg.suite.gaussian
    enc = MLPEncoder(g.D_y, m.d, m.encoder_width, m.encoder_depth).requires_grad_(False)
    folds, batch, steps, flops = 4, 64, {}, {}
    enc_layers = [(lin.in_features, lin.out_features) for lin in enc.modules() if isinstance(lin, torch.nn.Linear)]
    for U in args.cells_units:
        H = U * folds
        torch.manual_seed(0)
        model = ScoreModel(enc, H, g.d_x, m.head_width, m.head_depth, m.time_dim, parametrization="edm")
        opt = AdamW([{"params": model.heads.parameters()}], lr=1e-3)  # as train.py
        x, y = torch.randn(H, batch, g.d_x), torch.randn(H, batch, g.D_y)
        t = torch.rand(H, batch) * 0.9 + 0.05

        def step(model=model, opt=opt, x=x, y=y, t=t):
            loss = model(x, y, t).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps[U] = step
        heads_fwd = sum(2 * H * batch * a * b for _, a, b in (w.shape for w in model.heads.weights))
        flops[U] = 3 * heads_fwd + sum(2 * H * batch * a * b for a, b in enc_layers)
    iters = {}
    for U, fn in steps.items():  # warm up and size a block to ~50 ms
        for _ in range(3):
            fn()
        t0 = time.perf_counter()
        fn()
        iters[U] = max(1, int(0.05 / max(time.perf_counter() - t0, 1e-6)))
    samples = {U: [] for U in steps}
    for _ in range(args.cells_blocks):
        for U, fn in steps.items():  # interleaved, so load changes hit every U alike
            t0 = time.perf_counter()
            for _ in range(iters[U]):
                fn()
            samples[U].append((time.perf_counter() - t0) / iters[U] * 1e3)
    rows = []
    alone = median(samples[args.cells_units[0]]) / args.cells_units[0]
    for U in args.cells_units:
        ms = median(samples[U])
        gflops = flops[U] / (ms / 1e3) / 1e9
        rows.append({"units": U, "heads": U * folds, "step_ms": ms, "per_unit_ms": ms / U,
                     "saving": alone / (ms / U), "step_mflop": flops[U] / 1e6, "gflops": gflops,
                     "share_of_peak_pct": 100 * gflops / peak})
        log(f"cells: U={U}: {ms:.2f} ms/step, {ms / U:.3f} ms per unit, {100 * gflops / peak:.1f}% of peak")
    return {"blocks": args.cells_blocks, "setup": {"folds": folds, "batch_per_head": batch, "width": m.head_width,
                                                   "depth": m.head_depth, "threads": torch.get_num_threads()},
            "peak_gflops": peak, "rows": rows}


def summary(res: dict) -> list[list]:
    got = res.get(NAME)
    if not got:
        return []
    last = got["rows"][-1]
    best = max(got["rows"], key=lambda r: r["share_of_peak_pct"])
    return [[f"batched cells: a unit's step in a stack of {last['units']} vs alone", f"x{last['saving']:.2f}",
             "> x1", status(last["saving"] > 1)],
            [f"batched cells: a step's share of the fp32 matmul peak (best: {best['heads']} heads)",
             f"{best['share_of_peak_pct']:.1f}% ({best['gflops']:.1f} of {got['peak_gflops']:.1f} GFLOP/s)",
             ">= 50% (issue #12)", status(best["share_of_peak_pct"] >= 50)]]


def details(res: dict) -> list[str]:
    got = res.get(NAME)
    if not got:
        return []
    s = got["setup"]
    lines = ["", "## Batched cells: one training step of U stacked adapt units",
             "", f"Each unit: {s['folds']} fold heads ({s['width']} x{s['depth']}), {s['batch_per_head']} rows per "
                 f"head, frozen encoder, EDM, AdamW; {s['threads']} threads; medians of {got['blocks']} interleaved "
                 "blocks.", ""]
    rows = [[r["units"], r["heads"], f"{r['step_ms']:.2f}", f"{r['per_unit_ms']:.3f}", f"x{r['saving']:.2f}",
             f"{r['step_mflop']:.1f}", f"{r['gflops']:.1f}", f"{r['share_of_peak_pct']:.1f}%"] for r in got["rows"]]
    lines.append(table(["units U", "heads", "ms / step", "ms / step per unit", "x vs 1", "MFLOP / step", "GFLOP/s",
                        f"share of peak ({got['peak_gflops']:.1f} GFLOP/s)"], rows))
    return lines


if __name__ == "__main__":
    sys.exit(main([sys.modules[__name__]], __doc__))
