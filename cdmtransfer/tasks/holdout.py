"""Source task k as a stand-in target (suite.holdout = k): the pseudo-targets of `estimate` (source_calibration.py).

Any suite builds its K sources and its own target as usual; then source k (1..K, in the suite's order) becomes the
target and the other K − 1 stay sources, in their order; the suite's own target is not used. The held-out task's rows
are split reproducibly (suite.seed) into a test part (n_test rows, at most a quarter of them) and the pool adapt draws
m from. Ground truth is relabelled (task 0 → k, j → the j-th remaining source), so exact scores, posterior means and
reference samples stay exact. Suite extras (psnr, bump accuracy) describe the suite's own target and are dropped.
A standardising suite (file) keeps the statistics of all K sources: the held-out task's own rows inform them slightly.
"""

from __future__ import annotations

import dataclasses

import torch

from cdmtransfer.errors import ConfigError, DataError
from cdmtransfer.tasks.base import GroundTruth, TaskSet

TASK_METHODS = ("mean", "beta", "condition", "marginal_cov", "marginal_score")  # truth methods taking a task index


class RelabeledTruth(GroundTruth):
    """The suite's ground truth with task indices renumbered: new index i is the suite's task order[i]."""

    def __init__(self, truth: GroundTruth, order: list[int]):
        self._truth, self._order = truth, order

    def score(self, task, x_t, y, t):
        return self._truth.score(self._order[task], x_t, y, t)

    def sample(self, task, y, generator):
        return self._truth.sample(self._order[task], y, generator)

    def encoder(self):
        return self._truth.encoder()

    def __getattr__(self, name):  # only for what the class does not define: suite-specific extras
        attr = getattr(self._truth, name)
        if name in TASK_METHODS:
            return lambda task, *args, **kw: attr(self._order[task], *args, **kw)
        return attr


def hold_out(ts: TaskSet, k: int, n_test: int, seed: int) -> TaskSet:
    """The task set with source k (1..K) as the target and the other sources as sources."""
    K = ts.K
    if K < 2:
        raise ConfigError(f"suite.holdout = {k}: needs at least two source tasks, the suite has K = {K}")
    if not 1 <= k <= K:
        raise ConfigError(f"suite.holdout = {k}: must be between 1 and K = {K} (0: the suite's own target)")
    n_k = int(ts.source_n[k - 1])
    x, y = ts.source_x[k - 1, :n_k], ts.source_y[k - 1, :n_k]
    test = min(n_test, n_k // 4)
    if test < 1:
        raise DataError(f"suite.holdout = {k}: source {k} has {n_k} rows, too few to hold out a test split")
    perm = torch.randperm(n_k, generator=torch.Generator().manual_seed(seed + 7919 * k))
    keep = [j for j in range(K) if j != k - 1]
    n_max = int(ts.source_n[keep].max())
    return dataclasses.replace(
        ts, source_x=ts.source_x[keep, :n_max], source_y=ts.source_y[keep, :n_max], source_n=ts.source_n[keep],
        target_x=x[perm[test:]], target_y=y[perm[test:]], test_x=x[perm[:test]], test_y=y[perm[:test]],
        truth=RelabeledTruth(ts.truth, [k] + [j + 1 for j in keep]), extra_metrics=None,
        description=f"{ts.description}; held out: source {k} is the target, {K - 1} sources")
