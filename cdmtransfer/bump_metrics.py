"""Measurements for the Gaussian-bump suite (companions.md §B.2): centre accuracy, encoder geometry, percolation.

- centre accuracy: a generated image is correct when it holds exactly one bump (one connected component above half
  its maximum) whose estimated centre lies within 1 pixel (Euclidean, wrapped when periodic) of the condition's.
- encoder diagnostics on h over a grid of centres: PCA participation ratio (Σλ)²/Σλ², x-on-y orthogonality
  |cos(Δx(p), Δy(p))| and x-on-x / y-on-y parallelism cos(Δx(μx, μy), Δx(μx, μy′)), as means.
- percolation: largest-cluster fraction of kept lattice sites, connected when the normalised overlap of their bumps
  exp(−Δ²/(4σ²)) exceeds τ, i.e. Δ < 2σ√(ln 1/τ).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _refine(profile: np.ndarray, i: int) -> float:
    """Sub-pixel peak of a 1-D profile at index i: a parabola through the log of three points (exact for Gaussians)."""
    if i == 0 or i == len(profile) - 1:
        return float(i)
    lm, l0, lp = np.log(np.maximum(profile[i - 1: i + 2], 1e-12))
    curvature = lm - 2 * l0 + lp
    if curvature >= 0:
        return float(i)
    return i + float(np.clip((lm - lp) / (2 * curvature), -1, 1))


def find_bumps(pix: torch.Tensor, periodic: bool, floor: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Per image [B, N, N] (pixels in [0, 1], image[v, u] with u ↔ μx): number of bumps [B] and centre [B, 2].

    Bumps: connected components (8-neighbour) of pixels above half the maximum; an image whose maximum is below
    `floor` has none. Centre: the peak of each axis's marginal profile (minus its minimum), refined in log space,
    which is exact for a Gaussian bump and for the sum of stripes. Periodic images are rolled to put the maximum in
    the middle first, so a bump split across the border counts once.
    """
    from scipy import ndimage

    imgs = pix.detach().cpu().numpy()
    B, N, _ = imgs.shape
    counts = np.zeros(B, dtype=int)
    centres = np.full((B, 2), np.nan)
    for b in range(B):
        img = imgs[b]
        peak = img.max()
        if peak < floor:
            continue
        shift = np.zeros(2, dtype=int)
        if periodic:
            v0, u0 = np.unravel_index(img.argmax(), img.shape)
            shift = np.array([N // 2 - u0, N // 2 - v0])
            img = np.roll(img, (shift[1], shift[0]), axis=(0, 1))
        _, counts[b] = ndimage.label(img > 0.5 * peak, structure=np.ones((3, 3)))
        for axis, prof in enumerate((img.sum(0), img.sum(1))):  # axis 0: μx from columns, 1: μy from rows
            prof = prof - prof.min()
            c = _refine(prof, int(prof.argmax())) - shift[axis]
            centres[b, axis] = c % N if periodic else c
    return counts, centres


def centre_errors(found: np.ndarray, true: np.ndarray, N: int, periodic: bool) -> np.ndarray:
    """Euclidean distance between estimated and true centres [B], with wrapped differences when periodic."""
    d = found - true
    if periodic:
        d = (d + N / 2) % N - N / 2
    return np.sqrt((d**2).sum(-1))


def centre_accuracy(pix: torch.Tensor, true: np.ndarray, N: int, periodic: bool, tol: float = 1.0) -> float:
    """Fraction of images with exactly one bump within `tol` pixels of its true centre (companions.md §B.2)."""
    counts, found = find_bumps(pix, periodic)
    ok = (counts == 1) & (np.nan_to_num(centre_errors(found, true, N, periodic), nan=np.inf) <= tol)
    return float(ok.mean())


def participation_ratio(h: torch.Tensor) -> float:
    """Effective dimension of points h [P, d]: (Σλ)²/Σλ² over the eigenvalues of their covariance."""
    lam = torch.linalg.eigvalsh(torch.cov(h.T.double()).reshape(h.shape[1], h.shape[1])).clamp_min(0)
    return float(lam.sum() ** 2 / lam.pow(2).sum().clamp_min(1e-30))


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)


def factorisation(h: torch.Tensor) -> dict[str, float]:
    """Geometry of h on a grid, h [Gx, Gy, d] (index i ↔ μx, j ↔ μy), companions.md §B.2."""
    dx = h[1:, :] - h[:-1, :]  # Δx(p) = h(μx + δ, μy) − h(p): [Gx−1, Gy, d]
    dy = h[:, 1:] - h[:, :-1]  # [Gx, Gy−1, d]
    ortho = _cos(dx[:, :-1], dy[:-1, :]).abs().mean()  # same base point p
    par_x = _cos(dx[:, :, None], dx[:, None, :])  # Δx at (μx, μy) vs (μx, μy′): [Gx−1, Gy, Gy]
    par_y = _cos(dy[:, None], dy[None, :])  # Δy at (μx, μy) vs (μx′, μy): [Gx, Gx, Gy−1]
    off_x = ~torch.eye(par_x.shape[1], dtype=torch.bool)[None]
    off_y = ~torch.eye(par_y.shape[0], dtype=torch.bool)[..., None].expand_as(par_y)
    return {"h_effective_dim": participation_ratio(h.reshape(-1, h.shape[-1])),
            "h_xy_orthogonality": float(ortho),
            "h_xx_parallelism": float(par_x[off_x.expand_as(par_x)].mean()),
            "h_yy_parallelism": float(par_y[off_y].mean())}


def connection_radius(sigma: float, tau: float = 0.005) -> float:
    """Distance below which two bumps' normalised overlap exp(−Δ²/(4σ²)) exceeds τ: 2σ√(ln 1/τ)."""
    return 2 * sigma * math.sqrt(math.log(1 / tau))


def largest_cluster_fraction(sites: np.ndarray, radius: float, periodic_N: float | None = None) -> float:
    """Size of the largest connected cluster / number of sites, linking sites closer than `radius` ([P, 2])."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    P = len(sites)
    if P == 0:
        return 0.0
    box = periodic_N if periodic_N else None
    pairs = cKDTree(np.mod(sites, box) if box else sites, boxsize=box).query_pairs(radius * (1 - 1e-9),
                                                                                   output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(P, P))
    _, labels = connected_components(graph, directed=False)
    return float(np.bincount(labels).max() / P)


def percolation_curve(L: int, sigma: float, lambdas, tau: float = 0.005, spacing: float = 1.0, reps: int = 5,
                      seed: int = 0) -> list[float]:
    """Mean largest-cluster fraction on an L×L lattice with a fraction λ of sites kept, for each λ (§B.2 table)."""
    rng = np.random.default_rng(seed)
    grid = spacing * np.stack(np.meshgrid(np.arange(L), np.arange(L), indexing="ij"), -1).reshape(-1, 2)
    out = []
    for lam in lambdas:
        keep = max(1, round(lam * len(grid)))
        fr = [largest_cluster_fraction(grid[rng.choice(len(grid), keep, replace=False)],
                                       connection_radius(sigma, tau)) for _ in range(reps)]
        out.append(float(np.mean(fr)))
    return out
