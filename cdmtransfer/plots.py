"""Plots written as PNG artifacts (matplotlib, Agg backend, imported only when a plot is made)."""

from __future__ import annotations

from pathlib import Path


def learning_curves(summary: list[dict], metric: str, path: Path, title: str) -> Path | None:
    """Log-log target error vs m, one line per mode (mean over seeds), the seed range shaded (mean ± sd)."""
    rows = [r for r in summary if metric in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for mode in sorted({r["mode"] for r in rows}):
        pts = sorted((r["m"], r[metric]["mean"], r[metric]["std"]) for r in rows if r["mode"] == mode)
        m = [p[0] for p in pts]
        mean = [p[1] for p in pts]
        lo = [max(p[1] - p[2], p[1] * 0.05) for p in pts]  # keep the band positive on a log axis
        hi = [p[1] + p[2] for p in pts]
        (line,) = ax.plot(m, mean, marker="o", label=mode)
        ax.fill_between(m, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("target samples m")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
