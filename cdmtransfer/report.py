"""What commands print: rich tables for people, JSON for scripts (`--json` keeps stdout machine-readable)."""

from __future__ import annotations

import json
import math
import sys

from rich.console import Console
from rich.table import Table

METRIC_ORDER = ("score_error", "score_error_weighted", "posterior_mean_mse", "posterior_mean_mse_floor",
                "ref/linear_pooled_mse", "ref/linear_target_mse", "ref/oracle_ls_mse", "ref/encoder_ls_mse",
                "ref/encoder_pooled_mse",
                "sliced_w2", "sliced_w2_floor", "test_dsm", "final_loss", "train_seconds")
DIVERGED_MARK = "!"  # after a value computed from diverged samples (metrics.evaluate_model's divergence check)
DIVERGED_NOTE = f"{DIVERGED_MARK} from diverged samples: not a result"
SAMPLE_COLUMNS = ("posterior_mean_mse", "sliced_w2")  # sweep columns computed from samples


def console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 120  # pipes and logs: wide enough that tables do not wrap
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=width)


def emit_json(data: dict) -> None:
    sys.stdout.write(json.dumps(data, indent=1, default=str) + "\n")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def metrics_table(title: str, metrics: dict, flagged=()) -> Table:
    """Metric and value rows; the metrics named in `flagged` are marked (values from diverged samples)."""
    table = Table(title=title, show_header=True, caption=DIVERGED_NOTE if flagged else None)
    table.add_column("metric")
    table.add_column("value", justify="right")
    keys = [k for k in METRIC_ORDER if k in metrics] + sorted(k for k in metrics if k not in METRIC_ORDER)
    for key in keys:
        table.add_row(key, _fmt(metrics[key]) + (f" {DIVERGED_MARK}" if key in flagged else ""))
    return table


SWEEP_COLUMNS = {"score_error": "score error", "posterior_mean_mse": "post. mean MSE", "sliced_w2": "sliced W2",
                 "test_dsm": "test DSM", "posterior_mean_mse_fitted_excess": "MSE − floor*",
                 "test_dsm_fitted_excess": "DSM − floor*"}
MODE_ORDER = {"frozen": 0, "finetune": 1, "auto": 2, "scratch": 3, "oracle": 4}
EXCESS = ("posterior_mean_mse_fitted_excess", "test_dsm_fitted_excess")  # not bolded: floors differ by mode


def sweep_table(summary: list[dict], title: str) -> Table:
    metrics = [k for k in SWEEP_COLUMNS if any(k in row for row in summary)]
    diverged = any(row.get("diverged", {}).get("mean", 0) > 0 for row in summary)
    fitted = any(k in EXCESS for k in metrics)
    encoders = any(row.get("pretrains", 1) > 1 for row in summary)
    # oracle (the suite's true h*) is a reference, not a choice a user has: the bold marks the best of the others
    choices = [row for row in summary if row["mode"] != "oracle"] or summary
    table = Table(title=title, show_header=True, caption="lower is better; bold: best at each m"
                  + (" but the oracle (h*)" if len(choices) < len(summary) else "")
                  + ("; *floor fitted per mode, floor + A/m across m" if fitted else "")
                  + ("; (s): sd of the encoders' means" if encoders else "")
                  + (f"; {DIVERGED_MARK} some seed's samples diverged: not a result" if diverged else ""))
    lengths = any("steps" in row for row in summary)
    chose = any(any(row.get("choices") or []) for row in summary)  # finetune / auto: what validation chose
    for col in ("mode", "m", "seeds", *(SWEEP_COLUMNS[k] for k in metrics), *(("steps", "converged") if lengths
                                                                             else ()), *(("chosen",) if chose else ())):
        table.add_column(col, justify="left" if col == "mode" else "right")
    best = {(k, m): min((row[k]["mean"] for row in choices if k in row and row["m"] == m), default=math.nan)
            for k in metrics for m in {row["m"] for row in summary}}
    for row in sorted(summary, key=lambda r: (r["m"], MODE_ORDER.get(r["mode"], 9))):
        cells = []
        for k in metrics:
            if k not in row:
                cells.append("–")
                continue
            mean, std = row[k]["mean"], row[k]["std"]
            text = f"{mean:.3g}" if k in EXCESS else f"{mean:.4g}" + (f" ± {std:.2g}" if row["seeds"] > 1 else "")
            if "pretrain_std" in row[k] and k not in EXCESS:
                text += f" ({row[k]['pretrain_std']:.2g})"
            if k in SAMPLE_COLUMNS and row.get("diverged", {}).get("mean", 0) > 0:
                text += f" {DIVERGED_MARK}"
            bold = mean == best[(k, row["m"])] and k not in EXCESS and (row["mode"] != "oracle" or choices is summary)
            cells.append(f"[bold]{text}[/bold]" if bold else text)
        if lengths:  # the chosen training length and how many seeds' validation stopped it (train.py)
            cells.append(f"{row['steps']['mean']:.0f}" if "steps" in row else "–")
            conv = row.get("converged", {}).get("mean")
            cells.append("–" if conv is None else f"{round(conv * row['seeds'])}/{row['seeds']}")
        if chose:  # what cross-validation chose, per seed (finetune's encoder rate; auto's mode and head start)
            cells.append(choice_counts(row.get("choices") or []))
        table.add_row(row["mode"], str(row["m"]), str(row["seeds"]), *cells)
    return table


