"""A real `mlflow server` on loopback as the tracking backend: pretrain, adapt by run id and by runs:/ URI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from cdmtransfer.cli import app
from test_pipeline import TINY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path, _migrated_db):
    port = free_port()
    db = tmp_path / "server.db"
    db.write_bytes(Path(_migrated_db).read_bytes())
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{db}", "--workers", "1",
                             "--artifacts-destination", (tmp_path / "server-artifacts").as_uri()],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:  # bounded wait for the server to answer
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start within 90 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_pretrain_and_adapt_against_a_real_server(server, tmp_path, monkeypatch):
    monkeypatch.setenv("CDMTRANSFER_HOME", str(tmp_path / "local"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY)
    runner = CliRunner()
    pre = runner.invoke(app, ["pretrain", str(recipe), "--tracking-uri", server, "--json"])
    assert pre.exit_code == 0, pre.stderr
    assert pre.stdout.lstrip().startswith("{"), pre.stdout[:500]
    pre_id = json.loads(pre.stdout)["run_id"]
    # runs:/ resolves through the server's artifact store, not the local work directory
    ada = runner.invoke(app, ["adapt", str(recipe), "--tracking-uri", server, "--mode", "frozen",
                              "--encoder", f"runs:/{pre_id}/model", "--json"])
    assert ada.exit_code == 0, ada.stderr
    ada_id = json.loads(ada.stdout)["run_id"]
    client = MlflowClient(tracking_uri=server)
    assert client.get_run(pre_id).info.status == "FINISHED"
    run = client.get_run(ada_id)
    assert run.info.status == "FINISHED" and run.data.tags["cdmtransfer.pretrain_run_id"] == pre_id
    assert "score_error" in run.data.metrics
    assert {a.path for a in client.list_artifacts(pre_id, "model")} >= {"model/model.safetensors", "model/meta.json"}
