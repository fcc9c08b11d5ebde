"""Task suites. Each module's `build(cfg)` returns a TaskSet built reproducibly from `cfg.seed`."""

from cdmtransfer.config import Config
from cdmtransfer.tasks.base import GroundTruth, TaskSet


def build_taskset(cfg: Config) -> TaskSet:
    if cfg.suite.name == "lsgmm":
        from cdmtransfer.tasks import lsgmm

        return lsgmm.build(cfg)
    from cdmtransfer.tasks import bumps, digits, files, gaussian, langevin

    builders = {"gaussian": gaussian.build, "langevin": langevin.build, "file": files.build,
                "digits": digits.build, "mnist": digits.build_mnist, "bumps": bumps.build}
    return builders[cfg.suite.name](cfg)


__all__ = ["GroundTruth", "TaskSet", "build_taskset"]
