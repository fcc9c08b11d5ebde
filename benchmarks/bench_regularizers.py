"""ms per training step (loss + backward + AdamW step) of pretraining on the LSGMM suite, with each regulariser
on alone vs plain DSM. Same model init, same batches, one torch thread.

    .venv/bin/python benchmarks/bench_regularizers.py [steps] [off,mixmatch,...]
"""

import sys
import time

import torch

from cdmtransfer.config import load_config
from cdmtransfer.diffusion import OUProcess
from cdmtransfer.models import MLPEncoder, ScoreModel
from cdmtransfer.regularizers import make_objective
from cdmtransfer.stages import dsm_objective
from cdmtransfer.tasks import build_taskset

BASE = ["suite.name=lsgmm", "suite.K=4", "suite.n=512", "model.d=4", "model.encoder_width=128",
        "model.encoder_depth=2", "model.head_width=128", "model.head_depth=2", "pretrain.batch_size=64"]
VARIANTS = {"off": [], "consistency": ["regularize.consistency.weight=1"], "mmd": ["regularize.mmd.weight=1"],
            "info": ["regularize.info.weight=1"], "hsic": ["regularize.hsic.weight=1"],
            "mixmatch": ["suite.lsgmm.condition=view", "regularize.mixmatch.weight=1"]}  # D_y = d_x = 16: views


def ms_per_step(over, steps):
    cfg = load_config(None, BASE + over)
    ts = build_taskset(cfg)
    process = OUProcess(cfg.diffusion.T0, cfg.diffusion.T)
    torch.manual_seed(0)
    m = cfg.model
    model = ScoreModel(MLPEncoder(ts.D_y, m.d, m.encoder_width, m.encoder_depth), ts.K, ts.d_x, m.head_width,
                       m.head_depth, m.time_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reg = make_objective(cfg.regularize, "pretrain", process, ts.truth)
    loss_fn = dsm_objective(ts.source_x, ts.source_y, ts.source_n, process, cfg.pretrain.batch_size, regularizer=reg)
    gen = torch.Generator().manual_seed(0)
    for i in range(steps + 20):
        if i == 20:
            t0 = time.perf_counter()
        loss = loss_fn(model, gen).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return 1000 * (time.perf_counter() - t0) / steps


if __name__ == "__main__":
    torch.set_num_threads(1)
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    base = None
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else list(VARIANTS)  # e.g. off,mixmatch
    for name, over in ((n, VARIANTS[n]) for n in ["off"] + [n for n in only if n != "off"]):
        ms = min(ms_per_step(over, steps) for _ in range(3))
        base = base or ms
        print(f"{name:12s} {ms:7.2f} ms/step  x{ms / base:.2f}")
