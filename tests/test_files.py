"""The user-data loader (cdmtransfer/tasks/files.py): valid .npz/.csv files, and a table of bad inputs."""

import csv
import os

import numpy as np
import pytest
import torch

from cdmtransfer.config import load_config
from cdmtransfer.errors import DataError
from cdmtransfer.tasks import build_taskset, files

COUNTS = {0: 30, 1: 20, 2: 25, 3: 15}  # task 0 is the default target
X_COLS, Y_COLS = ["a", "b", "c"], ["p", "q", "r", "s"]


def make_data(seed=0, counts=COUNTS):
    """x [N, 3], y [N, 4], task [N] with rows of all tasks interleaved, and columns far from mean 0 / std 1."""
    rng = np.random.default_rng(seed)
    task = np.concatenate([np.full(n, k) for k, n in counts.items()])
    rng.shuffle(task)
    N = len(task)
    x = rng.normal(loc=[5.0, -3.0, 10.0], scale=[2.0, 0.5, 3.0], size=(N, 3)) + task[:, None]
    y = rng.normal(loc=[1.0, 2.0, -4.0, 0.0], scale=[1.0, 3.0, 0.2, 5.0], size=(N, 4))
    return x, y, task


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def write_csv(path, x, y, task, header=None, cells=None):
    """Write a .csv; `cells` maps (row, column name) -> replacement text."""
    header = header or X_COLS + Y_COLS + ["task"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for i in range(len(task)):
            row = {**{c: repr(float(v)) for c, v in zip(X_COLS, x[i])}, **{c: repr(float(v)) for c, v in zip(Y_COLS, y[i])},
                   "task": str(int(task[i]))}
            for (r, c), v in (cells or {}).items():
                if r == i:
                    row[c] = v
            w.writerow([row.get(h, "0") for h in header])
    return path


def cfg_for(path, *extra):
    return load_config(None, ["suite.name=file", f"suite.file.path={path}", *extra])


CSV_OPTS = [f"suite.file.x_columns=[{','.join(X_COLS)}]", f"suite.file.y_columns=[{','.join(Y_COLS)}]",
            "suite.file.task_column=task"]


# --------------------------------------------------------------------------------------------------------------
# Valid files


def test_valid_npz_builds_with_standardisation(tmp_path):
    x, y, task = make_data()
    p = write_npz(tmp_path / "d.npz", x=x, y=y, task=task)
    ts = files.build(cfg_for(p))
    assert ts.name == "file" and ts.K == 3 and ts.d_x == 3 and ts.D_y == 4
    assert ts.source_n.tolist() == [20, 25, 15]  # sources 1, 2, 3 in id order
    assert ts.source_x.shape == (3, 25, 3) and ts.source_y.shape == (3, 25, 4)
    assert ts.test_x.shape[0] == round(0.2 * 30) == 6
    assert ts.target_x.shape[0] + ts.test_x.shape[0] == 30
    assert ts.target_y.shape == (24, 4) and ts.test_y.shape == (6, 4)

    # the sources' (unpadded) rows are standardised to mean 0, std 1, column by column
    sx = torch.cat([ts.source_x[k, :n] for k, n in enumerate(ts.source_n.tolist())])
    sy = torch.cat([ts.source_y[k, :n] for k, n in enumerate(ts.source_n.tolist())])
    assert torch.allclose(sx.mean(0), torch.zeros(3), atol=1e-5) and torch.allclose(sx.std(0), torch.ones(3), atol=1e-4)
    assert torch.allclose(sy.mean(0), torch.zeros(4), atol=1e-5) and torch.allclose(sy.std(0), torch.ones(4), atol=1e-4)
    assert torch.all(ts.source_x[2, 15:] == 0)  # padding past source_n

    # unstandardize_x maps back to the file's rows, task by task, in file order
    for k, tid in enumerate([1, 2, 3]):
        back = ts.unstandardize_x(ts.source_x[k, : COUNTS[tid]])
        assert torch.allclose(back, torch.as_tensor(x[task == tid], dtype=torch.float32), atol=1e-4)
        assert torch.allclose(ts.source_y[k, : COUNTS[tid]],
                              ts.standardize_y(torch.as_tensor(y[task == tid], dtype=torch.float32)), atol=1e-5)
    # the target's pool and test rows together are exactly the task-0 rows
    tgt = torch.cat([ts.unstandardize_x(ts.target_x), ts.unstandardize_x(ts.test_x)]).double()
    want = torch.as_tensor(x[task == 0])
    assert torch.allclose(tgt[tgt[:, 0].argsort()], want[want[:, 0].argsort()], atol=1e-4)


@pytest.mark.parametrize("frac,n_test", [(0.5, 15), (0.1, 3), (0.9, 27)])
def test_test_fraction_respected(tmp_path, frac, n_test):
    x, y, task = make_data()
    ts = files.build(cfg_for(write_npz(tmp_path / "d.npz", x=x, y=y, task=task), f"suite.file.test_fraction={frac}"))
    assert ts.test_x.shape[0] == n_test and ts.target_x.shape[0] == 30 - n_test


def test_standardize_false_keeps_raw_values(tmp_path):
    x, y, task = make_data()
    ts = files.build(cfg_for(write_npz(tmp_path / "d.npz", x=x, y=y, task=task), "suite.file.standardize=false"))
    assert ts.x_mean is None
    assert torch.allclose(ts.source_x[0, :20], torch.as_tensor(x[task == 1], dtype=torch.float32))
    assert torch.equal(ts.unstandardize_x(ts.source_x), ts.source_x)


def test_sources_selected_and_ordered_by_recipe(tmp_path):
    x, y, task = make_data()
    ts = files.build(cfg_for(write_npz(tmp_path / "d.npz", x=x, y=y, task=task), "suite.file.sources=[3, 1]",
                             "suite.file.target=2", "suite.file.standardize=false"))
    assert ts.K == 2 and ts.source_n.tolist() == [15, 20]
    assert torch.allclose(ts.source_x[0, :15], torch.as_tensor(x[task == 3], dtype=torch.float32))
    assert ts.target_x.shape[0] + ts.test_x.shape[0] == 25


def test_split_reproducible_from_suite_seed(tmp_path):
    x, y, task = make_data()
    p = write_npz(tmp_path / "d.npz", x=x, y=y, task=task)
    a, b = files.build(cfg_for(p, "suite.seed=1")), files.build(cfg_for(p, "suite.seed=1", "seed=9"))
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.target_x, b.target_x)
    c = files.build(cfg_for(p, "suite.seed=2"))
    assert not torch.equal(a.test_x, c.test_x)


