"""What an ensemble of pretrained encoders would buy `frozen`: the score error of the average of N frozen models'
ε̂ (one per encoder, same target subset), against each member's, on a suite with exact scores (the Gaussian suites).

A sweep with `--pretrain-seeds N` adapts every frozen cell on N encoders; this reads its frozen (and oracle) child
runs from the store and scores, per (m, seed), each member and the average of the members' ε̂ predictions with
metrics.score_metrics (the evaluator's draws and seed, so members reproduce the sweep's score_error). Several sweeps
of the same recipe, m and seeds (the same target subsets) pool their encoders. No training:

    CDMTRANSFER_HOME=DIR cdmtransfer sweep recipes/gaussian-nonlinear.yaml --m 32,128 --modes frozen,oracle \\
        --seeds 3 --pretrain-seeds 3
    .venv/bin/python benchmarks/encoder_ensemble.py recipes/gaussian-nonlinear.yaml DIR SWEEP_RUN_ID [DIR2 RUN2 ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdmtransfer.config import load_config  # noqa: E402
from cdmtransfer.diffusion import OUProcess  # noqa: E402
from cdmtransfer.metrics import score_metrics  # noqa: E402
from cdmtransfer.runs import load_model_dir  # noqa: E402
from cdmtransfer.tasks import build_taskset  # noqa: E402
from cdmtransfer.tracking import resolve_store  # noqa: E402


def child_runs(store, sweep_run_id: str) -> list:
    """The sweep's adapt child runs (mlflow Run objects)."""
    from mlflow import MlflowClient

    client = MlflowClient(store.uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"tags.mlflow.parentRunId = '{sweep_run_id}' "
                                           "and tags.`cdmtransfer.stage` = 'adapt'", max_results=10000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("sweeps", nargs="+", metavar="HOME SWEEP_RUN_ID",
                    help="pairs: a store's directory (CDMTRANSFER_HOME of the sweep) and the sweep's run id")
    args = ap.parse_args()
    if len(args.sweeps) % 2:
        ap.error("sweeps come in pairs: HOME SWEEP_RUN_ID")
    cfg = load_config(args.recipe, [])
    taskset = build_taskset(cfg)
    process = OUProcess(cfg.diffusion.T0, cfg.diffusion.T)

    def score(model) -> float:
        return score_metrics(model, taskset, process, cfg.evaluate.t_draws,
                             torch.Generator().manual_seed(cfg.evaluate.seed))["score_error"]

    cells: dict[tuple[int, int], dict[str, list]] = {}
    for home, sweep_run_id in zip(args.sweeps[0::2], args.sweeps[1::2]):
        store = resolve_store(None, None, home)
        for run in child_runs(store, sweep_run_id):
            mode = run.data.params["adapt.mode"]
            key = (int(run.data.params["adapt.m"]), int(run.data.params["seed"]))
            model = load_model_dir(store.work_dir(run.info.run_id) / "model", run.info.run_id)[0].eval()
            cells.setdefault(key, {}).setdefault(mode, []).append(model)
    rows: dict[int, dict[str, list[float]]] = {}
    for (m, _), by_mode in sorted(cells.items()):
        members = by_mode.get("frozen", [])
        if len(members) < 2:
            continue

        @torch.no_grad()
        def ensemble(x_t, y, t, members=members):  # the average of the members' ε̂: one score field
            return torch.stack([member(x_t, y, t) for member in members]).mean(0)

        each = [score(member) for member in members]
        row = rows.setdefault(m, {"members": [], "best": [], "ensemble": [], "oracle": [], "N": []})
        row["members"].append(statistics.fmean(each))
        row["best"].append(min(each))
        row["ensemble"].append(score(ensemble))
        row["N"].append(len(members))
        row["oracle"] += [score(model) for model in by_mode.get("oracle", [])]

    def cell(values: list[float]) -> str:
        if not values:
            return "–"
        sd = f" ± {statistics.stdev(values):.3g}" if len(values) > 1 else ""
        return f"{statistics.fmean(values):.4g}{sd}"

    print("| m | encoders | seeds | frozen, members' mean | frozen, best member (picked on the test set) | frozen, ensemble (mean ε̂) | oracle |")
    print("|---|---|---|---|---|---|---|")
    for m, row in sorted(rows.items()):
        print(f"| {m} | {max(row['N'])} | {len(row['ensemble'])} | {cell(row['members'])} | {cell(row['best'])} | "
              f"{cell(row['ensemble'])} | {cell(row['oracle'])} |")


if __name__ == "__main__":
    main()
