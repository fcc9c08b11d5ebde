"""What the benchmark scripts in this folder share: the repository on sys.path, progress logging, load and machine
measurement, the default-Config pretrain setup, markdown formatting and the runner (`main`) that parses the options,
runs one or more benchmark modules and prints their combined report.

A benchmark module defines NAME (its section name), OPTIONS (argparse flags it adds), defaults(args) (its settings,
from --quick), run(args) -> dict, summary(res) -> rows of the summary table and details(res) -> its report lines.
`res` holds every section that ran in the invocation, keyed by NAME, plus "machine" and "quick".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a plain script from anywhere, without installing the package
    sys.path.insert(0, str(ROOT))

WARMUP_STEPS = 50  # steps dropped from the start of every timed train() run
BLOCK_OPTION = ("--block", {"type": int, "default": 10,
                            "help": "steps per paired block in the train() benchmark (train()'s log_every; default 10)"})
PROBE_MARK = "@@BENCH@@"  # a probe subprocess prints its JSON result on a line starting with this


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


def subprocess_env(**extra: str) -> dict:
    """This process's environment plus `extra`, without MLFLOW_TRACKING_URI (a benchmark never uses a real store)."""
    env = {**os.environ, **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def probe_result(stdout: str) -> dict | None:
    """The JSON a probe subprocess printed after PROBE_MARK (its last such line), or None."""
    line = next((ln for ln in stdout.splitlines()[::-1] if ln.startswith(PROBE_MARK)), None)
    return None if line is None else json.loads(line[len(PROBE_MARK):])


class TrainBench:
    """The pretrain of the default Config, without MLflow: its task set, DSM loss (stages.dsm_objective) and a
    freshly seeded ScoreModel, and a real train() run on them."""

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

    def run_train(self, steps: int, progress, ckpt_root: Path | None = None) -> float:
        """The real train() on a new model (pretrain settings, metrics=None, log_every = block, checkpoint_every >
        steps so the only checkpoint is the final one), reporting to `progress`; returns its wall time in seconds."""
        from cdmtransfer.models import model_spec
        from cdmtransfer.train import train

        tc = dataclasses.replace(self.cfg.pretrain, steps=steps, log_every=self.block, checkpoint_every=steps * 10)
        model = self.model()
        meta = {"stage": "pretrain", "model": model_spec(model), "config": self.cfg.to_dict(), "run_id": "bench"}
        with tempfile.TemporaryDirectory(prefix="cdm-bench-", dir=ckpt_root) as d:
            t0 = time.perf_counter()
            train(model, [{"params": list(model.parameters())}], self.loss_fn, tc, seed=self.cfg.seed,
                  ckpt_dir=Path(d) / "checkpoints", meta=meta, metrics=None, progress=progress, label="bench")
            return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------------------------
# Report


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def samples_table(label: str, unit: str, samples: dict[str, list[float]]) -> str:
    """A table of interleaved timings: one row per variant, every sample and their median."""
    rows = [[name, " / ".join(f"{v:.2f}" for v in values), f"{median(values):.2f}"] for name, values in samples.items()]
    return table([label, unit, "median"], rows)


def status(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def report(res: dict, modules) -> str:
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
    summary = [row for mod in modules for row in mod.summary(res)]
    lines += ["", "## Summary", "", table(["Benchmark", "Result", "Goal", "Status"], summary)]
    for mod in modules:
        lines += mod.details(res)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# Runner


def main(modules, doc: str, argv=None) -> int:
    """Parse the options of `modules`, run them in order (all, or those named by --only when there are several)
    and print the combined report; --json also writes every result."""
    names = [mod.NAME for mod in modules]
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short run (fewer steps and repetitions)")
    p.add_argument("--json", metavar="PATH", help="also write all results (raw samples included) as JSON")
    p.add_argument("--threads", type=int, default=1, help="torch threads for every measurement (default 1, as cdmtransfer runs)")
    if len(modules) > 1:
        p.add_argument("--only", default=",".join(names), help="comma-separated subset of " + ",".join(names))
    added = set()
    for mod in modules:
        for flag, kwargs in mod.OPTIONS:
            if flag not in added:  # an option two benchmarks share (--block) is added once
                added.add(flag)
                p.add_argument(flag, **kwargs)
    args = p.parse_args(argv)
    args.warmup_steps = WARMUP_STEPS
    for mod in modules:
        mod.defaults(args)
    only = {s.strip() for s in getattr(args, "only", ",".join(names)).split(",") if s.strip()}
    unknown = only - set(names)
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
    args.results = res  # matmul reuses train's ms/step when that section ran first
    for mod in modules:
        if mod.NAME not in only:
            continue
        fl = ForeignLoad()
        res[mod.NAME] = mod.run(args)
        foreign[mod.NAME] = fl.cores()
        torch.set_num_threads(args.threads)  # pretrain() sets threads from its config; keep one value throughout
    res["machine"]["load_after"] = loadavg()
    res["seconds"] = time.perf_counter() - t0
    text = report(res, modules)
    print(text)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1, default=str))
        log(f"wrote {path}")
    return 0
