"""Task diversity (ν, Δ), ε_approx and the K/n prediction (cdmtransfer/diversity.py): statistics recovered on cases
where the answer is known by construction, and the measurement end to end on tiny suites."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from cdmtransfer import diversity
from cdmtransfer.cli import app
from cdmtransfer.config import load_config
from cdmtransfer.errors import ConfigError
from cdmtransfer.models import FixedEncoder
from cdmtransfer.tasks import GroundTruth, build_taskset
from cdmtransfer.tasks.holdout import RelabeledTruth

TINY = """
name: tiny-diversity
suite:
  name: gaussian
  K: 3
  n: 96
  n_test: 64
  n_target_pool: 256
  gaussian: {d_x: 2, D_y: 6, d: 2}
model: {d: 2, encoder_width: 16, encoder_depth: 1, head_width: 32, head_depth: 1, time_dim: 8}
pretrain: {steps: 60, batch_size: 32, log_every: 20, checkpoint_every: 60, warmup_steps: 5, val_every: 20}
evaluate: {t_draws: 2, posterior_samples: 4, posterior_conditions: 8, sampler_steps: 8, dist_conditions: 2,
           dist_samples: 8}
"""


def synthetic_losses(rng, inv_nu, delta, encoders=12, noise=0.02):
    """Source averages spread over [0.05, 1] and target errors on the line inv_nu·x + delta, with relative noise
    (as measured errors have)."""
    x = rng.uniform(0.05, 1.0, encoders)
    return x, (inv_nu * x + delta) * (1 + noise * rng.standard_normal(encoders))


def test_fit_recovers_a_known_slope_and_intercept():
    x, y = synthetic_losses(np.random.default_rng(0), inv_nu=1.7, delta=0.05)
    fit = diversity.fit_diversity(x, y, level=0.95, seed=0)
    assert fit["inv_nu"] == pytest.approx(1.7, abs=0.03) and fit["delta"] == pytest.approx(0.05, abs=0.02)
    lo, hi = fit["inv_nu_interval"]
    assert lo < 1.7 < hi and hi - lo < 0.1
    assert fit["delta_interval"][0] < 0.05 < fit["delta_interval"][1]


def test_intervals_cover_near_their_level():
    """80% intervals over 150 synthetic encoder sets: the true 1/ν and Δ inside in roughly 80% of them."""
    rng = np.random.default_rng(1)
    held = np.zeros(2)
    trials = 150
    for i in range(trials):
        x, y = synthetic_losses(rng, inv_nu=0.8, delta=0.1, encoders=15, noise=0.1)
        fit = diversity.fit_diversity(x, y, n_boot=300, seed=i)
        held += [fit["inv_nu_interval"][0] <= 0.8 <= fit["inv_nu_interval"][1],
                 fit["delta_interval"][0] <= 0.1 <= fit["delta_interval"][1]]
    assert np.all(held / trials > 0.68) and np.all(held / trials < 0.92), held / trials


def test_delta_cover_puts_every_encoder_under_the_line():
    """Points on or below a known line (Def 3.1 as an inequality): the cover intercept is the line's own Δ when
    some encoder attains it, and no measured encoder lies above slope·x + delta_cover."""
    rng = np.random.default_rng(2)
    x = np.linspace(0.1, 1.0, 10)
    slack = np.abs(rng.normal(0, 0.02, 10))
    slack[[0, -1]] = 0.0  # the two ends attain the bound, so the LS slope differs from 2 but the cover holds
    y = 2.0 * x + 0.3 - slack
    fit = diversity.fit_diversity(x, y, seed=0)
    assert np.all(y <= fit["inv_nu"] * x + fit["delta_cover"] + 1e-12)
    assert fit["delta_cover"] >= fit["delta"]


@pytest.mark.parametrize("x, y, why", [([0.1, 0.2], [0.1, 0.2], "at least 3"),
                                       ([0.3, 0.3, 0.3], [0.1, 0.2, 0.3], "same source error"),
                                       ([0.1, math.nan, 0.3], [0.1, 0.2, 0.3], "finite"),
                                       ([0.1, 0.2, 0.3], [0.1, 0.2], "one source average")])
def test_fit_refuses_what_cannot_identify_the_line(x, y, why):
    with pytest.raises(ConfigError, match=why):
        diversity.fit_diversity(x, y)


def test_k_n_prediction_follows_the_source_rate():
    """r_z = C·(K log N_F + log N_H)/(nK): C recovered from one measurement, and the floor's moves in K and n."""
    lnf, lnh, C, eps_approx, inv_nu, delta = 200.0, 800.0, 0.01, 0.02, 1.5, 0.004
    measured = eps_approx + C * (8 * lnf + lnh) / (512 * 8)  # a source average at K = 8, n = 512
    assert diversity.rz_constant(measured, eps_approx, 8, 512, lnf, lnh) == pytest.approx(C)
    theta = dict(inv_nu=inv_nu, delta=delta, eps_approx=eps_approx, C=C, log_NF=lnf, log_NH=lnh)
    base = diversity.floor_at(8, 512, **theta)
    assert base == pytest.approx(inv_nu * measured + delta)
    # a quarter of the rows: the whole source term ×4; half the sources: only the encoder's share log N_H/(nK) ×2
    assert diversity.floor_at(8, 128, **theta) - base == pytest.approx(inv_nu * 3 * (measured - eps_approx))
    assert diversity.floor_at(4, 512, **theta) - base == pytest.approx(inv_nu * C * lnh / (512 * 8))
    assert diversity.floor_at(10**6, 10**9, **theta) == pytest.approx(inv_nu * eps_approx + delta, rel=1e-4)
    assert diversity.rz_constant(eps_approx / 2, eps_approx, 8, 512, lnf, lnh) == 0.0  # never a negative C
    with pytest.raises(ConfigError):
        diversity.rz_rate(0, 512, lnf, lnh)


