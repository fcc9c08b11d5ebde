"""Typed recipe configuration: dataclasses from YAML, `--set a.b=v` overrides, validation with did-you-mean.

Precedence: dataclass defaults < recipe YAML < `--set` overrides < explicit CLI flags. Validation happens once, here;
everything downstream receives a `Config` it can trust. Values are parsed with `yaml.safe_load` only: a recipe can
never name a class or run code.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from cdmtransfer.errors import ConfigError

MODES = ("frozen", "finetune", "scratch", "oracle")


def _range(lo=None, hi=None, lo_open=False):
    """Field metadata: allowed numeric range, checked at validation."""
    return {"range": (lo, hi, lo_open)}


@dataclass
class GaussianSuite:
    """Gaussian tasks sharing h*: x | y ~ N(A_k h*(y) + b_k, Σ_k), exact noisy scores at every t."""

    d_x: int = field(default=8, metadata=_range(1))
    D_y: int = field(default=32, metadata=_range(1))
    d: int = field(default=4, metadata=_range(1))  # dimension of the true representation h*
    h_star: Literal["linear", "nonlinear"] = "linear"
    target: Literal["in_span", "out_of_span"] = "in_span"
    noise: float = field(default=0.3, metadata=_range(0.0, lo_open=True))  # scale of the task covariances


@dataclass
class LangevinSuite:
    """The paper's conditioned-diffusion experiment (theory.md §4.1): Langevin-path prior, y = Mx + N(0, I/4)."""

    d_x: int = field(default=50, metadata=_range(2))
    D_y: int = field(default=100, metadata=_range(1))
    beta_target: float = field(default=5.5, metadata=_range(0.0, lo_open=True))
    obs_std: float = field(default=0.5, metadata=_range(0.0, lo_open=True))


@dataclass
class FileSuite:
    """User data: `.npz` with arrays x, y, task, or `.csv` with the columns named here."""

    path: str = ""
    x_columns: list[str] = field(default_factory=list)  # .csv only
    y_columns: list[str] = field(default_factory=list)  # .csv only
    task_column: str = "task"  # .csv only
    sources: list[int] = field(default_factory=list)  # task ids used as sources; empty: every id but the target
    target: int = 0
    test_fraction: float = field(default=0.2, metadata=_range(0.0, 1.0, lo_open=True))
    standardize: bool = True  # scale x and y by the source mean/std (undone when sampling)


@dataclass
class SuiteConfig:
    name: Literal["gaussian", "langevin", "file"] = "gaussian"
    seed: int = 0  # the task world (h*, maps, data, splits); the run seed does not change it
    K: int = field(default=8, metadata=_range(1))  # number of source tasks (synthetic suites)
    n: int = field(default=512, metadata=_range(1))  # samples per source task (synthetic suites)
    n_target_pool: int = field(default=2048, metadata=_range(1))  # target rows m is drawn from (synthetic)
    n_test: int = field(default=256, metadata=_range(1))  # held-out target pairs (synthetic suites)
    gaussian: GaussianSuite = field(default_factory=GaussianSuite)
    langevin: LangevinSuite = field(default_factory=LangevinSuite)
    file: FileSuite = field(default_factory=FileSuite)


@dataclass
class ModelConfig:
    d: int = field(default=4, metadata=_range(1))  # output dimension of the learned encoder h
    encoder_width: int = field(default=128, metadata=_range(1))
    encoder_depth: int = field(default=3, metadata=_range(1))  # hidden layers of h
    head_width: int = field(default=128, metadata=_range(1))
    head_depth: int = field(default=2, metadata=_range(1))  # hidden layers of each score head f_k
    time_dim: int = field(default=16, metadata=_range(2))  # sinusoidal time features (even)


@dataclass
class DiffusionConfig:
    T0: float = field(default=0.01, metadata=_range(0.0, lo_open=True))  # early-stopping time
    T: float = field(default=4.0, metadata=_range(0.0, lo_open=True))  # horizon; α_T = e^{-T}


@dataclass
class TrainConfig:
    steps: int = field(default=2000, metadata=_range(1))
    batch_size: int = field(default=128, metadata=_range(1))  # per task
    lr: float = field(default=2e-3, metadata=_range(0.0, lo_open=True))
    weight_decay: float = field(default=0.0, metadata=_range(0.0))
    grad_clip: float = field(default=1.0, metadata=_range(0.0))  # 0 disables clipping
    ema_decay: float = field(default=0.995, metadata=_range(0.0, 1.0))
    warmup_steps: int = field(default=50, metadata=_range(0))
    log_every: int = field(default=25, metadata=_range(1))
    checkpoint_every: int = field(default=500, metadata=_range(1))


