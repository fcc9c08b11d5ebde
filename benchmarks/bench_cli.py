"""Benchmark 4 (`cli`): `python -m cdmtransfer --help` latency, and that it does not import torch. Run from the
repository root:

    .venv/bin/python benchmarks/bench_cli.py [--quick]

Times --help in subprocesses, checks sys.modules of one run for heavy modules and lists the slowest top-level
imports (-X importtime). Prints a markdown table on stdout; progress goes to stderr. See benchmarks/README.md.
"""

from __future__ import annotations

import subprocess
import sys
import time

from _common import ROOT, log, main, median, probe_result, status, subprocess_env, table

NAME = "cli"
HEAVY_MODULES = ("torch", "mlflow", "numpy", "sqlalchemy", "pandas", "safetensors", "yaml", "rich", "typer")
OPTIONS = []

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


def defaults(args) -> None:
    args.cli_runs = 5


def _time_cmd(cmd: list[str], n: int, env: dict) -> tuple[list[float], subprocess.CompletedProcess]:
    times, proc = [], None
    for _ in range(n):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
    return times, proc


def run(args) -> dict:
    log("cli: timing --help")
    if not (ROOT / "cdmtransfer" / "cli.py").is_file():
        return {"skipped": "no CLI yet"}
    py = sys.executable
    env = subprocess_env(COLUMNS="100")
    help_cmd = [py, "-m", "cdmtransfer", "--help"]
    _time_cmd(help_cmd, 1, env)  # warm the file cache
    times, proc = _time_cmd(help_cmd, args.cli_runs, env)
    if proc.returncode != 0:
        return {"skipped": f"`python -m cdmtransfer --help` exited {proc.returncode}: "
                           f"{(proc.stderr.strip().splitlines() or [''])[-1][:200]}"}
    probe = subprocess.run([py, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True)
    found = probe_result(probe.stdout)
    modules = found["modules"] if found else None
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


def summary(res: dict) -> list[list]:
    cli = res.get(NAME)
    if cli is None:
        return []
    if "skipped" in cli:
        return [["`cdmtransfer --help`", f"skipped: {cli['skipped']}", "no torch import", "n/a"]]
    ok = None if cli["torch_imported"] is None else not cli["torch_imported"]
    return [["`cdmtransfer --help` latency (median of "
             f"{len(cli['help_ms_runs'])})",
             f"{cli['help_ms']:.0f} ms, torch imported: {cli['torch_imported']}",
             "no torch import", status(ok)]]


def details(res: dict) -> list[str]:
    cli = res.get(NAME)
    if cli is None:
        return []
    lines = ["", "## 4. `python -m cdmtransfer --help`", ""]
    if "skipped" in cli:
        lines.append(f"skipped: {cli['skipped']}")
        return lines
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
    return lines


if __name__ == "__main__":
    sys.exit(main([sys.modules[__name__]], __doc__))