class BlindTarget(GroundTruth):
    """Task 1's law for every task, except that the target (task 0) sees y = 0 whatever y is: x independent of y."""

    def __init__(self, truth):
        self.truth = truth

    def score(self, task, x_t, y, t):
        return self.truth.score(1, x_t, torch.zeros_like(y) if task == 0 else y, t)

    def sample(self, task, y, generator):
        return self.truth.sample(1, torch.zeros_like(y) if task == 0 else y, generator)


def one_task_suite(cfg, blind_target=False):
    """The tiny suite with every source and the target drawn from one task (source 1), so L(P⁰, h) = L(P^k, h) for
    every h: ν = 1 and Δ = 0 by construction. With `blind_target` the target's x ignores y instead: no encoder
    helps or hurts it, so 1/ν = 0 and Δ is its heads' own misfit."""
    ts = build_taskset(cfg)
    truth = BlindTarget(ts.truth)
    gen = torch.Generator().manual_seed(5)

    def draw(task, rows):
        y = torch.randn(rows, ts.D_y, generator=gen)
        return truth.sample(task, y, gen), y

    fit, test = 1024, cfg.suite.n_test  # every task: `fit` rows for its head, `test` held out (task_stacks)
    xs, ys = zip(*(draw(1, fit + test) for _ in range(ts.K)))
    target = 0 if blind_target else 1
    (px, py), (tx, ty) = draw(target, fit), draw(target, test)
    return dataclasses.replace(ts, source_x=torch.stack(xs), source_y=torch.stack(ys),
                               source_n=torch.full((ts.K,), fit + test), target_x=px, target_y=py, test_x=tx,
                               test_y=ty, truth=truth if blind_target else RelabeledTruth(ts.truth, [1] * (ts.K + 1)))


def rotated_encoders(W):
    """h*(y) = W y rotated by 0°…90° into directions of y no task uses: from exact to blind."""
    Q = torch.linalg.qr(torch.cat([W, torch.randn(W.shape, generator=torch.Generator().manual_seed(0))]).T)[0].T
    away = Q[len(W):]
    return [FixedEncoder(math.cos(a) * W + math.sin(a) * away, torch.zeros(len(W)))
            for a in np.radians([0, 20, 40, 55, 70, 90])]


def measured(tmp_path, blind_target):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    cfg = load_config(path, ["suite.n_test=1024"])  # held-out rows per task: the test's noise is theirs
    ts = one_task_suite(cfg, blind_target)
    errors = diversity.representation_errors(cfg, ts, rotated_encoders(build_taskset(cfg).truth.encoder().weight),
                                             steps=400, draws=16)
    excess = errors["excess"]
    return errors, excess, diversity.fit_diversity(excess[:, 1:].mean(1), excess[:, 0], seed=0)


