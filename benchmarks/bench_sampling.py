"""Benchmark `sampling`: what evaluation's posterior sampling costs on a Langevin-sized model, the sampler's fast path
(ScoreModel.sampling_eps: the code's share of the first layer and μ(w) once per sampling, the time's share and the
preconditioning once per step) against the model's general ε̂ (eps_from_code on [1, B, ·] batches, per-row times).
Run from the repository root:

    .venv/bin/python benchmarks/bench_sampling.py [--quick] [--threads N]

The model has recipes/langevin.yaml's shape (d_x = 50, D_y = 100, d = 10; encoder 256 × 3, heads 128 × 2; EDM,
linear mean, full covariance) with random weights; metrics.conditional_samples draws 100 conditions × 128 denoised
samples over 100 SDE steps (what evaluate_model draws per Langevin cell), both paths in interleaved repetitions.
Both give the same samples to float rounding (the largest difference is reported).
"""

from __future__ import annotations

import sys
import time

from _common import log, main, median, samples_table, status

NAME = "sampling"
OPTIONS = []


def defaults(args) -> None:
    args.sampling_reps = 2 if args.quick else 5


def run(args) -> dict:
    import torch

    from cdmtransfer.diffusion import OUProcess
    from cdmtransfer.metrics import conditional_samples
    from cdmtransfer.models import MLPEncoder, ScoreModel

    class General(ScoreModel):
        """The same model; an ε̂ of its own (the parent's) sends sampling down the general path."""

        def eps_from_code(self, *args):
            return super().eps_from_code(*args)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fast = ScoreModel(MLPEncoder(100, 10, 256, 3), 1, 50, 128, 2, 16, parametrization="edm", sigma_data=0.8,
                      linear_mean=True, mean_covariance="full")
    with torch.no_grad():
        for p in fast.heads.mean.parameters():  # built as zero; the heads keep nn.Linear's initialisation
            p.normal_(0, 0.3)
        fast.heads.mean.basis.copy_(torch.linalg.qr(torch.randn(1, 50, 50))[0])
        fast.heads.mean.scale.uniform_(0.3, 1.5)
    general = General(MLPEncoder(100, 10, 256, 3), 1, 50, 128, 2, 16, parametrization="edm", sigma_data=0.8,
                      linear_mean=True, mean_covariance="full")
    general.load_state_dict(fast.state_dict())
    y = torch.randn(100, 100, generator=torch.Generator().manual_seed(1))
    process = OUProcess(0.01, 5.0)

    def draw(model):
        return conditional_samples(model, y, 128, process, 100, "sde", torch.Generator().manual_seed(2), denoise=True)

    times, out = {"fast": [], "general": []}, {}
    for rep in range(args.sampling_reps):
        for name, model in (("fast", fast), ("general", general)):
            t0 = time.perf_counter()
            out[name] = draw(model)
            times[name].append(time.perf_counter() - t0)
        log(f"sampling: rep {rep}: fast {times['fast'][-1]:.2f} s, general {times['general'][-1]:.2f} s")
    return {"reps": args.sampling_reps, "threads": torch.get_num_threads(), "seconds": times,
            "max_abs_diff": float((out["fast"] - out["general"]).abs().max()),
            "sample_scale": float(out["general"].abs().mean())}


def summary(res: dict) -> list[list]:
    got = res.get(NAME)
    if not got:
        return []
    fast, general = median(got["seconds"]["fast"]), median(got["seconds"]["general"])
    return [["sampling: 12,800 Langevin draws x 100 steps, fast path vs eps_from_code",
             f"{fast:.2f} vs {general:.2f} s (x{general / fast:.2f})", "> x1", status(general > fast)]]


def details(res: dict) -> list[str]:
    got = res.get(NAME)
    if not got:
        return []
    return ["", "## Sampling: 100 conditions x 128 denoised draws x 100 SDE steps, Langevin-sized model", "",
            f"{got['threads']} threads, {got['reps']} interleaved repetitions; largest difference between the two "
            f"paths' samples {got['max_abs_diff']:.2g} (samples' mean |x| {got['sample_scale']:.2f}).", "",
            samples_table("path", "seconds", got["seconds"])]


if __name__ == "__main__":
    sys.exit(main([sys.modules[__name__]], __doc__))
