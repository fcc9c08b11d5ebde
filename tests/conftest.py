"""Shared test setup: make the package importable from the repo root and keep torch to 2 threads."""

import importlib.util
import sys
from pathlib import Path

import torch

if importlib.util.find_spec("cdmtransfer") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

torch.set_num_threads(2)
