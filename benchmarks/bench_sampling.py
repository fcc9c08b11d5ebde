"""Benchmark `sampling`: what evaluation's posterior sampling costs on a Langevin-sized model, the sampler's fast path
(ScoreModel.sampling_eps: the code's share of the first layer and μ(w) once per sampling, the time's share and the
preconditioning once per step) against the model's general ε̂ (eps_from_code on [1, B, ·] batches, per-row times).
Run from the repository root:

    .venv/bin/python benchmarks/bench_sampling.py [--quick] [--threads N]

The model has recipes/langevin.yaml's shape (d_x = 50, D_y = 100, d = 10; encoder 256 × 3, heads 128 × 2; EDM,
linear mean, full covariance) with random weights; metrics.conditional_samples draws 100 conditions × 128 denoised
samples over 100 SDE steps (what evaluate_model draws per Langevin cell), both paths in interleaved repetitions.
Both give the same samples to float rounding (the largest difference is reported).

Then batched evaluation (#12): 8 such models with their own weights, σ_d and encoders, 100 conditions × 32 denoised
draws each (what evaluate_model draws for the posterior mean per cell) over 100 SDE steps, one model after the other
(metrics.conditional_samples) against all 8 side by side (metrics.stacked_conditional_samples: the heads stacked,
one sampler run), in interleaved repetitions; the samples agree to float rounding.
"""

from __future__ import annotations

import sys
import time

from _common import log, main, median, samples_table, status

NAME = "sampling"
OPTIONS = []


STACKED_MODELS = 8


def defaults(args) -> None:
    args.sampling_reps = 2 if args.quick else 5


def _langevin_sized(model_cls, seed: int):
    """A model of recipes/langevin.yaml's shape with random weights (its linear mean and covariance made non-trivial)."""
    import torch

    from cdmtransfer.models import MLPEncoder

    torch.manual_seed(seed)
    model = model_cls(MLPEncoder(100, 10, 256, 3), 1, 50, 128, 2, 16, parametrization="edm",
                      sigma_data=0.8 + 0.05 * seed, linear_mean=True, mean_covariance="full")
    with torch.no_grad():
        for p in model.heads.mean.parameters():  # built as zero; the heads keep nn.Linear's initialisation
            p.normal_(0, 0.3)
        model.heads.mean.basis.copy_(torch.linalg.qr(torch.randn(1, 50, 50))[0])
        model.heads.mean.scale.uniform_(0.3, 1.5)
    return model.eval()


def run(args) -> dict:
    import torch

    from cdmtransfer.diffusion import OUProcess
    from cdmtransfer.metrics import conditional_samples, stacked_conditional_samples
    from cdmtransfer.models import ScoreModel

    class General(ScoreModel):
        """The same model; an ε̂ of its own (the parent's) sends sampling down the general path."""

        def eps_from_code(self, *args):
            return super().eps_from_code(*args)

    torch.set_num_threads(args.threads)
    fast = _langevin_sized(ScoreModel, 0)
    general = _langevin_sized(General, 0)
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
    models = [_langevin_sized(ScoreModel, seed) for seed in range(STACKED_MODELS)]

    def draw_models(stacked: bool):
        gen, n_per = torch.Generator().manual_seed(2), 32
        if stacked:
            return stacked_conditional_samples(models, y, n_per, process, 100, "sde", gen, denoise=True)
        state, out_ = gen.get_state(), []
        for model in models:
            gen.set_state(state)
            out_.append(conditional_samples(model, y, n_per, process, 100, "sde", gen, denoise=True))
        return torch.stack(out_)

    stacked_times, stacked_out = {"one model after the other": [], "stacked": []}, {}
    for rep in range(args.sampling_reps):
        for name in stacked_times:
            t0 = time.perf_counter()
            stacked_out[name] = draw_models(name == "stacked")
            stacked_times[name].append(time.perf_counter() - t0)
        log(f"sampling: rep {rep}: {STACKED_MODELS} models one after the other "
            f"{stacked_times['one model after the other'][-1]:.2f} s, stacked {stacked_times['stacked'][-1]:.2f} s")
    return {"reps": args.sampling_reps, "threads": torch.get_num_threads(), "seconds": times,
            "max_abs_diff": float((out["fast"] - out["general"]).abs().max()),
            "sample_scale": float(out["general"].abs().mean()),
            "stacked": {"models": STACKED_MODELS, "seconds": stacked_times,
                        "max_abs_diff": float((stacked_out["stacked"] - stacked_out["one model after the other"])
                                              .abs().max())}}


def summary(res: dict) -> list[list]:
    got = res.get(NAME)
    if not got:
        return []
    fast, general = median(got["seconds"]["fast"]), median(got["seconds"]["general"])
    rows = [["sampling: 12,800 Langevin draws x 100 steps, fast path vs eps_from_code",
             f"{fast:.2f} vs {general:.2f} s (x{general / fast:.2f})", "> x1", status(general > fast)]]
    stacked = got.get("stacked")
    if stacked:
        alone, together = (median(stacked["seconds"][k]) for k in ("one model after the other", "stacked"))
        rows.append([f"sampling: {stacked['models']} models x 3,200 draws, stacked vs one after the other",
                     f"{together:.2f} vs {alone:.2f} s (x{alone / together:.2f})", "-", "info"])
    return rows


def details(res: dict) -> list[str]:
    got = res.get(NAME)
    if not got:
        return []
    return ["", "## Sampling: 100 conditions x 128 denoised draws x 100 SDE steps, Langevin-sized model", "",
            f"{got['threads']} threads, {got['reps']} interleaved repetitions; largest difference between the two "
            f"paths' samples {got['max_abs_diff']:.2g} (samples' mean |x| {got['sample_scale']:.2f}).", "",
            samples_table("path", "seconds", got["seconds"])] + _stacked_details(got.get("stacked"))


def _stacked_details(got: dict | None) -> list[str]:
    if not got:
        return []
    return ["", f"## Batched evaluation: {got['models']} Langevin-sized models, 100 conditions x 32 denoised draws x "
            f"100 SDE steps each", "",
            f"Largest difference between the stacked and the one-by-one samples {got['max_abs_diff']:.2g}.", "",
            samples_table("models", "seconds", got["seconds"])]


if __name__ == "__main__":
    sys.exit(main([sys.modules[__name__]], __doc__))
