"""Benchmark 1 (`train`): time per step of the package's train() loop vs a bare PyTorch loop on the same model and
batches. Run from the repository root:

    .venv/bin/python benchmarks/bench_train_loop.py [--quick] [--threads N] [--reps N] [--train-steps N] [--block N]

The real train() (pretrain settings of the default Config, metrics=None) is observed through a Progress-compatible
clock that, after every --block steps, runs one block of each bare loop (paired blocks, so background load hits both
sides alike). Prints a markdown table on stdout; progress goes to stderr. See benchmarks/README.md.
"""

from __future__ import annotations

import copy
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import BLOCK_OPTION, TrainBench, log, main, median, status, table

NAME = "train"
GOAL_TRAIN_RATIO = 1.15  # package train() ms/step / bare PyTorch ms/step
OPTIONS = [
    ("--train-steps", {"type": int, "help": "steps per train()/bare run (default 500; quick 150)"}),
    ("--reps", {"type": int, "help": "interleaved repetitions (default 3)"}),
    BLOCK_OPTION,
]


def defaults(args) -> None:
    args.train_steps = args.train_steps or (150 if args.quick else 500)
    args.reps = args.reps or 3


class BareLoop:
    """The baseline: the same ScoreModel (same init) on the same DSM batches (stages.dsm_objective) with plain
    AdamW, backward and step. `clip` / `ema` add the package's gradient clipping / EMA update, nothing else."""

    def __init__(self, bench: TrainBench, clip: bool = False, ema: bool = False):
        import torch

        from cdmtransfer.optim import AdamW
        from cdmtransfer.train import ema_update

        tc = bench.cfg.pretrain
        self.clip, self.ema, self.tc, self.loss_fn, self.ema_update = clip, ema, tc, bench.loss_fn, ema_update
        self.model = bench.model()
        self.optimizer = AdamW([{"params": self.model.parameters()}], lr=tc.lr, weight_decay=tc.weight_decay)
        self.params = list(self.model.parameters())
        self.shadow = copy.deepcopy(self.model).requires_grad_(False) if ema else None
        self.gen = torch.Generator().manual_seed(bench.cfg.seed)
        self.step = 0

    def run(self, n: int) -> float:
        """n steps; returns ms/step."""
        from torch import nn

        model, optimizer, loss_fn, gen = self.model, self.optimizer, self.loss_fn, self.gen
        t0 = time.perf_counter()
        for _ in range(n):
            loss = loss_fn(model, gen).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.clip:
                nn.utils.clip_grad_norm_(self.params, self.tc.grad_clip)
            optimizer.step()
            if self.ema:
                self.ema_update(self.shadow, model, self.step, self.tc.ema_decay)
            self.step += 1
        return (time.perf_counter() - t0) / n * 1e3


class PairedClock:
    """A Progress stand-in for train(). train() calls update() once per log interval (`block` steps); the clock
    records how long those steps took and then runs one block of every bare variant, so each train() block is
    paired with bare blocks measured within the same second. Background load then hits both sides of a pair
    alike, and the median of per-pair ratios stays meaningful on a shared CI machine. finish() runs after the
    last step, so (finish - last resume) is the tail: the last optimizer.step + EMA + the final checkpoint."""

    def __init__(self, bare: dict[str, BareLoop], block: int):
        self.bare, self.block = bare, block
        self.ms: dict[str, list[float]] = {"train()": [], **{n: [] for n in bare}}
        self._rounds = 0
        self.t_resume = self.t_finish = None
        self.last_step = 0

    def start(self, step: int = 0) -> None:
        self.last_step, self.t_resume = step, time.perf_counter()

    def update(self, step: int, loss: float) -> None:
        now = time.perf_counter()
        self.ms["train()"].append((now - self.t_resume) / (step - self.last_step) * 1e3)
        self.last_step = step
        names = list(self.bare)
        r = self._rounds % len(names)
        self._rounds += 1
        for name in names[r:] + names[:r]:  # rotate so no variant always runs right after train()
            self.ms[name].append(self.bare[name].run(self.block))
        self.t_resume = time.perf_counter()

    def finish(self) -> None:
        self.t_finish = time.perf_counter()


def one_rep(bench: TrainBench, steps: int, ckpt_root: Path) -> tuple[dict[str, list[float]], float, float]:
    """One repetition: the real train() (pretrain settings, metrics=None, progress off, checkpoint_every >
    steps so the only checkpoint is the final one), with fresh bare loops interleaved block by block."""
    bare = {"bare": BareLoop(bench), "bare+clip": BareLoop(bench, clip=True),
            "bare+clip+ema": BareLoop(bench, clip=True, ema=True)}
    for loop in bare.values():  # warm up: lazy optimizer state, allocator, first-call dispatch
        loop.run(bench.block)
    clock = PairedClock(bare, bench.block)
    wall = bench.run_train(steps, clock, ckpt_root)
    return clock.ms, (clock.t_finish - clock.t_resume) * 1e3, wall