def test_valid_csv_builds_same_as_npz(tmp_path):
    x, y, task = make_data()
    ts_npz = files.build(cfg_for(write_npz(tmp_path / "d.npz", x=x, y=y, task=task)))
    ts_csv = build_taskset(cfg_for(write_csv(tmp_path / "d.csv", x, y, task), *CSV_OPTS))
    assert ts_csv.K == 3 and ts_csv.d_x == 3 and ts_csv.D_y == 4
    assert ts_csv.source_n.tolist() == [20, 25, 15]
    for name in ("source_x", "source_y", "target_x", "target_y", "test_x", "test_y", "x_mean", "x_std"):
        assert torch.allclose(getattr(ts_csv, name), getattr(ts_npz, name), atol=1e-6), name


def test_csv_columns_picked_by_name_not_position(tmp_path):
    x, y, task = make_data()
    header = ["task", "s", "extra", "c", "b", "a", "r", "q", "p"]
    p = write_csv(tmp_path / "d.csv", x, y, task, header=header)
    ts = files.build(cfg_for(p, *CSV_OPTS, "suite.file.standardize=false"))
    assert torch.allclose(ts.source_x[0, :20], torch.as_tensor(x[task == 1], dtype=torch.float32))
    assert torch.allclose(ts.source_y[0, :20], torch.as_tensor(y[task == 1], dtype=torch.float32))


def test_integer_valued_float_task_ids_and_1d_y_accepted(tmp_path):
    x, y, task = make_data()
    ts = files.build(cfg_for(write_npz(tmp_path / "d.npz", x=x, y=y[:, 0], task=task.astype(np.float64))))
    assert ts.K == 3 and ts.D_y == 1


# --------------------------------------------------------------------------------------------------------------
# Bad inputs: every one is a DataError (exit 3) naming the file and the problem


