"""MLflow: where runs are stored, run lifecycle, batched metrics, artifacts, lineage and model lookup.

Default store (ECOSYSTEM.md §2.1): an explicit embedded SQLite database plus an artifact folder, both under one
project-local directory (`tracking.home`, default ./cdmtransfer-runs). `--tracking-uri`, then MLFLOW_TRACKING_URI,
then `tracking.uri` in the recipe override it; an `http://` server works the same way.
Runs always end FINISHED, FAILED or KILLED: `tracked_run` sets the status on every way out.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import re
import shlex
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from cdmtransfer.errors import ConfigError, DataError, stop_requested
from cdmtransfer.store_template import start_from_template

# stdout belongs to the command (--json must stay parseable): MLflow must not print run URLs there.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

for _name in ("alembic", "mlflow"):  # the store's schema set-up logs at INFO; keep the terminal for our output
    logging.getLogger(_name).setLevel(logging.WARNING)

TAG = "cdmtransfer."
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_BATCH = 1000  # MLflow's limit of metrics per log_batch call


@dataclass
class Store:
    uri: str
    home: Path  # local directory for the embedded store and for working checkpoints
    embedded: bool

    @property
    def artifact_location(self) -> str | None:
        return (self.home / "artifacts").as_uri() if self.embedded else None

    def work_dir(self, run_id: str) -> Path:
        """<home>/work/<run id>; anything but a 32-hex run id is refused, so no path can escape <home>/work."""
        if not RUN_ID.fullmatch(run_id):
            raise ConfigError(f"{run_id!r} is not an MLflow run id (32 hexadecimal characters)")
        return self.home / "work" / run_id

    def ui_command(self) -> str:
        return ui_command(self.uri) if self.embedded else f"open {self.uri}"


def ui_command(uri: str, cwd: Path | None = None) -> str:
    """A command that opens the MLflow UI on `uri` and works as printed, in a shell without the virtualenv activated:
    this interpreter's own `mlflow` script by absolute path (a bare `mlflow` is on PATH only inside the venv), else
    `<python> -m mlflow`. When the store is the repository's default (`make ui` opens that), it says so too."""
    script = Path(sys.executable).parent / "mlflow"  # not resolved: a venv's python is a link out of the venv
    exe = shlex.quote(str(script)) if script.is_file() else f"{shlex.quote(sys.executable)} -m mlflow"
    command = f"{exe} ui --backend-store-uri {shlex.quote(uri)}"
    cwd = Path.cwd() if cwd is None else cwd
    makefile = cwd / "Makefile"
    if uri == f"sqlite:///{(cwd / 'cdmtransfer-runs' / 'mlflow.db').as_posix()}" and makefile.is_file() \
            and re.search(r"^ui:", makefile.read_text(errors="replace"), re.M):
        command += "    # or, here: make ui"
    return command


def resolve_store(cli_uri: str | None, recipe_uri: str | None, home: str) -> Store:
    home_path = Path(home).expanduser().resolve()
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or recipe_uri
    if not uri:
        return Store(f"sqlite:///{(home_path / 'mlflow.db').as_posix()}", home_path, embedded=True)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    elif "://" not in uri:
        raise ConfigError(f"tracking URI {uri!r} is not a URI; use sqlite:///path/mlflow.db or http://host:port")
    return Store(uri, home_path, embedded=False)


@contextmanager
def _sqlite_init_lock(uri: str) -> Iterator[None]:
    """Serialise first contact with a SQLite store across processes (`make -j`, parallel scripts): MLflow migrates
    a new database's schema on first use, and two processes migrating at once corrupt it (ECOSYSTEM.md §2.8)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(uri[len("sqlite:///"):]).expanduser().with_suffix(".init.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes
        yield


_DEFERRED = (signal.SIGINT, signal.SIGTERM)
_deferral = {"active": False, "caught": []}


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends, then reach whatever handler was installed. A KeyboardInterrupt
    raised inside an SQLite write leaves that write's transaction open in this process: the database stays locked,
    and every later write (marking the runs KILLED) waits out the 20 s busy timeout and fails."""
    if _deferral["active"] or threading.current_thread() is not threading.main_thread():
        yield  # nested: the outermost block delivers; another thread: signals reach only the main thread anyway
        return
    previous = {sig: signal.getsignal(sig) for sig in _DEFERRED}
    previous = {sig: handler for sig, handler in previous.items() if handler is not None}  # None: not set by Python
    for sig in previous:
        signal.signal(sig, lambda signum, frame: _deferral["caught"].append(signum))
    _deferral["active"] = True
    try:
        yield
    finally:
        _deferral["active"] = False
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        caught, _deferral["caught"] = _deferral["caught"], []
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)  # runs the handler now (SIGTERM's in cli.main raises KeyboardInterrupt)


