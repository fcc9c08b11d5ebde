"""Benchmarks for cdmtransfer's training path. Run from the repository root:

    .venv/bin/python benchmarks/bench_train.py            # full run (a few minutes on 2 cores)
    .venv/bin/python benchmarks/bench_train.py --quick    # short run (CI smoke test, ~1 minute)
    .venv/bin/python benchmarks/bench_train.py --json bench-results/train.json

Measures (see benchmarks/README.md for what each number means and the goals):
  1. time per step of the package's `train()` loop vs a bare PyTorch loop on the same model and batches;
  2. the share of training wall time spent writing metrics to MLflow in a real `pretrain`;
  3. BatchedHeads (one baddbmm per layer for K heads) vs K nn.Sequential heads in a Python loop;
  4. `python -m cdmtransfer --help` latency, and that it does not import torch;
  5. (matmul) the fp32 torch.mm peak in GFLOP/s and the share of it one pretrain training step achieves;
  6. (memory) peak RSS of a short pretrain train() in a fresh process for K in {8, 32} x n in {512, 4096};
  7. (quickstart) wall time of `cdmtransfer sweep recipes/quickstart.yaml --quiet` on a cold store.

Prints markdown tables on stdout; progress goes to stderr. Nothing under cdmtransfer/ is modified: the benchmark
observes the real loop through its public hooks (a Progress-compatible clock, and timing wrappers around a few
functions that are restored afterwards).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a plain script from anywhere, without installing the package
    sys.path.insert(0, str(ROOT))

GOAL_TRAIN_RATIO = 1.15  # package train() ms/step / bare PyTorch ms/step
GOAL_LOGGING_SHARE = 3.0  # % of train wall time spent in MLflow writes
SECTIONS = ("train", "logging", "heads", "cli", "matmul", "memory", "quickstart")
HEAVY_MODULES = ("torch", "mlflow", "numpy", "sqlalchemy", "pandas", "safetensors", "yaml", "rich", "typer")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


class ForeignLoad:
    """CPU time used by *other* processes while a section ran: (all busy CPU time from /proc/stat) minus this
    process's and its children's CPU time, divided by the wall time. 0 on a quiet machine; 1.0 means another
    process kept one whole core busy. None where /proc/stat is unavailable."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def cores(self) -> float | None:
        busy = self._busy()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        return round(max(0.0, (busy - self.busy0) - (self._own() - self.own0)) / wall, 2)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ------------------------------------------------------------------------------------------------------------------
# 1. train() vs bare PyTorch


class BareLoop:
    """The baseline: the same ScoreModel (same init) on the same DSM batches (stages.dsm_objective) with plain
    AdamW, backward and step. `clip` / `ema` add the package's gradient clipping / EMA update, nothing else."""

    def __init__(self, bench: "TrainBench", clip: bool = False, ema: bool = False):
        import torch

        from cdmtransfer.train import ema_update

        tc = bench.cfg.pretrain
        self.clip, self.ema, self.tc, self.loss_fn, self.ema_update = clip, ema, tc, bench.loss_fn, ema_update
        self.model = bench.model()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
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