# Limits held beside a sweep's table: estimators every cell's test conditions admit, whatever the mode (references.py)
REFERENCE_COLUMNS = {"posterior_mean_mse_floor": "true post. mean", "ref/oracle_ls_mse": "LS on h*(y)",
                     "ref/linear_target_mse": "ridge on y", "ref/linear_pooled_mse": "sources' linear",
                     "sliced_w2_floor": "W2 floor"}


def references_table(summary: list[dict]) -> Table | None:
    """Per m, the limits the sweep's models are held against (mean ± sd over seeds), or None when the suite has none.

    They depend on the test conditions and the seed's m target pairs, not on the mode: each m's values come from its
    first mode (in MODE_ORDER) that logged them."""
    keys = [k for k in REFERENCE_COLUMNS if any(k in row for row in summary)]
    if not keys:
        return None
    table = Table(title="limits on the same test conditions (what the columns above compare with)",
                  caption="posterior-mean MSE of: the true posterior mean (closed form, or MCMC where the suite has "
                          "none; no model can beat it); least squares on the true features h*(y) of the m pairs; "
                          "ridge regression of x on y fitted on the m pairs; "
                          "the best linear estimator fitted on the pooled sources (no target data). W2 floor: the "
                          "sliced W2 between two sets of true samples", show_header=True)
    for col in ("m", *(REFERENCE_COLUMNS[k] for k in keys)):
        table.add_column(col, justify="right")
    rows = sorted(summary, key=lambda r: (r["m"], MODE_ORDER.get(r["mode"], 9)))
    for m in sorted({row["m"] for row in rows}):
        cells = []
        for k in keys:
            row = next((r for r in rows if r["m"] == m and k in r), None)
            if row is None:
                cells.append("–")
                continue
            mean, std = row[k]["mean"], row[k]["std"]
            spread = row["seeds"] > 1 and std > 1e-9 * abs(mean)  # not a float's rounding (the sources' fit is one)
            cells.append(f"{mean:.4g}" + (f" ± {std:.2g}" if spread else ""))
        table.add_row(str(m), *cells)
    return table


def ensemble_table(ensembles: list[dict]) -> Table | None:
    """Per pretrained mode and m, the members' mean of each headline metric against their ensemble's (the mean of the
    encoders' ε̂; ensemble.py), means over seeds; None without several encoders."""
    if not ensembles:
        return None
    keys = [k for k in SWEEP_COLUMNS if any(k in e["ensemble"] for e in ensembles)]
    table = Table(title="the encoders' cells averaged (one model whose ε̂ is the mean of theirs): "
                        "members → ensemble",
                  caption="members: each encoder's cell alone, averaged; ensemble: the mean of their ε̂, evaluated "
                          "like a cell (score error and test DSM on the same draws: never worse, by Jensen's "
                          "inequality); each seed's ensemble is a child run (tag cdmtransfer.stage = ensemble) whose model "
                          "evaluate and sample load", show_header=True)
    for col in ("mode", "m", "encoders", "seeds", *(SWEEP_COLUMNS[k] for k in keys)):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for e in sorted(ensembles, key=lambda e: (MODE_ORDER.get(e["mode"], 9), e["m"])):
        cells = []
        for k in keys:
            if k not in e["ensemble"]:
                cells.append("–")
                continue
            before, after = e["members"][k]["mean"], e["ensemble"][k]["mean"]
            change = after / before - 1 if before else math.nan
            cells.append(f"{_fmt(before)} → {_fmt(after)} ({change:+.0%})")
        table.add_row(e["mode"], str(e["m"]), str(e["encoders"]), str(e["seeds"]), *cells)
    return table