class _UninterruptedClient:
    """An MlflowClient on an SQLite store whose calls a signal cannot stop midway (`_signals_deferred`); a call to a
    server is interrupted as usual (nothing stays locked, and a server that does not answer must not hold Ctrl-C)."""

    def __init__(self, client: MlflowClient):
        self._client = client

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            with _signals_deferred():
                return attr(*args, **kwargs)

        return call


class Tracker:
    """One tracking store and experiment; creates and reopens runs."""

    def __init__(self, store: Store, experiment: str):
        self.store = store
        try:
            store.home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{store.home}: cannot create the run directory ({exc.strerror or exc}); "
                              f"set CDMTRANSFER_HOME or tracking.home to a writable place") from None
        if store.uri.startswith("sqlite:"):  # its ~1 s of imports outside the lock other processes wait on
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
        with _sqlite_init_lock(store.uri):
            db_file = Path(store.uri[len("sqlite:///"):]) if store.uri.startswith("sqlite:///") else None
            if store.embedded and db_file is not None and not db_file.exists():
                start_from_template(db_file, store.home / "artifacts")  # milliseconds instead of ~2 s of migrations
            client = MlflowClient(tracking_uri=store.uri)
            self.client = _UninterruptedClient(client) if store.uri.startswith("sqlite:") else client
            self.experiment_id = self._experiment(experiment)

    def _experiment(self, name: str) -> str:
        try:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                try:
                    return self.client.create_experiment(name, artifact_location=self.store.artifact_location)
                except MlflowException:  # another process created it first
                    exp = self.client.get_experiment_by_name(name)
            return exp.experiment_id
        except MlflowException as exc:
            raise ConfigError(f"tracking store {self.store.uri} is unreachable or unusable: {_first_line(exc)}") from None
        except Exception as exc:  # connection errors surface as several types
            raise ConfigError(f"tracking store {self.store.uri} is unreachable or unusable: {_first_line(exc)}") from None

    def get_run(self, run_id: str):
        try:
            return self.client.get_run(run_id)
        except MlflowException:
            raise ConfigError(f"run {run_id} not found in the tracking store {self.store.uri}") from None


def open_tracker(cfg, tracking_uri: str | None) -> Tracker:
    """The tracker for a Config: --tracking-uri, then MLFLOW_TRACKING_URI, then the recipe, then the embedded store."""
    return Tracker(resolve_store(tracking_uri, cfg.tracking.uri, cfg.tracking.home), cfg.tracking.experiment)


class Run:
    """A live MLflow run with a metric buffer flushed in batches (one write per flush, not per step)."""

    def __init__(self, tracker: Tracker, run_id: str):
        self.tracker, self.client, self.run_id = tracker, tracker.client, run_id
        self._metrics: list[Metric] = []
        self.logging_seconds = 0.0  # wall time spent writing to the store

    @property
    def work_dir(self) -> Path:
        return self.tracker.store.work_dir(self.run_id)

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self._metrics.extend(Metric(k, float(v), ts, step) for k, v in values.items())

    def flush(self) -> None:
        start = time.perf_counter()
        while self._metrics:
            chunk, self._metrics = self._metrics[:_BATCH], self._metrics[_BATCH:]
            self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
        self.logging_seconds += time.perf_counter() - start

    def log_params(self, params: dict) -> None:
        items = [Param(k, _param_str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100], synchronous=True)

    def set_tags(self, tags: dict) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)

    def log_dict(self, data: dict, name: str) -> None:
        self.client.log_dict(self.run_id, data, name)

    def log_artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_artifact(self, local_file: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_file), artifact_path)


def _param_str(value) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


