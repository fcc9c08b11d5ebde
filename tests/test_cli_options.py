"""One command line (issue #14): every command takes the shared options and they do what they say; the footer's
`mlflow ui` line works as printed outside the virtualenv."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from cdmtransfer.cli import app

SHARED = {"--quiet", "-q", "--seed", "--json", "--verbose", "-v", "--tracking-uri", "--set"}


def test_every_command_takes_the_shared_options():
    group = typer.main.get_command(app)
    assert set(group.commands) == {"pretrain", "adapt", "sweep", "estimate", "evaluate", "sample"}
    for name, command in group.commands.items():
        options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        assert SHARED <= options, (name, SHARED - options)


def test_no_command_help_imports_torch_or_mlflow():
    code = ("import sys; from typer.testing import CliRunner; from cdmtransfer.cli import app\n"
            "for c in ('pretrain', 'adapt', 'sweep', 'estimate', 'evaluate', 'sample'):\n"
            "    assert CliRunner().invoke(app, [c, '--help']).exit_code == 0\n"
            "print('torch' in sys.modules, 'mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False False"


TINY = """name: tiny
suite: {name: gaussian, K: 2, n: 32, n_target_pool: 32, n_test: 32, gaussian: {d_x: 2, D_y: 3, d: 2}}
model: {d: 2, encoder_width: 8, encoder_depth: 1, head_width: 8, head_depth: 1, time_dim: 4}
adapt: {steps: 4, m: 4, val_folds: 1, batch_size: 8}
evaluate: {t_draws: 2, posterior_samples: 4, posterior_conditions: 8, sampler_steps: 4, dist_conditions: 2,
           dist_samples: 4}
