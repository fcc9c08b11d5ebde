"""Batched cells and batched evaluation on a CUDA device (issue #12). Skipped where there is none (CI, laptops); on
a GPU machine `make test` runs them, and `benchmarks/device_check.py` is the longer check with timings.

Evaluation draws its noise with the same CPU generator on any device (diffusion._noise), so a model evaluated on the
GPU must give its CPU numbers to float rounding. Training draws its batches with a generator on the device, so a
cell trained there is another draw of the same procedure: it must finish, and land near its CPU result."""

import dataclasses
import math

import pytest
import torch

from cdmtransfer.cells import train_cells
from cdmtransfer.metrics import evaluate_models
from test_batched_cells import _cell, _setup
from test_batched_eval import FULL, SCALAR, _models

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda
@pytest.mark.parametrize("sets", [FULL, SCALAR])
def test_batched_evaluation_on_cuda_gives_the_cpu_numbers(sets):
    cfg, taskset, _, _ = _setup("frozen", sets=sets)
    models = _models(cfg, taskset, full=sets == FULL)
    cfgs = [dataclasses.replace(cfg, seed=s) for s in range(len(models))]
    on_cpu = evaluate_models(models, taskset, cfgs)
    on_gpu = evaluate_models(models, taskset, cfgs, device="cuda")
    for (got, _), (want, _) in zip(on_gpu, on_cpu):
        for key in ("score_error", "test_dsm", "posterior_mean_mse", "sliced_w2"):
            assert got[key] == pytest.approx(want[key], rel=1e-4), key


@cuda
def test_batched_cells_train_on_cuda(tmp_path):
    specs = [("frozen", 0), ("finetune", 1), ("scratch", 2)]
    setups = [_setup(mode, seed) for mode, seed in specs]
    cells = lambda tag: [_cell(cfg, taskset, enc, source, tmp_path / f"{tag}{k}")  # noqa: E731
                         for k, (cfg, taskset, enc, source) in enumerate(setups)]
    taskset = setups[0][1]
    on_cpu = train_cells(cells("cpu"), taskset)
    on_gpu = train_cells(cells("gpu"), taskset, device=torch.device("cuda"))
    for (mode, _), got, want in zip(specs, on_gpu, on_cpu):
        assert got is not None, mode
        assert math.isfinite(got["metrics"]["score_error"]) and got["metrics"]["diverged"] == 0.0
        # another draw of the batches: near the CPU run, not equal to it
        assert got["metrics"]["score_error"] < 1.5 * want["metrics"]["score_error"], mode
