"""Evaluations shared by the cells of one sweep.

An adapted model's metrics (metrics.evaluate_model) are a function of its weights and spec, the suite, the
evaluation and diffusion settings, and its target subset (adapt.m and seed: the references fit on it); the
evaluation's noise is fixed by evaluate.seed. So a cell whose final model is bit for bit another's reuses that
evaluation instead of drawing its samples again: a `finetune` cell whose cross-validation kept the encoder frozen
ends with its `frozen` twin's model (all 36 such cells of `make paper` did), and evaluation is most of a cell's cost
on the paper's suites. The cache is a directory the sweep's processes share: <key>.json (metrics, skipped) and
<key>.pt (the draws the samples figure reuses), each written whole (os.replace) so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from cdmtransfer.models import model_spec

EVALUATION_KEYS = ("suite", "evaluate", "diffusion", "seed")  # besides the model and adapt.m: what metrics read


def evaluation_key(model, cfg) -> str:
    """SHA-256 of what an evaluation depends on: the model's spec and every tensor of its state, the config's
    EVALUATION_KEYS and adapt.m."""
    digest = hashlib.sha256()
    settings = {k: v for k, v in cfg.to_dict().items() if k in EVALUATION_KEYS}
    digest.update(json.dumps([model_spec(model), settings, cfg.adapt.m], sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load(cache: Path, key: str) -> tuple[dict, dict, dict] | None:
    """(metrics, skipped, draws) stored under `key`, or None."""
    found, draws = cache / f"{key}.json", cache / f"{key}.pt"
    if not (found.is_file() and draws.is_file()):
        return None
    got = json.loads(found.read_text())
    return got["metrics"], got["skipped"], torch.load(draws, weights_only=True)


def store(cache: Path, key: str, metrics: dict, skipped: dict, draws: dict) -> None:
    """Write an evaluation under `key` (the draws first: `load` needs both files)."""
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{key}.{os.getpid()}"
    torch.save(draws, tmp)
    os.replace(tmp, cache / f"{key}.pt")
    tmp.write_text(json.dumps({"metrics": metrics, "skipped": skipped}))
    os.replace(tmp, cache / f"{key}.json")
