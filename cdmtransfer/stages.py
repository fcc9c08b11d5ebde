"""What the two training stages (theory.md §1.4) share: the DSM objective, score models, encoders (new, fresh,
loaded from a pretrain export), the source heads a new head can start from, and the run bookkeeping.

pretraining.py: joint DSM over the K source tasks, in the shared encoder h and the K heads f_1..f_K.
adaptation.py:  DSM on m target samples with a new head f_0 and an encoder that is
                frozen (the pretrained ĥ; the paper's fine-tuning estimator), finetune (ĥ trained too, at a learning
                rate cross-validation chooses, 0 included), auto (frozen, finetune or scratch and the head's start,
                chosen by cross-validation), scratch (a fresh encoder; the paper's baseline) or oracle (frozen with the
                suite's true h* in place of ĥ, its source heads pretrained on h*: the ceiling of any learned
                representation).
Both run the one loop in train.py and end with an exported EMA model and metrics in MLflow.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from cdmtransfer.checkpoint import list_checkpoints, load_export, read_meta
from cdmtransfer.config import Config, flatten
from cdmtransfer.diffusion import OUProcess, dsm_loss, model_dsm_terms
from cdmtransfer.distributed import Dist
from cdmtransfer.errors import ConfigError, DataError, one_line
from cdmtransfer.models import ConvEncoder, FixedEncoder, MLPEncoder, ScoreModel, head_options, rebuild
from cdmtransfer.progress import Progress
from cdmtransfer.tasks import TaskSet
from cdmtransfer.tracking import TAG, Tracker, find_model_dir, register_model


def setup_torch(cfg: Config) -> torch.device:
    # One thread by default: for these small networks intra-op threading costs more than it gains, and with other
    # processes on the cores (parallel sweeps, make -j) spinning OpenMP threads slow tiny ops by 100x or more.
    torch.set_num_threads(cfg.threads or 1)
    torch.set_flush_denormal(True)  # Adam's second moments underflow to subnormals, which are ~100x slower on CPU
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = cuda but no CUDA device is available (use --set device=cpu)")
    return torch.device(cfg.device)


def dsm_objective(x: torch.Tensor, y: torch.Tensor, counts: torch.Tensor, process: OUProcess, batch: int,
                  regularizer=None, shard: Dist = Dist(), repeat: int = 1):
    """Per-sample DSM losses [K, batch] on a fresh batch from every task at once (theory.md §1.4).

    x [K, n_max, d_x], y [K, n_max, D_y], counts [K]: each task draws `batch` rows uniformly from its own n_k.
    `regularizer` (regularizers.RegularizedObjective), when given, returns DSM plus its terms per sample instead.
    Under torchrun every rank draws the same global batch and keeps its slice `shard.rank::shard.world`.
    `repeat` = G: the model stacks G candidates of K heads; all G see the same rows, times and noise (common random
    numbers: the draws are those of a run of K heads alone), and the losses are [G·K, batch]. loss_fn.repeat may
    drop later to the candidates still running (`_run_only`).
    """
    K, _, d_x = x.shape
    tile = lambda a: a.repeat(loss_fn.repeat, *([1] * (a.dim() - 1))) if loss_fn.repeat > 1 else a  # noqa: E731

    def loss_fn(model: ScoreModel, gen: torch.Generator) -> torch.Tensor:
        idx = (torch.rand(K, batch, generator=gen, device=x.device) * counts[:, None]).long()
        x0 = torch.gather(x, 1, idx[..., None].expand(-1, -1, d_x))
        yb = torch.gather(y, 1, idx[..., None].expand(-1, -1, y.shape[-1]))
        t = process.sample_t((K, batch), gen, device=x.device)
        noise = torch.randn(x0.shape, generator=gen, device=x.device)
        if shard.active:
            part = slice(shard.rank, None, shard.world)
            x0, yb, t, noise = x0[:, part], yb[:, part], t[:, part], noise[:, part]
        x0, yb, t, noise = tile(x0), tile(yb), tile(t), tile(noise)
        if regularizer is not None:
            return regularizer(model, x0, yb, t, noise, gen)
        return training_loss(model, x0, yb, t, noise, process)

    loss_fn.repeat = repeat
    return loss_fn


def training_loss(model, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                  process: OUProcess) -> torch.Tensor:
    """Per-sample loss [K, B] of one batch: the DSM (theory.md §1.4; EDM-weighted or not), plus the linear mean's
    least squares when the model has one (models.ScoreModel.mean_fit_loss). `model` may be wrapped (DDP)."""
    net, x_t = getattr(model, "module", model), process.perturb(x0, t, noise)
    if net is model:
        return model_dsm_terms(model, x0, x_t, y, t, noise)[0]
    # DDP: the forward goes through the wrapper, which syncs the gradients
    loss = net.dsm_weight(t) * dsm_loss(model(x_t, y, t), noise)
    if net.linear_mean:
        with torch.no_grad():
            code = net.encoder(y)
        loss = loss + net.mean_fit_loss(code, x0)
    return loss


def score_model(cfg: Config, encoder: torch.nn.Module, K: int, taskset: TaskSet, x_train: torch.Tensor,
                sigma_data: float | None = None) -> ScoreModel:
    """A ScoreModel with the recipe's heads and parametrisation; σ_d² is the per-coordinate second moment of the
    stage's own training x (models.Preconditioning) unless given."""
    m = cfg.model
    sigma_data = resolve_scale(sigma_data, x_train)
    model = ScoreModel(encoder, K, taskset.d_x, m.head_width, m.head_depth, m.time_dim,
                       **head_options(m, taskset.image_shape), parametrization=m.parametrization,
                       sigma_data=sigma_data, linear_mean=m.linear_mean, mean_covariance=m.mean_covariance)
    model.edm_weighting = m.edm_weighting
    return model


