"""Image helpers for the image suites: degradation operators y = A(x) + noise, PSNR, and PNG sample grids.

All operators are pure, batched torch functions on pixel images in the [0, 1] scale, shape [B, H, W]; noise comes
from an explicit generator. The suites map pixels p ∈ [0, 1] to model units x = 2p − 1 (see `to_model`), so a noise
std σ in pixels is 2σ in model units. Restoration setting of theory.md §4.2: y | x ~ N(x, σ² I) with σ = 0.5.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F


def to_model(p: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] → model units in [−1, 1]."""
    return 2 * p - 1


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Model units → pixels in [0, 1] (clamped, for display and PSNR)."""
    return ((x + 1) / 2).clamp(0, 1)


def add_noise(p: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """y = p + std·ε, ε ~ N(0, I) (theory.md §4.2 uses std = 0.5 on MNIST)."""
    return p + std * torch.randn(p.shape, generator=generator)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalised 2-D Gaussian kernel, radius ⌈3σ⌉ (sums to one, so blurring keeps mean intensity)."""
    radius = max(1, math.ceil(3 * sigma))
    u = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-u**2 / (2 * sigma**2))
    k = g[:, None] * g[None, :]
    return k / k.sum()


def blur(p: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with reflected borders (mass-preserving up to border effects): [B, H, W] → [B, H, W]."""
    k = gaussian_kernel(sigma)
    r = k.shape[0] // 2
    padded = F.pad(p[:, None], (r, r, r, r), mode="reflect" if r < min(p.shape[-2:]) else "replicate")
    return F.conv2d(padded, k[None, None])[:, 0]


def random_mask(shape, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Float mask [B, H, W] with exactly round(fraction·H·W) pixels per image set to 0 (missing), the rest 1."""
    B, H, W = shape
    drop = round(fraction * H * W)
    order = torch.rand(B, H * W, generator=generator).argsort(dim=1)
    mask = torch.ones(B, H * W)
    mask.scatter_(1, order[:, :drop], 0.0)
    return mask.view(B, H, W)


def inpaint(p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked image: observed pixels kept, missing pixels set to 0.5 (mid-grey, i.e. 0 in model units)."""
    return p * mask + 0.5 * (1 - mask)


def downsample(p: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Average-pool by `factor`, then nearest upsample back to [B, H, W] (H, W divisible by factor)."""
    low = F.avg_pool2d(p[:, None], factor)
    return F.interpolate(low, scale_factor=factor, mode="nearest")[:, 0]


def psnr(estimate: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, pixels in [0, 1] (peak 1): 10·log10(1 / MSE). Input [B, ...]."""
    mse = (estimate - clean).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


def save_grid(path: Path, images: torch.Tensor, row_labels: list[str] | None = None, title: str = "") -> Path:
    """Write a [R, C, H, W] grid of [0, 1] images as a PNG (matplotlib's object API, Agg, imported lazily).

    The images are tiled into one array, 1-pixel white gaps between them, and drawn as one image with the row
    labels as y tick labels: one axes instead of R·C (a 4 × 8 grid took ~1.4 s that way, drawn with every adapt
    run of an image suite)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    images = images.detach().cpu().clamp(0, 1)
    R, C, H, W = images.shape
    gap = 1
    padded = torch.ones(R, C, H + gap, W + gap)
    padded[:, :, :H, :W] = images
    canvas = padded.permute(0, 2, 1, 3).reshape(R * (H + gap), C * (W + gap))[:-gap, :-gap]  # [R·(H+1)−1, C·(W+1)−1]
    fig = Figure(figsize=(0.9 * C + 0.9, 0.9 * R + 0.3), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.9 / (0.9 * C + 0.9), 0.02, 1 - 1.0 / (0.9 * C + 0.9), 1 - 0.32 / (0.9 * R + 0.3)))
    ax.imshow(canvas.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    ax.set_xticks([])
    ax.set_yticks([i * (H + gap) + (H - 1) / 2 for i in range(R)] if row_labels else [])
    if row_labels:
        ax.set_yticklabels(row_labels, fontsize=7)
        ax.tick_params(axis="y", length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_preview(model, taskset, cfg, path: Path, conditions: int = 8, per_condition: int = 4,
                  seed: int = 0) -> Path | None:
    """Draw samples for the first test conditions and write the suite's preview grid; None if not an image suite."""
    if taskset.preview is None:
        return None
    from cdmtransfer.diffusion import OUProcess
    from cdmtransfer.metrics import conditional_samples

    n = min(conditions, taskset.test_y.shape[0])
    e = cfg.evaluate
    draws = conditional_samples(model, taskset.test_y[:n], per_condition, OUProcess(cfg.diffusion.T0, cfg.diffusion.T),
                                e.sampler_steps, e.sampler, torch.Generator().manual_seed(seed))
    grid, labels = taskset.preview(taskset.test_y[:n], draws, taskset.test_x[:n])
    return save_grid(path, grid, labels, title=taskset.description)