def choice_counts(choices: list[str]) -> str:
    """'frozen ×2, ft×0.1' from the seeds' choices (frozen: encoder fixed; ft×c: encoder lr c × the head's)."""
    counts: dict[str, int] = {}
    for c in choices:
        if c:
            counts[c] = counts.get(c, 0) + 1
    return ", ".join(f"{c} ({n})" if n > 1 else c for c, n in counts.items()) or "–"


def store_footer(out: Console, uri: str) -> None:
    """Where the runs are, and a command that opens the MLflow UI on them as printed (tracking.ui_command)."""
    out.print(f"MLflow store: {uri}", markup=False)
    if uri.startswith("sqlite:///"):
        from cdmtransfer.tracking import ui_command

        out.print(f"View the runs:  {ui_command(uri)}", markup=False)


def _m_text(m) -> str:
    if m is None:
        return "–"
    return f"{m:,.0f}" if m < 1e7 else f"{m:.2e}"


EXTRAPOLATE = 4  # a predicted m beyond this multiple of the largest measured m is marked as an extrapolation


def _m_mark(m, reach) -> str:
    return "never" if m is None else _m_text(m) + ("*" if m > reach else "")


def _interval_text(interval) -> str:
    lo, hi = interval
    return f"[{_m_text(lo)}, {_m_text(hi) if hi is not None else 'never'}]"


def predicted_tables(out: Console, report, quiet: bool = False) -> None:
    """The source-calibrated answer per mode, its update with the target's points, and (unless quiet) the fits."""
    ev, pct = report.evidence, None
    for mode, r in report.predicted.items():
        pct = round(100 * r["level"])
    tasks = ", ".join(str(k) for k in ev.get("holdout_tasks", []))
    reach = EXTRAPOLATE * max(ev.get("ladder") or [1])
    table = Table(title=f"Target samples for {report.error} ≤ {report.epsilon_text}: predicted from held-out source "
                        f"tasks {tasks} ({pct}% intervals; no target data)",
                  caption=f"* beyond {EXTRAPOLATE}× the largest measured m ({reach // EXTRAPOLATE}): an extrapolation "
                          f"of the fitted curve; never: ε at or below the floor")
    for col in ("mode", "m(ε)", "interval", "never", "curve", "evidence (leave-one-task-out)"):
        table.add_column(col, justify="left" if col in ("mode", "curve", "evidence (leave-one-task-out)") else "right")
    for mode, r in report.predicted.items():
        loto = r["loto_summary"]
        med = loto["median_abs_log2"]
        evidence = (f"{len(r['tasks'])} tasks × {len(ev.get('ladder', []))} m × {ev.get('seeds')} seed"
                    + ("s" if ev.get("seeds", 1) > 1 else ""))
        if loto["cases"]:
            evidence += (f"; {loto['covered']}/{loto['cases']} held in interval"
                         + (f", median error ×{2 ** med:.2g}" if med is not None else ""))
        table.add_row(mode, _m_mark(r["m"], reach), _interval_text(r["interval"]),
                      f"{100 * r['p_unreachable']:.0f}%", r["shape"], evidence)
    out.print(table)
    updated = {mode: r["updated"] for mode, r in report.predicted.items() if "updated" in r}
    if updated:
        up = Table(title=f"Updated with the target's own points ({pct}% intervals)")
        for col in ("mode", "target points", "m(ε)", "interval", "interval width vs sources", "weight: target",
                    "collect"):
            up.add_column(col, justify="left" if col in ("mode", "target points", "collect") else "right")
        for mode, u in updated.items():
            pts = ", ".join(f"m={m:g}" for m, _, _ in u["target_points"])
            before = report.predicted[mode]["interval"]
            narrow = (f"{u['narrowing']:.2f}×" if u["narrowing"] is not None else
                      "bounded now" if before[1] is None and u["interval"][1] is not None else "–")
            if u["collect_more"] is None:
                collect = "more data may not reach ε"
            elif u["collect_more"] == 0:
                collect = f"none: m = {u['have']} already reaches ε"
            else:
                hi = u["collect_more_hi"]
                collect = f"about {u['collect_more']} more" + (f" ({hi} for the upper end)" if hi else "")
            up.add_row(mode, pts, _m_mark(u["m"], reach), _interval_text(u["interval"]),
                       narrow, f"{100 * u['weights']['target']:.0f}%", collect)
        out.print(up)
    if quiet:
        return
    fits = Table(title=f"Fitted curves of the held-out tasks: {report.error} ≈ floor + A·m^-p (mean; task-to-task "
                       f"sd; fit-noise sd)")
    for col in ("mode", "floor", "A", "p", "leave-one-point-out rms log error (p=1 | free p)", "per task: m(ε)"):
        fits.add_column(col, justify="left" if col in ("mode", "per task: m(ε)") else "right")
    for mode, r in report.predicted.items():
        f, a = r["floor"], r["A"]
        lopo = " | ".join("–" if v != v else f"{v:.3f}" for v in r["lopo_rms_log"].values())
        own = ", ".join(f"{t['task']}: {_m_text(t['m_own']) if t['m_own'] is not None else 'never'}"
                        for t in r["tasks"])
        fits.add_row(mode, f"{f['mean']:.4g} ({f['task_sd']:.2g}; {f['noise_sd']:.2g})",
                     f"{a['mean']:.4g} ({a['task_sd']:.2g}; {a['noise_sd']:.2g})", f"{r['p']:.2f}", lopo, own)
    out.print(fits)
    secs = ev.get("seconds", {})
    reused = sum(r["reused"] for r in ev.get("runs", []))
    out.print(f"held-out runs: {len(ev.get('runs', []))} sweeps ({reused} reused), pretrains stopped by validation, "
              f"capped at {ev.get('pretrain_steps_cap')} steps; training {secs.get('training', 0):.0f} s, statistics "
              f"{secs.get('statistics', 0):.1f} s")