def progress_for(cfg_steps: int, label: str, quiet: bool) -> Progress:
    return Progress(total=cfg_steps, label=label, enabled=not quiet)


def check_resume(run_dir: Path, cfg: Config, stage: str) -> None:
    found = list_checkpoints(run_dir / "checkpoints") or list_checkpoints(run_dir / "checkpoints-cv")
    if not found:
        raise ConfigError(f"--resume: run has no checkpoint under {run_dir / 'checkpoints'}")
    meta = read_meta(found[-1])
    if meta.get("stage") != stage:
        raise ConfigError(f"--resume: that run is a {meta.get('stage')} run, not {stage}")
    if not isinstance(meta.get("config"), dict):
        raise DataError(f"{found[-1]}: checkpoint holds no config")
    stored = flatten({k: v for k, v in meta["config"].items() if k != "tracking"})
    now = flatten({k: v for k, v in cfg.to_dict().items() if k != "tracking"})
    diff = sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))
    if diff:
        where = one_line(", ".join(diff[:5]))  # keys from the checkpoint's file: any text
        raise ConfigError(f"--resume: the recipe differs from the run being resumed at {where}")


def finish_run(run, model_dir: Path, cfg: Config, stage: str) -> str | None:
    if not cfg.tracking.log_artifacts:
        return None
    run.log_artifacts(model_dir, "model")
    model_id = register_model(run, model_dir, f"{cfg.name}-{stage}", {"stage": stage})
    if model_id:
        run.set_tags({TAG + "model_id": model_id})
    return model_id


@dataclass
class SourceHeads:
    """The pretrained model's spec and EMA weights: its K source heads can start the target head (head_init)."""

    spec: dict
    weights: dict


def load_encoder(tracker: Tracker, source: str, taskset: TaskSet, cfg: Config,
                 h_star: FixedEncoder | None = None) -> tuple[torch.nn.Module, dict, SourceHeads]:
    """The pretrained encoder ĥ from a run id, an MLflow URI or a local path, checked against the recipe; with
    its lineage and the source heads. `h_star` (--mode oracle): the encoder must be this h*, fixed."""
    with tempfile.TemporaryDirectory(prefix="cdmtransfer-") as tmp:
        model_dir, run_id = find_model_dir(tracker, source, Path(tmp))
        weights, meta = load_export(model_dir)
    spec = meta["model"].get("encoder") if isinstance(meta.get("model"), dict) else None
    if h_star is not None and isinstance(spec, dict) and spec.get("kind") != "fixed":
        raise ConfigError(f"--encoder {source}: --mode oracle adapts a pretrain on the suite's h* (cdmtransfer "
                          f"pretrain RECIPE --set model.encoder=oracle --set model.d={h_star.d}), not a learned encoder")
    encoder, heads = encoder_from_export(weights, meta, source, taskset.D_y, cfg.model.d)
    if h_star is not None and not _same_h_star(encoder, h_star):
        raise ConfigError(f"--encoder {source}: its fixed encoder is not this suite's h* (another suite setting)")
    lineage = {"encoder_source": source, "pretrain_run_id": run_id or str(meta.get("run_id", ""))}
    return encoder, lineage, heads


