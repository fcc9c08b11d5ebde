"""The companion-paper regularisers against the same recipe with the term off, paired by pretrain seed: the README's
"Companion-paper regularisers" table. For every recipe and pretrain seed S it runs

    cdmtransfer sweep recipes/regularize-<term>.yaml --seed S --jobs 1 --json [--set ...]

(pretrain seed S, then frozen and scratch at m = 16 with adapt seeds S..S+2, every run stopped by validation),
and the baseline `regularize-off.yaml` on the same seeds (mix-and-match, whose suite differs, against itself with
`regularize.mixmatch.weight=0`). Every sweep pins `pretrain.encoder_decay` (a regularised pretrain cannot compare
decays; the baseline would otherwise choose one: like for like). Prints, per term and mode, the paired difference
(term − off) of each metric, mean ± sd over the pretrain seeds of the adapt-seed means. Two sweeps at a time, one
thread each:

    .venv/bin/python benchmarks/regularizer_effects.py --seeds 3 --home /tmp/reg [--set model.linear_mean=true ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TERMS = ("consistency", "mmd", "info", "hsic", "mixmatch")
METRICS = ("score_error", "posterior_mean_mse", "sliced_w2", "consistency_gap_t0.5", "mmd_to_prior",
           "style_leakage", "subspace_error", "probe_r2")
MODES = ("frozen", "scratch")


def sweeps(terms, seeds: int, extra: list[str]) -> list[tuple[str, str, int, list[str]]]:
    """(label, recipe, seed, overrides) of every sweep to run: each term, its baseline, each seed."""
    out = []
    for s in range(seeds):
        if any(t != "mixmatch" for t in terms):
            out.append(("off", "regularize-off", s, extra))
        for t in terms:
            out.append((t, f"regularize-{t}", s, extra))
        if "mixmatch" in terms:
            out.append(("mixmatch-off", "regularize-mixmatch", s, extra + ["regularize.mixmatch.weight=0"]))
    return out


def run_sweep(job, home: Path, decay: str) -> dict:
    label, recipe, seed, overrides = job
    sets = [a for o in [f"pretrain.encoder_decay={decay}", *overrides] for a in ("--set", o)]
    cmd = [sys.executable, "-m", "cdmtransfer", "sweep", str(ROOT / "recipes" / f"{recipe}.yaml"), "--seed",
           str(seed), "--jobs", "1", "--json", "--quiet", *sets]
    env = {**os.environ, "CDMTRANSFER_HOME": str(home), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{label} seed {seed} failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    wall = time.perf_counter() - t0
    print(f"[reg] {label} seed {seed}: {wall:.0f} s", file=sys.stderr, flush=True)
    return {"label": label, "seed": seed, "wall": wall, "rows": json.loads(done.stdout)["rows"]}


def means(result: dict, mode: str) -> dict[str, float]:
    """The adapt seeds' mean of each metric, for one sweep and mode."""
    rows = [r["metrics"] for r in result["rows"] if r["mode"] == mode]
    return {k: statistics.fmean(r[k] for r in rows) for k in METRICS if rows and all(k in r for r in rows)}


def cell(values: list[float]) -> str:
    if not values:
        return "–"
    sd = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):+.3f}{sd}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="pretrain seeds (each sweep: adapt seeds S..S+2)")
    ap.add_argument("--terms", default=",".join(TERMS))
    ap.add_argument("--home", type=Path, required=True, help="CDMTRANSFER_HOME for every sweep (a new store)")
    ap.add_argument("--decay", default="0", help="pretrain.encoder_decay pinned on every sweep (default 0)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="an override for every sweep")
    ap.add_argument("--parallel", type=int, default=2)
    args = ap.parse_args()
    terms = [t for t in args.terms.split(",") if t]
    jobs = sweeps(terms, args.seeds, args.sets)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda j: run_sweep(j, args.home, args.decay), jobs))
    got = {(r["label"], r["seed"]): r for r in results}
    (args.home / "regularizer_effects.json").write_text(json.dumps(results, indent=1))
    print(f"{len(jobs)} sweeps, {time.perf_counter() - t0:.0f} s wall; overrides: encoder_decay={args.decay} "
          f"{' '.join(args.sets)}\n")
    shown = METRICS
    print("| term | mode | " + " | ".join(shown) + " |")
    print("|---|---|" + "---|" * len(shown))
    for label in ("off", "mixmatch-off"):
        if (label, 0) in got:
            for mode in MODES:
                base = [means(got[(label, s)], mode) for s in range(args.seeds)]
                print(f"| {label} (level) | {mode} | " + " | ".join(
                    f"{statistics.fmean(b[k] for b in base):.3f}" if all(k in b for b in base) else "–"
                    for k in shown) + " |")
    for t in terms:
        base_label = "mixmatch-off" if t == "mixmatch" else "off"
        for mode in MODES:
            diffs = {k: [] for k in shown}
            for s in range(args.seeds):
                on, off = means(got[(t, s)], mode), means(got[(base_label, s)], mode)
                for k in shown:
                    if k in on and k in off:
                        diffs[k].append(on[k] - off[k])
            print(f"| {t} − {base_label} | {mode} | " + " | ".join(cell(diffs[k]) for k in shown) + " |")


if __name__ == "__main__":
    main()
