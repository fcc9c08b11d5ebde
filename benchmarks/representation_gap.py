"""How much of the target's conditional mean a pretrained encoder ĥ can carry, against the true h*: the source term.

On a synthetic suite that knows h* and the target's mean E[x | y], least squares (ridge, GCV: references.ridge_gcv)
of the target's x on features of M fresh target draws is scored against the true mean on fresh conditions, for the
features ĥ(y) and h*(y), at growing M. As M grows the h* column falls to 0 and the ĥ column to what no head on ĥ can
go below; 1 − R² of h* read from ĥ (references.readout_error) is printed for fresh conditions too.

    .venv/bin/python benchmarks/representation_gap.py recipes/gaussian-nonlinear.yaml PRETRAIN_MODEL_DIR [--set K=V]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdmtransfer.checkpoint import load_export  # noqa: E402
from cdmtransfer.config import load_config  # noqa: E402
from cdmtransfer.references import readout_error, ridge_gcv  # noqa: E402
from cdmtransfer.stages import encoder_from_export  # noqa: E402
from cdmtransfer.tasks import build_taskset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("model_dir", help="a pretrain's exported model directory (<home>/work/<run id>/model)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--sizes", default="128,1024,16384", help="target draws M for the least squares")
    args = ap.parse_args()
    cfg = load_config(args.recipe, args.overrides)
    taskset = build_taskset(cfg)
    h_star = taskset.truth.encoder()
    if h_star is None:
        sys.exit(f"{args.recipe}: the suite has no true representation h*")
    weights, meta = load_export(Path(args.model_dir))
    encoder, _ = encoder_from_export(weights, meta, args.model_dir, taskset.D_y, cfg.model.d)
    gen = torch.Generator().manual_seed(123)
    y_eval = torch.randn(20000, taskset.D_y, generator=gen)
    true_mean = taskset.truth.mean(0, y_eval).double()
    print("| M | excess mean MSE on h*(y) | on ĥ(y) |\n|---|---|---|")
    for size in map(int, args.sizes.split(",")):
        y = torch.randn(size, taskset.D_y, generator=gen)
        x = taskset.truth.sample(0, y, gen)
        with torch.no_grad():
            row = [float((ridge_gcv(h(y), x).predict(h(y_eval)) - true_mean).pow(2).mean()) for h in (h_star, encoder)]
        print(f"| {size} | {row[0]:.4f} | {row[1]:.4f} |")
    with torch.no_grad():
        gap = readout_error(encoder, h_star, y_eval)
    print(f"\n1 − R² of h* read from ĥ on fresh conditions: {gap:.4f}")


if __name__ == "__main__":
    main()