@dataclass
class AdaptConfig(TrainConfig):
    steps: int = field(default=1500, metadata=_range(1))
    batch_size: int = field(default=64, metadata=_range(1))  # draws per step from the m samples (with replacement)
    mode: Literal["frozen", "finetune", "scratch", "oracle"] = "frozen"
    m: int = field(default=32, metadata=_range(1))  # target samples
    encoder_lr: float = field(default=2e-4, metadata=_range(0.0, lo_open=True))  # finetune only


@dataclass
class EvaluateConfig:
    t_draws: int = field(default=8, metadata=_range(1))  # noise levels per test pair for score errors
    posterior_samples: int = field(default=32, metadata=_range(1))  # N samples per condition for the mean
    posterior_conditions: int = field(default=100, metadata=_range(1))  # test conditions for posterior-mean MSE
    sampler: Literal["ode", "sde"] = "sde"
    sampler_steps: int = field(default=100, metadata=_range(2))
    dist_conditions: int = field(default=8, metadata=_range(1))  # conditions for the distribution distance
    dist_samples: int = field(default=256, metadata=_range(2))  # samples per condition for it
    seed: int = 1234  # evaluation noise: the same for every mode, so modes compare on equal terms


@dataclass
class SweepConfig:
    modes: list[str] = field(default_factory=lambda: list(MODES))
    m: list[int] = field(default_factory=lambda: [32])
    seeds: int = field(default=1, metadata=_range(1))


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # None: the embedded store under `home` (or MLFLOW_TRACKING_URI)
    # SQLite store, artifacts and working checkpoints; CDMTRANSFER_HOME sets the default
    home: str = field(default_factory=lambda: os.environ.get("CDMTRANSFER_HOME", "cdmtransfer-runs"))
    experiment: str = "cdmtransfer"
    log_artifacts: bool = True


@dataclass
class Config:
    name: str = "recipe"
    seed: int = 0
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    threads: int = field(default=0, metadata=_range(0))  # torch intra-op threads; 0: one (best for small nets)
    suite: SuiteConfig = field(default_factory=SuiteConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# Loading and validation


def load_config(path: str | Path | None, overrides: list[str] = (), source: str | None = None) -> Config:
    """Read a recipe (or the defaults when `path` is None), apply `--set` overrides, validate."""
    data: dict = {}
    where = source or (str(path) if path else "<defaults>")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: recipe file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise ConfigError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, item)
    cfg = from_dict(Config, data, where)
    check_consistency(cfg, where)
    return cfg


def check_consistency(cfg: Config, where: str) -> None:
    """Rules that span several keys."""
    if cfg.diffusion.T <= cfg.diffusion.T0:
        raise ConfigError(f"{where}: diffusion.T = {cfg.diffusion.T} must exceed diffusion.T0 = {cfg.diffusion.T0}")
    if cfg.model.time_dim % 2:
        raise ConfigError(f"{where}: model.time_dim = {cfg.model.time_dim} must be even")
    for mode in cfg.sweep.modes:
        if mode not in MODES:
            close = difflib.get_close_matches(mode, MODES, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: sweep.modes has {mode!r}, not one of {', '.join(MODES)}{hint}")
    for m in cfg.sweep.m:
        if m < 1:
            raise ConfigError(f"{where}: sweep.m has {m}, must be >= 1")
    if cfg.suite.name == "file" and not cfg.suite.file.path:
        raise ConfigError(f"{where}: suite.file.path is required when suite.name is 'file'")


def apply_override(data: dict, item: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (safe)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set adapt.m=16")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls, data: Any, where: str, prefix: str = ""):
    """Build dataclass `cls` from `data`, rejecting unknown keys, wrong types and out-of-range values."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'recipe'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        kwargs[name] = _coerce(hints[name], data[name], where, f"{prefix}{name}", f.metadata)
    return cls(**kwargs)


def _coerce(tp, value, where: str, key: str, metadata) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where, key, metadata)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: {key} = {value!r} is not one of {', '.join(map(str, choices))}{hint}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # "a,b" from --set or the CLI
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        return [_coerce(item_tp, v, where, f"{key}[{i}]", {}) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, str):
            value = _parse_number(value, int, where, key)
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, str):
            value = _parse_number(value, float, where, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{where}: {key} must be finite, got {value!r}")
    elif tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        value = str(value)
    _check_range(value, metadata, where, key)
    return value


def _parse_number(text: str, kind, where: str, key: str):
    try:
        return kind(text)
    except ValueError:
        word = "an integer" if kind is int else "a number"
        raise ConfigError(f"{where}: {key} must be {word}, got {text!r}") from None


def _check_range(value, metadata, where: str, key: str) -> None:
    if "range" not in metadata:
        return
    lo, hi, lo_open = metadata["range"]
    if lo is not None and (value < lo or (lo_open and value == lo)):
        op = ">" if lo_open else ">="
        raise ConfigError(f"{where}: {key} = {value!r} must be {op} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where}: {key} = {value!r} must be <= {hi}")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
