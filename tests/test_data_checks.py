"""Valid but degenerate data (cdmtransfer/data_checks.py): each case is named in one stderr line and an MLflow tag;
what cannot work is refused with a DataError (exit 3). Clean data says nothing."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from cdmtransfer.cli import app
from cdmtransfer.config import load_config
from cdmtransfer.data_checks import TAG, for_stage
from cdmtransfer.errors import DataError
from cdmtransfer.tasks import build_taskset


def arrays(target=100, sources=(40, 40), seed=0):
    """x [N, 2], y [N, 3] ~ N(0, 1), task ids 0 (target, first), 1, 2, ...: clean data, 20 test pairs."""
    rng = np.random.default_rng(seed)
    task = np.concatenate([np.full(n, k) for k, n in enumerate((target, *sources))])
    return rng.normal(size=(len(task), 2)), rng.normal(size=(len(task), 3)), task


def warnings_of(tmp_path, x, y, task, *sets, stage="adapt"):
    np.savez(tmp_path / "d.npz", x=x, y=y, task=task)
    cfg = load_config(None, ["suite.name=file", f"suite.file.path={tmp_path / 'd.npz'}", *sets])
    return for_stage(build_taskset(cfg).data_warnings, (stage,))


def test_clean_data_flags_and_counts_say_nothing(tmp_path):
    x, y, task = arrays()
    rng = np.random.default_rng(1)
    y[:, 1] = rng.integers(0, 2, len(task))  # a 0/1 flag column
    y[:, 2] = rng.poisson(0.3, len(task))  # mostly zeros (MAD 0), small counts: no outlier
    assert warnings_of(tmp_path, x, y, task) == []
    assert warnings_of(tmp_path, x, y, task, stage="pretrain") == []


def test_constant_columns(tmp_path):
    x, y, task = arrays()
    y[:, 1] = 2.5
    assert warnings_of(tmp_path, x, y, task) == ["y column 1 is constant (every row 2.5)"]
    x[:, :] = 1.0
    assert warnings_of(tmp_path, x, y, task)[0] == "x columns 0, 1 are constant"


def test_constant_in_the_sources_only_is_inflated_by_standardising(tmp_path):
    x, y, task = arrays()
    x[task != 0, 1] = 3.0
    assert warnings_of(tmp_path, x, y, task) == [
        "x column 1 is constant across the sources but not in the target: standardising by the sources' spread "
        "(≈ 0) inflates the target's values a millionfold"]
    assert warnings_of(tmp_path, x, y, task, "suite.file.standardize=false") == []  # nothing is divided


def test_extreme_outlier_named_with_row_and_size(tmp_path):
    x, y, task = arrays()
    x[57, 0] = 1e30
    (text,) = warnings_of(tmp_path, x, y, task)
    assert text.startswith("x column 0 has 1 extreme outlier 1e+30 at row 57 (")
    assert text.endswith(" robust sd from the median)")
    x[58, 0] = 1e5  # far out, but within 10^6 robust sd: a heavy tail, not flagged
    assert len(warnings_of(tmp_path, x, y, task)) == 1


def test_unit_scale_expected_without_standardising(tmp_path):
    x, y, task = arrays()
    x[:, 0] *= 1e5
    assert warnings_of(tmp_path, x, y, task, "suite.file.standardize=false") == [
        f"x column 0 has sd {x[:, 0].std():.3g} with suite.file.standardize off; the diffusion expects roughly unit "
        f"scale"]


def test_tiny_test_split_says_how_many_pairs(tmp_path):
    x, y, task = arrays(target=3)
    assert warnings_of(tmp_path, x, y, task) == [
        "the target's test split has 1 pair: every test metric is computed from 1 pair (fewer than 20 is noise; "
        "raise suite.file.test_fraction or add target rows)"]
    assert warnings_of(tmp_path, x, y, task, stage="pretrain") == []  # pretrain never uses the target


def test_test_pairs_duplicated_in_the_pool(tmp_path):
    x, y, task = arrays()
    x[1:50], y[1:50] = x[0], y[0]  # half the target's rows identical: the split puts some on each side
    ts_texts = warnings_of(tmp_path, x, y, task)
    assert len(ts_texts) == 1 and ts_texts[0].endswith(
        " of the 20 test pairs also appear in the target's pool (same x and y): the test metrics partly measure "
        "memorisation")


def test_sources_too_small_for_pretrain_validation(tmp_path):
    x, y, task = arrays(sources=(40, 4))  # round(0.1 · 4) = 0 rows to hold out
    assert warnings_of(tmp_path, x, y, task, stage="pretrain") == [
        "the smallest source task has 4 rows: too few to hold out pretrain.val_fraction = 0.1, so pretrain runs "
        "without validation, to pretrain.steps"]
    assert warnings_of(tmp_path, x, y, task, "pretrain.val_fraction=0", stage="pretrain") == []


def test_csv_columns_are_named(tmp_path):
    x, y, task = arrays()
    rows = ["a,b,p,q,r,task"] + [f"{a},{b},{p},7,{r},{t}" for (a, b), (p, _, r), t in zip(x, y, task)]
    (tmp_path / "d.csv").write_text("\ufeff" + "\n".join(rows) + "\n")  # with the BOM spreadsheets write
    cfg = load_config(None, ["suite.name=file", f"suite.file.path={tmp_path / 'd.csv'}",
                             "suite.file.x_columns=[a,b]", "suite.file.y_columns=[p,q,r]"])
    assert for_stage(build_taskset(cfg).data_warnings, ("adapt",)) == ["y column 'q' is constant (every row 7)"]


REFUSED = {  # what cannot work: DataError (exit 3) before any run exists
    "beyond float32": (lambda x, y, t: (np.where(np.arange(len(t))[:, None] == 9, 1e300, x), y, t),
                       "array x has values beyond the float32 range (±3.4e+38), first at row 9"),
    "no x columns": (lambda x, y, t: (x[:, :0], y, t), "array x has no columns"),
    "durations": (lambda x, y, t: (x.astype("timedelta64[s]"), y, t), "array x must be real numbers"),
    "booleans": (lambda x, y, t: (x, y > 0, t), "array y must be real numbers"),
    "task ids past int64": (lambda x, y, t: (x, y, t.astype(np.uint64) + np.uint64(2**63)), "beyond the int64"),
    "float task ids past 2^53": (lambda x, y, t: (x, y, t * 1e300), "integer task ids"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_cannot_work_is_refused(tmp_path, case):
    change, words = REFUSED[case]
    x, y, task = change(*arrays())
    np.savez(tmp_path / "d.npz", x=x, y=y, task=task)
    with pytest.raises(DataError, match=words.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        build_taskset(load_config(None, ["suite.name=file", f"suite.file.path={tmp_path / 'd.npz'}"]))


def test_a_one_row_source_standardises_to_finite_values(tmp_path):
    """Once NaN everywhere (the std of one row); now every column is flagged as constant across the sources."""
    x, y, task = arrays(sources=(1,))
    np.savez(tmp_path / "d.npz", x=x, y=y, task=task)
    ts = build_taskset(load_config(None, ["suite.name=file", f"suite.file.path={tmp_path / 'd.npz'}"]))
    assert all(bool(a.isfinite().all()) for a in (ts.source_x, ts.source_y, ts.target_x, ts.test_x))
    assert any("constant across the sources" in w.text for w in ts.data_warnings)


RECIPE = """
name: degenerate
suite: {{name: file, file: {{path: {path}, target: 0}}}}
model: {{d: 2, encoder_width: 8, encoder_depth: 1, head_width: 8, head_depth: 1, time_dim: 4}}
pretrain: {{steps: 2, val_every: 2, batch_size: 8}}
adapt: {{steps: 2, m: 2, val_folds: 1, batch_size: 8}}
evaluate: {{t_draws: 1, posterior_samples: 2, posterior_conditions: 2, sampler_steps: 2, dist_conditions: 1,
           dist_samples: 2}}
"""


def test_runs_print_one_line_and_carry_the_tag(tmp_path, store):
    x, y, task = arrays(target=3)
    y[:, 0] = 1.0
    np.savez(tmp_path / "d.npz", x=x, y=y, task=task)
    (tmp_path / "r.yaml").write_text(RECIPE.format(path=tmp_path / "d.npz"))
    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    expected = {
        "adapt": ["y column 0 is constant (every row 1)", "the target's test split has 1 pair: every test metric is "
                  "computed from 1 pair (fewer than 20 is noise; raise suite.file.test_fraction or add target rows)"],
        "pretrain": ["y column 0 is constant (every row 1)"],
    }
    for stage, texts in expected.items():
        args = [stage, str(tmp_path / "r.yaml"), "--json", "--quiet"] + (["--mode", "scratch"] if stage == "adapt"
                                                                           else [])
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.startswith("warning: data")]
        assert lines == [f"warning: data d.npz: {'; '.join(texts)}"], result.stderr
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                    filter_string=f"tags.`cdmtransfer.stage` = '{stage}'")
        assert run.data.tags[TAG] == "; ".join(texts) and run.info.status == "FINISHED"
