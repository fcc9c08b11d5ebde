"""Representation and consistency diagnostics for the companion-paper regularisers (regularizers.py).

Each is computed on the held-out target split when the suite makes it possible (metrics.py calls `diagnose`):
- consistency_gap_t{t}: ‖E[x̂₀(X_t', t') | X_t] − x̂₀(X_t, t)‖², t' = t/2, averaged over test points; the expectation
  is over the model's own reverse-SDE chains, estimated without bias from pairs of chains (§D.1 property CP).
- probe_r2: held-out R² of a linear least-squares probe predicting the true h*(y) from [h(y), 1] (fit on the first
  half of the test conditions, scored on the second): 1 when h carries h* linearly.
- mmd_to_prior: unbiased MMD² between h(y) and N(0, I) draws, kernel exp(−‖a−b‖²/d) (§C.2).
- LSGMM only (the suite knows its content and nuisance directions in condition space):
  subspace_error = ‖P_W − P_A‖_F / √(2k), P_A the projector on the content directions span(M_z), P_W the projector
  on the top-k eigenvectors of the encoder's *active subspace* matrix C = E_y[J_h(y)ᵀ J_h(y)] (J the Jacobian of h):
  the directions of y along which the (possibly nonlinear) encoder varies. C is restricted to the conditions'
  support span(M_z, M_u) (P C P): y never leaves it, so h's slopes off it are untrained and meaningless.
  With suite.lsgmm.condition = view the content directions are span(A) itself (the paper's ‖P_W − P_A‖_F/√(2k)),
  the nuisance directions every task's style subspace span(B_0, …, B_K), and the support all of R^{D_y}.
  0: h varies only with content; 1: only orthogonally to it. For a linear h(y) = W y, C = WᵀW and P_W is the
  projector on row(W) (within the support), as in §A.3.
  style_leakage = tr(P_U C)/tr(C), the share of the encoder's squared sensitivity along the nuisance directions
  span(M_u); style_probe_r2, the held-out R² of a linear probe of the nuisance u from h(y).
"""

from __future__ import annotations

import torch

from cdmtransfer.diffusion import OUProcess
from cdmtransfer.regularizers import mmd2, pairwise_gap, reverse_chain, x0_prediction

GAP_LEVELS = (0.1, 0.5, 1.0)


@torch.no_grad()
def consistency_gap(model, x0: torch.Tensor, y: torch.Tensor, t: float, generator: torch.Generator,
                    chains: int = 8, steps: int = 8) -> float:
    """Mean over rows of the unbiased ‖E[a] − b‖², a = x̂₀ after `steps` reverse steps from t to t/2 (head 0)."""
    n, d = x0.shape
    code = model.encoder(y)

    def eps_fn(x, tt):
        reps = x.shape[0] // n
        return model.eps_from_code(x[None], code.repeat(reps, 1)[None], tt[None], y.repeat(reps, 1)[None])[0]

    tt = torch.full((n,), t)
    x_t = OUProcess(1e-3, 10.0).perturb(x0, tt, torch.randn(x0.shape, generator=generator))
    b = x0_prediction(x_t, eps_fn(x_t, tt), tt)
    start, end = tt.repeat(chains), tt.repeat(chains) / 2
    x_end = reverse_chain(eps_fn, x_t.repeat(chains, 1), start, end, steps, generator)
    a = x0_prediction(x_end, eps_fn(x_end, end), end).view(chains, n, d)
    return float(pairwise_gap(a, b).mean())


def linear_probe_r2(features: torch.Tensor, target: torch.Tensor) -> float:
    """Held-out R² of least squares target ≈ [features, 1] β: fit on the first half of the rows, score the second."""
    half = features.shape[0] // 2
    F = torch.cat([features, torch.ones(features.shape[0], 1)], dim=1).double()
    T = target.double()
    beta = torch.linalg.lstsq(F[:half], T[:half]).solution
    resid = T[half:] - F[half:] @ beta
    total = T[half:] - T[half:].mean(0)
    return float(1 - resid.pow(2).sum() / total.pow(2).sum())


def subspace_error(U: torch.Tensor, V: torch.Tensor) -> float:
    """‖P_U − P_V‖_F / √(2k) for the column spans of U, V [D, k] (orthonormalised here): 0 equal, 1 orthogonal."""
    k = U.shape[1]
    Qu, Qv = torch.linalg.qr(U.double())[0], torch.linalg.qr(V.double())[0]
    return float(torch.linalg.norm(Qu @ Qu.T - Qv @ Qv.T) / (2 * k) ** 0.5)


def active_subspace(encoder, y: torch.Tensor) -> torch.Tensor:
    """C = mean_y J(y)ᵀ J(y) [D_y, D_y], J = ∂h/∂y by batched reverse-mode autodiff."""
    J = torch.func.vmap(torch.func.jacrev(lambda v: encoder(v[None])[0]))(y)  # [N, d, D_y]
    return torch.einsum("nij,nik->jk", J, J).detach() / y.shape[0]


def diagnose(model, taskset, generator: torch.Generator) -> tuple[dict[str, float], dict[str, str]]:
    """All diagnostics the suite allows; the rest go to `skipped` with the reason."""
    out, skipped = {}, {}
    x0, y = taskset.test_x[:64], taskset.test_y[:64]
    for t in GAP_LEVELS:
        out[f"consistency_gap_t{t:g}"] = consistency_gap(model, x0, y, t, generator)
    if taskset.test_y.shape[0] < 8:
        skipped["mmd_to_prior"] = skipped["probe_r2"] = "fewer than 8 test conditions"
        return out, skipped
    with torch.no_grad():
        code = model.encoder(taskset.test_y)
        out["mmd_to_prior"] = float(mmd2(code, torch.randn(code.shape, generator=generator)))
    truth = taskset.truth
    oracle = truth.encoder()
    if oracle is None:
        skipped["probe_r2"] = f"suite '{taskset.name}' has no true representation h*"
    else:
        with torch.no_grad():
            out["probe_r2"] = linear_probe_r2(code, oracle(taskset.test_y))
    basis = getattr(truth, "content_basis", None)
    if basis is None:
        skipped["subspace_error"] = f"suite '{taskset.name}' has no known content subspace"
        return out, skipped
    A, U = truth.content_basis(), truth.style_basis()
    support = getattr(truth, "support_basis", None)
    S = (support() if support else torch.cat([A, U], dim=1)).double()  # h is never trained off the conditions' span
    C = S @ S.T @ active_subspace(model.encoder, taskset.test_y).double() @ S @ S.T
    evecs = torch.linalg.eigh(C)[1]  # ascending eigenvalues
    out["subspace_error"] = subspace_error(evecs[:, -A.shape[1]:], A)
    P_U = U.double() @ U.double().T
    out["style_leakage"] = float(torch.trace(P_U @ C) / torch.trace(C).clamp_min(1e-12))
    with torch.no_grad():
        out["style_probe_r2"] = linear_probe_r2(code, truth.style(taskset.test_y))
    return out, skipped
