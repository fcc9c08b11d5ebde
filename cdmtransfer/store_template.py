"""A new embedded store starts as a copy of an empty one: MLflow migrates a new SQLite database's schema step by step
(about 2 s here), a copy takes milliseconds.

The empty store (the template) is built once per MLflow version, by MLflow itself, in the user's cache directory
(CDMTRANSFER_CACHE, else $XDG_CACHE_HOME/cdmtransfer, else ~/.cache/cdmtransfer), and copied from then on. Its
Default experiment's artifact folder is set to the new store's own. Anything that goes wrong (no writable cache, a
damaged template, which is then removed so that the next new store builds it again) leaves the store to MLflow's own
set-up, as before.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("CDMTRANSFER_CACHE")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "cdmtransfer"


def template_path() -> Path:
    import mlflow

    return cache_dir() / f"mlflow-{mlflow.__version__}-empty.db"


def build_template(path: Path) -> None:
    """An empty store at the installed MLflow's schema, built by MLflow, written atomically (concurrent builders each
    write a whole file; the last rename wins)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".db.tmp")
    os.close(fd)
    os.unlink(tmp)  # MLflow creates the file itself
    try:
        store = SqlAlchemyStore(f"sqlite:///{tmp}", (path.parent / "artifacts").as_uri())
        store.engine.dispose()
        with closing(sqlite3.connect(tmp)) as db:
            db.execute("VACUUM")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def start_from_template(db_file: Path, artifacts: Path) -> bool:
    """Create `db_file` (which must not exist yet; the caller holds the store's init lock) as a copy of the template,
    building the template first if this MLflow version has none. Returns False, having written nothing, when it
    cannot; MLflow then sets the store up itself."""
    tmp = db_file.with_suffix(".db.tmp")
    template = None
    try:
        template = template_path()
        if not template.is_file():
            build_template(template)
        shutil.copyfile(template, tmp)
        with closing(sqlite3.connect(tmp)) as db, db:  # closed after the update is committed
            db.execute("SELECT version_num FROM alembic_version").fetchone()  # a damaged file fails here
            db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                       ((artifacts / "0").as_uri(),))
        os.replace(tmp, db_file)
        return True
    except Exception as exc:  # noqa: BLE001 (OSError, sqlite3.Error, MLflow's own): the normal set-up still works
        if tmp.exists():
            tmp.unlink()
        if isinstance(exc, sqlite3.DatabaseError) and template is not None:
            template.unlink(missing_ok=True)  # damaged: the next new store builds it again
        return False