def _same_h_star(encoder: torch.nn.Module, h_star: FixedEncoder) -> bool:
    return (isinstance(encoder, FixedEncoder) and encoder.activation == h_star.activation
            and torch.equal(encoder.weight, h_star.weight) and torch.equal(encoder.bias, h_star.bias))


def encoder_from_export(weights: dict, meta: dict, source: str, D_y: int,
                        d: int) -> tuple[torch.nn.Module, SourceHeads]:
    """The encoder of an exported model (weights, meta.json), checked to take D_y and give d; and its source heads."""
    model = meta.get("model")
    spec = model.get("encoder") if isinstance(model, dict) else None
    if isinstance(model, dict) and "ensemble" in model:
        raise ConfigError(f"{source}: an ensemble of adapted models has no one encoder to start from; give one of "
                          f"its pretrains (its tag cdmtransfer.pretrain_run_ids)")
    if not spec or not isinstance(spec, dict):
        raise ConfigError(f"{source}: checkpoint holds no encoder")
    if spec.get("D_y") != D_y:
        raise ConfigError(f"{source}: encoder takes D_y = {spec.get('D_y')} but the recipe's suite has D_y = {D_y}")
    if spec.get("d") != d:
        raise ConfigError(f"{source}: encoder outputs d = {spec.get('d')} but the recipe has model.d = {d} "
                          f"(use --set model.d={spec.get('d')})")
    encoder = rebuild(spec, source, "encoder")
    state = {k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")}
    try:
        encoder.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"{source}: encoder weights do not fit ({str(exc).splitlines()[0]})") from None
    return encoder, SourceHeads(model, weights)


def new_encoder(cfg: Config, taskset: TaskSet) -> torch.nn.Module:
    """A fresh encoder h per model.encoder: an MLP on y, a small CNN on y viewed as the suite's condition image, or
    the suite's true h* (fixed: buffers only)."""
    m = cfg.model
    if m.encoder == "oracle":
        truth = taskset.truth.encoder()
        if truth is None:
            raise ConfigError(f"model.encoder = oracle: suite '{taskset.name}' has no true representation h*")
        if truth.d != m.d:
            raise ConfigError(f"model.encoder = oracle: the suite's h* has d = {truth.d}, the recipe model.d = {m.d} "
                              f"(use --set model.d={truth.d})")
        return truth
    if m.encoder == "conv":
        if taskset.condition_shape is None:
            raise ConfigError(f"model.encoder = conv needs image conditions; suite '{taskset.name}' has none "
                              f"(use model.encoder=mlp)")
        return ConvEncoder(taskset.D_y, m.d, m.encoder_width, m.encoder_depth, taskset.condition_shape)
    return MLPEncoder(taskset.D_y, m.d, m.encoder_width, m.encoder_depth, m.encoder_linear)


def fresh_encoder(cfg: Config, taskset: TaskSet) -> torch.nn.Module:
    """The new encoder scratch trains (and auto's scratch candidate: the same weights), seeded by cfg.seed."""
    torch.manual_seed(cfg.seed + 1)
    return new_encoder(cfg, taskset)


def compared_with(cv: list, chosen: int) -> tuple[int, int]:
    """For a choice's reason among candidates' (loss, step): the lowest loss, and the candidate the chosen one is
    compared with (the lowest when it was not chosen, else the next lowest)."""
    best = min(range(len(cv)), key=lambda g: cv[g][0])
    return best, best if best != chosen else min((g for g in range(len(cv)) if g != chosen), key=lambda g: cv[g][0])


