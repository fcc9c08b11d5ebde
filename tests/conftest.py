"""Shared test setup: make the package importable from the repo root and keep torch to 2 threads."""

import importlib.util
import sys
from pathlib import Path

import torch

if importlib.util.find_spec("cdmtransfer") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

torch.set_num_threads(1)  # tiny ops: one thread is fastest and immune to core contention

import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Property-based tests (test_fuzz.py): `make test` runs a few hundred fixed examples (derandomized, so CI is
# repeatable); `make fuzz` (HYPOTHESIS_PROFILE=fuzz) thousands of fresh random ones, keeping failures in .hypothesis/.
_FUZZ_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                            HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("default", max_examples=30, derandomize=True, database=None, **_FUZZ_SETTINGS)
settings.register_profile("fuzz", max_examples=600, **_FUZZ_SETTINGS)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


# New embedded stores start from an empty-store template in this cache (store_template.py): the tests' own, never the
# user's ~/.cache; subprocesses inherit it.
os.environ["CDMTRANSFER_CACHE"] = tempfile.mkdtemp(prefix="cdmtransfer-test-cache-")


@pytest.fixture(scope="session")
def _migrated_db():
    """An MLflow SQLite database with its schema already migrated (migration takes seconds; copying, milliseconds)."""
    from cdmtransfer.store_template import build_template, template_path

    path = template_path()
    if not path.is_file():
        build_template(path)
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, _migrated_db):
    """A fresh embedded store for one test: tmp_path/home with a migrated mlflow.db; returns the home path."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(_migrated_db, home / "mlflow.db")
    monkeypatch.setenv("CDMTRANSFER_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home
