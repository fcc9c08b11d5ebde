"""Bad input through the real CLI: one clear line on stderr, exit 2 (usage/config) or 3 (data), nothing left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from cdmtransfer.cli import app
from test_pipeline import TINY


def run_cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def write(path, text):
    path.write_text(text)
    return path


def npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def file_recipe(tmp_path, data, extra=""):
    return write(tmp_path / "file.yaml", f"""
name: userdata
suite: {{name: file, file: {{path: {data}, target: 0}}}}
model: {{d: 2, encoder_width: 16, encoder_depth: 1, head_width: 16, head_depth: 1, time_dim: 8}}
adapt: {{steps: 10, m: 4}}
{extra}""")


def good_arrays(n=40, rng=np.random.default_rng(0)):
    return dict(x=rng.normal(size=(n, 2)), y=rng.normal(size=(n, 3)), task=np.arange(n) % 3)


CASES = {
    # name: (build args from tmp_path, expected exit code, words the one line must contain)
    "missing recipe": (lambda p: ["pretrain", p / "nope.yaml"], 2, ["nope.yaml", "not found"]),
    "garbled yaml": (lambda p: ["pretrain", write(p / "bad.yaml", "suite: {name: gaussian\nmodel: [")], 2,
                     ["bad.yaml", "not valid YAML", "line"]),
    "unknown key": (lambda p: ["pretrain", write(p / "r.yaml", TINY + "\npretrian: {steps: 3}\n")], 2,
                    ["pretrian", "did you mean 'pretrain'"]),
    "unknown nested key": (lambda p: ["pretrain", write(p / "r.yaml", TINY), "--set", "model.dd=3"], 2,
                           ["model.dd", "did you mean 'model.d'"]),
    "wrong type": (lambda p: ["pretrain", write(p / "r.yaml", TINY), "--set", "pretrain.steps=many"], 2,
                   ["pretrain.steps", "integer"]),
    "out of range": (lambda p: ["pretrain", write(p / "r.yaml", TINY), "--set", "pretrain.lr=-1"], 2,
                     ["pretrain.lr", "> 0"]),
    "empty decay grid": (lambda p: ["pretrain", write(p / "r.yaml", TINY), "--set", "pretrain.encoder_decay_grid=[]"],
                         2, ["pretrain.encoder_decay_grid", ">= 0"]),
    "negative pinned decay": (lambda p: ["pretrain", write(p / "r.yaml", TINY), "--set", "pretrain.encoder_decay=-1"],
                              2, ["pretrain.encoder_decay", ">= 0"]),
    "bad mode": (lambda p: ["adapt", write(p / "r.yaml", TINY), "--mode", "frozn"], 2,
                 ["adapt.mode", "did you mean 'frozen'"]),
    "m of zero on the command line": (lambda p: ["adapt", write(p / "r.yaml", TINY), "--mode", "scratch", "--m", 0],
                                      2, ["adapt.m = 0", ">= 1"]),
    "negative jobs": (lambda p: ["sweep", write(p / "r.yaml", TINY), "--jobs", -1], 2, ["--jobs -1"]),
    "frozen without encoder": (lambda p: ["adapt", write(p / "r.yaml", TINY), "--mode", "frozen"], 2,
                               ["--encoder"]),
    "m larger than target pool": (lambda p: ["adapt", write(p / "r.yaml", TINY), "--mode", "scratch", "--m", 500],
                                  3, ["m = 500", "64 target rows"]),
    "encoder not found": (lambda p: ["adapt", write(p / "r.yaml", TINY), "--mode", "frozen", "--encoder",
                                     p / "no-such-dir"], 2, ["no-such-dir"]),
    "unknown run id": (lambda p: ["adapt", write(p / "r.yaml", TINY), "--mode", "frozen", "--encoder",
                                  "0123456789abcdef0123456789abcdef"], 2, ["0123456789abcdef0123456789abcdef",
                                                                          "not found"]),
    "NaN in data": (lambda p: ["adapt", file_recipe(p, npz(p / "d.npz", **{**good_arrays(),
                                                                            "x": np.full((40, 2), np.nan)})),
                               "--mode", "scratch"], 3, ["d.npz", "NaN"]),
    "data file missing": (lambda p: ["adapt", file_recipe(p, p / "gone.npz"), "--mode", "scratch"], 3,
                          ["gone.npz", "not found"]),
    "x/y rows differ": (lambda p: ["adapt", file_recipe(p, npz(p / "d.npz", **{**good_arrays(),
                                                                                "y": np.zeros((39, 3))})),
                                   "--mode", "scratch"], 3, ["same number of rows"]),
    "m larger than file target": (lambda p: ["adapt", file_recipe(p, npz(p / "d.npz", **good_arrays())),
                                             "--mode", "scratch", "--m", 50], 3, ["m = 50"]),
    "oracle on user data": (lambda p: ["adapt", file_recipe(p, npz(p / "d.npz", **good_arrays())),
                                       "--mode", "oracle"], 2, ["oracle", "no true representation"]),
    "run directory not creatable": (lambda p: ["adapt", write(p / "r.yaml", TINY), "--mode", "scratch", "--set",
                                               f"tracking.home={write(p / 'plain-file', 'x')}/runs"], 2,
                                    ["plain-file", "cannot create the run directory"]),
    "recipe is a directory": (lambda p: ["pretrain", p], 2, ["is a directory, not a recipe file"]),
    "recipe names a Python object": (lambda p: ["pretrain", write(p / "evil.yaml", "name: !!python/object/apply:os.system"
                                                                               " ['touch pwned']\n")], 2,
                                     ["evil.yaml", "not valid YAML", "python/object"]),
    "resume id escaping the work dir": (lambda p: ["pretrain", write(p / "r.yaml", TINY), "--resume", "../../etc"], 2,
                                        ["'../../etc'", "not an MLflow run id"]),
    "sweep resume of an unknown run": (lambda p: ["sweep", write(p / "r.yaml", TINY), "--resume", "../x"], 2,
                                       ["../x", "not found"]),
    "runs:/ URI escaping its artifacts": (lambda p: ["adapt", write(p / "r.yaml", TINY), "--mode", "frozen", "--encoder",
                                                     "runs:/0123456789abcdef0123456789abcdef/../../x"], 2,
                                          ["'..'", "not allowed"]),
    "runs:/ URI with a bad run id": (lambda p: ["adapt", write(p / "r.yaml", TINY), "--mode", "frozen", "--encoder",
                                                "runs:/nothex/model"], 2, ["'nothex'", "not an MLflow run id"]),
    "models:/ URI that does not resolve": (lambda p: ["adapt", write(p / "r.yaml", TINY), "--mode", "frozen",
                                                      "--encoder", "models:/m-deadbeef"], 3,
                                           ["models:/m-deadbeef", "not found"]),
    "unreachable tracking server": (lambda p: ["adapt", write(p / "r.yaml", TINY), "--mode", "scratch",
                                               "--tracking-uri", "http://127.0.0.1:9"], 2, ["127.0.0.1:9", "unreachable"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_one_line_exit_code_nothing_left(name, tmp_path, store, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    build, code, words = CASES[name]
    result = run_cli(*build(tmp_path))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
    runs = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db").search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db").search_experiments()])
    assert runs == []  # nothing created, so nothing left RUNNING
    assert not (store / "work").exists()


def test_encoder_that_does_not_fit_the_recipe(tmp_path, store):
    recipe = write(tmp_path / "r.yaml", TINY)
    pre = run_cli("pretrain", recipe, "--json", "--quiet")
    assert pre.exit_code == 0, pre.stderr
    import json

    run_id = json.loads(pre.stdout)["run_id"]
    for override, words in (("suite.gaussian.D_y=9", ["D_y = 8", "D_y = 9"]), ("model.d=3", ["d = 2", "model.d = 3"])):
        result = run_cli("adapt", recipe, "--mode", "frozen", "--encoder", run_id, "--set", override)
        assert result.exit_code == 2, result.stderr
        line = result.stderr.strip()
        assert "\n" not in line and all(w in line for w in words), line
    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    statuses = [r.info.status for r in client.search_runs([e.experiment_id for e in client.search_experiments()])]
    assert statuses == ["FINISHED"]  # only the pretrain run; the refused adapts created none


def test_help_does_not_import_torch():
    code = "import sys; from cdmtransfer.cli import app; sys.argv=['cdmtransfer','--help']\n" \
           "try:\n    app()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules, 'mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False False"


def _damaged_copy(src, dst, damage):
    import shutil

    shutil.copytree(src, dst)
    damage(dst)
    return dst


DAMAGE = {
    "truncated weights": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100]),
                          3, ["model.safetensors", "corrupt or truncated"]),
    "garbage weights": (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64), 3, ["corrupt or truncated"]),
    "older format": (lambda d: (d / "meta.json").write_text(
        (d / "meta.json").read_text().replace('"format_version": 1', '"format_version": 0')), 3,
        ["format version 0", "not supported"]),
    "garbled meta": (lambda d: (d / "meta.json").write_text("{not json"), 3, ["meta.json", "corrupt"]),
    "not a checkpoint": (lambda d: (d / "meta.json").unlink(), 3, ["not a cdmtransfer checkpoint"]),
}


def test_damaged_encoder_checkpoints_are_refused_cleanly(tmp_path, store):
    import json

    recipe = write(tmp_path / "r.yaml", TINY)
    pre = run_cli("pretrain", recipe, "--json", "--quiet")
    assert pre.exit_code == 0, pre.stderr
    model_dir = store / "work" / json.loads(pre.stdout)["run_id"] / "model"
    for name, (damage, code, words) in DAMAGE.items():
        bad = _damaged_copy(model_dir, tmp_path / name.replace(" ", "-"), damage)
        result = run_cli("adapt", recipe, "--mode", "frozen", "--encoder", bad)
        line = result.stderr.strip()
        assert result.exit_code == code, (name, line)
        assert "\n" not in line and all(w in line for w in words), (name, line)
    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FINISHED"]  # the pretrain; no adapt run was created


def test_version_and_help_exit_zero():
    import cdmtransfer

    version = run_cli("--version")
    assert version.exit_code == 0 and version.stdout.strip() == f"cdmtransfer {cdmtransfer.__version__}"
    helped = run_cli("adapt", "--help")
    assert helped.exit_code == 0 and "--encoder" in helped.stdout and "--mode" in helped.stdout