def run(args) -> dict:
    torch = __import__("torch")
    torch.set_num_threads(args.threads)
    steps, reps, block = args.train_steps, args.reps, args.block
    skip = max(1, -(-args.warmup_steps // block))  # whole blocks dropped from the start of every rep
    if steps // block <= skip + 1:
        raise SystemExit(f"--train-steps must be at least {(skip + 2) * block}")
    bench = TrainBench(block)
    ckpt_root = Path(tempfile.mkdtemp(prefix="cdm-bench-"))
    try:
        log(f"train: warm-up rep ({2 * block * 4} steps)")
        one_rep(bench, 2 * block, ckpt_root)
        names = ["bare", "bare+clip", "bare+clip+ema", "train()"]
        per_rep = {n: [] for n in names}
        ratio_rep = {n: [] for n in names}
        blocks = {n: [] for n in names}
        tails, walls = [], []
        for rep in range(reps):
            ms, tail, wall = one_rep(bench, steps, ckpt_root)
            tails.append(tail)
            walls.append(wall)
            for n in names:
                kept = ms[n][skip:]
                blocks[n] += kept
                per_rep[n].append(median(kept))
                ratio_rep[n].append(median([a / b for a, b in zip(kept, ms["bare"][skip:])]))
            log(f"train: rep {rep + 1}/{reps}: " + ", ".join(f"{n} {per_rep[n][-1]:.2f}" for n in names)
                + f" ms/step; paired train()/bare x{ratio_rep['train()'][-1]:.3f}")
    finally:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    cfg = bench.cfg
    n_params = sum(p.numel() for p in bench.model().parameters())
    return {
        "setup": {"suite": cfg.suite.name, "K": bench.taskset.K, "batch_per_task": cfg.pretrain.batch_size,
                  "rows_per_step": bench.taskset.K * cfg.pretrain.batch_size, "parameters": n_params,
                  "steps_per_run": steps, "reps": reps, "block_steps": block, "skipped_warmup_steps": skip * block,
                  "threads": torch.get_num_threads()},
        "ms_per_step": {n: median(per_rep[n]) for n in names},
        "ms_per_step_min_block": {n: min(blocks[n]) for n in names},
        "ms_per_step_per_rep": per_rep,
        "ratio_vs_bare": {n: median(ratio_rep[n]) for n in names},  # median over reps of the median paired ratio
        "ratio_vs_bare_per_rep": ratio_rep,
        "final_checkpoint_ms": median(tails),
        "final_checkpoint_ms_per_rep": tails,
        "train_call_wall_s_per_rep": walls,
        "checkpoint_ms_per_step_at_default_interval": median(tails) / cfg.pretrain.checkpoint_every,
        "default_checkpoint_every": cfg.pretrain.checkpoint_every,
    }


def summary(res: dict) -> list[list]:
    tr = res.get(NAME)
    if not tr:
        return []
    r = tr["ratio_vs_bare"]["train()"]
    best = tr["ms_per_step_min_block"]
    return [["train() vs bare PyTorch, time per step",
             f"x{r:.3f} paired ({tr['ms_per_step']['train()']:.2f} vs {tr['ms_per_step']['bare']:.2f} "
             f"ms/step; best blocks {best['train()']:.2f} vs {best['bare']:.2f})",
             f"<= x{GOAL_TRAIN_RATIO}", status(r <= GOAL_TRAIN_RATIO)]]


def details(res: dict) -> list[str]:
    tr = res.get(NAME)
    if not tr:
        return []
    s = tr["setup"]
    lines = ["", "## 1. Training step: train() vs bare PyTorch",
             "", f"{s['suite']} suite, K={s['K']} tasks x batch {s['batch_per_task']} = {s['rows_per_step']} "
                 f"rows/step, {s['parameters']:,} parameters, {s['threads']} threads. Each of {s['reps']} reps "
                 f"runs train() for {s['steps_per_run']} steps and, after every {s['block_steps']}-step block, "
                 f"one {s['block_steps']}-step block of each bare loop (paired blocks; first "
                 f"{s['skipped_warmup_steps']} steps of each rep dropped). ms/step: median over reps of the "
                 "median block. Ratio: median over reps of the median per-pair ratio to `bare`.",
             ""]
    desc = {"bare": "AdamW + backward + step only", "bare+clip": "+ clip_grad_norm_",
            "bare+clip+ema": "+ clip_grad_norm_ + EMA (train.ema_update)",
            "train()": "cdmtransfer.train.train (LR schedule, clip, EMA, loss bookkeeping)"}
    rows = []
    prev = None
    for name, ms in tr["ms_per_step"].items():
        rows.append([f"`{name}`", desc[name], f"{ms:.3f}", f"{tr['ms_per_step_min_block'][name]:.3f}",
                     f"x{tr['ratio_vs_bare'][name]:.3f}", "-" if prev is None else f"{ms - prev:+.3f}"])
        prev = ms
    lines.append(table(["Loop", "What it does", "ms/step (median)", "ms/step (best block)",
                        "paired ratio vs bare", "ms/step vs previous row"], rows))
    lines += ["", "Paired train()/bare ratio per rep: "
              + ", ".join(f"x{v:.3f}" for v in tr["ratio_vs_bare_per_rep"]["train()"]) + "."]
    lines += ["", f"Final checkpoint write (the last step's optimizer.step + EMA + save_checkpoint, measured "
                  f"inside train()): {tr['final_checkpoint_ms']:.1f} ms median per write "
                  f"(= {tr['checkpoint_ms_per_step_at_default_interval']:.3f} ms/step amortised at "
                  f"checkpoint_every={tr['default_checkpoint_every']}); excluded from the ms/step above."]
    return lines


if __name__ == "__main__":
    sys.exit(main([sys.modules[__name__]], __doc__))