class Evil:
    """Unpickling this would run a shell command; the loader must never unpickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _npz(**changes):
    def make(tmp):
        x, y, task = make_data()
        arrays = {"x": x, "y": y, "task": task}
        for k, v in changes.items():
            v = v(x, y, task) if callable(v) else v
            if v is None:
                arrays.pop(k)
            else:
                arrays[k] = v
        return write_npz(tmp / "d.npz", **arrays)

    return make


def _csv(cells=None, header=None):
    def make(tmp):
        x, y, task = make_data()
        return write_csv(tmp / "d.csv", x, y, task, header=header, cells=cells)

    return make


def _bytes(name, data):
    def make(tmp):
        p = tmp / name
        p.write_bytes(data(tmp) if callable(data) else data)
        return p

    return make


def _with_nan(x, y, task):
    x = x.copy()
    x[7, 1] = np.nan
    return x


def _target_count(n):
    def make(tmp):
        x, y, task = make_data(counts={0: n, 1: 10, 2: 10})
        return write_npz(tmp / "d.npz", x=x, y=y, task=task)

    return make


def _truncated(tmp):
    x, y, task = make_data()
    write_npz(tmp / "full.npz", x=x, y=y, task=task)
    data = (tmp / "full.npz").read_bytes()
    return data[: len(data) // 2]


def _object_npz(tmp):
    x, y, task = make_data()
    obj = np.empty(len(task), dtype=object)
    obj[:] = [Evil(tmp / "PWNED")] * len(task)
    return write_npz(tmp / "d.npz", x=obj, y=y, task=task)


BAD = [
    # id, make(tmp) -> path, extra overrides, substrings the message must contain
    ("missing_file", lambda tmp: tmp / "nope.npz", [], ["not found"]),
    ("wrong_suffix", _bytes("d.txt", b"1,2,3\n"), [], ["unsupported file type", ".txt"]),
    ("missing_task_array", _npz(task=None), [], ["missing array", "task"]),
    ("nan_in_x", _npz(x=_with_nan), [], ["array x", "NaN", "row 7"]),
    ("inf_in_y", _npz(y=lambda x, y, t: np.where(np.arange(len(t))[:, None] == 3, np.inf, y)), [],
     ["array y", "row 3"]),
    ("row_count_mismatch", _npz(y=lambda x, y, t: y[:-1]), [], ["same number of rows", "90, 89, 90"]),
    ("non_integer_task", _npz(task=lambda x, y, t: np.where(np.arange(len(t)) == 0, 0.5, t)), [],
     ["integer task ids"]),
    ("string_task", _npz(task=lambda x, y, t: t.astype(str)), [], ["integer task ids"]),
    ("x_not_2d", _npz(x=lambda x, y, t: x[:, 0]), [], ["array x", "2-D"]),
    ("x_complex", _npz(x=lambda x, y, t: x.astype(complex)), [], ["array x", "real"]),
    ("target_absent", _npz(), ["suite.file.target=9"], ["target task id 9", "0, 1, 2, 3"]),
    ("unknown_source", _npz(), ["suite.file.sources=[1, 7]"], ["source task id(s) 7", "not in the file"]),
    ("target_is_source", _npz(), ["suite.file.sources=[0, 1]"], ["both the target and a source"]),
    ("only_target", _npz(task=lambda x, y, t: np.zeros_like(t)), [], ["no source tasks"]),
    ("target_too_small", _target_count(2), [], ["target task 0 has 2 rows", "too few"]),
    ("test_fraction_leaves_no_pool", _npz(), ["suite.file.test_fraction=1.0"], ["has 30 rows", "too few"]),
    ("csv_missing_column", _csv(), CSV_OPTS[:1] + ["suite.file.y_columns=[p,q,zz]"], ["no column 'zz'"]),
    ("csv_non_numeric", _csv(cells={(3, "b"): "abc"}), CSV_OPTS, ["line 5", "column 'b'", "'abc'", "not a number"]),
    ("csv_ragged_row", _bytes("d.csv", b"a,b,c,p,q,r,s,task\n1,2,3,4,5,6,7,0\n1,2\n"), CSV_OPTS,
     ["line 3", "not a number"]),
    ("csv_empty", _bytes("d.csv", b""), CSV_OPTS, ["empty file"]),
    ("csv_no_columns_in_recipe", _csv(), [], ["x_columns"]),
    ("csv_bad_task_cell", _csv(cells={(0, "task"): "one"}), CSV_OPTS, ["line 2", "column 'task'", "not a number"]),
    ("npz_truncated", _bytes("d.npz", _truncated), [], ["not a readable .npz"]),
    ("npz_garbage", _bytes("d.npz", bytes(range(256)) * 4), [], []),
    ("npz_empty", _bytes("d.npz", b""), [], ["not a readable .npz"]),
    ("npz_object_dtype", _object_npz, [], ["unsupported array contents"]),
]

FIXED_BUGS = [  # once silently accepted or a traceback; now DataError like the .npz path
    ("csv_fractional_task_id", _csv(cells={(0, "task"): "0.5"}), CSV_OPTS, ["task", "integer"]),
    ("csv_inf_task_id", _csv(cells={(0, "task"): "inf"}), CSV_OPTS, ["task", "integer"]),
]


@pytest.mark.parametrize("case,make,extra,expect", [pytest.param(*b, id=b[0]) for b in BAD + FIXED_BUGS])
def test_bad_input_raises_data_error(tmp_path, case, make, extra, expect):
    path = make(tmp_path)
    with pytest.raises(DataError) as exc:
        files.build(cfg_for(path, *extra))
    msg = str(exc.value)
    assert exc.value.exit_code == 3
    assert str(path) in msg, msg
    for part in expect:
        assert part in msg, (part, msg)
    assert "\n" not in msg  # one line for the user
    assert not (tmp_path / "PWNED").exists()  # nothing was unpickled
