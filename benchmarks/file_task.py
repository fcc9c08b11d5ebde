"""A user-file task with a nonlinear shared representation, and the limits its results are held against (issue #13).

    python benchmarks/file_task.py write DIR          # DIR/tasks.npz and DIR/recipe.yaml (suite.name: file)
    cdmtransfer sweep DIR/recipe.yaml --modes frozen,finetune,auto,scratch
    python benchmarks/file_task.py refs DIR           # the references on the same test rows and the same m samples

The world (numpy, seed 0): y ~ N(0, I_16); a shared h*(y) = tanh(W2 tanh(W1 y)) in R^4 (W1: 16 → 32, W2: 32 → 4);
task k: x = A_k h*(y) + b_k + 0.3 ε, d_x = 8, A_k with N(0, 1) entries. K = 8 sources of 1000 rows, target task 0 of
2000 rows (20% held out by the file suite). The file carries nothing but x, y and task, as a user's would; the
script knows h* and the maps, so it can compute the limits the file suite cannot:
- floor: the exact posterior mean E[x | y] = A_0 h*(y) + b_0 (MSE = the noise, 0.09 per raw coordinate);
- true-feature least squares: GCV ridge of x on h*(y) fitted on the m target samples a run adapts on.
Both are reported in the file suite's standardised units, on its own test split, like posterior_mean_mse.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

K, N_SOURCE, N_TARGET, D_Y, D, D_X, NOISE = 8, 1000, 2000, 16, 4, 8, 0.3

RECIPE = """\
# A user-file task with a nonlinear shared representation (benchmarks/file_task.py wrote it and the data).
name: file-nonlinear
suite:
  name: file
  file: {{path: {path}, target: 0}}
model: {{d: 4}}
sweep:
  modes: [frozen, finetune, auto, scratch]
  m: [16, 32, 128, 512]
  seeds: 3
"""


class World:
    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.W1 = rng.normal(size=(D_Y, 32)) / np.sqrt(D_Y) * 1.5
        self.W2 = rng.normal(size=(32, D)) / np.sqrt(32) * 2.0
        self.A = rng.normal(size=(K + 1, D, D_X))  # task 0 is the target
        self.b = rng.normal(size=(K + 1, D_X)) * 0.5
        self.rng = rng

    def h(self, y: np.ndarray) -> np.ndarray:
        return np.tanh(np.tanh(y @ self.W1) @ self.W2)

    def mean(self, k: int, y: np.ndarray) -> np.ndarray:
        return self.h(y) @ self.A[k] + self.b[k]

    def draw(self, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        y = self.rng.normal(size=(n, D_Y))
        return self.mean(k, y) + NOISE * self.rng.normal(size=(n, D_X)), y


def write(out: Path, n_source: int = N_SOURCE) -> None:
    """The target is drawn first, so files written with different n_source share the same target rows."""
    world = World()
    xs, ys, ids = [], [], []
    for k in range(K + 1):
        x, y = world.draw(k, N_TARGET if k == 0 else n_source)
        xs.append(x), ys.append(y), ids.append(np.full(len(x), k))
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "tasks.npz", x=np.concatenate(xs).astype(np.float32), y=np.concatenate(ys).astype(np.float32),
             task=np.concatenate(ids))
    (out / "recipe.yaml").write_text(RECIPE.format(path=(out / "tasks.npz").resolve()))
    print(f"wrote {out / 'tasks.npz'} and {out / 'recipe.yaml'}")


def refs(out: Path, ms: list[int], seeds: int) -> dict:
    import torch

    from cdmtransfer.config import load_config
    from cdmtransfer.references import ridge_gcv
    from cdmtransfer.tasks import build_taskset

    world = World()
    cfg = load_config(out / "recipe.yaml")
    taskset = build_taskset(cfg)
    raw_y = lambda y: (y.double() * taskset.y_std.double() + taskset.y_mean.double()).numpy()  # noqa: E731
    std_x = lambda x: (torch.as_tensor(x) - taskset.x_mean.double()) / taskset.x_std.double()  # noqa: E731
    h_test = torch.as_tensor(world.h(raw_y(taskset.test_y)))
    x_test = taskset.test_x.double()
    result = {"floor": float((std_x(world.mean(0, raw_y(taskset.test_y))) - x_test).pow(2).mean()),
              "true_feature_ls": {}}
    for m in ms:
        values = []
        for seed in range(seeds):  # the subsets a sweep's seeds adapt on (sweep seeds are cfg.seed + i)
            x_m, y_m = taskset.target_subset(m, seed=cfg.seed + seed)
            fit = ridge_gcv(torch.as_tensor(world.h(raw_y(y_m))), x_m)
            values.append(float((fit.predict(h_test) - x_test).pow(2).mean()))
        result["true_feature_ls"][m] = {"mean": float(np.mean(values)), "values": values}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["write", "refs"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--m", default="16,32,128,512")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n-source", type=int, default=N_SOURCE, help="rows per source task (write)")
    args = parser.parse_args()
    if args.action == "write":
        write(args.dir, args.n_source)
    else:
        print(json.dumps(refs(args.dir, [int(v) for v in args.m.split(",")], args.seeds), indent=1))


if __name__ == "__main__":
    main()