"""


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    return result


def progress_lines(result, label):
    return [line for line in result.stderr.splitlines() if line.startswith(f"[{label}]")]


def test_quiet_and_seed_work_on_evaluate_and_sample(tmp_path, store):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    run_id = json.loads(cli("adapt", recipe, "--mode", "scratch", "--json").stdout)["run_id"]

    loud, quiet = cli("evaluate", run_id, "--seed", "5"), cli("evaluate", run_id, "--seed", "5", "--quiet")
    assert len(progress_lines(loud, "evaluate")) == 2 and "seed 5" in progress_lines(loud, "evaluate")[0]
    assert progress_lines(quiet, "evaluate") == [] and quiet.stdout == loud.stdout  # only the progress goes
    table = {line.split("│")[1].strip(): line.split("│")[2].strip()
             for line in quiet.stdout.splitlines() if line.count("│") >= 3}
    other = json.loads(cli("evaluate", run_id, "-q", "--seed", "6", "--json").stdout)["metrics"]
    assert table["test_dsm"] != f"{other['test_dsm']:.4g}"  # --seed is the evaluation noise

    loud = cli("sample", run_id, "--n", "3", "--test", "--out", tmp_path / "a.npz", "--seed", "1")
    assert len(progress_lines(loud, "sample")) == 2
    quiet = cli("sample", run_id, "--n", "3", "--test", "--out", tmp_path / "b.npz", "--seed", "1", "-q")
    assert progress_lines(quiet, "sample") == []
    assert np.array_equal(np.load(tmp_path / "a.npz")["samples"], np.load(tmp_path / "b.npz")["samples"])


def test_estimate_takes_quiet_and_seed(tmp_path, store):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    results = [cli("estimate", recipe, "--epsilon", "0.5", "--holdout", 0, "--json", *flags)  # theory only
               for flags in ([], ["-q", "--seed", "3"])]
    assert json.loads(results[0].stdout)["theory"] == json.loads(results[1].stdout)["theory"]  # theory: no noise
    bad = CliRunner().invoke(app, ["estimate", str(recipe), "--epsilon", "0.5", "--holdout", "0", "--seed", "-1"])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: ") and "seed = -1" in bad.stderr


def test_calibration_bootstrap_follows_the_seed():
    from cdmtransfer.config import load_config
    from cdmtransfer.estimate import build_problem, calibrate

    problem, _ = build_problem(load_config(None), 0.5, 0.1, {})
    rng = np.random.default_rng(0)
    m = [8, 16, 32, 64]
    curves = {"scratch": (m, 0.2 + 4 / np.array(m) * (1 + 0.3 * rng.normal(size=(3, 4))))}
    a, b, c = (calibrate(curves, 0.5, problem, "score", seed=s)["scratch"]["m_interval"] for s in (1, 1, 2))
    assert a == b and a != c


# ---------------------------------------------------------------------------------------------------------------
# The footer's `mlflow ui` line


def test_ui_command_names_the_venv_mlflow_by_absolute_path(tmp_path):
    from cdmtransfer.tracking import ui_command

    uri = f"sqlite:///{tmp_path / 'my runs' / 'mlflow.db'}"
    parts = shlex.split(ui_command(uri, cwd=tmp_path))
    assert parts[-3:] == ["ui", "--backend-store-uri", uri]  # the space in the path survives the shell
    exe = parts[:-3]
    script = Path(sys.executable).parent / "mlflow"
    assert exe == ([str(script)] if script.is_file() else [sys.executable, "-m", "mlflow"])
    assert Path(exe[0]).is_absolute() and os.access(exe[0], os.X_OK)
    if len(exe) == 1:  # a console script runs without the venv activated: its #! names the venv's python
        interpreter = Path(script.read_text().splitlines()[0][2:].split()[0])
        assert interpreter.is_absolute() and os.access(interpreter, os.X_OK)


def test_ui_command_without_a_mlflow_script_uses_this_python(tmp_path, monkeypatch):
    from cdmtransfer.tracking import ui_command

    fake = tmp_path / "bin" / "python3"
    monkeypatch.setattr(sys, "executable", str(fake))
    assert ui_command("sqlite:////x/mlflow.db", cwd=tmp_path) == f"{fake} -m mlflow ui --backend-store-uri " \
                                                                "sqlite:////x/mlflow.db"


def test_footer_offers_make_ui_in_the_repository(tmp_path):
    from rich.console import Console

    from cdmtransfer.report import store_footer

    (tmp_path / "Makefile").write_text("all:\n\ttrue\nui: setup\n\tmlflow ui\n")
    uri = f"sqlite:///{(tmp_path / 'cdmtransfer-runs' / 'mlflow.db').as_posix()}"
    out = Console(record=True, width=300)
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        store_footer(out, uri)
    finally:
        os.chdir(cwd)
    text = out.export_text()
    assert f"MLflow store: {uri}" in text and "ui --backend-store-uri" in text and "# or, here: make ui" in text
    out = Console(record=True, width=300)
    store_footer(out, "sqlite:////elsewhere/mlflow.db")  # not this directory's store: no make ui
    assert "make ui" not in out.export_text()


@pytest.mark.parametrize("uri", ["http://host:5000", "file:///x"])
def test_footer_for_other_stores_names_only_the_store(uri):
    from rich.console import Console

    from cdmtransfer.report import store_footer

    out = Console(record=True, width=300)
    store_footer(out, uri)
    assert out.export_text().strip() == f"MLflow store: {uri}"


def test_the_sweep_table_bolds_the_best_mode_a_user_can_choose_not_the_oracle():
    """oracle (h*) is a reference: the best of the other modes at each m is bold; a sweep of oracle alone bolds it."""
    from rich.console import Console

    from cdmtransfer.report import sweep_table

    def row(mode, m, value):
        return {"mode": mode, "m": m, "seeds": 1, "score_error": {"mean": value, "std": 0.0}}

    def bold_rows(summary):
        console = Console(record=True, width=200, force_terminal=True, color_system="standard")
        console.print(sweep_table(summary, "t"))
        lines = console.export_text(styles=True).splitlines()
        return {line.split()[1] for line in lines if "\x1b[1m" in line and line.split()[1] in ("frozen", "scratch",
                                                                                              "oracle")}

    summary = [row("frozen", 8, 0.5), row("scratch", 8, 0.9), row("oracle", 8, 0.4), row("oracle", 32, 0.1)]
    assert bold_rows(summary) == {"frozen"}
    assert bold_rows([row("oracle", 8, 0.4)]) == {"oracle"}


def test_the_limits_table_shows_each_m_once_from_the_first_mode_that_logged_them():
    """Limits do not depend on the mode: one row per m, values from the first mode in the table's order (frozen
    before scratch, whatever the summary's order), '–' where no mode logged one, nothing for a suite without any."""
    from rich.console import Console

    from cdmtransfer.report import references_table

    def row(mode, m, seeds, **refs):
        return {"mode": mode, "m": m, "seeds": seeds, "score_error": {"mean": 1.0, "std": 0.1},
                **{k: {"mean": mean, "std": std} for k, (mean, std) in refs.items()}}

    floor, ls = "posterior_mean_mse_floor", "ref/oracle_ls_mse"
    summary = [row("scratch", 8, 2, **{floor: (0.9, 0.0), ls: (0.8, 0.05)}),
               row("frozen", 8, 2, **{floor: (0.1674, 2.4e-17), ls: (0.3351, 0.027)}),
               row("frozen", 32, 1, **{floor: (0.1674, 0.0)})]
    console = Console(record=True, width=200)
    console.print(references_table(summary))
    lines = {line.split()[1]: line for line in console.export_text().splitlines() if line[:1] == "│"}
    assert set(lines) == {"8", "32"}
    assert "0.1674" in lines["8"] and "0.3351 ± 0.027" in lines["8"] and "0.9" not in lines["8"]
    assert "0.1674 ±" not in lines["8"]  # no spread shown where the seeds agree (to a float's rounding)
    assert "–" in lines["32"] and "±" not in lines["32"]
    assert references_table([row("frozen", 8, 1)]) is None
