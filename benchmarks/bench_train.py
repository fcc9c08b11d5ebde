"""Benchmarks for cdmtransfer's training path. Run from the repository root:

    .venv/bin/python benchmarks/bench_train.py            # full run (a few minutes on 2 cores)
    .venv/bin/python benchmarks/bench_train.py --quick    # short run (CI smoke test, ~1 minute)
    .venv/bin/python benchmarks/bench_train.py --json bench-results/train.json
    .venv/bin/python benchmarks/bench_train.py --only heads,cli

Runs, in this order, the ten benchmarks of this folder, each of which also runs alone
(`.venv/bin/python benchmarks/bench_heads.py --quick`); see benchmarks/README.md for what each number means and
the goals:
  1. train       (bench_train_loop.py)  time per step of the package's `train()` loop vs a bare PyTorch loop;
  2. logging     (bench_logging.py)     the share of training wall time spent writing metrics to MLflow;
  3. heads       (bench_heads.py)       BatchedHeads vs K nn.Sequential heads in a Python loop;
  4. cli         (bench_cli.py)         `python -m cdmtransfer --help` latency, and that it does not import torch;
  5. matmul      (bench_matmul.py)      the fp32 torch.mm peak and the share of it one pretrain step achieves
                                        (using section 1's ms/step when both run in one invocation);
  6. memory      (bench_memory.py)      peak RSS of a short pretrain for K in {8, 32} x n in {512, 4096};
  7. quickstart  (bench_quickstart.py)  wall time of `cdmtransfer sweep recipes/quickstart.yaml --quiet`, cold store;
  8. cells       (bench_cells.py)       a step of U stacked adapt units (batched cells) per unit, and its share of
                                        the fp32 matmul peak;
  9. sampling    (bench_sampling.py)    evaluation's posterior sampling, the sampler's fast path vs eps_from_code;
 10. optim       (bench_optim.py)       one AdamW update of 128 stacked heads, fused vs torch's foreach.

Prints one combined report of markdown tables on stdout; progress goes to stderr. Nothing under cdmtransfer/ is
modified: the benchmarks observe the real loop through its public hooks (a Progress-compatible clock, and timing
wrappers around a few functions that are restored afterwards).
"""

from __future__ import annotations

import sys

import bench_cells
import bench_cli
import bench_heads
import bench_logging
import bench_matmul
import bench_memory
import bench_optim
import bench_quickstart
import bench_sampling
import bench_train_loop
from _common import main

MODULES = [bench_train_loop, bench_logging, bench_heads, bench_cli, bench_matmul, bench_memory, bench_quickstart,
           bench_cells, bench_sampling, bench_optim]

if __name__ == "__main__":
    sys.exit(main(MODULES, __doc__))
