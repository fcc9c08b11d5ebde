"""Typed recipe configuration: dataclasses from YAML, `--set a.b=v` overrides, validation with did-you-mean.

Precedence: dataclass defaults < recipe YAML < `--set` overrides < explicit CLI flags. Validation happens once, here;
everything downstream receives a `Config` it can trust. Values are parsed with `yaml.safe_load` only: a recipe can
never name a class or run code.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from cdmtransfer.errors import ConfigError
from cdmtransfer.typed import from_dict, value_range

MODES = ("frozen", "finetune", "auto", "scratch", "oracle")
PRETRAINED_MODES = ("frozen", "finetune", "auto")  # the modes that adapt a pretrained encoder and heads
# the modes that start from a pretrain run: the learned encoder's (PRETRAINED_MODES), or oracle's pretrain on h*
FROM_PRETRAIN = (*PRETRAINED_MODES, "oracle")
_range = value_range  # field metadata: allowed numeric range
_SEED = _range(0, 2**62)  # torch and numpy take non-negative 64-bit seeds; offsets (seed + 17, ...) stay inside


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
    # the exact reference posterior (LangevinTruth: posterior_mean_mse_floor, sliced_w2) by batched MCMC
    mcmc_method: Literal["hmc", "mala"] = "hmc"  # hmc: 3 leapfrog steps per iteration
    mcmc_chains: int = field(default=16, metadata=_range(2))  # chains per condition
    mcmc_warmup: int = field(default=150, metadata=_range(2))  # iterations adapting the step size (discarded)
    mcmc_steps: int = field(default=256, metadata=_range(4))  # iterations kept per chain
    mcmc_cache: bool = True  # cache results under tracking.home/cache/langevin-mcmc


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
class DigitsSuite:
    """Restoration on sklearn's 8×8 digits (theory.md §4.2 at digit scale): x clean, y = degraded x.

    Pixels are scaled to [0, 1], degraded there, and both x and y mapped to [−1, 1] (x = 2p − 1); every noise std
    below is in the [0, 1] pixel scale. Sources: the digits in `sources`; target: `target`.
    """

    degradation: Literal["noise", "blur", "inpaint", "downsample"] = "noise"
    noise_std: float = field(default=0.5, metadata=_range(0.0, lo_open=True))  # 'noise': y = x + N(0, std²)
    extra_noise: float = field(default=0.05, metadata=_range(0.0))  # small noise added after blur/inpaint/downsample
    blur_sigma: float = field(default=1.0, metadata=_range(0.0, lo_open=True))  # Gaussian kernel width, pixels
    mask_fraction: float = field(default=0.5, metadata=_range(0.0, 1.0))  # 'inpaint': fraction of pixels missing
    mask_channel: bool = True  # 'inpaint': y = [masked image, mask] (2·H·W dims) instead of the masked image only
    sources: list[int] = field(default_factory=lambda: list(range(1, 10)))
    target: int = 0


@dataclass
class MnistSuite(DigitsSuite):
    """The same restoration tasks on MNIST read from a local file (IDX pair or .npz x_train/y_train); no download."""

    # directory with train-images-idx3-ubyte[.gz] + train-labels-idx1-ubyte[.gz] (or train-images.idx3-ubyte ...)
    path: str = ""  # or an .npz with x_train, y_train


@dataclass
class BumpsSuite:
    """Gaussian-bump images conditioned on the centre (companions.md §B.1); sources differ in bump width σ."""

    N: int = field(default=16, metadata=_range(4))  # images are N×N
    spacing: float = field(default=0.5, metadata=_range(0.0, lo_open=True))  # centre lattice spacing, pixels
    density: float = field(default=1.0, metadata=_range(0.0, 1.0, lo_open=True))  # λ: fraction of lattice kept
    source_sigmas: list[float] = field(default_factory=lambda: [0.75, 1.0, 1.5, 2.0])  # one source task per σ
    target_sigma: float = field(default=1.25, metadata=_range(0.0, lo_open=True))
    rendering: Literal["bump", "sos"] = "bump"  # sources: one bump, or sum of stripes
    target_rendering: Literal["same", "bump", "sos"] = "same"
    periodic: bool = False  # wrapped distances: the data manifold is a torus
    margin: float = field(default=1.0, metadata=_range(0.0))  # non-periodic: centres in [margin, N − 1 − margin]
    D_y: int = field(default=2, metadata=_range(2))  # raw condition: (μx, μy) itself, or embedded (tasks/bumps.py)
    holdout_band: list[float] = field(default_factory=list)  # [lo, hi]: centres with lo ≤ μx ≤ hi are OOD only
    accuracy_conditions: int = field(default=64, metadata=_range(1))  # conditions each for ID / OOD accuracy
    accuracy_samples: int = field(default=2, metadata=_range(1))  # samples per condition for accuracy


@dataclass
class LsgmmSuite:
    """Latent subspace GMM (companions.md §A.3, tasks/lsgmm.py): x = A z + B_k g + σ_n ε, y = M [z; u].

    Content z ~ GMM (shared), x-style g ~ N(0, I) in a task-specific subspace B_k, condition-side nuisance
    u ~ N(c_k, I) with a task-specific offset c_k; x | y is Gaussian (exact scores), h*(y) = z = M_zᵀ y.
    """

    d_x: int = field(default=16, metadata=_range(2))
    D_y: int = field(default=16, metadata=_range(2))
    k: int = field(default=2, metadata=_range(1))  # content dimension (= dim of h*)
    m_style: int = field(default=2, metadata=_range(1))  # x-style dimension per task (B_k) and y-nuisance dimension
    components: int = field(default=4, metadata=_range(1))  # GMM components of the content z
    spread: float = field(default=2.0, metadata=_range(0.0))  # GMM means ~ spread · N(0, I_k)
    scale: float = field(default=0.5, metadata=_range(0.0, lo_open=True))  # within-component std s
    noise: float = field(default=0.1, metadata=_range(0.0, lo_open=True))  # σ_n
    nuisance_shift: float = field(default=2.0, metadata=_range(0.0))  # ‖c_k‖ scale of the task offsets of u
    # latent: y = M [z; u] (condition-side latents). view: y = A z + B_k u + σ_n (I − AAᵀ) ε' is a second *view* of
    # the content in x-space (needs D_y = d_x; h*(y) = Aᵀy; the mix-and-match regulariser needs it).
    condition: Literal["latent", "view"] = "latent"


@dataclass
class SuiteConfig:
    name: Literal["gaussian", "langevin", "file", "digits", "mnist", "bumps", "lsgmm"] = "gaussian"
    # the task world (h*, maps, data, splits); the run seed does not change it
    seed: int = field(default=0, metadata=_SEED)
    K: int = field(default=8, metadata=_range(1))  # number of source tasks (synthetic suites)
    n: int = field(default=512, metadata=_range(1))  # samples per source task (synthetic suites)
    n_target_pool: int = field(default=2048, metadata=_range(1))  # target rows m is drawn from (synthetic)
    n_test: int = field(default=256, metadata=_range(1))  # held-out target pairs (synthetic suites)
    # k >= 1: source task k is the target and the other K − 1 are the sources (estimate's pseudo-targets,
    # tasks/holdout.py); 0: the suite's own target
    holdout: int = field(default=0, metadata=_range(0))
    gaussian: GaussianSuite = field(default_factory=GaussianSuite)
    langevin: LangevinSuite = field(default_factory=LangevinSuite)
    file: FileSuite = field(default_factory=FileSuite)
    digits: DigitsSuite = field(default_factory=DigitsSuite)
    mnist: MnistSuite = field(default_factory=MnistSuite)
    bumps: BumpsSuite = field(default_factory=BumpsSuite)
    lsgmm: LsgmmSuite = field(default_factory=LsgmmSuite)


@dataclass
class ModelConfig:
    d: int = field(default=4, metadata=_range(1))  # output dimension of the learned encoder h
    encoder_width: int = field(default=128, metadata=_range(1))
    encoder_depth: int = field(default=3, metadata=_range(1))  # hidden layers of h
    head_width: int = field(default=128, metadata=_range(1))
    head_depth: int = field(default=2, metadata=_range(1))  # hidden layers of each score head f_k
    time_dim: int = field(default=16, metadata=_range(2))  # sinusoidal time features (even)
    # conv: a small CNN on image conditions (digits, mnist); oracle: the suite's true h*, fixed (synthetic suites):
    # pretrain then fits only the source heads, and `adapt --mode frozen` on that run is frozen's limit with a perfect ĥ
    encoder: Literal["mlp", "conv", "oracle"] = "mlp"
    # mlp: also a linear path, h(y) = P y + c + MLP(y), that pretrain starts at the d-dimensional linear summary of y
    # best for every source's linear fit of x (head_start.linear_summary), the MLP's output at 0 (ignored for conv)
    encoder_linear: bool = True
    head: Literal["mlp", "conv", "unet"] = "mlp"  # conv: grouped-conv heads on image x (head_width = channels)
    # edm: preconditioned heads (unit-variance input and target at every t, EDM loss weight; models.Preconditioning);
    # eps: the head predicts the noise ε directly with the paper's σ²-weighted loss
    parametrization: Literal["edm", "eps"] = "edm"
    edm_weighting: bool = False  # edm: weight ‖ε̂ − ε‖² by w_t (unit-scale F-space loss); false: the paper's weighting
    # each head also learns a linear map μ_k(h(y)) (least squares on the code) and sees x_t centred on it: a
    # linear-Gaussian denoiser is its starting point and the network learns the rest (models.ScoreModel)
    linear_mean: bool = True
    # full: each head's linear-Gaussian start also has a covariance Σ_k (residual covariance of x around the linear
    # fit, in closed form), so F = 0 is x | y ~ N(μ_k(h(y)), Σ_k) (MLP heads with edm only); scalar: Σ_k = σ_d² I
    mean_covariance: Literal["full", "scalar"] = "full"
    # head = unet: U-Net heads (unet.py; head_width = channels of the first level, head_depth = residual blocks per
    # level) with a channel multiplier per resolution level, pixel patch p (0: 2 when both sides are >= 16, else 1),
    # optionally a zero-initialised output layer; head_sees_y: the condition y (an image of x's size, e.g. the noisy
    # digit) is also an input channel of the head, not only the encoder's
    unet_mults: list[int] = field(default_factory=lambda: [1, 2, 2])
    unet_patch: int = field(default=0, metadata=_range(0, 4))
    unet_zero_out: bool = False
    head_sees_y: bool = False


@dataclass
class DiffusionConfig:
    T0: float = field(default=0.01, metadata=_range(0.0, lo_open=True))  # early-stopping time
    T: float = field(default=4.0, metadata=_range(0.0, lo_open=True))  # horizon; α_T = e^{-T}


@dataclass
class TrainConfig:
    # A cap: training stops earlier when the validation loss stops improving (patience) and keeps the best EMA weights.
    steps: int = field(default=10000, metadata=_range(1))
    batch_size: int = field(default=128, metadata=_range(1))  # per task
    lr: float = field(default=2e-3, metadata=_range(0.0, lo_open=True))
    weight_decay: float = field(default=0.0, metadata=_range(0.0))
    grad_clip: float = field(default=1.0, metadata=_range(0.0))  # 0 disables clipping
    ema_decay: float = field(default=0.995, metadata=_range(0.0, 1.0))
    warmup_steps: int = field(default=50, metadata=_range(0))
    log_every: int = field(default=25, metadata=_range(1))
    checkpoint_every: int = field(default=500, metadata=_range(1))
    # Validation (train.py): held-out DSM of the EMA weights every val_every steps, with val_draws fixed noise draws per
    # held-out row; stop after `patience` checks without a relative improvement of min_delta. patience 0: no early stop
    # (the best checkpoint is still kept).
    val_every: int = field(default=100, metadata=_range(1))
    patience: int = field(default=8, metadata=_range(0))
    min_delta: float = field(default=1e-3, metadata=_range(0.0))
    # ... and, where the validation is scored row by row, by more than min_delta_se standard errors of the gain (its
    # paired row-by-row difference from the best): an improvement smaller than its own noise does not count
    min_delta_se: float = field(default=0.0, metadata=_range(0.0))
    val_draws: int = field(default=16, metadata=_range(1))
    val_fraction: float = field(default=0.1, metadata=_range(0.0, 0.5))  # pretrain: rows held out per source task


@dataclass
class PretrainConfig(TrainConfig):
    # weight_decay applies to the heads; the encoder's own decay: null compares encoder_decay_grid by the held-out DSM
    # and keeps the best (pretraining._pretrain_loop: the first value alone, the others stacked where it learned past its
    # start); a value pins it. A pretrain that overfits its source rows learns a worse ĥ without it (README, "The
    # encoder's weight decay, chosen by validation").
    encoder_decay: Optional[float] = field(default=None, metadata=_range(0.0))
    encoder_decay_grid: list[float] = field(default_factory=lambda: [0.0, 0.3, 1.0])


@dataclass
class AdaptConfig(TrainConfig):
    # steps (a cap; cross-validation chooses the length), batch_size (draws per step from the m samples, with
    # replacement) and lr (the head's): null follows the m-aware rule of `adapt_defaults`; a value pins it.
    steps: Optional[int] = field(default=None, metadata=_range(1))
    batch_size: Optional[int] = field(default=None, metadata=_range(1))
    lr: Optional[float] = field(default=None, metadata=_range(0.0, lo_open=True))
    val_every: int = field(default=25, metadata=_range(1))  # small m overfits within a few hundred steps
    # checks without improvement that end a fold model; null: the m-aware rule (`adapt_defaults`)
    patience: Optional[int] = field(default=None, metadata=_range(0))
    # a few held-out samples make a noisy check: a step must beat the best (at first the closed-form start) by more
    # than one standard error of its gain to be chosen
    min_delta_se: float = field(default=1.0, metadata=_range(0.0))
    # frozen: ĥ fixed (the paper's estimator); finetune: ĥ trained too, its learning rate chosen by cross-validation;
    # auto: frozen, finetune (and the head's start) or scratch chosen by cross-validation; scratch; oracle: frozen
    # with the suite's true h* in place of ĥ (a pretrain on h*, `oracle_config`): the ceiling of any learned
    # representation
    mode: Literal["frozen", "finetune", "auto", "scratch", "oracle"] = "frozen"
    m: int = field(default=32, metadata=_range(1))  # target samples
    # finetune/auto: the encoder's learning rate. null: chosen by cross-validation among encoder_lr_grid × lr
    # (0 = the encoder stays frozen, so validation can always fall back to frozen); a value pins it.
    encoder_lr: Optional[float] = field(default=None, metadata=_range(0.0))
    encoder_lr_grid: list[float] = field(default_factory=lambda: [0.0, 0.03, 0.1, 0.3])
    # finetune/auto choose the simplest setting (frozen encoder first, then the lowest encoder rate; the source-started
    # head before a random one) whose cross-validated DSM is within this relative margin of the lowest
    select_margin: float = field(default=0.03, metadata=_range(0.0))
    # Adapt chooses its length by cross-validation on the m samples (adaptation.py): val_folds fold models train at once,
    # each validated on its held-out fold, and the final model retrains on all m for the step the folds chose.
    # 1: no cross-validation, the final model trains to the cap (reported as not converged).
    val_folds: int = field(default=4, metadata=_range(1))
    # frozen/finetune/auto: start the new head from the source head with the lowest DSM on the m samples (source),
    # or from a random initialisation (random). null: source, and auto tries both and keeps the better by validation.
    head_init: Optional[Literal["source", "random"]] = None
    # auto: also try a new encoder trained on the m samples (scratch, started by its closed form), chosen only when
    # cross-validation prefers it: a target outside the sources' span can be learned better from scratch at large m
    auto_scratch: bool = True
    # finetune/auto: also try the pretrained encoder completed from the m samples, where the sources left code
    # directions empty and the samples fill one above the noise edge (head_start.complete_code: a target that needs a
    # direction no source reads)
    code_completion: bool = True


def oracle_config(cfg: "Config", d: int) -> "Config":
    """The recipe with the suite's true h* (of width d) as its encoder: what `--mode oracle` pretrains and adapts."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, encoder="oracle", d=d))