def estimate_tables(out: Console, report, quiet: bool = False) -> None:
    """The source-calibrated answer, the theory's required m per mode (orders of magnitude) and the target-only fit."""
    if report.predicted:
        predicted_tables(out, report, quiet)
    if report.theory and not (quiet and report.predicted):
        theory_table(out, report)
    for note in report.notes:
        if not quiet:
            out.print(f"note: {note}")
    if report.calibrated:
        calibrated_table(out, report)
    if report.diversity:
        diversity_tables(out, report, quiet)


def diversity_tables(out: Console, report, quiet: bool = False) -> None:
    """Measured 1/ν, Δ (Def 3.1), ε_approx and the floor at other K and n (theory.md §3; cdmtransfer/diversity.py)."""
    d = report.diversity
    pct = round(100 * d["level"])
    iv = lambda v: f"[{v[0]:.3g}, {v[1]:.3g}]"  # noqa: E731
    table = Table(title=f"Task diversity (Def 3.1): target error ≈ (1/ν)·source average + Δ over {d['encoders']} "
                        f"encoders ({pct}% bootstrap intervals)", caption=f"units: {d['units']}")
    for col in ("quantity", "value", "interval", "meaning"):
        table.add_column(col, justify="right" if col in ("value", "interval") else "left")
    table.add_row("1/ν", f"{d['inv_nu']:.3g}", iv(d["inv_nu_interval"]), "slope: target error per unit of source error")
    table.add_row("Δ", f"{d['delta']:.3g}", iv(d["delta_interval"]), "intercept: target error no source error sees")
    table.add_row("Δ (cover)", f"{d['delta_cover']:.3g}", "", "smallest Δ at that slope with every encoder under it")
    if d.get("eps_approx") is not None:
        table.add_row("ε_approx", f"{d['eps_approx']:.3g}", "", f"smallest source average ({d['eps_approx_encoder']})")
        irr = d["irreducible_dsm"]
        table.add_row("irreducible DSM", f"{irr['target']:.4g}", "", "target's DSM at the exact score; sources "
                      f"{irr['sources_mean']:.4g}")
    kn = d.get("k_n")
    if kn:
        table.add_row("r_z", f"{kn['r_z']:.3g}", "", f"source term at K = {d['sizes']['K']}, n = {d['sizes']['n']} "
                      f"(C = {kn['C']:.3g} in C·(K log N_F + log N_H)/(nK))")
    out.print(table)
    frozen = report.predicted.get("frozen")
    if frozen and report.error == "test_dsm" and d.get("irreducible_dsm"):
        tasks = report.evidence.get("holdout_tasks", [])
        irr = sum(d["irreducible_dsm"]["sources"][k - 1] for k in tasks) / len(tasks)
        f = frozen["floor"]
        mine = next((r["target"] for r in d["table"] if r["encoder"].startswith(f"K={d['sizes']['K']} n="
                                                                                f"{d['sizes']['n']} best")), None)
        direct = "" if mine is None else (f"; measured directly (target, the K = {d['sizes']['K']} pretrained encoder "
                                          f"frozen, a head on plenty of rows): excess {mine:.3g}")
        out.print(f"fitted frozen floor (test_dsm, held-out sources {', '.join(map(str, tasks))}): {f['mean']:.4g} "
                  f"(fit sd {f['noise_sd']:.2g}) = their irreducible DSM {irr:.4g} + excess {f['mean'] - irr:.3g}"
                  f"{direct}; ε_approx {d['eps_approx']:.3g}")
    if kn:
        grid = Table(title="The floor at other K and n: predicted ν⁻¹(ε_approx + r_z) + Δ (C fitted at the first row) "
                           "vs the target error of an encoder pretrained there")
        for col in ("K", "n", "floor measured", "floor predicted", "shift measured", "shift predicted",
                    "source avg measured", "source avg predicted"):
            grid.add_column(col, justify="right")
        for r in kn["grid"]:
            grid.add_row(str(r["K"]), str(r["n"]), *(f"{r[k]:.3g}" for k in (
                "measured_floor", "predicted_floor", "measured_shift", "predicted_shift", "measured_source_avg",
                "predicted_source_avg")))
        for r in kn["more_sources"]:
            grid.add_row(str(r["K"]), str(r["n"]), "", f"{r['predicted_floor']:.3g}", "", "", "", "")
        out.print(grid)
    if not quiet:
        enc = Table(title="Representation errors per encoder (heads refit with the encoder frozen)")
        for col in ("encoder", "source average", "target"):
            enc.add_column(col, justify="left" if col == "encoder" else "right")
        for r in d["table"]:
            enc.add_row(r["encoder"], f"{r['source_avg']:.4g}", f"{r['target']:.4g}")
        out.print(enc)
        s = d["seconds"]
        out.print(f"diversity: {s['total']:.0f} s ({s['pretrains']:.0f} s pretrains, {s['heads']:.0f} s head refits)")


