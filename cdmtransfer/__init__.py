"""cdmtransfer: few-shot transfer for conditional diffusion models (Cheng et al. 2025, theory.md).

Python API, mirroring the CLI. Each function takes a recipe path (or a `Config`) plus `--set`-style overrides and
returns a result with the MLflow run id, metrics and paths:

    import cdmtransfer as cdm
    pre = cdm.pretrain("recipes/quickstart.yaml")
    res = cdm.adapt("recipes/quickstart.yaml", encoder=pre.run_id, overrides=["adapt.mode=frozen", "adapt.m=16"])
    print(res.metrics["score_error"])

torch and mlflow load on first use, not on import.
"""

from __future__ import annotations

__version__ = "0.1.0"


def _cfg(recipe, overrides):
    from cdmtransfer.config import Config, apply_override, check_consistency, from_dict, load_config

    if isinstance(recipe, Config):
        data = recipe.to_dict()
        for item in overrides:
            apply_override(data, item)
        cfg = from_dict(Config, data, "<config>")
        check_consistency(cfg, "<config>")
        return cfg
    return load_config(recipe, list(overrides))


def load_config(recipe=None, overrides=()):
    """The validated Config of a recipe (or the defaults) with `a.b=v` overrides applied."""
    return _cfg(recipe, overrides)


def pretrain(recipe, overrides=(), **kwargs):
    """Pretrain the shared encoder and K source heads. kwargs: tracking_uri, resume, quiet."""
    from cdmtransfer.pretraining import pretrain as run

    return run(_cfg(recipe, overrides), **kwargs)


def adapt(recipe, overrides=(), **kwargs):
    """Adapt to the target set. kwargs: encoder (run id, URI or path), tracking_uri, resume, quiet."""
    from cdmtransfer.adaptation import adapt as run

    return run(_cfg(recipe, overrides), **kwargs)


def sweep(recipe, overrides=(), **kwargs):
    """Learning curves over sweep.modes x sweep.m x sweep.seeds. kwargs: encoder (a source, or a list of them: the
    cells run on each and are also averaged into one model per (mode, m, seed)), tracking_uri, quiet, jobs, resume."""
    from cdmtransfer.curves import sweep as run

    return run(_cfg(recipe, overrides), **kwargs)


def evaluate(run_id, overrides=(), **kwargs):
    """Recompute the target metrics of an adapt run. kwargs: tracking_uri, home, quiet (no warnings), progress."""
    from cdmtransfer.runs import evaluate_run

    return evaluate_run(run_id, overrides=list(overrides), **kwargs)


def sample(run_id, n, out, **kwargs):
    """Write n samples per condition to `out` (.npz). kwargs: y_file, test, task, tracking_uri, seed, progress."""
    from cdmtransfer.runs import sample_run

    return sample_run(run_id, n, out, **kwargs)


__all__ = ["__version__", "adapt", "evaluate", "load_config", "pretrain", "sample", "sweep"]
