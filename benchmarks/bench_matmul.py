"""Benchmark 5 (`matmul`): the fp32 torch.mm peak in GFLOP/s and the share of it one pretrain training step
achieves. Run from the repository root:

    .venv/bin/python benchmarks/bench_matmul.py [--quick] [--threads N] [--block N]

The step's FLOPs are counted from the layer shapes of the model `pretrain` builds; its ms/step comes from section
`train` when that ran in the same invocation (benchmarks/bench_train.py --only train,matmul), otherwise from a
short real train() of its own. Prints markdown tables on stdout; progress goes to stderr. See benchmarks/README.md.
"""

from __future__ import annotations

import sys
import time

from _common import BLOCK_OPTION, TrainBench, log, main, median, table

NAME = "matmul"
OPTIONS = [BLOCK_OPTION]


def defaults(args) -> None:
    args.matmul_sizes = [1024, 2048]
    args.matmul_reps = 3 if args.quick else 5
    args.matmul_train_steps = 150 if args.quick else 300


def step_flops(cfg=None) -> dict:
    """Matmul FLOPs of one pretrain step, counted from the layer shapes of the ScoreModel that `pretrain` builds for
    `cfg` (default Config): forward = 2·rows·in·out per encoder nn.Linear (rows = K·batch, the encoder sees every
    row) + 2·K·batch·in·out per BatchedHeads layer (one baddbmm: K heads of `batch` rows); forward + backward =
    3 × forward. Elementwise work (SiLU, time features, loss, AdamW, EMA, clipping) is not counted."""
    from torch import nn

    from cdmtransfer.config import load_config
    from cdmtransfer.models import ScoreModel
    from cdmtransfer.stages import new_encoder
    from cdmtransfer.tasks import build_taskset

    cfg = cfg or load_config(None, [])
    ts = build_taskset(cfg)
    m, batch = cfg.model, cfg.pretrain.batch_size
    model = ScoreModel(new_encoder(cfg, ts), ts.K, ts.d_x, m.head_width, m.head_depth, m.time_dim)
    rows = ts.K * batch
    enc = [(lin.in_features, lin.out_features) for lin in model.encoder.modules() if isinstance(lin, nn.Linear)]
    heads = [tuple(w.shape) for w in model.heads.weights]  # (K, in, out)
    enc_fwd = sum(2 * rows * a * b for a, b in enc)
    heads_fwd = sum(2 * batch * k * a * b for k, a, b in heads)
    return {"K": ts.K, "batch_per_task": batch, "rows_per_step": rows,
            "encoder_layers": [f"{a}x{b}" for a, b in enc], "head_layers": [f"{k}x{a}x{b}" for k, a, b in heads],
            "encoder_forward_flops": enc_fwd, "heads_forward_flops": heads_fwd,
            "forward_flops": enc_fwd + heads_fwd, "step_flops": 3 * (enc_fwd + heads_fwd)}


class BlockClock:
    """A Progress stand-in that records ms/step of every log block of train()."""

    def __init__(self):
        self.ms, self.last, self.t = [], 0, None

    def start(self, step: int = 0) -> None:
        self.last, self.t = step, time.perf_counter()

    def update(self, step: int, loss: float) -> None:
        now = time.perf_counter()
        self.ms.append((now - self.t) / (step - self.last) * 1e3)
        self.last, self.t = step, now

    def finish(self) -> None:
        pass


