"""TaskSet: K source tasks, a target pool to draw m samples from, and a held-out target test split.

Task indices follow the paper (theory.md §1.1): 0 is the target, 1..K are the sources. A suite that knows its ground
truth attaches a `GroundTruth`; the evaluator uses what it offers and reports what it had to skip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from cdmtransfer.errors import DataError


class GroundTruth:
    """What a synthetic suite knows exactly. Subclasses override what they can; `None` means "not known"."""

    def score(self, task: int, x_t: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
        """∇_x log p_t(x_t | y) for task `task`, rows batched ([B, d_x], [B, D_y], [B])."""
        return None

    def sample(self, task: int, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        """One draw x ~ p(x | y) per row of y."""
        return None

    def encoder(self) -> torch.nn.Module | None:
        """The true representation h* as a module (for `adapt --mode oracle`)."""
        return None


@dataclass
class TaskSet:
    name: str
    source_x: torch.Tensor  # [K, n_max, d_x], rows past source_n[k] are padding
    source_y: torch.Tensor  # [K, n_max, D_y]
    source_n: torch.Tensor  # [K] rows per source task
    target_x: torch.Tensor  # [N_pool, d_x]: the pool the m target samples are drawn from
    target_y: torch.Tensor  # [N_pool, D_y]
    test_x: torch.Tensor  # [N_test, d_x]: held-out target pairs for evaluation
    test_y: torch.Tensor  # [N_test, D_y]
    truth: GroundTruth = field(default_factory=GroundTruth)
    x_mean: torch.Tensor | None = None  # set when x was standardised: samples are mapped back with these
    x_std: torch.Tensor | None = None
    y_mean: torch.Tensor | None = None
    y_std: torch.Tensor | None = None
    description: str = ""
    # Image suites (tasks/digits.py, tasks/bumps.py); None elsewhere, so other suites are unaffected.
    image_shape: tuple[int, int] | None = None  # x is a flattened H×W image
    condition_shape: tuple[int, int, int] | None = None  # y is a flattened C×H×W image (for model.encoder = conv)
    # extra_metrics(model=, draw=, x_true=, x_mean=, y=, seed=) -> dict: suite-specific metrics, called by
    # evaluate_model with draw(y, n_per, generator) -> [C, n_per, d_x] samples, the posterior-mean evaluation's
    # x, mean and conditions, and a seed for the suite's own draws. Implementations take **_ for the rest.
    extra_metrics: Callable[..., dict] | None = None
    # preview(y [C, D_y], samples [C, n, d_x], x_true [C, d_x] | None) -> ([R, cols, H, W] in [0, 1], row labels)
    preview: Callable[..., tuple] | None = None
    # data_checks.DataWarning list: valid but degenerate data (constant columns, outliers, tiny splits, ...)
    data_warnings: list = field(default_factory=list)

    @property
    def K(self) -> int:
        return self.source_x.shape[0]

    @property
    def d_x(self) -> int:
        return self.source_x.shape[-1]

    @property
    def D_y(self) -> int:
        return self.source_y.shape[-1]

    def target_subset(self, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The m target samples: a reproducible draw without replacement from the pool, fixed by `seed`.

        Nested in m for a given seed (the first m of one permutation), so learning curves compare like with like.
        """
        pool = self.target_x.shape[0]
        if m > pool:
            raise DataError(f"m = {m} exceeds the {pool} target rows available for adaptation")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(pool, generator=g)[:m]
        return self.target_x[idx], self.target_y[idx]

    def unstandardize_x(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.x_mean is None else x * self.x_std + self.x_mean

    def standardize_y(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.y_mean is None else (y - self.y_mean) / self.y_std

    def summary(self) -> dict:
        return {"suite": self.name, "K": self.K, "d_x": self.d_x, "D_y": self.D_y,
                "n_per_source": [int(v) for v in self.source_n], "target_pool": int(self.target_x.shape[0]),
                "n_test": int(self.test_x.shape[0])}


def stack_sources(xs: list[torch.Tensor], ys: list[torch.Tensor]):
    """Pad per-task arrays into [K, n_max, ·] tensors plus the row counts."""
    n = torch.tensor([x.shape[0] for x in xs])
    n_max = int(n.max())
    X = torch.zeros(len(xs), n_max, xs[0].shape[1])
    Y = torch.zeros(len(ys), n_max, ys[0].shape[1])
    for k, (x, y) in enumerate(zip(xs, ys)):
        X[k, : x.shape[0]] = x
        Y[k, : y.shape[0]] = y
    return X, Y, n


def draw_splits(draw, K: int, n: int, n_pool: int, n_test: int) -> tuple:
    """Sources 1..K with n rows each, then the target's pool and test split, from `draw(task, rows) -> (x, y)`.

    Returns (source_x, source_y, source_n, pool_x, pool_y, test_x, test_y) in TaskSet's argument order.
    """
    xs, ys = zip(*(draw(k, n) for k in range(1, K + 1)))
    X, Y, counts = stack_sources(list(xs), list(ys))
    return (X, Y, counts, *draw(0, n_pool), *draw(0, n_test))
