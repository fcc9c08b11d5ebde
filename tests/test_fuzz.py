"""Fuzzed inputs (issue #14): random and mutated recipes, `--set` items, .npz/.csv data, IDX and condition files,
checkpoint directories, and the command line itself.

The property everywhere: whatever the input, the only exceptions that escape are the project's own (CdmError, which
the CLI prints as one line with exit 2 or 3), no library warning reaches the terminal, and no MLflow run is left
RUNNING. Hypothesis shrinks any other
exception to a minimal input. `make test` runs a few hundred examples; `make fuzz` thousands (conftest.py profiles).
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
from pathlib import Path

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from cdmtransfer.config import Config, flatten, load_config
from cdmtransfer.errors import CdmError

# A warning would reach the user's terminal as extra lines beside the one-line refusal: treat it as a failure too.
pytestmark = [pytest.mark.fuzz, pytest.mark.filterwarnings("error::RuntimeWarning"),
              pytest.mark.filterwarnings("error::UserWarning")]
REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
KEYS = sorted(flatten(Config().to_dict()))  # every dotted recipe key


@pytest.fixture(autouse=True)
def _subnormals():
    """Training (stages.setup_torch) flushes subnormal floats process-wide; hypothesis refuses to draw floats then."""
    import torch

    torch.set_flush_denormal(False)


def only_own_errors(fn, *args, **kwargs):
    """Call fn; a CdmError (the project's one-line refusal) is fine, anything else fails the example."""
    try:
        return fn(*args, **kwargs)
    except CdmError as exc:
        assert "\n" not in str(exc), str(exc)
        return None


def scaled(n: int) -> int:
    """n examples in `make test`, 10× under `make fuzz`."""
    return n * 10 if settings().max_examples > 100 else n


# ---------------------------------------------------------------------------------------------------------------
# Mutations of valid bytes and text


@st.composite
def mutated(draw, data: bytes, alphabet: bytes = bytes(range(256))) -> bytes:
    """`data` with 1–8 edits (flip, insert, delete, truncate, repeat), biased to the first 300 bytes (headers)."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, min(len(out), 300)) | st.integers(0, len(out)))
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "repeat"]))
        byte = draw(st.sampled_from(list(alphabet)))
        if op == "flip" and pos < len(out):
            out[pos] = byte
        elif op == "insert":
            out[pos:pos] = bytes([byte]) * draw(st.integers(1, 4))
        elif op == "delete":
            del out[pos: pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del out[pos:]
        elif op == "repeat":
            out[pos:pos] = out[pos: pos + draw(st.integers(1, 32))]
    return bytes(out)


YAML_CHARS = b":-[]{}\n #&*!'\"|>%@`?,.=0123456789eE+_abcdlnstuxy\t\x00"
YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=10**300, max_value=10**400)
    | st.floats() | st.text(max_size=12) | st.dates(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)


@st.composite
def recipe_data(draw) -> dict:
    """A nested mapping of real (sometimes misspelt) recipe keys with values of any YAML type."""
    data: dict = {}
    for key in draw(st.lists(st.sampled_from(KEYS) | st.text(min_size=1, max_size=10), max_size=6)):
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else node
        node[parts[-1]] = draw(YAML_VALUES)
    return data


# ---------------------------------------------------------------------------------------------------------------
# Recipes and --set


@given(text=st.text(max_size=300) | st.builds(bytes.decode, st.binary(max_size=300), st.just("latin-1")))
def test_recipe_text(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text, errors="surrogateescape")
    only_own_errors(load_config, path)


@given(data=st.data())
def test_mutated_recipe_files(tmp_path, data):
    source = data.draw(st.sampled_from(RECIPES))
    path = tmp_path / "r.yaml"
    path.write_bytes(data.draw(mutated(source.read_bytes(), YAML_CHARS)))
    only_own_errors(load_config, path)


@given(recipe=recipe_data())
def test_recipe_structures(tmp_path, recipe):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    only_own_errors(load_config, path)


SET_ITEMS = (st.text(max_size=30)
             | st.builds("{}={}".format, st.sampled_from(KEYS), st.text(alphabet=YAML_CHARS.decode(), max_size=20))
             | st.builds("{}={}".format, st.sampled_from(KEYS),
                         YAML_VALUES.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip())))


@given(items=st.lists(SET_ITEMS, max_size=4))
def test_set_overrides(items):
    only_own_errors(load_config, None, items)


# ---------------------------------------------------------------------------------------------------------------
# User data: .npz and .csv through the whole loader (build_taskset, with its data checks)


def build_file_suite(path: Path, sets: list[str]):
    from cdmtransfer.tasks import build_taskset

    cfg = load_config(None, ["suite.name=file", f"suite.file.path={path}", *sets])
    taskset = only_own_errors(build_taskset, cfg)
    if taskset is not None:  # what loads is usable: finite float32 tensors, a non-empty pool and test split
        for name in ("source_x", "source_y", "target_x", "target_y", "test_x", "test_y", "x_std", "y_std"):
            value = getattr(taskset, name)
            assert value is None or bool(value.isfinite().all()), name
        assert taskset.target_x.shape[0] >= 1 and taskset.test_x.shape[0] >= 1


FILE_SETS = st.lists(st.sampled_from(["suite.file.target=1", "suite.file.target=9", "suite.file.sources=[0, 2]",
                                      "suite.file.sources=[2, 2]", "suite.file.test_fraction=0.9",
                                      "suite.file.test_fraction=1.0", "suite.file.standardize=false",
                                      "pretrain.val_fraction=0.5"]), max_size=3, unique=True)
NUMBERS = st.floats(width=64) | st.sampled_from([0.0, 1e30, -1e30, 3.4e38, 1e300, 5e-324])
DTYPES = ["f8", "f4", "f2", "i1", "i8", "u1", "u8", "?", "c8", "m8[s]", "M8[D]", "U3", "S2"]


@st.composite
def table(draw):
    """x [N, d_x], y [N, D_y], task [N]: mostly well-formed, with odd values, dtypes and shapes mixed in."""
    n = draw(st.integers(0, 30))
    x = draw(hnp.arrays(np.float64, (n, draw(st.integers(0, 3))), elements=NUMBERS | st.floats(-3, 3)))
    y = draw(hnp.arrays(np.float64, (n, draw(st.integers(0, 3))), elements=NUMBERS | st.floats(-3, 3)))
    task = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, 3)))
    arrays = {"x": x, "y": y, "task": task}
    for _ in range(draw(st.integers(0, 2))):  # an odd dtype or shape, or a missing or extra array
        name = draw(st.sampled_from(["x", "y", "task", "extra"]))
        change = draw(st.sampled_from(["array", "dtype", "drop"]))
        if change == "array":
            arrays[name] = draw(hnp.arrays(st.sampled_from([np.dtype(d) for d in DTYPES]),
                                           hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)))
        elif change == "dtype":
            arrays[name] = _astype(arrays.get(name, x), draw(st.sampled_from(DTYPES)))
        else:
            arrays.pop(name, None)
    return arrays


def _astype(array: np.ndarray, dtype: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        try:
            return array.astype(dtype)
        except (TypeError, ValueError, OverflowError):  # not every cast exists
            return array


@given(arrays=table(), sets=FILE_SETS)
def test_npz_files(tmp_path, arrays, sets):
    path = tmp_path / "d.npz"
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    build_file_suite(path, sets)


def _valid_npz(compressed: bool) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, x=rng.normal(size=(24, 2)), y=rng.normal(size=(24, 2)),
                                                      task=np.arange(24) % 3)
    return buf.getvalue()


VALID_NPZ = [_valid_npz(False), _valid_npz(True)]


@given(data=st.data())
def test_mutated_npz_bytes(tmp_path, data):
    path = tmp_path / "d.npz"
    path.write_bytes(data.draw(mutated(data.draw(st.sampled_from(VALID_NPZ)))))
    build_file_suite(path, [])


CELLS = st.sampled_from(["0", "1", "2", "-2.5", "1e30", "1e400", "nan", "inf", "", " ", "abc", "0x1F", "1_0", '"1"',
                         "3.4e38", "\x00"]) | st.floats().map(repr) | st.text(max_size=6)


@given(header=st.lists(st.sampled_from(["a", "b", "p", "q", "task", " a ", "A", ""]), max_size=7),
       rows=st.lists(st.lists(CELLS, max_size=7), max_size=12), raw=st.none() | st.text(max_size=200),
       sets=FILE_SETS)
def test_csv_files(tmp_path, header, rows, raw, sets):
    path = tmp_path / "d.csv"
    text = raw if raw is not None else "\n".join(",".join(r) for r in [header, *rows])
    path.write_text(text, errors="surrogateescape")
    build_file_suite(path, ["suite.file.x_columns=[a, b]", "suite.file.y_columns=[p, q]", *sets])


# ---------------------------------------------------------------------------------------------------------------
# MNIST IDX files and sampling conditions


def _idx(array: np.ndarray, magic: int) -> bytes:
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()


VALID_IDX = (_idx(np.zeros((4, 4, 4), np.uint8), 0x803), _idx(np.arange(4, dtype=np.uint8), 0x801))


@given(data=st.data(), dotted=st.booleans(), gz=st.booleans())
def test_mnist_idx_files(tmp_path, data, dotted, gz):
    from cdmtransfer.tasks.digits import read_mnist

    folder = tmp_path / "mnist"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for name, valid in zip(("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), VALID_IDX):
        content = data.draw(mutated(valid) | st.just(valid) | st.binary(max_size=40))
        if dotted:
            name = name.replace("-idx", ".idx")
        if gz:
            content = data.draw(st.just(gzip.compress(content)) | mutated(gzip.compress(content)))
            name += ".gz"
        (folder / name).write_bytes(content)
    only_own_errors(read_mnist, folder)


@given(suffix=st.sampled_from([".npy", ".npz", ".csv"]), content=st.binary(max_size=200) | st.none(),
       array=hnp.arrays(st.sampled_from([np.dtype(d) for d in DTYPES]),
                        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))
def test_condition_files(tmp_path, suffix, content, array):
    from cdmtransfer.runs import read_conditions

    path = tmp_path / f"y{suffix}"
    if content is not None:
        path.write_bytes(content)
    elif suffix == ".npy":
        np.save(path, array)
    elif suffix == ".npz":
        np.savez(path, y=array)
    else:
        np.savetxt(path, np.atleast_2d(array.astype(str)) if array.ndim <= 2 else array.reshape(-1, 1).astype(str),
                   fmt="%s", delimiter=",")
    only_own_errors(read_conditions, path)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint directories: an exported model and a training checkpoint, with damaged files and metadata


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny real export (model/) and checkpoint (step_000001/), as adapt writes them."""
    import torch

    from cdmtransfer.checkpoint import export_model, save_checkpoint
    from cdmtransfer.models import build_model, model_spec

    spec = {"encoder": {"kind": "mlp", "D_y": 3, "d": 2, "width": 4, "depth": 1}, "K": 1, "d_x": 2,
            "head_width": 4, "head_depth": 1, "time_dim": 4, "parametrization": "edm", "sigma_data": 1.0}
    model = build_model(spec)
    meta = {"stage": "adapt", "mode": "scratch", "model": model_spec(model), "config": Config().to_dict(),
            "run_id": ""}
    root = tmp_path_factory.mktemp("exported")
    export_model(root / "model", model.state_dict(), meta)
    state = {"step": 1, "rng": torch.get_rng_state(), "optimizer": {"state": {}, "param_groups": []}}
    save_checkpoint(root / "checkpoints", 1, model.state_dict(), model.state_dict(), state, meta)
    return root


SMALL_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2, 40) | st.floats() | st.text(max_size=8),
                          lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def _paths(node, prefix=()):
    """Every key path through the nested dicts of `node`."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))


@st.composite
def damaged_meta(draw, meta: dict) -> bytes:
    """meta.json with keys deleted or values replaced (sizes kept small), or as damaged bytes, or any JSON."""
    kind = draw(st.sampled_from(["edit", "edit", "bytes", "json"]))
    if kind == "bytes":
        return draw(mutated(json.dumps(meta).encode()))
    if kind == "json":
        return json.dumps(draw(SMALL_JSON)).encode()
    meta = json.loads(json.dumps(meta))
    paths = list(_paths(meta))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        node = meta
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or path[-1] not in node:
            continue
        if draw(st.booleans()):
            del node[path[-1]]
        else:
            node[path[-1]] = draw(SMALL_JSON)
    return json.dumps(meta).encode()


@given(data=st.data())
def test_damaged_model_directories(tmp_path, exported, data):
    from cdmtransfer.checkpoint import load_checkpoint, load_export
    from cdmtransfer.runs import load_model_dir
    from cdmtransfer.stages import encoder_from_export

    which = data.draw(st.sampled_from(["model", "checkpoints/step_000001"]))
    folder = tmp_path / "dir"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(exported / which, folder)
    files = sorted(p.name for p in folder.iterdir())
    for name in data.draw(st.lists(st.sampled_from(files), min_size=1, max_size=2, unique=True)):
        path = folder / name
        how = data.draw(st.sampled_from(["damage", "remove", "directory"]) if name != "meta.json"
                        else st.sampled_from(["meta", "meta", "remove", "directory"]))
        if how == "remove":
            path.unlink()
        elif how == "directory":
            path.unlink()
            path.mkdir()
        elif how == "meta":
            path.write_bytes(data.draw(damaged_meta(json.loads(path.read_text()))))
        else:
            path.write_bytes(data.draw(mutated(path.read_bytes())))
    only_own_errors(load_model_dir, folder, "fuzz")
    loaded = only_own_errors(load_export, folder)
    if loaded is not None:
        only_own_errors(encoder_from_export, *loaded, "fuzz", 3, 2)
    if which != "model":
        only_own_errors(load_checkpoint, folder)


@given(meta=st.data())
def test_resume_against_damaged_checkpoint(tmp_path, exported, meta):
    from cdmtransfer.stages import check_resume

    run_dir = tmp_path / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(exported / "checkpoints", run_dir / "checkpoints")
    meta_file = run_dir / "checkpoints" / "step_000001" / "meta.json"
    meta_file.write_bytes(meta.draw(damaged_meta(json.loads(meta_file.read_text()))))
    only_own_errors(check_resume, run_dir, Config(), "adapt")


# ---------------------------------------------------------------------------------------------------------------
# The command line: parse → validate → refuse in one line (exit 2/3) or run; never a traceback, never RUNNING

TINY = """name: fuzz
suite: {name: gaussian, K: 2, n: 16, n_target_pool: 16, n_test: 16, gaussian: {d_x: 2, D_y: 3, d: 2}}
model: {d: 2, encoder_width: 4, encoder_depth: 1, head_width: 4, head_depth: 1, time_dim: 4}
"""
TOKENS = st.sampled_from(["--seed", "--m", "--mode", "--modes", "--seeds", "--jobs", "--set", "--resume", "--encoder",
                          "-q", "--json", "-v", "--tracking-uri", "--delta", "--nu", "--constant", "--metric",
                          "--log-factor", "--paper-logs", "--calibrate", "frozen", "scratch", "tv", "0", "1", "-1",
                          "nan", "inf", "1e400", "0.5", "2", "abc", "adapt.m=0", "seed=-3", "model.d=[1]",
                          "0123456789abcdef0123456789abcdef", "../x", "runs:/x", "=",
                          "suite.name=file"]) | st.text(max_size=8)


@given(command=st.sampled_from(["pretrain", "adapt", "sweep", "estimate"]), tokens=st.lists(TOKENS, max_size=6),
       epsilon=st.sampled_from(["0.5", "0", "-1", "nan", "inf", "1e-300", "x"]))
@settings(max_examples=scaled(25))
def test_command_line(tmp_path, store, command, tokens, epsilon):
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from cdmtransfer.cli import app

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    extra = ["--epsilon", epsilon, "--holdout", "0"] if command == "estimate" else ["--dry-run"]  # nothing trains
    result = CliRunner().invoke(app, [command, str(recipe), *tokens, *extra])
    assert result.exit_code in (0, 2, 3), (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    if result.exit_code and "Usage:" not in result.stderr:  # typer's own usage box aside: one line
        if "-v" in tokens or "--verbose" in tokens:  # the traceback, asked for, then the line
            assert lines[-1].startswith("error: "), result.stderr
        else:
            assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    else:
        assert "Traceback" not in result.stderr + result.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert all(r.info.status != "RUNNING" for r in runs)