class TrainBench:
    def __init__(self, block: int):
        import torch

        from cdmtransfer.config import load_config
        from cdmtransfer.diffusion import OUProcess
        from cdmtransfer.stages import dsm_objective
        from cdmtransfer.tasks import build_taskset

        self.torch = torch
        self.cfg = load_config(None, [])
        self.block = block
        self.taskset = build_taskset(self.cfg)
        process = OUProcess(self.cfg.diffusion.T0, self.cfg.diffusion.T)
        ts = self.taskset
        self.loss_fn = dsm_objective(ts.source_x, ts.source_y, ts.source_n, process, self.cfg.pretrain.batch_size)

    def model(self):
        from cdmtransfer.models import MLPEncoder, ScoreModel

        m, ts = self.cfg.model, self.taskset
        self.torch.manual_seed(self.cfg.seed)
        return ScoreModel(MLPEncoder(ts.D_y, m.d, m.encoder_width, m.encoder_depth), ts.K, ts.d_x,
                          m.head_width, m.head_depth, m.time_dim)

    def rep(self, steps: int, ckpt_root: Path) -> tuple[dict[str, list[float]], float, float]:
        """One repetition: the real train() (pretrain settings, metrics=None, progress off, checkpoint_every >
        steps so the only checkpoint is the final one), with fresh bare loops interleaved block by block."""
        from cdmtransfer.models import model_spec
        from cdmtransfer.train import train

        bare = {"bare": BareLoop(self), "bare+clip": BareLoop(self, clip=True),
                "bare+clip+ema": BareLoop(self, clip=True, ema=True)}
        for loop in bare.values():  # warm up: lazy optimizer state, allocator, first-call dispatch
            loop.run(self.block)
        tc = dataclasses.replace(self.cfg.pretrain, steps=steps, log_every=self.block, checkpoint_every=steps * 10)
        model = self.model()
        meta = {"stage": "pretrain", "model": model_spec(model), "config": self.cfg.to_dict(), "run_id": "bench"}
        clock = PairedClock(bare, self.block)
        with tempfile.TemporaryDirectory(dir=ckpt_root) as d:
            t0 = time.perf_counter()
            train(model, [{"params": list(model.parameters())}], self.loss_fn, tc, seed=self.cfg.seed,
                  ckpt_dir=Path(d) / "checkpoints", meta=meta, metrics=None, progress=clock, label="bench")
            wall = time.perf_counter() - t0
        return clock.ms, (clock.t_finish - clock.t_resume) * 1e3, wall


def bench_train(args) -> dict:
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
        bench.rep(2 * block, ckpt_root)
        names = ["bare", "bare+clip", "bare+clip+ema", "train()"]
        per_rep = {n: [] for n in names}
        ratio_rep = {n: [] for n in names}
        blocks = {n: [] for n in names}
        tails, walls = [], []
        for rep in range(reps):
            ms, tail, wall = bench.rep(steps, ckpt_root)
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


# ------------------------------------------------------------------------------------------------------------------
# 2. MLflow logging share in a real pretrain


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


def bench_logging(args) -> dict:
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the store must be the temporary one
    import mlflow

    from cdmtransfer import stages, tracking
    from cdmtransfer import train as train_mod
    from cdmtransfer.config import load_config

    runs = []
    with tempfile.TemporaryDirectory(prefix="cdm-bench-mlflow-") as home:
        for label in ("cold store", "warm store"):
            cfg = load_config(None, [f"tracking.home={home}", f"pretrain.steps={args.pretrain_steps}",
                                     "pretrain.log_every=25", f"threads={args.threads}", "name=bench"])
            t = Timings()
            t.wrap(stages, "build_taskset", "build task set")
            t.wrap(stages, "open_tracker", "open store + experiment")
            t.wrap(mlflow.MlflowClient, "create_run", "create run")
            t.wrap(tracking.Run, "log_params", "log params")
            t.wrap(tracking.Run, "log_dict", "log config.json")
            t.wrap(stages, "train", "train() (= train_seconds)")
            t.wrap(train_mod, "save_checkpoint", "  of which checkpoints")
            t.wrap(tracking.Run, "flush", "metric flushes (= logging_seconds)")
            t.wrap(stages, "export_model", "export model")
            t.wrap(stages, "_finish", "log artifacts + register model")
            t.wrap(mlflow.MlflowClient, "set_terminated", "set terminated")
            log(f"logging: pretrain {args.pretrain_steps} steps ({label})")
            t0 = time.perf_counter()
            try:
                summary = stages.pretrain(cfg, quiet=True)
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


# ------------------------------------------------------------------------------------------------------------------
# 3. BatchedHeads vs a Python loop over K heads


def bench_heads(args) -> dict:
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


# ------------------------------------------------------------------------------------------------------------------
# 4. CLI --help latency and imports

_PROBE = r"""
import contextlib, io, json, runpy, sys
sys.argv = ["cdmtransfer", "--help"]
code = 0
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        runpy.run_module("cdmtransfer", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code or 0
mods = sorted({m.split(".")[0] for m in sys.modules})
print("@@BENCH@@" + json.dumps({"exit": code, "modules": mods}))
"""


def _time_cmd(cmd: list[str], n: int, env: dict) -> tuple[list[float], subprocess.CompletedProcess]:
    times, proc = [], None
    for _ in range(n):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
    return times, proc


