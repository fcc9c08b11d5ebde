"""Several models with the same MLP heads as one stack of heads, so that evaluation runs them side by side (#12).

The adapted models of a sweep's cells share their heads' shapes and differ in weights, σ_d and encoder. Stacked,
head k is model k's head, and model k's code h_k(y) comes from its own encoder (`stack_codes`): a sampler step or a
score evaluation is then one batched call for every model (ScoreModel.sampling_eps with head = None,
ScoreModel.eps_from_code on [M, B, ·]) instead of one call per model, with each head computing what its model does.
"""

from __future__ import annotations

import torch

from cdmtransfer.models import ScoreModel, build_model, model_spec


def _head_spec(model: ScoreModel) -> dict:
    """What must agree for two models' heads to stack: the spec without the encoder and σ_d, plus the code width."""
    spec = {k: v for k, v in model_spec(model).items() if k not in ("encoder", "sigma_data")}
    return {**spec, "d": model.encoder.d}


def stackable(models: list) -> bool:
    """True when there are several models and all are plain single-head ScoreModels with MLP heads of one shape
    (ensembles, conv and U-Net heads are evaluated one model after the other)."""
    if len(models) < 2:
        return False
    if any(type(m) is not ScoreModel or m.head != "mlp" or m.heads.K != 1 for m in models):
        return False
    first = _head_spec(models[0])
    return all(_head_spec(m) == first for m in models[1:])


def stack_heads(models: list[ScoreModel], device=None) -> ScoreModel:
    """One ScoreModel whose head k is models[k]'s, each with its own σ_d (models must be `stackable`). Its encoder
    is not used: pass every model's code (stack_codes) to eps_from_code or sampling_eps."""
    stack = build_model({**model_spec(models[0]), "K": len(models)})
    states = [m.heads.state_dict() for m in models]
    stack.heads.load_state_dict({name: torch.cat([state[name] for state in states]) for name in states[0]})
    scales = [m.precond.sd for m in models] if stack.precond is not None else []
    if len(set(scales)) > 1:  # EDM: each head keeps its model's σ_d
        stack.precond.sd = torch.tensor(scales)[:, None, None]
    stack = stack.eval().requires_grad_(False)
    if device is not None:
        stack = stack.to(device)
        if torch.is_tensor(getattr(stack.precond, "sd", None)):
            stack.precond.sd = stack.precond.sd.to(device)
    return stack


@torch.no_grad()
def stack_codes(models: list[ScoreModel], y: torch.Tensor, device=None) -> torch.Tensor:
    """Every model's code of the conditions y [B, D_y], by its own encoder: [M, B, d] on `device`."""
    return torch.stack([m.encoder(y) for m in models]).to(device or y.device)
