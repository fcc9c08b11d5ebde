"""Benchmark `optim`: one AdamW update of a batched sweep's stacked heads, cdmtransfer.optim.AdamW (torch's fused
kernel: one pass over each parameter and its moments) against torch.optim.AdamW(foreach=True) (the update the package
used before: eight `_foreach` passes). Run from the repository root:

    .venv/bin/python benchmarks/bench_optim.py [--quick] [--threads N]

The parameters are those of 128 stacked heads of the default recipe (32 units × 4 folds: weights and biases of a
128 × 2 MLP head on d_x + d + time_dim inputs) with random gradients; each update is timed in interleaved blocks,
and the two optimizers' parameters after the same 20 updates are compared (they round differently).
"""

from __future__ import annotations

import sys
import time

from _common import log, main, median, samples_table, status

NAME = "optim"
OPTIONS = []


def defaults(args) -> None:
    args.optim_blocks = 3 if args.quick else 7


def run(args) -> dict:
    import torch

    from cdmtransfer.config import load_config
    from cdmtransfer.models import BatchedHeads
    from cdmtransfer.optim import AdamW

    torch.set_num_threads(args.threads)
    m, g = load_config(None, []).model, load_config(None, []).suite.gaussian
    torch.manual_seed(0)
    heads = [BatchedHeads(128, g.d_x + m.d + m.time_dim, g.d_x, m.head_width, m.head_depth) for _ in range(2)]
    heads[1].load_state_dict(heads[0].state_dict())
    params = [list(h.parameters()) for h in heads]
    gen = torch.Generator().manual_seed(1)
    for p, q in zip(*params):
        p.grad = torch.randn(p.shape, generator=gen)
        q.grad = p.grad.clone()
    opts = {"fused (cdmtransfer.optim)": AdamW([{"params": params[0]}], lr=1e-3, weight_decay=0.01),
            "foreach (torch.optim)": torch.optim.AdamW(params[1], lr=1e-3, weight_decay=0.01, foreach=True)}
    for _ in range(20):
        for opt in opts.values():
            opt.step()
    diff = max(float((p - q).abs().max()) for p, q in zip(*params))
    times = {name: [] for name in opts}
    for _ in range(args.optim_blocks):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            for _ in range(50):
                opt.step()
            times[name].append((time.perf_counter() - t0) / 50 * 1e3)
        log("optim: " + ", ".join(f"{name} {ms[-1]:.2f} ms" for name, ms in times.items()))
    return {"blocks": args.optim_blocks, "threads": torch.get_num_threads(), "ms": times, "max_abs_diff": diff,
            "parameters": sum(p.numel() for p in params[0])}


def summary(res: dict) -> list[list]:
    got = res.get(NAME)
    if not got:
        return []
    fused, foreach = (median(got["ms"][k]) for k in got["ms"])
    return [["AdamW update of 128 stacked heads, fused vs foreach", f"{fused:.2f} vs {foreach:.2f} ms "
             f"(x{foreach / fused:.2f})", "> x1", status(foreach > fused)]]


def details(res: dict) -> list[str]:
    got = res.get(NAME)
    if not got:
        return []
    return ["", "## AdamW: one update of 128 stacked heads", "",
            f"{got['parameters']:,} parameters, {got['threads']} threads, {got['blocks']} interleaved blocks of 50 "
            f"updates; after 20 updates the two differ by at most {got['max_abs_diff']:.2g}.", "",
            samples_table("optimizer", "ms / update", got["ms"])]


if __name__ == "__main__":
    sys.exit(main([sys.modules[__name__]], __doc__))