def theory_table(out: Console, report) -> None:
    table = Table(title=f"Target samples for {report.metric} error ≤ {report.epsilon:g}: uncalibrated theory "
                        f"(theory.md §3.1), orders of magnitude only")
    for col in ("mode", "required m", "dominant term", "note"):
        table.add_column(col, justify="right" if col == "required m" else "left")
    for mode, r in report.theory.items():
        note = r["reason"]
        table.add_row(mode, _m_text(r["m"]) if r["feasible"] else "infeasible", r["dominant_term"], note)
    out.print(table)
    if report.saving is not None:
        out.print(f"transfer needs {report.saving:.3g}× fewer target samples than scratch (theory)")


def calibrated_table(out: Console, report) -> None:
    cal = Table(title="Fitted to the target sweep alone (95% bootstrap intervals over seeds)")
    for col in ("mode", "m for ε: floor + A/m", "interval", "m for ε: floor + A/m^p", "interval", "floor",
                "p (measured)", "p (theory)", "consistent"):
        cal.add_column(col, justify="left" if col == "mode" else "right")
    for mode, r in report.calibrated.items():
        if "error" in r:
            cal.add_row(mode, "–", r["error"], "", "", "", "")
            continue
        lo, hi = r["m_interval"]
        m_text = _m_text(r["m"]) if r["reachable"] else f"unreachable (floor {r['floor']:.3g} ≥ ε)"
        mp = r.get("m_power")
        mp_lo, mp_hi = r.get("m_power_interval", [None, None])
        p_lo, p_hi = r["exponent_interval"]
        cal.add_row(mode, m_text, f"[{_m_text(lo)}, {_m_text(hi)}]", _m_text(mp) if mp else "unreachable",
                    f"[{_m_text(mp_lo)}, {_m_text(mp_hi)}]", f"{r['floor']:.3g}",
                    f"{r['exponent']:.2f} [{p_lo:.2f}, {p_hi:.2f}]", f"{r['theory_exponent']:.2f}",
                    "yes" if r["consistent"] else "no")
    out.print(cal)