def bench_cli(args) -> dict:
    log("cli: timing --help")
    if not (ROOT / "cdmtransfer" / "cli.py").is_file():
        return {"skipped": "no CLI yet"}
    py = sys.executable
    env = {**os.environ, "COLUMNS": "100"}
    env.pop("MLFLOW_TRACKING_URI", None)
    help_cmd = [py, "-m", "cdmtransfer", "--help"]
    _time_cmd(help_cmd, 1, env)  # warm the file cache
    times, proc = _time_cmd(help_cmd, args.cli_runs, env)
    if proc.returncode != 0:
        return {"skipped": f"`python -m cdmtransfer --help` exited {proc.returncode}: "
                           f"{(proc.stderr.strip().splitlines() or [''])[-1][:200]}"}
    probe = subprocess.run([py, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True)
    line = next((ln for ln in probe.stdout.splitlines()[::-1] if ln.startswith("@@BENCH@@")), None)
    modules = json.loads(line[len("@@BENCH@@"):])["modules"] if line else None
    imp = subprocess.run([py, "-X", "importtime", "-m", "cdmtransfer", "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    top = []
    for ln in imp.stderr.splitlines():  # "import time:  self [us] | cumulative | package", nesting by indentation
        parts = ln.split("|")
        if not ln.startswith("import time:") or len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2]
        if name.startswith(" ") and not name.startswith("  "):  # one space after '|': a top-level import
            top.append((int(parts[1]), name.strip()))
    top.sort(reverse=True)
    startup, _ = _time_cmd([py, "-c", "pass"], 3, env)
    torch_import, _ = _time_cmd([py, "-c", "import torch"], 3, env)
    return {
        "help_ms": 1e3 * median(times), "help_ms_runs": [1e3 * t for t in times],
        "torch_imported": None if modules is None else "torch" in modules,
        "heavy_modules_imported": None if modules is None else [m for m in HEAVY_MODULES if m in modules],
        "slowest_top_level_imports_ms": [(name, us / 1e3) for us, name in top[:6]],
        "python_startup_ms": 1e3 * median(startup), "import_torch_ms": 1e3 * median(torch_import),
    }


# ------------------------------------------------------------------------------------------------------------------
# 5. fp32 matmul peak and the training step's share of it


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
    from cdmtransfer.models import model_spec
    from cdmtransfer.train import train

    bench = TrainBench(args.block)
    tc = dataclasses.replace(bench.cfg.pretrain, steps=steps, log_every=args.block, checkpoint_every=steps * 10)
    model = bench.model()
    meta = {"stage": "pretrain", "model": model_spec(model), "config": bench.cfg.to_dict(), "run_id": "bench"}
    clock = BlockClock()
    with tempfile.TemporaryDirectory(prefix="cdm-bench-") as d:
        train(model, [{"params": list(model.parameters())}], bench.loss_fn, tc, seed=bench.cfg.seed,
              ckpt_dir=Path(d) / "checkpoints", meta=meta, metrics=None, progress=clock, label="bench")
    kept = clock.ms[max(1, -(-args.warmup_steps // args.block)):]
    return {"ms_per_step": median(kept), "ms_per_step_best_block": min(kept), "steps": steps,
            "source": f"own short train() run ({steps} steps, first {args.warmup_steps} dropped)"}


def bench_matmul(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    peak = []
    for n in args.matmul_sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        for _ in range(2):  # warm up
            torch.mm(a, b, out=out)
        gf = []
        for _ in range(args.matmul_reps):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            gf.append(2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
        peak.append({"n": n, "gflops_median": median(gf), "gflops_best": max(gf), "gflops_runs": gf})
        log(f"matmul: {n}x{n} fp32: median {median(gf):.1f} GFLOP/s, best {max(gf):.1f}")
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


# ------------------------------------------------------------------------------------------------------------------
# 6. Peak resident memory of a short pretrain as K·n grows

_MEM_PROBE = r"""
import json, resource, sys, tempfile, time, dataclasses
from pathlib import Path
sys.path.insert(0, sys.argv[1])
K, n, steps, threads = (int(v) for v in sys.argv[2:6])
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB
def vmrss():  # current (not peak) resident set, MiB; None off Linux
    try:
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
    except (OSError, StopIteration):
        return None
import torch
from cdmtransfer.config import load_config
from cdmtransfer.diffusion import OUProcess
from cdmtransfer.models import ScoreModel, model_spec
from cdmtransfer.stages import dsm_objective, new_encoder
from cdmtransfer.tasks import build_taskset
from cdmtransfer.train import train
torch.set_num_threads(threads)
out = {"rss_imports_mib": rss(), "vmrss_imports_mib": vmrss()}
cfg = load_config(None, [f"suite.K={K}", f"suite.n={n}"])
ts = build_taskset(cfg)
out["rss_taskset_mib"] = rss()
out["source_tensors_mib"] = sum(t.numel() * t.element_size() for t in (ts.source_x, ts.source_y)) / 2 ** 20
torch.manual_seed(cfg.seed)
m = cfg.model
model = ScoreModel(new_encoder(cfg, ts), ts.K, ts.d_x, m.head_width, m.head_depth, m.time_dim)
out["parameters"] = sum(p.numel() for p in model.parameters())
process = OUProcess(cfg.diffusion.T0, cfg.diffusion.T)
loss_fn = dsm_objective(ts.source_x, ts.source_y, ts.source_n, process, cfg.pretrain.batch_size)
tc = dataclasses.replace(cfg.pretrain, steps=steps, checkpoint_every=steps * 10)
meta = {"stage": "pretrain", "model": model_spec(model), "config": cfg.to_dict(), "run_id": "bench"}
t0 = time.perf_counter()
with tempfile.TemporaryDirectory(prefix="cdm-bench-mem-") as d:
    train(model, [{"params": list(model.parameters())}], loss_fn, tc, seed=cfg.seed,
          ckpt_dir=Path(d) / "checkpoints", meta=meta, metrics=None, label="bench")
out["train_seconds"] = time.perf_counter() - t0
out["rss_peak_mib"] = rss()
out["vmrss_end_mib"] = vmrss()
print("@@BENCH@@" + json.dumps(out))
"""


def bench_memory(args) -> dict:
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    rows = []
    for K in args.memory_k:
        for n in args.memory_n:
            log(f"memory: K={K} n={n}: {args.memory_steps}-step pretrain train() in a fresh process")
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", _MEM_PROBE, str(ROOT), str(K), str(n),
                                   str(args.memory_steps), str(args.threads)],
                                  cwd=ROOT, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            line = next((ln for ln in proc.stdout.splitlines()[::-1] if ln.startswith("@@BENCH@@")), None)
            if proc.returncode != 0 or line is None:
                rows.append({"K": K, "n": n, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]})
                continue
            r = json.loads(line[len("@@BENCH@@"):])
            r.update({"K": K, "n": n, "rows": K * n, "process_wall_s": wall,
                      "data_dependent_mib": r["rss_peak_mib"] - r["rss_imports_mib"]})
            rows.append(r)
            log(f"memory: K={K} n={n}: imports {r['rss_imports_mib']:.0f} MiB, peak {r['rss_peak_mib']:.0f} MiB")
    return {"steps": args.memory_steps, "threads": args.threads, "rows": rows,
            "how": "ru_maxrss of a fresh `python -c` per point; default Config with suite.K / suite.n overridden; "
                   "real cdmtransfer.train.train() with metrics=None (no MLflow)"}


# ------------------------------------------------------------------------------------------------------------------
# 7. Quickstart sweep wall time on a cold store


def bench_quickstart(args) -> dict:
    recipe = ROOT / "recipes" / "quickstart.yaml"
    if not recipe.is_file():
        return {"skipped": "no recipes/quickstart.yaml"}
    cmd = [sys.executable, "-m", "cdmtransfer", "sweep", "recipes/quickstart.yaml", "--quiet"]
    with tempfile.TemporaryDirectory(prefix="cdm-bench-qs-") as home:
        env = {**os.environ, "CDMTRANSFER_HOME": home, "COLUMNS": "120"}
        env.pop("MLFLOW_TRACKING_URI", None)
        log("quickstart: " + " ".join(cmd[1:]) + " (cold store)")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    res = {"command": "CDMTRANSFER_HOME=<new tmp dir> python -m cdmtransfer sweep recipes/quickstart.yaml --quiet",
           "wall_s": wall, "returncode": proc.returncode, "stdout_tail": proc.stdout.strip().splitlines()[-20:]}
    if proc.returncode != 0:
        res["stderr_tail"] = proc.stderr.strip().splitlines()[-10:]
    log(f"quickstart: {wall:.1f} s, exit {proc.returncode}")
    return res


# ------------------------------------------------------------------------------------------------------------------
# Report


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def status(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def report(res: dict) -> str:
    lines = []
    mach = res["machine"]
    lines.append(f"Machine: {mach['cores']} cores ({mach['cpu']}), torch {mach['torch']} "
                 f"({'CUDA available' if mach['cuda'] else 'CPU'}), Python {mach['python']}, "
                 f"threads {mach['threads']}; load average {mach['load_before']} before, "
                 f"{mach.get('load_after')} after{'; QUICK run' if res['quick'] else ''}.")
    fl = {k: v for k, v in mach.get("foreign_load_cores", {}).items() if v is not None}
    if fl:
        lines.append("CPU used by other processes during each section (cores, 0 = quiet): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in fl.items()) + ".")
    if any(v > 0.25 for v in fl.values()):
        lines.append("\nWARNING: other processes were using the CPUs during this run, so timings are inflated and "
                     "noisy (with more than one torch thread, every parallel region also waits for descheduled "
                     "threads). Paired ratios and the 'best block' columns are the least disturbed estimates.")
    summary = []
    tr = res.get("train")
    if tr:
        r = tr["ratio_vs_bare"]["train()"]
        best = tr["ms_per_step_min_block"]
        summary.append(["train() vs bare PyTorch, time per step",
                        f"x{r:.3f} paired ({tr['ms_per_step']['train()']:.2f} vs {tr['ms_per_step']['bare']:.2f} "
                        f"ms/step; best blocks {best['train()']:.2f} vs {best['bare']:.2f})",
                        f"<= x{GOAL_TRAIN_RATIO}", status(r <= GOAL_TRAIN_RATIO)])
    lg = res.get("logging")
    if lg:
        cold = lg["runs"][0]
        summary.append(["MLflow logging share of train time",
                        f"{cold['logging_share_pct']:.2f}% ({cold['logging_seconds']:.3f} s of "
                        f"{cold['train_seconds']:.2f} s)", f"<= {GOAL_LOGGING_SHARE}%",
                        status(cold["logging_share_pct"] <= GOAL_LOGGING_SHARE)])
        summary.append([f"pretrain() total wall, {cold['steps']} steps (cold store)",
                        f"{cold['total_seconds']:.2f} s ({cold['outside_train_seconds']:.2f} s outside train())",
                        "-", "info"])
    hd = res.get("heads")
    if hd:
        k8 = next((row for row in hd["rows"] if row["K"] == 8), hd["rows"][-1])
        summary.append([f"BatchedHeads speed-up over a loop, K={k8['K']}", f"x{k8['loop_over_batched']:.2f}",
                        "> x1", status(k8["loop_over_batched"] > 1)])
    cli = res.get("cli")
    if cli is not None:
        if "skipped" in cli:
            summary.append(["`cdmtransfer --help`", f"skipped: {cli['skipped']}", "no torch import", "n/a"])
        else:
            ok = None if cli["torch_imported"] is None else not cli["torch_imported"]
            summary.append(["`cdmtransfer --help` latency (median of "
                            f"{len(cli['help_ms_runs'])})",
                            f"{cli['help_ms']:.0f} ms, torch imported: {cli['torch_imported']}",
                            "no torch import", status(ok)])
    mm = res.get("matmul")
    if mm:
        summary.append([f"train step vs fp32 matmul peak ({mm['threads']} thread(s))",
                        f"{mm['share_of_peak_pct']:.1f}% ({mm['train_gflops']:.2f} of {mm['peak_gflops']:.1f} "
                        f"GFLOP/s; {mm['flops']['step_flops'] / 1e6:.0f} MFLOP/step in "
                        f"{mm['train_step']['ms_per_step']:.2f} ms)", "-", "info"])
    mem = res.get("memory")
    if mem:
        ok = [r for r in mem["rows"] if "error" not in r]
        if ok:
            lo, hi = min(ok, key=lambda r: r["rows"]), max(ok, key=lambda r: r["rows"])
            summary.append([f"peak RSS of a {mem['steps']}-step pretrain, K·n {lo['rows']} -> {hi['rows']}",
                            f"{lo['rss_peak_mib']:.0f} -> {hi['rss_peak_mib']:.0f} MiB (imports alone "
                            f"{median([r['rss_imports_mib'] for r in ok]):.0f} MiB); VmRSS end - after imports "
                            + (f"{lo['vmrss_end_mib'] - lo['vmrss_imports_mib']:+.0f} -> "
                               f"{hi['vmrss_end_mib'] - hi['vmrss_imports_mib']:+.0f} MiB"
                               if lo.get("vmrss_end_mib") is not None and hi.get("vmrss_end_mib") is not None
                               else "n/a"), "-", "info"])
        for r in mem["rows"]:
            if "error" in r:
                summary.append([f"memory K={r['K']} n={r['n']}", f"error: {r['error']}", "-", "n/a"])
    qs = res.get("quickstart")
    if qs:
        if "skipped" in qs:
            summary.append(["quickstart sweep (cold store)", f"skipped: {qs['skipped']}", "-", "n/a"])
        else:
            summary.append(["quickstart sweep wall time (cold store, 1 run)",
                            f"{qs['wall_s']:.1f} s (exit {qs['returncode']})", "-",
                            "info" if qs["returncode"] == 0 else "FAIL"])
    lines += ["", "## Summary", "", table(["Benchmark", "Result", "Goal", "Status"], summary)]

    if tr:
        s = tr["setup"]
        lines += ["", "## 1. Training step: train() vs bare PyTorch",
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
    if lg:
        lines += ["", "## 2. MLflow logging in a real pretrain", ""]
        rows = []
        for r in lg["runs"]:
            rows.append([r["store"], r["steps"], f"{r['total_seconds']:.2f}", f"{r['train_seconds']:.2f}",
                         f"{r['ms_per_step_in_pretrain']:.2f}", f"{r['logging_seconds']:.3f}",
                         f"{r['logging_share_pct']:.2f}%", f"{r['outside_train_seconds']:.2f}"])
        lines.append(table(["Store", "Steps", "pretrain() wall (s)", "train_seconds", "ms/step",
                            "logging_seconds", "logging share", "outside train() (s)"], rows))
        if tr:
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
    if hd:
        s = hd["setup"]
        lines += ["", "## 3. BatchedHeads vs a Python loop of nn.Sequential heads",
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
    if cli is not None:
        lines += ["", "## 4. `python -m cdmtransfer --help`", ""]
        if "skipped" in cli:
            lines.append(f"skipped: {cli['skipped']}")
        else:
            lines.append(table(["Measure", "Value"], [
                ["--help wall time (median)", f"{cli['help_ms']:.0f} ms "
                                               f"(runs: {', '.join(f'{t:.0f}' for t in cli['help_ms_runs'])})"],
                ["bare `python -c pass`", f"{cli['python_startup_ms']:.0f} ms"],
                ["`python -c 'import torch'` (what --help avoids)", f"{cli['import_torch_ms']:.0f} ms"],
                ["torch imported by --help", str(cli["torch_imported"])],
                ["heavy modules imported by --help", ", ".join(cli["heavy_modules_imported"] or []) or "none"],
                ["slowest top-level imports (cumulative ms)",
                 ", ".join(f"{n} {ms:.0f}" for n, ms in cli["slowest_top_level_imports_ms"])],
            ]))
    if mm:
        f = mm["flops"]
        lines += ["", "## 5. fp32 matmul peak and the training step's share of it", "",
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
    if mem:
        lines += ["", f"## 6. Peak resident memory of a {mem['steps']}-step pretrain", "",
                  f"One fresh process per point ({mem['how']}), {mem['threads']} thread(s). `after imports` is "
                  "ru_maxrss once torch and cdmtransfer are imported; `peak` is ru_maxrss at the end.", ""]
        rows = []
        for r in mem["rows"]:
            if "error" in r:
                rows.append([r["K"], r["n"], "-", "error", r["error"], "", "", "", "", "", ""])
                continue
            rows.append([r["K"], r["n"], r["rows"], f"{r['rss_imports_mib']:.0f}", f"{r['rss_taskset_mib']:.0f}",
                         f"{r['rss_peak_mib']:.0f}", f"{r['data_dependent_mib']:.0f}",
                         f"{r['source_tensors_mib']:.2f}",
                         "-" if r.get("vmrss_imports_mib") is None else f"{r['vmrss_imports_mib']:.0f}",
                         "-" if r.get("vmrss_end_mib") is None else f"{r['vmrss_end_mib']:.0f}",
                         "-" if r.get("vmrss_end_mib") is None else f"{r['vmrss_end_mib'] - r['vmrss_imports_mib']:+.0f}"])
        lines.append(table(["K", "n", "K·n", "after imports (MiB)", "after task set (MiB)", "peak (MiB)",
                            "peak - imports (MiB)", "source x+y tensors (MiB)", "VmRSS after imports (MiB)", "VmRSS at end (MiB)",
                            "VmRSS end - imports (MiB)"], rows))
        lines += ["", "ru_maxrss is a high-water mark, and the imports (torch, cdmtransfer and what it pulls in) briefly "
                      "peak above the resident set they leave, so the peak hides the data-dependent part until it exceeds that "
                      "import peak. The current resident set (VmRSS from /proc/self/status) after imports and at "
                      "the end shows the growth with K·n directly."]
    if qs and "skipped" not in qs:
        lines += ["", "## 7. Quickstart sweep on a cold store", "",
                  f"`{qs['command']}`: **{qs['wall_s']:.1f} s**, exit {qs['returncode']} (one run; includes "
                  "interpreter start, imports and the new MLflow store)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short run (fewer steps and repetitions)")
    p.add_argument("--json", metavar="PATH", help="also write all results (raw samples included) as JSON")
    p.add_argument("--threads", type=int, default=1, help="torch threads for every measurement (default 1, as cdmtransfer runs)")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--train-steps", type=int, help="steps per train()/bare run (default 500; quick 150)")
    p.add_argument("--reps", type=int, help="interleaved repetitions (default 3)")
    p.add_argument("--block", type=int, default=10,
                   help="steps per paired block in the train() benchmark (train()'s log_every; default 10)")
    p.add_argument("--pretrain-steps", type=int, help="steps of the real pretrain (default 1000; quick 200)")
    args = p.parse_args(argv)
    args.train_steps = args.train_steps or (150 if args.quick else 500)
    args.reps = args.reps or 3
    args.warmup_steps = 50
    args.pretrain_steps = args.pretrain_steps or (200 if args.quick else 1000)
    args.heads_k = [1, 2, 4, 8, 16, 32, 64]
    args.heads_blocks = 7 if args.quick else 21
    args.cli_runs = 5
    args.matmul_sizes = [1024, 2048]
    args.matmul_reps = 3 if args.quick else 5
    args.matmul_train_steps = 150 if args.quick else 300
    args.memory_k = [8, 32]
    args.memory_n = [512, 4096]
    args.memory_steps = 50
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(SECTIONS)
    if unknown:
        p.error(f"--only: unknown {', '.join(sorted(unknown))}")

    import torch

    torch.set_num_threads(args.threads)
    res: dict = {"quick": args.quick, "machine": {
        "cores": os.cpu_count(), "cpu": cpu_model(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
        "python": platform.python_version(), "platform": platform.platform(), "threads": torch.get_num_threads(),
        "load_before": loadavg()}}
    t0 = time.perf_counter()
    foreign = res["machine"]["foreign_load_cores"] = {}
    sections = {"train": bench_train, "logging": bench_logging, "heads": bench_heads, "cli": bench_cli,
                "matmul": bench_matmul, "memory": bench_memory, "quickstart": bench_quickstart}
    args.results = res  # matmul reuses train's ms/step when that section ran first
    for name, fn in sections.items():
        if name not in only:
            continue
        fl = ForeignLoad()
        res[name] = fn(args)
        foreign[name] = fl.cores()
        torch.set_num_threads(args.threads)  # pretrain() sets threads from its config; keep one value throughout
    res["machine"]["load_after"] = loadavg()
    res["seconds"] = time.perf_counter() - t0
    text = report(res)
    print(text)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1, default=str))
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
