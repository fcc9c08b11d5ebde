"""Task suites. Each module's `build(cfg)` returns a TaskSet built reproducibly from `cfg.seed`."""

from cdmtransfer.config import Config
from cdmtransfer.tasks.base import GroundTruth, TaskSet


def build_taskset(cfg: Config) -> TaskSet:
    """The recipe's task set (with suite.holdout = k, source k as the target: tasks/holdout.py), with its
    degenerate-data warnings (data_checks) attached."""
    from cdmtransfer.data_checks import split_warnings

    taskset = _build(cfg)
    if cfg.suite.holdout:
        from cdmtransfer.tasks.holdout import hold_out

        taskset = hold_out(taskset, cfg.suite.holdout, cfg.suite.n_test, cfg.suite.seed)
    taskset.data_warnings = [*taskset.data_warnings, *split_warnings(taskset, cfg)]
    return taskset


def _build(cfg: Config) -> TaskSet:
    if cfg.suite.name == "lsgmm":
        from cdmtransfer.tasks import lsgmm

        return lsgmm.build(cfg)
    from cdmtransfer.tasks import bumps, digits, files, gaussian, langevin

    builders = {"gaussian": gaussian.build, "langevin": langevin.build, "file": files.build,
                "digits": digits.build, "mnist": digits.build_mnist, "bumps": bumps.build}
    return builders[cfg.suite.name](cfg)


__all__ = ["GroundTruth", "TaskSet", "build_taskset"]
