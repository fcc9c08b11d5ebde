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


def conditional_scatter(model_draws, true_draws, x_true, path: Path, title: str) -> Path:
    """Model samples x | y (and true ones, where the suite can draw them) for a few test conditions, in the plane
    of the first two coordinates of x; the held-out true x of each condition is starred.

    Drawn with matplotlib's object API (no pyplot state), markers rather than a scatter collection and a fixed
    layout: ~0.2 s a figure instead of ~0.4 s (logged with every adapt run, so a sweep draws one per cell)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_cond = model_draws.shape[0]
    fig = Figure(figsize=(3.2 * n_cond, 3.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_cond, squeeze=False)[0]
    fig.subplots_adjust(left=0.25 / n_cond, right=0.98, bottom=0.15, top=0.82, wspace=0.35)
    j = 1 if model_draws.shape[-1] > 1 else 0
    for c, ax in enumerate(axes):
        if true_draws is not None:
            ax.plot(true_draws[c, :, 0], true_draws[c, :, j], ".", ms=3, alpha=0.35, color="grey", label="true")
        ax.plot(model_draws[c, :, 0], model_draws[c, :, j], ".", ms=3, alpha=0.5, color="tab:blue", label="model")
        ax.plot([x_true[c, 0]], [x_true[c, j]], "*", ms=11, color="tab:red", label="held-out x")
        ax.set_xlabel("x[0]")
        ax.set_ylabel(f"x[{j}]")
        ax.set_title(f"condition {c}", fontsize=9)
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def adapt_samples_figure(model, taskset, cfg, path: Path, draws: dict | None = None, n_cond: int = 3,
                         n_per: int = 200) -> Path | None:
    """The sample plot logged with every adapt run: the suite's image grid, or a scatter for vector data.

    `draws`: the conditional samples evaluation already drew for its first test conditions (metrics.evaluate_model's
    `keep`: model and true samples [C, N, d_x], the conditions' held-out x); the figure shows the first n_cond of
    them instead of sampling its own."""
    import torch

    from cdmtransfer.diffusion import OUProcess
    from cdmtransfer.metrics import conditional_samples

    if taskset.preview is not None:
        from cdmtransfer.images import write_preview

        return write_preview(model, taskset, cfg, path, seed=cfg.seed)
    if taskset.image_shape is not None:
        return None
    title = f"{cfg.name}: adapt {cfg.adapt.mode}, m = {cfg.adapt.m}"
    if draws is not None and draws["model"].shape[0] >= min(n_cond, taskset.test_y.shape[0]):
        truth = draws["true"]
        return conditional_scatter(draws["model"][:n_cond].numpy(), None if truth is None else truth[:n_cond].numpy(),
                                   draws["x"][:n_cond].numpy(), path, title)
    n_cond = min(n_cond, taskset.test_y.shape[0])
    y, x_true = taskset.test_y[:n_cond], taskset.test_x[:n_cond]
    gen = torch.Generator().manual_seed(cfg.evaluate.seed + 5)
    process = OUProcess(cfg.diffusion.T0, cfg.diffusion.T)
    model_draws = conditional_samples(model, y, n_per, process, cfg.evaluate.sampler_steps, cfg.evaluate.sampler, gen)
    truth = taskset.truth.sample(0, y.repeat_interleave(n_per, 0), gen)
    truth = None if truth is None else truth.view(n_cond, n_per, -1)
    return conditional_scatter(model_draws.numpy(), None if truth is None else truth.numpy(), x_true.numpy(), path,
                               title)


def estimate_band(predicted: dict, error: str, eps_text: str, path: Path) -> Path | None:
    """The predicted learning-curve band per mode (estimate): held-out tasks' points, the pooled band for a new
    task and, after --calibrate, the target's points and the updated band."""
    if not predicted:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(predicted), figsize=(5 * len(predicted), 4), dpi=110, squeeze=False)
    for ax, (mode, r) in zip(axes[0], predicted.items()):
        band = r["band"]
        ax.fill_between(band["m"], band["lo"], band["hi"], color="C0", alpha=0.2, label="new task (sources)")
        ax.plot(band["m"], band["mid"], color="C0")
        for t in r["tasks"]:
            pts = list(zip(*t["points"]))
            ax.plot(pts[0], pts[1], "o", ms=4, alpha=0.7, label=f"held-out source {t['task']}")
        if "updated" in r:
            u = r["updated"]
            ax.fill_between(u["band"]["m"], u["band"]["lo"], u["band"]["hi"], color="C3", alpha=0.25,
                            label="target (updated)")
            pts = list(zip(*u["target_points"]))
            ax.plot(pts[0], pts[1], "k*", ms=9, label="target points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("target samples m")
        ax.set_ylabel(error.replace("_", " "))
        ax.set_title(f"{mode}: ε = {eps_text}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
