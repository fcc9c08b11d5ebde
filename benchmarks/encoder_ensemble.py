"""What an ensemble of pretrained encoders buys `frozen`, pooled over several sweeps: `sweep --pretrain-seeds N`
prints its own encoders' ensemble (cdmtransfer/ensemble.py); this scores the same way the frozen cells of several
sweeps of one recipe, m and seeds (the same target subsets: e.g. two encoder depths), as one ensemble per (m, seed),
beside the best single member picked on the test set (which a user could not pick) and the oracle. No training:

    CDMTRANSFER_HOME=DIR cdmtransfer sweep recipes/gaussian-nonlinear.yaml --m 32,128 --modes frozen,oracle \\
        --seeds 3 --pretrain-seeds 3
    .venv/bin/python benchmarks/encoder_ensemble.py recipes/gaussian-nonlinear.yaml DIR SWEEP_RUN_ID [DIR2 RUN2 ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdmtransfer.config import load_config  # noqa: E402
from cdmtransfer.ensemble import ensemble_rows  # noqa: E402
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
    rows, model_dirs, oracle = [], {}, {}
    for home, sweep_run_id in zip(args.sweeps[0::2], args.sweeps[1::2]):
        store = resolve_store(None, None, home)
        for run in child_runs(store, sweep_run_id):
            p = run.data.params
            model_dirs[run.info.run_id] = store.work_dir(run.info.run_id) / "model"
            if p["adapt.mode"] == "oracle":
                oracle.setdefault(int(p["adapt.m"]), {})[int(p["seed"])] = run.data.metrics["score_error"]
            rows.append({"mode": p["adapt.mode"], "m": int(p["adapt.m"]), "seed": int(p["seed"]),
                         "pretrain": len(rows), "run_id": run.info.run_id})
    rows = [r for r in rows if r["mode"] == "frozen"]

    def load(run_id: str):
        return load_model_dir(model_dirs[run_id], run_id)[0].eval()

    by_m: dict[int, list[dict]] = {}
    for row in ensemble_rows(rows, load, taskset, cfg):
        by_m.setdefault(row["m"], []).append(row)

    def cell(values: list[float]) -> str:
        sd = f" ± {statistics.stdev(values):.3g}" if len(values) > 1 else ""
        return f"{statistics.fmean(values):.4g}{sd}" if values else "–"

    print("| m | encoders | seeds | frozen, members' mean | best member (picked on the test set) | ensemble | oracle |")
    print("|---|---|---|---|---|---|---|")
    for m, group in sorted(by_m.items()):
        print(f"| {m} | {max(len(r['members']) for r in group)} | {len(group)} | "
              f"{cell([r['members_mean']['score_error'] for r in group])} | "
              f"{cell([min(e['score_error'] for e in r['each']) for r in group])} | "
              f"{cell([r['metrics']['score_error'] for r in group])} | {cell(list(oracle.get(m, {}).values()))} |")


if __name__ == "__main__":
    main()
