"""A new embedded store starts as a copy of an empty-store template (store_template.py): the same schema MLflow's own
migrations give, its Default experiment's artifacts inside the store, and MLflow's own set-up whenever the template
cannot be used."""

from __future__ import annotations

import sqlite3

from mlflow import MlflowClient

from cdmtransfer.store_template import template_path
from cdmtransfer.tracking import Tracker, resolve_store


def _schema(db) -> list:
    """Every table's and index's definition, its lines sorted (MLflow's migrations emit a table's constraints in an
    order that varies from one run to the next)."""
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
        return sorted((kind, name, sorted(line.strip().rstrip(",") for line in (sql or "").splitlines()))
                      for kind, name, sql in rows)


def _default_artifacts(db) -> str:
    with sqlite3.connect(db) as c:
        return c.execute("SELECT artifact_location FROM experiments WHERE experiment_id = 0").fetchone()[0]


def _open(home):
    tracker = Tracker(resolve_store(None, None, str(home)), "cdmtransfer")
    run = tracker.client.create_run(tracker.experiment_id)  # the store works: a run logs and reads back
    tracker.client.log_metric(run.info.run_id, "x", 2.5)
    assert tracker.client.get_run(run.info.run_id).data.metrics == {"x": 2.5}
    return home / "mlflow.db"


def test_new_stores_copy_the_template_with_the_schema_mlflow_migrates_to(tmp_path, monkeypatch):
    monkeypatch.setenv("CDMTRANSFER_CACHE", str(tmp_path / "cache"))
    assert not template_path().exists()
    first = _open(tmp_path / "a")  # builds the template, then copies it
    assert template_path().is_file()
    second = _open(tmp_path / "b")
    migrated = tmp_path / "plain" / "mlflow.db"  # what MLflow's own migrations give
    migrated.parent.mkdir()
    MlflowClient(tracking_uri=f"sqlite:///{migrated}").search_experiments()
    assert _schema(first) == _schema(second) == _schema(migrated)
    with sqlite3.connect(second) as a, sqlite3.connect(migrated) as b:
        assert a.execute("SELECT * FROM alembic_version").fetchall() == b.execute(
            "SELECT * FROM alembic_version").fetchall()
    assert _default_artifacts(second) == (tmp_path / "b" / "artifacts" / "0").as_uri()  # not the template's


def test_a_damaged_template_is_rebuilt_and_without_a_cache_mlflow_sets_the_store_up(tmp_path, monkeypatch):
    monkeypatch.setenv("CDMTRANSFER_CACHE", str(tmp_path / "cache"))
    template_path().parent.mkdir(parents=True)
    template_path().write_bytes(b"not a database" * 100)
    db = _open(tmp_path / "a")
    assert _default_artifacts(db) != (tmp_path / "a" / "artifacts" / "0").as_uri()  # MLflow set it up itself
    assert not list((tmp_path / "a").glob("*.tmp"))
    assert not template_path().exists()  # removed: the next new store builds a good one
    _open(tmp_path / "c")
    assert _default_artifacts(tmp_path / "c" / "mlflow.db") == (tmp_path / "c" / "artifacts" / "0").as_uri()
    (tmp_path / "plain-file").write_text("x")
    monkeypatch.setenv("CDMTRANSFER_CACHE", str(tmp_path / "plain-file"))  # no cache can be made under a file
    _open(tmp_path / "b")
