"""Benchmark 6 (`memory`): peak RSS of a short pretrain train() in a fresh process for K in {8, 32} x n in
{512, 4096}. Run from the repository root:

    .venv/bin/python benchmarks/bench_memory.py [--threads N]

Each point is a fresh `python -c` (default Config with suite.K / suite.n overridden, real train() with
metrics=None) that reports ru_maxrss and VmRSS. Prints a markdown table on stdout; progress goes to stderr.
See benchmarks/README.md.
"""

from __future__ import annotations

import subprocess
import sys
import time

from _common import ROOT, log, main, median, probe_result, subprocess_env, table

NAME = "memory"
OPTIONS = []

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


def defaults(args) -> None:
    args.memory_k = [8, 32]
    args.memory_n = [512, 4096]
    args.memory_steps = 50


def run(args) -> dict:
    env = subprocess_env()
    rows = []
    for K in args.memory_k:
        for n in args.memory_n:
            log(f"memory: K={K} n={n}: {args.memory_steps}-step pretrain train() in a fresh process")
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", _MEM_PROBE, str(ROOT), str(K), str(n),
                                   str(args.memory_steps), str(args.threads)],
                                  cwd=ROOT, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            r = probe_result(proc.stdout)
            if proc.returncode != 0 or r is None:
                rows.append({"K": K, "n": n, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]})
                continue
            r.update({"K": K, "n": n, "rows": K * n, "process_wall_s": wall,
                      "data_dependent_mib": r["rss_peak_mib"] - r["rss_imports_mib"]})
            rows.append(r)
            log(f"memory: K={K} n={n}: imports {r['rss_imports_mib']:.0f} MiB, peak {r['rss_peak_mib']:.0f} MiB")
    return {"steps": args.memory_steps, "threads": args.threads, "rows": rows,
            "how": "ru_maxrss of a fresh `python -c` per point; default Config with suite.K / suite.n overridden; "
                   "real cdmtransfer.train.train() with metrics=None (no MLflow)"}


def summary(res: dict) -> list[list]:
    mem = res.get(NAME)
    if not mem:
        return []
    rows = []
    ok = [r for r in mem["rows"] if "error" not in r]
    if ok:
        lo, hi = min(ok, key=lambda r: r["rows"]), max(ok, key=lambda r: r["rows"])
        rows.append([f"peak RSS of a {mem['steps']}-step pretrain, K·n {lo['rows']} -> {hi['rows']}",
                     f"{lo['rss_peak_mib']:.0f} -> {hi['rss_peak_mib']:.0f} MiB (imports alone "
                     f"{median([r['rss_imports_mib'] for r in ok]):.0f} MiB); VmRSS end - after imports "
                     + (f"{lo['vmrss_end_mib'] - lo['vmrss_imports_mib']:+.0f} -> "
                        f"{hi['vmrss_end_mib'] - hi['vmrss_imports_mib']:+.0f} MiB"
                        if lo.get("vmrss_end_mib") is not None and hi.get("vmrss_end_mib") is not None
                        else "n/a"), "-", "info"])
    for r in mem["rows"]:
        if "error" in r:
            rows.append([f"memory K={r['K']} n={r['n']}", f"error: {r['error']}", "-", "n/a"])
    return rows


def details(res: dict) -> list[str]:
    mem = res.get(NAME)
    if not mem:
        return []
    lines = ["", f"## 6. Peak resident memory of a {mem['steps']}-step pretrain", "",
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
    return lines


if __name__ == "__main__":
    sys.exit(main([sys.modules[__name__]], __doc__))
