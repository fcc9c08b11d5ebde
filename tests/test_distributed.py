"""torchrun data parallelism for real: 2 gloo processes on loopback take the same steps as 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from mlflow import MlflowClient
from safetensors.torch import load_file

from test_pipeline import TINY


def test_torchrun_two_processes_match_one(tmp_path, store):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    env = {**os.environ, "CDMTRANSFER_HOME": str(store), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "cdmtransfer", "pretrain", str(recipe), "--json", "--quiet"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "cdmtransfer", "pretrain", str(recipe), "--json", "--quiet"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    outputs = [json.loads(chunk) for chunk in _json_objects(two.stdout)]
    main = [o for o in outputs if o["run_id"]]
    assert len(main) == 1  # rank 0 alone created a run
    a = load_file(str(store / "work" / json.loads(one.stdout)["run_id"] / "model" / "model.safetensors"))
    b = load_file(str(store / "work" / main[0]["run_id"] / "model" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    assert client.get_run(main[0]["run_id"]).data.metrics["world_size"] == 2


def _json_objects(text: str):
    """Split concatenated pretty-printed JSON documents (one per rank) on stdout."""
    depth, start = 0, None
    for i, ch in enumerate(text):
        if ch == "{":
            depth, start = depth + 1, i if depth == 0 else start
        elif ch == "}":
            depth -= 1
            if depth == 0:
                yield text[start:i + 1]
