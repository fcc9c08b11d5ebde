"""The score error a closed-form linear-Gaussian model reaches on a Gaussian suite: the limit beside frozen/oracle.

For each m and seed, the m target samples (the same subsets adapt draws) fit x | y ~ N(μ̂(f(y)), Σ̂) in closed form:
μ̂ ridge least squares of x on the features f(y) (GCV, references.ridge_gcv), Σ̂ either isotropic (the GCV error per
coordinate) or the residual covariance shrunk toward it (head_start.residual_covariance, the rule the heads start from
with model.mean_covariance = full). Features: the pretrained encoder ĥ (what `frozen` sees) and the true h* (what
`oracle` sees). Its exact score −(α²Σ̂ + σ²I)⁻¹(x_t − αμ̂) is scored like metrics.score_metrics (E_t ‖s − s*‖² on the
test pairs, t ~ U[T0, T]). No diffusion training: a head that scores above this is losing to a linear model.

    .venv/bin/python benchmarks/linear_gaussian_limit.py recipes/gaussian-linear.yaml PRETRAIN_MODEL_DIR [--seeds 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdmtransfer.config import load_config  # noqa: E402
from cdmtransfer.diffusion import OUProcess  # noqa: E402
from cdmtransfer.references import ridge_gcv  # noqa: E402
from cdmtransfer.runs import load_model_dir  # noqa: E402
from cdmtransfer.head_start import residual_covariance  # noqa: E402
from cdmtransfer.tasks import build_taskset  # noqa: E402


def score_error(taskset, process, mean, cov: torch.Tensor, draws: int = 8, seed: int = 0) -> float:
    """E ‖s − s*‖² of the Gaussian model x | y ~ N(mean(y), cov) on the suite's test pairs (float64)."""
    g = torch.Generator().manual_seed(seed)
    x0, y = taskset.test_x.repeat(draws, 1).double(), taskset.test_y.repeat(draws, 1)
    t = process.sample_t((x0.shape[0],), g).double()
    alpha, var = torch.exp(-t)[:, None], -torch.expm1(-2 * t)[:, None]
    x_t = alpha * x0 + var.sqrt() * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    lam, U = torch.linalg.eigh(cov)
    score = -(((x_t - alpha * mean(y)) @ U) / (alpha**2 * lam + var)) @ U.T
    exact = taskset.truth.score(0, x_t.float(), y, t.float()).double()
    return float((score - exact).pow(2).sum(-1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("model_dir", help="the pretrain run's exported model directory (its encoder is ĥ)")
    ap.add_argument("--m", default="8,32,128")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config(args.recipe, [])
    taskset = build_taskset(cfg)
    encoder = load_model_dir(Path(args.model_dir), args.model_dir)[0].encoder.eval()
    process = OUProcess(cfg.diffusion.T0, cfg.diffusion.T)
    print("| m | ĥ, isotropic | ĥ, covariance (frozen's limit) | h*, isotropic | h*, covariance (oracle's limit) |")
    print("|---|---|---|---|---|")
    for m in (int(v) for v in args.m.split(",")):
        out = {}
        for seed in range(args.seeds):
            x_m, y_m = taskset.target_subset(m, seed)
            for name, f in (("ĥ", encoder), ("h*", taskset.truth.encoder())):
                with torch.no_grad():
                    features = f(y_m)
                fit = ridge_gcv(features, x_m)
                iso = torch.eye(x_m.shape[1], dtype=torch.float64) * fit.gcv / x_m.shape[1]
                full = residual_covariance(x_m.double() - fit.predict(features), fit.gcv, iso)
                mean = lambda y, f=f, fit=fit: fit.predict(f(y).detach())  # noqa: E731
                for kind, cov in (("iso", iso), ("full", full)):
                    out.setdefault((name, kind), []).append(score_error(taskset, process, mean, cov))
        cells = [sum(v) / len(v) for v in out.values()]
        print(f"| {m} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
