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
from cdmtransfer.data_checks import column_warnings
from cdmtransfer.errors import DataError
from cdmtransfer.tasks.base import TaskSet, stack_sources


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x", "y", "task") if k not in z.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {', '.join(missing)}; found {', '.join(z.files) or 'none'}")
            x, y, task = z["x"], z["y"], z["task"]
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({_first_line(exc)})") from None
    except ValueError as exc:  # object arrays would need pickle, which we never allow
        raise DataError(f"{path}: unsupported array contents ({_first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 (a damaged archive: zlib.error, NotImplementedError, SyntaxError, ...)
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {_first_line(exc)})") from None
    return x, y, task


def read_csv(path: Path, x_cols: list[str], y_cols: list[str], task_col: str):
    if not x_cols or not y_cols:
        raise DataError(f"{path}: a .csv needs suite.file.x_columns and suite.file.y_columns in the recipe")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: spreadsheets often start with a BOM
            reader = csv.reader(fh)
            header = next(reader, None)
            rows = [row for row in reader if any(cell.strip() for cell in row)]  # skip blank lines
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read as CSV ({_first_line(exc)})") from None
    if header is None:
        raise DataError(f"{path}: empty file")
    header = [h.strip() for h in header]
    col = {name: i for i, name in enumerate(header)}
    for name in [*x_cols, *y_cols, task_col]:
        if name not in col:
            raise DataError(f"{path}: no column {name!r}; columns are {', '.join(map(repr, header))}")

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


F32_MAX = float(np.finfo(np.float32).max)


def validate(path: Path, x: np.ndarray, y: np.ndarray, task: np.ndarray):
    """Shapes, dtypes and values a run can work with; x and y come back as float64, task as int64."""
    if y.ndim == 1:
        y = y[:, None]
    for name, arr, ndim in (("x", x, 2), ("y", y, 2), ("task", task, 1)):
        if arr.ndim != ndim:
            raise DataError(f"{path}: array {name} must be {ndim}-D, got shape {arr.shape}")
    arrays = {}
    for name, arr in (("x", x), ("y", y)):
        if arr.dtype.kind not in "iuf":  # not bool, complex, dates, durations or text
            raise DataError(f"{path}: array {name} must be real numbers, got dtype {arr.dtype}")
        if arr.shape[1] == 0:
            raise DataError(f"{path}: array {name} has no columns (shape {arr.shape})")
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            bad = int(np.argwhere(~np.isfinite(arr))[0][0])
            raise DataError(f"{path}: array {name} has NaN or inf (first at row {bad})")
        big = np.abs(arr) > F32_MAX
        if big.any():  # the model computes in float32, where these are inf
            bad = int(np.argwhere(big)[0][0])
            raise DataError(f"{path}: array {name} has values beyond the float32 range (±{F32_MAX:.3g}), first "
                            f"at row {bad}; rescale the data")
        arrays[name] = arr
    x, y = arrays["x"], arrays["y"]
    whole = task.dtype.kind == "f" and bool(np.isfinite(task).all() and np.all(np.mod(task, 1) == 0)
                                            and np.all(np.abs(task) <= 2.0**53))  # exact in float64 and int64
    if task.dtype.kind not in "iu" and not whole:
        raise DataError(f"{path}: array task must hold integer task ids, got dtype {task.dtype}")
    if task.dtype.kind == "u" and task.size and int(task.max()) > np.iinfo(np.int64).max:
        raise DataError(f"{path}: array task holds ids beyond the int64 range")
    task = task.astype(np.int64)
    if not (x.shape[0] == y.shape[0] == task.shape[0]):
        raise DataError(f"{path}: x, y and task must have the same number of rows, got "
                        f"{x.shape[0]}, {y.shape[0]}, {task.shape[0]}")
    if x.shape[0] == 0:
        raise DataError(f"{path}: no rows")
    return x, y, task


def read_checked(f) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    """(path, x, y, task) of the suite.file config `f`: read (.npz or .csv) and validated."""
    path = Path(f.path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: data file not found (suite.file.path)")
    if path.suffix == ".npz":
        x, y, task = read_npz(path)
    elif path.suffix == ".csv":
        x, y, task = read_csv(path, f.x_columns, f.y_columns, f.task_column)
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .npz (x, y, task) or .csv")
    return (path, *validate(path, x, y, task))


def build(cfg: Config) -> TaskSet:
    f = cfg.suite.file
    path, x, y, task = read_checked(f)
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

    used = np.isin(task, [*sources, f.target])
    warnings = [*column_warnings("x", x[used], np.flatnonzero(used), np.isin(task[used], sources), f.standardize,
                                 f.x_columns if path.suffix == ".csv" else None),
                *column_warnings("y", y[used], np.flatnonzero(used), np.isin(task[used], sources), f.standardize,
                                 f.y_columns if path.suffix == ".csv" else None)]

    # float64 until the end: standardising data near the float32 limits must not overflow on the way
    x_t = torch.as_tensor(x, dtype=torch.float64)
    y_t = torch.as_tensor(y, dtype=torch.float64)
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
        stats = dict(x_mean=all_x.mean(0), x_std=_spread(all_x), y_mean=all_y.mean(0), y_std=_spread(all_y))
        src_x = [(v - stats["x_mean"]) / stats["x_std"] for v in src_x]
        src_y = [(v - stats["y_mean"]) / stats["y_std"] for v in src_y]
        tx = (tx - stats["x_mean"]) / stats["x_std"]
        ty = (ty - stats["y_mean"]) / stats["y_std"]
    src_x, src_y = [v.float() for v in src_x], [v.float() for v in src_y]
    tx, ty, stats = tx.float(), ty.float(), {k: v.float() for k, v in stats.items()}
    for name, arr in (("x", torch.cat([*src_x, tx])), ("y", torch.cat([*src_y, ty])), *stats.items()):
        if not torch.isfinite(arr).all():
            raise DataError(f"{path}: {name} overflows float32 after standardisation; rescale the data")
    X, Y, n = stack_sources(src_x, src_y)
    desc = f"file {path.name}: sources {_ids(sources)}, target {f.target}"
    return TaskSet("file", X, Y, n, tx[pool_idx], ty[pool_idx], tx[test_idx], ty[test_idx],
                   description=desc, data_warnings=warnings, **stats)


def _spread(a: torch.Tensor) -> torch.Tensor:
    """Column standard deviations, at least 1e-6 (a constant column stays constant); a single row has none (the
    sample std of one row is NaN, which once made every standardised value NaN)."""
    std = a.std(0) if a.shape[0] > 1 else torch.zeros(a.shape[1], dtype=a.dtype)
    return std.clamp_min(1e-6)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _ids(ids) -> str:
    return ", ".join(str(i) for i in ids)
