"""Valid but degenerate data: inputs a run accepts and finishes on, with numbers that then mean little (issue #14).

Each check yields one short phrase. A run whose data has any prints one line on stderr,
`warning: data <source>: <problem>; <problem>`, and carries the tag cdmtransfer.data_warnings (the same phrases).
What cannot work at all is refused before any run exists (tasks/files.validate: DataError, exit 3).

Column checks look at the rows a run uses (sources and target) of user data (`file` suite); split checks look at
any suite's TaskSet. A warning names the stages it concerns: the target's test split means nothing to pretrain.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TAG = "cdmtransfer.data_warnings"
OUTLIER_SDS = 1e6  # |v − median| beyond this many robust standard deviations (1.4826 · MAD) is an extreme outlier
MIN_TEST_PAIRS = 20  # test metrics from fewer held-out target pairs are too noisy to rank runs by
UNIT_SCALE = (1e-3, 1e3)  # column spreads the diffusion copes with unstandardised (its prior is N(0, I))
_MAD_TO_SD = 1.4826  # σ = 1.4826 · MAD for Gaussian data
_TAG_CHARS = 5000  # MLflow tag values are limited to a few thousand characters


@dataclass(frozen=True)
class DataWarning:
    text: str
    stages: tuple[str, ...] = ("pretrain", "adapt")


def _col(names: list[str] | None, j: int) -> str:
    return repr(names[j]) if names and j < len(names) else str(j)


def _cols(names: list[str] | None, columns: list[int], show: int = 5) -> str:
    more = f" and {len(columns) - show} more" if len(columns) > show else ""
    return ", ".join(_col(names, j) for j in columns[:show]) + more


def _robust_scale(dev: np.ndarray) -> float:
    """σ from the MAD of |v − median|; where over half the values sit on the median (MAD 0), the smallest nonzero
    deviation instead (a column of 0/1 flags has no outliers; 0s with a 1e30 has one)."""
    mad = float(np.median(dev))
    if mad > 0:
        return _MAD_TO_SD * mad
    nonzero = dev[dev > 0]
    return float(nonzero.min()) if nonzero.size else 0.0


def column_warnings(name: str, values: np.ndarray, rows: np.ndarray, source_rows: np.ndarray, standardize: bool,
                    names: list[str] | None = None) -> list[DataWarning]:
    """Constant columns, extreme outliers and (unstandardised) far-from-unit scales of array `name` [N, D].

    `rows` are the file's row numbers of `values` (for messages); `source_rows` a boolean mask of the sources' rows,
    whose mean and spread standardisation uses.
    """
    with np.errstate(all="ignore"):  # values near the float limits: a ratio may be inf, never a warning on stderr
        return _column_warnings(name, values, rows, source_rows, standardize, names)


def _column_warnings(name, values, rows, source_rows, standardize, names) -> list[DataWarning]:
    out = []
    spread = np.ptp(values, axis=0)
    constant = [j for j in range(values.shape[1]) if spread[j] == 0]
    if len(constant) == 1:
        out.append(DataWarning(f"{name} column {_col(names, constant[0])} is constant (every row "
                               f"{values[0, constant[0]]:.6g})"))
    elif constant:
        out.append(DataWarning(f"{name} columns {_cols(names, constant)} are constant"))
    if standardize and source_rows.any():
        flat = [j for j in range(values.shape[1]) if spread[j] > 0 and np.ptp(values[source_rows, j]) == 0]
        if flat:
            which = f"column {_col(names, flat[0])} is" if len(flat) == 1 else f"columns {_cols(names, flat)} are"
            out.append(DataWarning(f"{name} {which} constant across the sources but not in the target: "
                                   f"standardising by the sources' spread (≈ 0) inflates the target's values a "
                                   f"millionfold"))
    outliers = []
    for j in range(values.shape[1]):
        if spread[j] == 0:
            continue
        col = values[:, j]
        dev = np.abs(col - np.median(col))
        scale = _robust_scale(dev)
        far = dev > OUTLIER_SDS * scale
        if far.any():
            worst, count = int(np.argmax(dev)), int(far.sum())
            what = "1 extreme outlier" if count == 1 else f"{count} extreme outliers, the largest"
            outliers.append(f"{name} column {_col(names, j)} has {what} {col[worst]:.3g} at row {int(rows[worst])} "
                            f"({dev[worst] / scale:.2g} robust sd from the median)")
    if outliers:
        more = f" (and {len(outliers) - 3} more {name} columns with outliers)" if len(outliers) > 3 else ""
        out.append(DataWarning("; ".join(outliers[:3]) + more))
    if not standardize:
        sd = values.std(axis=0)
        odd = [j for j in range(values.shape[1]) if spread[j] > 0 and not UNIT_SCALE[0] <= sd[j] <= UNIT_SCALE[1]]
        if odd:
            which = (f"column {_col(names, odd[0])} has sd {sd[odd[0]]:.3g}" if len(odd) == 1 else
                     f"columns {_cols(names, odd)} have sds {', '.join(f'{sd[j]:.2g}' for j in odd[:5])}")
            out.append(DataWarning(f"{name} {which} with suite.file.standardize off; the diffusion expects roughly "
                                   f"unit scale"))
    return out


def split_warnings(taskset, cfg) -> list[DataWarning]:
    """Problems of any suite's splits: a tiny test split, test pairs that are also in the pool, and sources too
    small for pretrain to hold out validation rows."""
    from cdmtransfer.validation import holdout_split

    out = []
    n_test = int(taskset.test_x.shape[0])
    if n_test < MIN_TEST_PAIRS:
        knob = "suite.file.test_fraction" if cfg.suite.name == "file" else "suite.n_test"
        pairs = "1 pair" if n_test == 1 else f"{n_test} pairs"
        out.append(DataWarning(f"the target's test split has {pairs}: every test metric is computed from {pairs} "
                               f"(fewer than {MIN_TEST_PAIRS} is noise; raise {knob} or add target rows)",
                               ("adapt",)))
    pool = _row_keys(taskset.target_x, taskset.target_y)
    shared = sum(key in pool for key in _row_keys(taskset.test_x, taskset.test_y, unique=False))
    if shared:
        out.append(DataWarning(f"{shared} of the {n_test} test pairs also appear in the target's pool (same x and "
                               f"y): the test metrics partly measure memorisation", ("adapt",)))
    fraction = cfg.pretrain.val_fraction
    if fraction > 0 and holdout_split(taskset.source_n, fraction, cfg.suite.seed)[1] is None:
        smallest = int(taskset.source_n.min())
        out.append(DataWarning(f"the smallest source task has {smallest} row{'s' if smallest != 1 else ''}: too few "
                               f"to hold out pretrain.val_fraction = {fraction:g}, so pretrain runs without "
                               f"validation, to pretrain.steps", ("pretrain",)))
    return out


def _row_keys(x, y, unique: bool = True):
    rows = np.concatenate([x.numpy(), y.numpy()], axis=1)
    keys = [row.tobytes() for row in np.ascontiguousarray(rows)]
    return set(keys) if unique else keys


def for_stage(warnings: list[DataWarning], stages: tuple[str, ...]) -> list[str]:
    """The phrases that concern any of `stages`, in order, without repeats."""
    return list(dict.fromkeys(w.text for w in warnings if set(w.stages) & set(stages)))


def source_label(cfg) -> str:
    """What the warning line names: the user's file, or the suite."""
    if cfg.suite.name == "file":
        return Path(cfg.suite.file.path).name
    return f"suite {cfg.suite.name}"


def tags(texts: list[str]) -> dict:
    """{TAG: the phrases} for a run's tags; empty when there is nothing to say."""
    if not texts:
        return {}
    value = "; ".join(texts)
    return {TAG: value if len(value) <= _TAG_CHARS else value[: _TAG_CHARS - 3] + "..."}


def line(label: str, texts: list[str]) -> str | None:
    """The one stderr line, or None."""
    return f"warning: data {label}: {'; '.join(texts)}" if texts else None


def echo(cfg, texts: list[str]) -> None:
    """Print the warning line for `texts` (if any) on stderr: warnings show even with --quiet and --json."""
    text = line(source_label(cfg), texts)
    if text:
        print(text, file=sys.stderr, flush=True)
