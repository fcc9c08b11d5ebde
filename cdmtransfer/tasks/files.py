"""User data from a file: `.npz` with arrays x [N, d_x], y [N, D_y], task [N], or `.csv` with named columns.

Which task ids are sources and which one is the target is set in the recipe (suite.file). The target's rows are
split, reproducibly from the seed, into a held-out test part and the pool that adapt draws m samples from.
With `standardize`, x and y are centred and scaled by the sources' statistics; samples are mapped back.
"""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import numpy as np
import torch

from cdmtransfer.config import Config
from cdmtransfer.errors import DataError
from cdmtransfer.tasks.base import TaskSet, stack_sources


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x", "y", "task") if k not in z.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {', '.join(missing)}; found {', '.join(z.files) or 'none'}")
            x, y, task = z["x"], z["y"], z["task"]
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    except ValueError as exc:  # object arrays would need pickle, which we never allow
        raise DataError(f"{path}: unsupported array contents ({exc})") from None
    return x, y, task


def read_csv(path: Path, x_cols: list[str], y_cols: list[str], task_col: str):
    if not x_cols or not y_cols:
        raise DataError(f"{path}: a .csv needs suite.file.x_columns and suite.file.y_columns in the recipe")
    try:
        with open(path, newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            rows = [row for row in reader if any(cell.strip() for cell in row)]  # skip blank lines
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read as CSV ({exc})") from None
    if header is None:
        raise DataError(f"{path}: empty file")
    header = [h.strip() for h in header]
    col = {name: i for i, name in enumerate(header)}
    for name in [*x_cols, *y_cols, task_col]:
        if name not in col:
            raise DataError(f"{path}: no column {name!r}; columns are {', '.join(header)}")

    def column(name: str, kind):
        out = []
        for line, row in enumerate(rows, start=2):
            try:
                out.append(kind(row[col[name]]))
            except (ValueError, IndexError):
                cell = row[col[name]] if col[name] < len(row) else "<missing>"
                raise DataError(f"{path}: line {line}, column {name!r}: {cell!r} is not a number") from None
        return out

    x = np.array([column(c, float) for c in x_cols], dtype=np.float64).T.reshape(len(rows), len(x_cols))
    y = np.array([column(c, float) for c in y_cols], dtype=np.float64).T.reshape(len(rows), len(y_cols))
    task = np.array(column(task_col, float), dtype=np.float64)  # validate() checks these are integers
    return x, y, task


def validate(path: Path, x: np.ndarray, y: np.ndarray, task: np.ndarray):
    if y.ndim == 1:
        y = y[:, None]
    for name, arr, ndim in (("x", x, 2), ("y", y, 2), ("task", task, 1)):
        if arr.ndim != ndim:
            raise DataError(f"{path}: array {name} must be {ndim}-D, got shape {arr.shape}")
    for name, arr in (("x", x), ("y", y)):
        if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
            raise DataError(f"{path}: array {name} must be real numbers, got dtype {arr.dtype}")
        if not np.isfinite(arr).all():
            bad = int(np.argwhere(~np.isfinite(arr))[0][0])
            raise DataError(f"{path}: array {name} has NaN or inf (first at row {bad})")
    if not np.issubdtype(task.dtype, np.integer):
        if np.issubdtype(task.dtype, np.floating) and np.isfinite(task).all() and np.all(np.mod(task, 1) == 0):
            task = task.astype(np.int64)
        else:
            raise DataError(f"{path}: array task must hold integer task ids, got dtype {task.dtype}")
    if not (x.shape[0] == y.shape[0] == task.shape[0]):
        raise DataError(f"{path}: x, y and task must have the same number of rows, got "
                        f"{x.shape[0]}, {y.shape[0]}, {task.shape[0]}")
    if x.shape[0] == 0:
        raise DataError(f"{path}: no rows")
    return x, y, task


def build(cfg: Config) -> TaskSet:
    f = cfg.suite.file
    path = Path(f.path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: data file not found (suite.file.path)")
    if path.suffix == ".npz":
        x, y, task = read_npz(path)
    elif path.suffix == ".csv":
        x, y, task = read_csv(path, f.x_columns, f.y_columns, f.task_column)
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .npz (x, y, task) or .csv")
    x, y, task = validate(path, x, y, task)
    ids = sorted(int(i) for i in np.unique(task))
    if f.target not in ids:
        raise DataError(f"{path}: target task id {f.target} not in the file (task ids: {_ids(ids)})")
    sources = f.sources or [i for i in ids if i != f.target]
    if len(set(sources)) != len(sources):
        raise DataError(f"{path}: suite.file.sources lists a task id twice: {_ids(sources)}")
    unknown = [s for s in sources if s not in ids]
    if unknown:
        raise DataError(f"{path}: source task id(s) {_ids(unknown)} not in the file (task ids: {_ids(ids)})")
    if f.target in sources:
        raise DataError(f"{path}: task {f.target} is both the target and a source (suite.file.sources)")
    if not sources:
        raise DataError(f"{path}: no source tasks: the file holds only the target task {f.target}")

    x_t = torch.as_tensor(x, dtype=torch.float32)
    y_t = torch.as_tensor(y, dtype=torch.float32)
    task_t = torch.as_tensor(task)
    src_x = [x_t[task_t == s] for s in sources]
    src_y = [y_t[task_t == s] for s in sources]
    tx, ty = x_t[task_t == f.target], y_t[task_t == f.target]
    n_test = int(round(f.test_fraction * tx.shape[0]))
    if n_test < 1 or tx.shape[0] - n_test < 1:
        raise DataError(f"{path}: target task {f.target} has {tx.shape[0]} rows: too few to hold out "
                        f"test_fraction = {f.test_fraction} and keep rows to adapt on")
    perm = torch.randperm(tx.shape[0], generator=torch.Generator().manual_seed(cfg.suite.seed))
    test_idx, pool_idx = perm[:n_test], perm[n_test:]

    stats = {}
    if f.standardize:
        all_x, all_y = torch.cat(src_x), torch.cat(src_y)
        stats = dict(x_mean=all_x.mean(0), x_std=all_x.std(0).clamp_min(1e-6),
                     y_mean=all_y.mean(0), y_std=all_y.std(0).clamp_min(1e-6))
        src_x = [(v - stats["x_mean"]) / stats["x_std"] for v in src_x]
        src_y = [(v - stats["y_mean"]) / stats["y_std"] for v in src_y]
        tx = (tx - stats["x_mean"]) / stats["x_std"]
        ty = (ty - stats["y_mean"]) / stats["y_std"]
    X, Y, n = stack_sources(src_x, src_y)
    desc = f"file {path.name}: sources {_ids(sources)}, target {f.target}"
    return TaskSet("file", X, Y, n, tx[pool_idx], ty[pool_idx], tx[test_idx], ty[test_idx],
                   description=desc, **stats)


def _ids(ids) -> str:
    return ", ".join(str(i) for i in ids)