def test_identical_tasks_give_slope_one_and_no_intercept(tmp_path):
    """End to end on a suite with ν = 1, Δ = 0 known by construction: encoders from exact (h*) to blind, heads refit
    per task, exact irreducible DSM subtracted, the line fitted."""
    errors, excess, fit = measured(tmp_path, blind_target=False)
    assert np.allclose(errors["irreducible"], errors["irreducible"][0], rtol=0.1)  # one task: one irreducible DSM
    assert np.all(np.diff(excess.mean(1)) > 0)  # the further from h*, the larger the representation error
    assert excess[0].max() < 0.4 * excess[-1].min()
    assert fit["inv_nu"] == pytest.approx(1.0, abs=0.2)
    assert abs(fit["delta"]) < 0.1 * excess[:, 0].max()


def test_a_target_that_ignores_y_gives_slope_zero(tmp_path):
    """The target's column must be the target's: when its x ignores y, the encoders' errors on the sources vary
    fourfold while the target's stay at its heads' misfit, so 1/ν ≈ 0 and Δ ≈ that misfit."""
    errors, excess, fit = measured(tmp_path, blind_target=True)
    assert excess[-1, 1:].mean() > 3 * excess[0, 1:].mean()
    assert abs(fit["inv_nu"]) < 0.15
    assert fit["delta"] == pytest.approx(excess[:, 0].mean(), rel=0.3)


def test_estimate_diversity_cli_json_and_mlflow(tmp_path, store):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    args = ["estimate", str(path), "--epsilon", "0.5", "--holdout", "0", "--diversity", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + result.stderr
    out = json.loads(result.stdout)
    d = out["diversity"]
    assert d["known_scores"] and d["eps_approx"] is not None and d["table"][0]["encoder"] == "h*"
    assert d["encoders"] == len(d["table"]) >= 6
    assert [(r["K"], r["n"]) for r in d["k_n"]["grid"]] == [(3, 96), (1, 96), (3, 24), (1, 24)]
    assert d["k_n"]["grid"][0]["predicted_source_avg"] == pytest.approx(d["k_n"]["grid"][0]["measured_source_avg"])
    metrics = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db").get_run(out["run_id"]).data.metrics
    assert metrics["diversity_inv_nu"] == pytest.approx(d["inv_nu"]) and "eps_approx" in metrics
    table = CliRunner().invoke(app, args[:-1])
    assert table.exit_code == 0 and "Task diversity" in table.stdout and "1/ν" in table.stdout


def test_diversity_needs_two_sources(tmp_path, store):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.replace("K: 3", "K: 1"))
    result = CliRunner().invoke(app, ["estimate", str(path), "--epsilon", "0.5", "--holdout", "0", "--diversity"])
    assert result.exit_code == 2 and "at least 2 source tasks" in result.stderr


def test_table_splits_the_fitted_floor_with_the_held_out_tasks_own_irreducible_dsm():
    from io import StringIO

    from rich.console import Console

    from cdmtransfer.estimate import EstimateReport
    from cdmtransfer.report import diversity_tables

    x, y = synthetic_losses(np.random.default_rng(0), 0.8, 0.001)
    div = {**diversity.fit_diversity(x, y, n_boot=50), "units": "excess DSM", "eps_approx": 0.011,
           "eps_approx_encoder": "h*", "irreducible_dsm": {"target": 0.29, "sources_mean": 0.28,
                                                           "sources": [0.1, 0.2, 0.3, 0.4]},
           "sizes": {"K": 4, "n": 64}, "table": [{"encoder": "K=4 n=64 best (step 9)", "source_avg": 0.02,
                                                   "target": 0.018}]}
    report = EstimateReport(None, "score", {}, {}, None, error="test_dsm", evidence={"holdout_tasks": [2, 4]},
                            predicted={"frozen": {"floor": {"mean": 0.35, "noise_sd": 0.01}}}, diversity=div)
    out = StringIO()
    diversity_tables(Console(file=out, width=300), report, quiet=True)
    text = out.getvalue()
    assert "held-out sources 2, 4): 0.35" in text and "irreducible DSM 0.3 + excess 0.05" in text
    assert "excess 0.018" in text and "ε_approx 0.011" in text
