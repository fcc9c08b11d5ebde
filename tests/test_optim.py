"""cdmtransfer.optim.AdamW is torch.optim.AdamW(fused=True), step for step, without importing torch._dynamo."""

import io
import subprocess
import sys

import torch

from cdmtransfer.optim import AdamW


def _train(opt_cls, steps: int, state: dict | None = None, **kw):
    torch.manual_seed(0)
    a, b, c = torch.nn.Linear(5, 7), torch.nn.Linear(7, 3), torch.nn.Parameter(torch.randn(4))
    groups = [{"params": list(a.parameters())},
              {"params": [*b.parameters(), c], "lr": 5e-3, "weight_decay": 0.3}]  # its own rate and decay
    opt = opt_cls(groups, lr=2e-3, weight_decay=0.01, **kw)
    if state is not None:
        opt.load_state_dict(state)
        for group in opt.param_groups:  # torch's load replaces the groups' options (fused, foreach) by the saved ones
            group.update(kw)
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        x = torch.randn(16, 5, generator=gen)
        loss = b(torch.tanh(a(x))).pow(2).mean() + (c.sum() if i % 3 else 0)  # c has no gradient every third step
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.param_groups[0]["lr"] = 2e-3 * (1 - i / steps)  # a schedule changes a group's rate between steps
        opt.step()
    return [p.detach().clone() for p in (*a.parameters(), *b.parameters(), c)], opt


def _saved(opt) -> dict:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_adamw_equals_torch_and_resumes_from_either_state():
    ours, ours_opt = _train(AdamW, 30)
    ref, ref_opt = _train(torch.optim.AdamW, 30, fused=True)
    assert all(torch.equal(x, y) for x, y in zip(ours, ref))
    unfused, _ = _train(torch.optim.AdamW, 30, foreach=True)  # the same update, rounded otherwise
    assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(ours, unfused))
    for opt in (ours_opt, ref_opt):  # a checkpoint of either continues identically in both
        state = _saved(opt)
        resumed, _ = _train(AdamW, 5, state)
        resumed_ref, _ = _train(torch.optim.AdamW, 5, state, fused=True)
        assert all(torch.equal(x, y) for x, y in zip(resumed, resumed_ref))
        assert not all(torch.equal(x, y) for x, y in zip(resumed, _train(AdamW, 5)[0]))  # the state was used


def test_training_step_does_not_import_the_compiler():
    code = ("import sys, torch; from cdmtransfer.optim import AdamW; p = torch.nn.Parameter(torch.ones(3)); "
            "o = AdamW([{'params': [p]}], lr=1e-3); p.sum().backward(); o.step(); o.state_dict(); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