def stop_finished(model: ScoreModel, copies: int, loss_fn, clip, sd: torch.Tensor | None = None):
    """on_step for G stacked candidates of `copies` heads each: a candidate that stopped stops computing (its best
    loss, step and weights were kept when it stopped). `sd`: every head's σ_d when candidates differ, else None."""
    def on_step(done, val, ema):
        live = [g for g, c in enumerate(val.candidates or []) if not c[3]]
        if live and len(live) < loss_fn.repeat:
            _run_only(model, live, copies, loss_fn, clip, sd)

    return on_step


def _run_only(model: ScoreModel, live: list[int], copies: int, loss_fn, clip, sd: torch.Tensor | None = None) -> None:
    """From now on only candidates `live` of a stacked cross-validation run (forward, backward, loss): each is
    unaffected, since the candidates share draws and clip their own gradients; a stopped one's weights take
    optimizer steps without gradients, which nothing reads (its best loss and step were kept when it stopped).
    Conv / U-Net heads have no head subset: every candidate runs to the end."""
    if not hasattr(model.heads, "active"):
        return
    G = len(model.encoder.parts)
    device = next(model.heads.parameters()).device
    model.heads.active = torch.cat([torch.arange(g * copies, (g + 1) * copies) for g in live]).to(device)
    if sd is not None:
        model.precond.sd = sd[model.heads.active]
    model.encoder.sizes = [copies if g in live else 0 for g in range(G)]
    loss_fn.repeat = clip.count = len(live)


def resolve_scale(sigma: float | None, x: torch.Tensor) -> float:
    """A model's σ_d: `sigma`, else the RMS of its training x (score_model's rule)."""
    return float(sigma) if sigma is not None else float(x.pow(2).mean().sqrt().clamp_min(1e-3))


def set_heads(model: ScoreModel, state: dict, into) -> None:
    """Copy the heads of a model of len(into) heads (its heads' state_dict) into heads `into` of `model`."""
    own = model.heads.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            blocks = own[name].view(model.heads.K, -1)  # head tensors are K blocks along dim 0 (see load_head)
            blocks[torch.tensor(list(into))] = tensor.reshape(len(into), -1).to(blocks)


def load_head(model: ScoreModel, source: SourceHeads, task: int, into=None) -> None:
    """Copy source head `task` (1..K) into the heads of `model` listed in `into` (default: every head); each stacked
    head tensor is K blocks along dim 0."""
    K_src = source.spec["K"]
    heads = {k[len("heads."):]: v for k, v in source.weights.items() if k.startswith("heads.")}
    own = model.heads.state_dict()
    source_linear = bool(source.spec.get("linear_mean", False))
    if source_linear != model.linear_mean:
        was = str(source_linear).lower()
        raise ConfigError(f"adapt.head_init = source: the pretrained heads have model.linear_mean = {was}; use "
                          f"--set model.linear_mean={was} (or adapt.head_init=random)")
    source_cov = source.spec.get("mean_covariance", "scalar")
    if source_cov != ("full" if model.full_covariance else "scalar"):
        raise ConfigError(f"adapt.head_init = source: the pretrained heads have model.mean_covariance = {source_cov}; "
                          f"use --set model.mean_covariance={source_cov} (or adapt.head_init=random)")
    if source.spec.get("parametrization", "eps") != model.parametrization or set(heads) != set(own):
        raise ConfigError("adapt.head_init = source: the pretrained heads differ from the recipe's (head kind, "
                          "sizes or model.parametrization); use adapt.head_init=random")
    out = {}
    for name, tensor in heads.items():
        block = tensor.reshape(K_src, -1, *tensor.shape[1:])[task - 1]
        target = own[name]
        if block.numel() * model.heads.K != target.numel():
            raise ConfigError(f"adapt.head_init = source: head tensor {name} has another shape in the pretrained "
                              f"model; use adapt.head_init=random")
        blocks = target.detach().clone().reshape(model.heads.K, *block.shape)
        blocks[torch.tensor(list(range(model.heads.K) if into is None else into))] = block
        out[name] = blocks.reshape(target.shape)
    model.heads.load_state_dict(out)