def adapt_defaults(m: int) -> dict:
    """The m-aware rule for the adapt keys a recipe leaves unset (null): batch size, learning rate, step cap,
    patience.

    - batch_size = clamp(m / 2, 64, 512): 64 draws per step up to m = 128 (each sample drawn several times per step,
      which averages the DSM noise over t and ε), then growing with m so the gradient noise keeps falling as more
      data allows a more precise fit;
    - lr = 2e-3 · √(batch_size / 64), at most 4e-3 (the head's; finetune's encoder rates are multiples of it): the
      square-root scaling of Adam's rate with the batch, so 2e-3 up to m = 128;
    - steps (a cap, and the horizon of the cosine schedule) = clamp(2000 · m / batch_size, 1000, 20000): about
      2000 passes over each sample; cross-validation chose 170–2100 passes (median ≈ 530) on the Gaussian suites at
      m = 8–128, the most at m = 8 where the 1000-step floor allows 8000, so the cap binds only for a run still
      improving;
    - patience = 4 checks up to m = 128, else 8: against 8 everywhere, all 144 cells of the Gaussian (3 suites),
      Langevin and digits sweeps at m ≤ 128 kept the same best step and result with 4, at 37–50% fewer
      cross-validation steps; at m = 512 one cell of 12 changed, a slow fine-tuning candidate still improving after 4
      quiet checks (README, "Patience").
    """
    batch = int(min(512, max(64, m // 2)))
    return {"batch_size": batch, "lr": min(4e-3, 2e-3 * math.sqrt(batch / 64)),
            "steps": int(min(20000, max(1000, round(2000 * m / batch)))), "patience": 4 if m <= 128 else 8}


def resolve_adapt(cfg: "Config") -> "Config":
    """cfg with adapt's unset (null) steps, batch_size, lr and patience filled by `adapt_defaults(adapt.m)`; pinned
    keys stay."""
    a = cfg.adapt
    rule = adapt_defaults(a.m)
    filled = {k: v for k, v in rule.items() if getattr(a, k) is None}
    return dataclasses.replace(cfg, adapt=dataclasses.replace(a, **filled)) if filled else cfg


@dataclass
class EvaluateConfig:
    t_draws: int = field(default=8, metadata=_range(1))  # noise levels per test pair for score errors
    posterior_samples: int = field(default=32, metadata=_range(1))  # N samples per condition for the mean
    posterior_conditions: int = field(default=100, metadata=_range(1))  # test conditions for posterior-mean MSE
    sampler: Literal["ode", "sde"] = "sde"
    sampler_steps: int = field(default=100, metadata=_range(2))
    dist_conditions: int = field(default=8, metadata=_range(1))  # conditions for the distribution distance
    dist_samples: int = field(default=256, metadata=_range(2))  # samples per condition for it
    # evaluation noise: the same for every mode, so modes compare on equal terms
    seed: int = field(default=1234, metadata=_SEED)
    # samples whose RMS spread about the target data's mean exceeds this multiple of the data's own (or that hold a
    # non-finite value) mark the model diverged: its sample-based metrics are flagged, not reported as results
    divergence_ratio: float = field(default=3.0, metadata=_range(1.0, lo_open=True))


@dataclass
class SweepConfig:
    modes: list[str] = field(default_factory=lambda: ["frozen", "finetune", "scratch", "oracle"])  # auto: on request
    m: list[int] = field(default_factory=lambda: [32])
    seeds: int = field(default=1, metadata=_range(1))
    # pretrained encoders (seeds seed, seed + 1000, ...): each pretrained-mode cell runs on every one of them, with the
    # same target subsets, so the table's spread includes the encoder's (the theory's source term varies with it)
    pretrain_seeds: int = field(default=1, metadata=_range(1))
    # train the cells that share a schedule (steps, batch, learning rate, folds) as one stacked model in one loop
    # (cells.py); false: one model and loop per cell, as before
    batch_cells: bool = True
    # at most this many heads (cells × candidates × folds) per stacked model: on CPU a unit's step is cheapest in
    # stacks of about 16–32 heads (benchmarks/bench_cells.py); larger groups are cut into several (a cell's completed
    # encoder, found after grouping, may add its folds beyond the cap)
    group_heads: int = field(default=32, metadata=_range(1))


@dataclass
class ConsistencyReg:
    """§D consistency (regularizers.py): λ_C · L_C from two short reverse chains t → max(t − hop, T0)."""

    weight: float = field(default=0.0, metadata=_range(0.0))  # λ_C; 0 = off
    hop_max: float = field(default=0.1, metadata=_range(0.0, lo_open=True))  # hop ~ Unif[0, hop_max], in t units
    steps: int = field(default=4, metadata=_range(1))  # Euler–Maruyama steps per chain
    fraction: float = field(default=0.25, metadata=_range(0.0, 1.0, lo_open=True))  # of each task's batch
    weighting: Literal["alpha2", "none"] = "alpha2"  # α_t² L_C (x_t-scale, bounded) or plain L_C (x₀-scale)


@dataclass
class MmdReg:
    """§C MMD² between codes h(y) in the batch and prior draws, kernel exp(−‖a−b‖²/d)."""

    weight: float = field(default=0.0, metadata=_range(0.0))
    prior: Literal["gaussian", "mixture"] = "gaussian"


@dataclass
class InfoReg:
    """§C anti-ignoring: weight · max(0, margin − (DSM with shuffled codes − DSM with matching codes))."""

    weight: float = field(default=0.0, metadata=_range(0.0))
    margin: float = field(default=1.0, metadata=_range(0.0))


@dataclass
class HsicReg:
    """§A HSIC(h(y), nuisance): 'task' (one-hot task id; pretrain only) or 'style' (the suite's known style)."""

    weight: float = field(default=0.0, metadata=_range(0.0))
    nuisance: Literal["task", "style"] = "task"


@dataclass
class MixmatchReg:
    """§A.2 style-guided mix-and-match: weight · ‖h(x̂₀^{k'}(x_t, h(y), t)) − h(y)‖² / tr Cov(h(y)), k' ≠ k a swapped
    head (pretrain; regularizers.py documents the reading).

    Needs D_y = d_x (h also reads x-space: suite.lsgmm.condition = view) and K ≥ 2 heads; with one head (adapt)
    there is no other style and the term is skipped. Rows with t > t_max get no penalty (null: every row).
    """

    weight: float = field(default=0.0, metadata=_range(0.0))
    t_max: Optional[float] = field(default=1.0, metadata=_range(0.0, lo_open=True))
    through_generation: bool = False  # also backpropagate into the swapped head's x̂₀ (default: into h only)
    normalize: bool = True  # divide by the codes' batch variance tr Cov(h(y)): scale-free (h cannot just shrink)
    swap: bool = True  # false: the row's own head k (no style swap; the multi-view invariance alone), an ablation


@dataclass
class RegularizeConfig:
    """Companion-paper terms added to the DSM loss (regularizers.py); every weight 0 = plain DSM.

    `stages` lists where the terms apply. MMD and HSIC act on the encoder only, so they are skipped where it is not
    trained (adapt frozen/oracle).
    """

    stages: list[str] = field(default_factory=lambda: ["pretrain", "adapt"])
    consistency: ConsistencyReg = field(default_factory=ConsistencyReg)
    mmd: MmdReg = field(default_factory=MmdReg)
    info: InfoReg = field(default_factory=InfoReg)
    hsic: HsicReg = field(default_factory=HsicReg)
    mixmatch: MixmatchReg = field(default_factory=MixmatchReg)


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
    seed: int = field(default=0, metadata=_SEED)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    threads: int = field(default=0, metadata=_range(0))  # torch intra-op threads; 0: one (best for small nets)
    suite: SuiteConfig = field(default_factory=SuiteConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    regularize: RegularizeConfig = field(default_factory=RegularizeConfig)
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
        if path.is_dir():
            raise ConfigError(f"{path}: is a directory, not a recipe file")
        if not path.is_file():
            raise ConfigError(f"{path}: recipe file not found")
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the recipe ({exc.strerror or exc})") from None
        data = _parse_yaml(text, str(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, item)
    cfg = from_dict(Config, data, where)
    check_consistency(cfg, where)
    return cfg


def _parse_yaml(text: str, where: str):
    """yaml.safe_load, with every failure as one ConfigError line: besides YAMLError, the safe loader raises
    ValueError (2001-13-01 as a date, !!int x), AttributeError (!!timestamp x) and RecursionError (deep nesting)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = str(getattr(exc, "problem", None) or exc).replace("\n", " ")
        raise ConfigError(f"{where}: not valid YAML{at}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML: nested too deeply") from None
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{where}: not valid YAML: {first}") from None


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
    grid = cfg.adapt.encoder_lr_grid
    if not grid or min(grid) < 0:
        raise ConfigError(f"{where}: adapt.encoder_lr_grid must be a non-empty list of multipliers >= 0, got {grid}")
    decays = cfg.pretrain.encoder_decay_grid
    if not decays or min(decays) < 0:
        raise ConfigError(f"{where}: pretrain.encoder_decay_grid must be a non-empty list of decays >= 0, got {decays}")
    for m in cfg.sweep.m:
        if m < 1:
            raise ConfigError(f"{where}: sweep.m has {m}, must be >= 1")
    if cfg.suite.name == "file" and not cfg.suite.file.path:
        raise ConfigError(f"{where}: suite.file.path is required when suite.name is 'file'")
    for stage in cfg.regularize.stages:
        if stage not in ("pretrain", "adapt"):
            raise ConfigError(f"{where}: regularize.stages has {stage!r}, not one of pretrain, adapt")
    if cfg.suite.name == "mnist" and not cfg.suite.mnist.path:
        raise ConfigError(f"{where}: suite.mnist.path is required when suite.name is 'mnist'")
    band = cfg.suite.bumps.holdout_band
    if band and (len(band) != 2 or band[0] > band[1]):
        raise ConfigError(f"{where}: suite.bumps.holdout_band must be [lo, hi] with lo <= hi, got {band}")


def apply_override(data: dict, item: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (safe)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set adapt.m=16")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except Exception:  # noqa: BLE001 (not YAML, or YAML the safe loader cannot build, e.g. a bad date: a string)
        value = raw
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


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