def time_train_step(args, steps: int) -> dict:
    """A short real train() (pretrain settings of the default Config, metrics=None): median and best ms/step over
    `--block`-step blocks after the first 50 steps."""
    clock = BlockClock()
    TrainBench(args.block).run_train(steps, clock)
    kept = clock.ms[max(1, -(-args.warmup_steps // args.block)):]
    return {"ms_per_step": median(kept), "ms_per_step_best_block": min(kept), "steps": steps,
            "source": f"own short train() run ({steps} steps, first {args.warmup_steps} dropped)"}


def matmul_peak(sizes: list[int], reps: int) -> list[dict]:
    """GFLOP/s of torch.mm on two n × n fp32 matrices for each n of `sizes`: 2 warm-up calls, then `reps` timed ones
    (the peak is the largest median over the sizes)."""
    import torch

    peak = []
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        for _ in range(2):  # warm up
            torch.mm(a, b, out=out)
        gf = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            gf.append(2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
        peak.append({"n": n, "gflops_median": median(gf), "gflops_best": max(gf), "gflops_runs": gf})
        log(f"matmul: {n}x{n} fp32: median {median(gf):.1f} GFLOP/s, best {max(gf):.1f}")
    return peak


def run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    peak = matmul_peak(args.matmul_sizes, args.matmul_reps)
    peak_med = max(p["gflops_median"] for p in peak)
    peak_best = max(p["gflops_best"] for p in peak)
    flops = step_flops()
    tr = (getattr(args, "results", {}) or {}).get("train")
    if tr:
        step = {"ms_per_step": tr["ms_per_step"]["train()"], "ms_per_step_best_block": tr["ms_per_step_min_block"]
                ["train()"], "source": "section `train` of this run"}
    else:
        log(f"matmul: timing a {args.matmul_train_steps}-step train() (section `train` did not run)")
        step = time_train_step(args, args.matmul_train_steps)
    achieved = flops["step_flops"] / (step["ms_per_step"] / 1e3) / 1e9
    achieved_best = flops["step_flops"] / (step["ms_per_step_best_block"] / 1e3) / 1e9
    return {"threads": torch.get_num_threads(), "reps": args.matmul_reps, "peak": peak,
            "peak_gflops": peak_med, "peak_gflops_best": peak_best, "flops": flops, "train_step": step,
            "train_gflops": achieved, "train_gflops_best": achieved_best,
            "share_of_peak_pct": 100 * achieved / peak_med, "share_of_peak_best_pct": 100 * achieved_best / peak_best}


def summary(res: dict) -> list[list]:
    mm = res.get(NAME)
    if not mm:
        return []
    return [[f"train step vs fp32 matmul peak ({mm['threads']} thread(s))",
             f"{mm['share_of_peak_pct']:.1f}% ({mm['train_gflops']:.2f} of {mm['peak_gflops']:.1f} "
             f"GFLOP/s; {mm['flops']['step_flops'] / 1e6:.0f} MFLOP/step in "
             f"{mm['train_step']['ms_per_step']:.2f} ms)", "-", "info"]]


def details(res: dict) -> list[str]:
    mm = res.get(NAME)
    if not mm:
        return []
    f = mm["flops"]
    lines = ["", "## 5. fp32 matmul peak and the training step's share of it", "",
             f"torch.mm of two n x n fp32 matrices, {mm['threads']} thread(s), {mm['reps']} timed reps after 2 "
             "warm-up calls; GFLOP/s = 2n^3 / time.", ""]
    lines.append(table(["n", "GFLOP/s (median)", "GFLOP/s (best)", "runs"],
                       [[p["n"], f"{p['gflops_median']:.1f}", f"{p['gflops_best']:.1f}",
                         ", ".join(f"{g:.1f}" for g in p["gflops_runs"])] for p in mm["peak"]]))
    lines += ["", f"One pretrain step of the default Config: K={f['K']} x batch {f['batch_per_task']} = "
                  f"{f['rows_per_step']} rows; encoder Linear layers {', '.join(f['encoder_layers'])} "
                  f"({f['encoder_forward_flops'] / 1e6:.1f} MFLOP forward), head layers (K x in x out) "
                  f"{', '.join(f['head_layers'])} ({f['heads_forward_flops'] / 1e6:.1f} MFLOP forward); "
                  f"step = 3 x forward = {f['step_flops'] / 1e6:.1f} MFLOP. train() ms/step from "
                  f"{mm['train_step']['source']}.", ""]
    lines.append(table(["", "ms/step", "achieved GFLOP/s", "peak GFLOP/s", "share of peak"], [
        ["median", f"{mm['train_step']['ms_per_step']:.2f}", f"{mm['train_gflops']:.2f}",
         f"{mm['peak_gflops']:.1f} (median)", f"{mm['share_of_peak_pct']:.1f}%"],
        ["best", f"{mm['train_step']['ms_per_step_best_block']:.2f}", f"{mm['train_gflops_best']:.2f}",
         f"{mm['peak_gflops_best']:.1f} (best)", f"{mm['share_of_peak_best_pct']:.1f}%"]]))
    return lines


if __name__ == "__main__":
    sys.exit(main([sys.modules[__name__]], __doc__))
