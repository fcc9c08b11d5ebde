"""Benchmark 7 (`quickstart`): wall time of `cdmtransfer sweep recipes/quickstart.yaml --quiet` on a cold store.
Run from the repository root:

    .venv/bin/python benchmarks/bench_quickstart.py

One subprocess with CDMTRANSFER_HOME set to a new temporary directory (a new MLflow store); interpreter start,
imports and store creation are included. Prints a markdown table on stdout; progress goes to stderr.
See benchmarks/README.md.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time

from _common import ROOT, log, main, subprocess_env

NAME = "quickstart"
OPTIONS = []


def defaults(args) -> None:
    pass


def run(args) -> dict:
    recipe = ROOT / "recipes" / "quickstart.yaml"
    if not recipe.is_file():
        return {"skipped": "no recipes/quickstart.yaml"}
    cmd = [sys.executable, "-m", "cdmtransfer", "sweep", "recipes/quickstart.yaml", "--quiet"]
    with tempfile.TemporaryDirectory(prefix="cdm-bench-qs-") as home:
        env = subprocess_env(CDMTRANSFER_HOME=home, COLUMNS="120")
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


def summary(res: dict) -> list[list]:
    qs = res.get(NAME)
    if not qs:
        return []
    if "skipped" in qs:
        return [["quickstart sweep (cold store)", f"skipped: {qs['skipped']}", "-", "n/a"]]
    return [["quickstart sweep wall time (cold store, 1 run)", f"{qs['wall_s']:.1f} s (exit {qs['returncode']})",
             "-", "info" if qs["returncode"] == 0 else "FAIL"]]


def details(res: dict) -> list[str]:
    qs = res.get(NAME)
    if not qs or "skipped" in qs:
        return []
    return ["", "## 7. Quickstart sweep on a cold store", "",
            f"`{qs['command']}`: **{qs['wall_s']:.1f} s**, exit {qs['returncode']} (one run; includes "
            "interpreter start, imports and the new MLflow store)."]


if __name__ == "__main__":
    sys.exit(main([sys.modules[__name__]], __doc__))
