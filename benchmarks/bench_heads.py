"""Benchmark 3 (`heads`): BatchedHeads (one baddbmm per layer for K heads) vs K nn.Sequential heads in a Python
loop. Run from the repository root:

    .venv/bin/python benchmarks/bench_heads.py [--quick] [--threads N]

Forward + backward for K in {1, 2, ..., 64}, in interleaved ~20 ms blocks. Prints a markdown table on stdout;
progress goes to stderr. See benchmarks/README.md.
"""

from __future__ import annotations

import sys
import time

from _common import log, main, median, status, table

NAME = "heads"
OPTIONS = []


def defaults(args) -> None:
    args.heads_k = [1, 2, 4, 8, 16, 32, 64]
    args.heads_blocks = 7 if args.quick else 21


def run(args) -> dict:
    import torch
    from torch import nn

    from cdmtransfer.config import load_config
    from cdmtransfer.models import BatchedHeads

    torch.set_num_threads(args.threads)
    cfg = load_config(None, [])
    m, g = cfg.model, cfg.suite.gaussian
    in_dim, out_dim, width, depth, batch = g.d_x + m.d + m.time_dim, g.d_x, m.head_width, m.head_depth, \
        cfg.pretrain.batch_size

    def sequential():
        dims = [in_dim] + [width] * depth + [out_dim]
        layers = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.SiLU())
        return nn.Sequential(*layers)

    rows = []
    for K in args.heads_k:
        torch.manual_seed(0)
        batched = BatchedHeads(K, in_dim, out_dim, width, depth)
        looped = nn.ModuleList(sequential() for _ in range(K))
        n_b = sum(p.numel() for p in batched.parameters())
        n_l = sum(p.numel() for p in looped.parameters())
        assert n_b == n_l, (n_b, n_l)
        z = torch.randn(K, batch, in_dim, requires_grad=True)  # inputs carry grad, like [x_t, h(y), τ(t)]

        def run_batched():
            batched.zero_grad(set_to_none=True)
            z.grad = None
            batched(z).square().mean().backward()

        def run_looped():
            looped.zero_grad(set_to_none=True)
            z.grad = None
            torch.stack([head(z[k]) for k, head in enumerate(looped)]).square().mean().backward()

        fns = {"batched": run_batched, "loop": run_looped}
        iters = {}
        for name, fn in fns.items():  # warm up and size a block to ~20 ms
            for _ in range(3):
                fn()
            t0 = time.perf_counter()
            fn()
            iters[name] = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-6)))
        samples = {name: [] for name in fns}
        for _ in range(args.heads_blocks):
            for name, fn in fns.items():  # interleaved
                t0 = time.perf_counter()
                for _ in range(iters[name]):
                    fn()
                samples[name].append((time.perf_counter() - t0) / iters[name] * 1e3)
        b, lp = median(samples["batched"]), median(samples["loop"])
        paired = median([a / c for a, c in zip(samples["loop"], samples["batched"])])
        bmin, lmin = min(samples["batched"]), min(samples["loop"])
        rows.append({"K": K, "batched_ms": b, "loop_ms": lp, "loop_over_batched": paired,
                     "batched_ms_best": bmin, "loop_ms_best": lmin, "loop_over_batched_best": lmin / bmin,
                     "parameters": n_b})
        log(f"heads: K={K}: batched {b:.3f} ms, loop {lp:.3f} ms (paired x{paired:.2f})")
    return {"blocks": args.heads_blocks, "setup": {"in_dim": in_dim, "out_dim": out_dim, "width": width, "depth": depth, "batch_per_head": batch,
                      "threads": torch.get_num_threads()}, "rows": rows}


def summary(res: dict) -> list[list]:
    hd = res.get(NAME)
    if not hd:
        return []
    k8 = next((row for row in hd["rows"] if row["K"] == 8), hd["rows"][-1])
    return [[f"BatchedHeads speed-up over a loop, K={k8['K']}", f"x{k8['loop_over_batched']:.2f}",
             "> x1", status(k8["loop_over_batched"] > 1)]]


def details(res: dict) -> list[str]:
    hd = res.get(NAME)
    if not hd:
        return []
    s = hd["setup"]
    lines = ["", "## 3. BatchedHeads vs a Python loop of nn.Sequential heads",
             "", f"Forward + backward of K heads ({s['in_dim']} -> {s['width']} x{s['depth']} -> "
                 f"{s['out_dim']}, SiLU), {s['batch_per_head']} rows per head, {s['threads']} threads. "
                 f"Blocks of ~20 ms alternate between the two ({hd['blocks']} each per K); times are medians "
                 "of blocks, `loop / batched` is the median of per-pair ratios (> 1: BatchedHeads is faster).",
             ""]
    rows = [[r["K"], f"{r['batched_ms']:.3f}", f"{r['loop_ms']:.3f}", f"x{r['loop_over_batched']:.2f}",
             f"{r['batched_ms_best']:.3f}", f"{r['loop_ms_best']:.3f}", f"x{r['loop_over_batched_best']:.2f}"]
            for r in hd["rows"]]
    lines.append(table(["K", "BatchedHeads (ms)", "loop of K nn.Sequential (ms)", "loop / batched",
                        "batched, best block", "loop, best block", "loop / batched, best"], rows))
    return lines


if __name__ == "__main__":
    sys.exit(main([sys.modules[__name__]], __doc__))