@contextmanager
def tracked_run(tracker: Tracker, name: str, tags: dict, resume_run_id: str | None = None) -> Iterator[Run]:
    """Start (or reopen, to resume) a run; always leave it FINISHED, FAILED or KILLED."""
    client = tracker.client
    if resume_run_id:
        tracker.get_run(resume_run_id)
        client.update_run(resume_run_id, status="RUNNING")
        run_id = resume_run_id
        client.set_tag(run_id, TAG + "resumed_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
        run = Run(tracker, run_id)
    else:
        run = open_run(tracker, name, tags)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        if stop_requested():  # SIGTERM's KeyboardInterrupt, turned into another exception (errors.request_stop)
            status = "KILLED"
        raise
    finally:
        close_run(run, status)


def open_run(tracker: Tracker, name: str, tags: dict) -> Run:
    """Create a RUNNING run; the caller must `close_run` it (prefer `tracked_run`, which always does)."""
    run_id = tracker.client.create_run(tracker.experiment_id, run_name=name,
                                       tags={k: str(v) for k, v in tags.items()}).info.run_id
    return Run(tracker, run_id)


def close_run(run: Run, status: str) -> None:
    """Flush buffered metrics and set the final status (FINISHED, FAILED or KILLED), whatever happens."""
    try:
        run.flush()
    finally:
        try:
            run.client.set_terminated(run.run_id, status)
        except Exception:  # noqa: BLE001 - a store connection the interrupt broke mid-write: once more, on a new one
            run.client.set_terminated(run.run_id, status)


def find_model_dir(tracker: Tracker, source: str, dst: Path) -> tuple[Path, str | None]:
    """Resolve an encoder/model source to a local exported-model directory; returns (dir, run_id or None).

    `source` is a local path, a run id, or an MLflow URI (runs:/<id>/model, models:/<model_id>).
    """
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file():
            path = path.parent
        return path, None
    if RUN_ID.fullmatch(source):
        tracker.get_run(source)
        local = tracker.store.work_dir(source) / "model"
        if local.is_dir():
            return local, source
        return _download(tracker, f"runs:/{source}/model", dst), source
    if source.startswith(("runs:/", "models:/")):
        parts = source.split(":/", 1)[1].split("/")
        if ".." in parts or "\\" in source:
            raise ConfigError(f"model URI {source!r}: '..' and backslashes are not allowed in artifact paths")
        run_id = parts[0] if source.startswith("runs:/") else None
        if run_id is not None and not RUN_ID.fullmatch(run_id):
            raise ConfigError(f"model URI {source!r}: {run_id!r} is not an MLflow run id (32 hexadecimal characters)")
        return _download(tracker, source, dst), run_id
    raise ConfigError(f"encoder source {source!r} is not a file, a run id, or a runs:/ or models:/ URI")


def _download(tracker: Tracker, uri: str, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    try:
        if uri.startswith("models:/m-"):  # a LoggedModel id: fetch from its artifact location in this store
            uri = tracker.client.get_logged_model(uri[len("models:/"):].strip("/")).artifact_location
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst),
                                                         tracking_uri=tracker.store.uri,
                                                         registry_uri=tracker.store.uri))
    except Exception as exc:
        raise DataError(f"cannot fetch model {uri}: {_first_line(exc)}") from None


def register_model(run: Run, model_dir: Path, name: str, params: dict) -> str | None:
    """Record the exported model as an MLflow LoggedModel (so models:/<id> resolves); returns its id."""
    client = run.client
    try:
        model = client.create_logged_model(run.tracker.experiment_id, name=name, source_run_id=run.run_id,
                                           params={k: _param_str(v) for k, v in params.items()})
        client.log_model_artifacts(model.model_id, str(model_dir))
        client.finalize_logged_model(model.model_id, "READY")
        return model.model_id
    except MlflowException as exc:
        logging.getLogger("cdmtransfer").warning("could not register the model: %s", _first_line(exc))
        return None


@dataclass
class RunSummary:
    """What a command prints and returns: the run, its metrics, and where its outputs are."""

    run_id: str
    stage: str
    metrics: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    tracking_uri: str = ""

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "stage": self.stage, "metrics": self.metrics,
                "paths": {k: str(v) for k, v in self.paths.items()}, "info": self.info,
                "tracking_uri": self.tracking_uri}
