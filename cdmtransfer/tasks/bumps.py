"""Gaussian-bump images conditioned on the bump centre (companions.md §B.1), as a transfer suite.

x: an N×N image (flattened, pixels p mapped to 2p − 1) of one Gaussian bump I(u, v) = exp(−((u−μx)² + (v−μy)²)/(2σ²))
or the sum of stripes (SOS) (exp(−(u−μx)²/(2σ²)) + exp(−(v−μy)²/(2σ²)))/2; u is the column, v the row. Centres lie on
a lattice of spacing `spacing` (in [margin, N−1−margin], or on the whole torus [0, N) with `periodic`, where distances
wrap); a fraction λ = `density` of the sites is kept for training, and sites with μx in `holdout_band` are never
trained on (they are the OOD conditions). x is a deterministic function of the centre, so p(x | y) is a point mass.

Tasks: source k renders with σ = source_sigmas[k] (K = their number); the target renders with `target_sigma` (and
`target_rendering`). All share h*(y) = (μx, μy) (scaled to [−1, 1]: μ̃ = 2μ/N − 1).

Raw condition y (D_y): for D_y = 2, y = μ̃. For D_y > 2, y = R f(μ) with R a fixed random orthogonal D_y×D_y matrix
and f(μ) = [μ̃x, μ̃y, sin/cos(2πjμx/N), sin/cos(2πjμy/N) for j = 1..⌊(D_y−2)/4⌋, zero padding]. f is nonlinear in μ
but its first two coordinates are μ̃ itself, so h*(y) = (Rᵀy)[:2] is *linear* in y and the oracle is a FixedEncoder
(models.py) with weight R[:, :2]ᵀ: the raw condition is high-dimensional and curved, the true representation exact.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cdmtransfer import bump_metrics, images
from cdmtransfer.config import BumpsSuite, Config
from cdmtransfer.errors import ConfigError
from cdmtransfer.models import FixedEncoder
from cdmtransfer.tasks.base import GroundTruth, TaskSet, stack_sources


def lattice(b: BumpsSuite) -> torch.Tensor:
    """All lattice centres [L, 2] as (μx, μy) in pixels."""
    if b.periodic:
        axis = torch.arange(0, b.N - 1e-9, b.spacing)
    else:
        axis = torch.arange(b.margin, b.N - 1 - b.margin + 1e-9, b.spacing)
    if axis.numel() == 0:
        raise ConfigError(f"suite.bumps: margin {b.margin} leaves no centres on a {b.N}-pixel side")
    mx, my = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([mx.reshape(-1), my.reshape(-1)], dim=1)


def render(centres: torch.Tensor, sigma: float, N: int, rendering: str = "bump", periodic: bool = False):
    """Pixel images [B, N, N] in [0, 1] (image[v, u], u ↔ μx) of a bump or SOS at each centre [B, 2]."""
    grid = torch.arange(N, dtype=torch.float32)
    du = grid[None, :] - centres[:, :1]  # [B, N] along u (columns)
    dv = grid[None, :] - centres[:, 1:]  # [B, N] along v (rows)
    if periodic:  # wrapped distance min(|Δ|, N − |Δ|)
        du = (du + N / 2) % N - N / 2
        dv = (dv + N / 2) % N - N / 2
    gu = torch.exp(-du**2 / (2 * sigma**2))
    gv = torch.exp(-dv**2 / (2 * sigma**2))
    if rendering == "sos":
        return (gv[:, :, None] + gu[:, None, :]) / 2
    return gv[:, :, None] * gu[:, None, :]


class BumpTruth(GroundTruth):
    """Knows the embedding y = R f(μ) and hence h*(y) = (Rᵀ y)[:2] = μ̃."""

    def __init__(self, R: torch.Tensor, b: BumpsSuite):
        self.R, self.b = R, b

    def embed(self, centres: torch.Tensor) -> torch.Tensor:
        N, D_y = self.b.N, self.R.shape[0]
        scaled = 2 * centres / N - 1
        feats = [scaled]
        for j in range(1, (D_y - 2) // 4 + 1):
            phase = 2 * math.pi * j * centres / N
            feats += [torch.sin(phase), torch.cos(phase)]
        f = torch.cat(feats, dim=1)
        f = torch.cat([f, torch.zeros(f.shape[0], D_y - f.shape[1])], dim=1)
        return f @ self.R.T

    def centres(self, y: torch.Tensor) -> torch.Tensor:
        return ((y @ self.R[:, :2]) + 1) * self.b.N / 2

    def encoder(self):
        return FixedEncoder(self.R[:, :2].T, torch.zeros(2), "identity")


def build(cfg: Config) -> TaskSet:
    s, b = cfg.suite, cfg.suite.bumps
    if not b.source_sigmas:
        raise ConfigError("suite.bumps.source_sigmas must name at least one σ")
    gen = torch.Generator().manual_seed(s.seed)
    D_y = b.D_y
    R = torch.eye(2) if D_y == 2 else torch.linalg.qr(torch.randn(D_y, D_y, generator=gen))[0]
    truth = BumpTruth(R, b)
    sites = lattice(b)
    in_band = torch.zeros(len(sites), dtype=torch.bool)
    if b.holdout_band:
        in_band = (sites[:, 0] >= b.holdout_band[0]) & (sites[:, 0] <= b.holdout_band[1])
    train_sites, ood_sites = sites[~in_band], sites[in_band]
    if len(train_sites) == 0:
        raise ConfigError(f"suite.bumps.holdout_band {b.holdout_band} leaves no training centres")
    keep = max(1, round(b.density * len(train_sites)))  # λ: the same kept sites for every task
    kept = train_sites[torch.randperm(len(train_sites), generator=gen)[:keep]]
    target_rendering = b.rendering if b.target_rendering == "same" else b.target_rendering

    def pairs(centres, sigma, rendering):
        x = images.to_model(render(centres, sigma, b.N, rendering, b.periodic)).view(len(centres), -1)
        return x, truth.embed(centres)

    def subset(centres, n):
        return centres[torch.randperm(len(centres), generator=gen)[:n]]

    xs, ys = zip(*(pairs(subset(kept, s.n), sig, b.rendering) for sig in b.source_sigmas))
    X, Y, n = stack_sources(list(xs), list(ys))
    pool_x, pool_y = pairs(subset(kept, s.n_target_pool), b.target_sigma, target_rendering)
    test_sites = subset(train_sites, s.n_test)  # ID: any lattice site outside the band
    test_x, test_y = pairs(test_sites, b.target_sigma, target_rendering)
    ood_test = subset(ood_sites, b.accuracy_conditions)

    # Diagnostics grid: the lattice thinned to at most 16 values per axis.
    axis = torch.unique(sites[:, 0])
    axis = axis[:: max(1, math.ceil(len(axis) / 16))]
    gx, gy = torch.meshgrid(axis, axis, indexing="ij")
    grid_y = truth.embed(torch.stack([gx.reshape(-1), gy.reshape(-1)], 1))

    def accuracy(draw, centres, generator):
        k = b.accuracy_samples
        x = draw(truth.embed(centres), k, generator).reshape(len(centres) * k, b.N, b.N)
        true = centres.repeat_interleave(k, 0).numpy()
        return bump_metrics.centre_accuracy(images.to_pixels(x), true, b.N, b.periodic)

    def extra_metrics(*, model, draw, seed, **_):
        g = torch.Generator().manual_seed(seed)
        out = {"centre_accuracy_id": accuracy(draw, test_sites[: b.accuracy_conditions], g)}
        if len(ood_test):
            out["centre_accuracy_ood"] = accuracy(draw, ood_test, g)
        with torch.no_grad():
            h = model.encoder(grid_y).view(len(axis), len(axis), -1)
        out.update(bump_metrics.factorisation(h))
        r = bump_metrics.connection_radius(b.target_sigma)
        out["train_largest_cluster"] = bump_metrics.largest_cluster_fraction(
            kept.numpy(), r, float(b.N) if b.periodic else None)
        return out

    def preview(y, samples, x_true):
        cols = [images.to_pixels(x_true).view(-1, b.N, b.N)] if x_true is not None else []
        cols += [images.to_pixels(samples[:, j]).view(-1, b.N, b.N) for j in range(samples.shape[1])]
        grid = torch.stack(cols, dim=1)  # rows: conditions; columns: [true,] samples
        labels = [f"({c[0]:.1f},{c[1]:.1f})" for c in truth.centres(y).tolist()]
        return grid, labels

    desc = (f"bumps {b.N}x{b.N} {b.rendering}, σ sources {b.source_sigmas} → target {b.target_sigma} "
            f"({target_rendering}), λ={b.density}, D_y={D_y}" + (", periodic" if b.periodic else "")
            + (f", OOD band μx∈{b.holdout_band}" if b.holdout_band else ""))
    return TaskSet("bumps", X, Y, n, pool_x, pool_y, test_x, test_y, truth, description=desc,
                   image_shape=(b.N, b.N), extra_metrics=extra_metrics, preview=preview)


def centre_of(taskset: TaskSet, y: torch.Tensor) -> np.ndarray:
    """True centres (pixels) of conditions y, for scripts and tests."""
    return taskset.truth.centres(y).numpy()
