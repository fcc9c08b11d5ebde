"""Image restoration suites (theory.md §4.2): x a clean digit image, y a degraded copy; sources digits 1..9, target 0.

`digits`: the 8×8 handwritten digits that ship inside scikit-learn (1797 images, ~180 per digit; nothing downloaded).
`mnist`: 28×28 MNIST read from a file the user already has (IDX pair or .npz with x_train/y_train; nothing downloaded).
Pixels p ∈ [0, 1] are degraded in that scale (images.py), then x = 2p − 1 and y = 2A(p) − 1 + noise are used as is
(no further standardisation). Degradations: `noise` y = p + N(0, σ²), σ = 0.5 as in the paper; `blur`, `inpaint`
(random pixel mask; y = [masked image, mask] with `mask_channel`), `downsample` (2× average pooling, upsampled),
each followed by a small noise `extra_noise`. No score or conditional sampler is exact (GroundTruth returns None),
so evaluate reports posterior_mean_mse plus `psnr` (dB, [0, 1] pixels) of the posterior mean via `extra_metrics`.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from cdmtransfer import images
from cdmtransfer.config import Config, DigitsSuite
from cdmtransfer.errors import DataError
from cdmtransfer.tasks.base import TaskSet, stack_sources

# The IDX pair as LeCun's site names it, and the dotted spelling common elsewhere (train-images.idx3-ubyte)
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
MNIST_SPELLINGS = {name: (name, name.replace("-idx", ".idx")) for name in MNIST_FILES}


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's bundled digits as pixels in [0, 1] ([N, 8, 8], values 0..16 divided by 16) and labels [N]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except Exception as exc:  # noqa: BLE001 (OSError, EOFError, zlib.error from a damaged .gz)
        raise DataError(f"{path}: cannot read IDX file ({type(exc).__name__}: "
                        f"{(str(exc).splitlines() or [''])[0]})") from None
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"{path}: not an IDX file with magic {magic:#010x}")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: IDX header truncated")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: IDX header says {dims} but holds {data.size} values")
    return data.reshape(dims)


def _find(folder: Path, name: str) -> Path | None:
    """The first of `name`'s spellings (MNIST_SPELLINGS), plain or .gz, that exists in `folder`."""
    for spelling in MNIST_SPELLINGS[name]:
        for candidate in (folder / spelling, folder / f"{spelling}.gz"):
            if candidate.is_file():
                return candidate
    return None


def read_mnist(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST training images as pixels in [0, 1] ([N, 28, 28]) and labels, from a directory of IDX files or an .npz."""
    path = Path(path)
    expected = (f"a directory with {MNIST_FILES[0]} and {MNIST_FILES[1]} (or train-images.idx3-ubyte and "
                f"train-labels.idx1-ubyte; optionally .gz), or an .npz with arrays x_train and y_train")
    if path.is_file() and path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in ("x_train", "y_train") if k not in z.files]
                if missing:
                    raise DataError(f"{path}: no array {', '.join(missing)}; expected {expected}")
                x, y = z["x_train"], z["y_train"]
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 (BadZipFile, ValueError, OSError, zlib.error, ...)
            raise DataError(f"{path}: cannot read .npz ({type(exc).__name__}: "
                            f"{(str(exc).splitlines() or [''])[0]})") from None
    elif path.is_dir():
        files = [_find(path, name) for name in MNIST_FILES]
        if None in files:
            raise DataError(f"{path}: MNIST files not found; expected {expected}")
        x, y = _read_idx(files[0], 0x00000803), _read_idx(files[1], 0x00000801)
    else:
        raise DataError(f"{path}: not found; expected {expected}")
    if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise DataError(f"{path}: need images [N, H, W] and labels [N], got {x.shape} and {y.shape}")
    if x.dtype.kind not in "iuf" or y.dtype.kind not in "iuf" or x.size == 0:
        raise DataError(f"{path}: need non-empty numeric images and labels, got {x.dtype} {x.shape} and {y.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{path}: images hold NaN or inf")
    return x / (255.0 if x.max() > 1 else 1.0), y.astype(np.int64)


def degrade(p: torch.Tensor, dcfg: DigitsSuite, gen: torch.Generator) -> torch.Tensor:
    """Degraded observation y of pixel images p [B, H, W], flattened in model units: [B, D_y]."""
    B = p.shape[0]
    kind = dcfg.degradation
    if kind == "noise":
        return images.to_model(images.add_noise(p, dcfg.noise_std, gen)).view(B, -1)
    if kind == "blur":
        return images.to_model(images.add_noise(images.blur(p, dcfg.blur_sigma), dcfg.extra_noise, gen)).view(B, -1)
    if kind == "downsample":
        return images.to_model(images.add_noise(images.downsample(p, 2), dcfg.extra_noise, gen)).view(B, -1)
    mask = images.random_mask(p.shape, dcfg.mask_fraction, gen)
    y = images.to_model(images.inpaint(images.add_noise(p, dcfg.extra_noise, gen), mask)).view(B, -1)
    return torch.cat([y, images.to_model(mask).view(B, -1)], dim=1) if dcfg.mask_channel else y


def build_restoration(name: str, pix: np.ndarray, labels: np.ndarray, cfg: Config, dcfg: DigitsSuite,
                      source: str) -> TaskSet:
    s = cfg.suite
    H, W = pix.shape[1:]
    if dcfg.degradation == "downsample" and (H % 2 or W % 2):
        raise DataError(f"{source}: downsample needs even image sides, got {H}×{W}")
    for digit in [*dcfg.sources, dcfg.target]:
        if not (labels == digit).any():
            raise DataError(f"{source}: no images of digit {digit}")
    if dcfg.target in dcfg.sources:
        raise DataError(f"{source}: target digit {dcfg.target} is also a source")
    gen = torch.Generator().manual_seed(s.seed)
    pix_t = torch.as_tensor(pix)

    def rows(digit: int) -> torch.Tensor:
        idx = torch.as_tensor(np.flatnonzero(labels == digit))
        return pix_t[idx[torch.randperm(idx.numel(), generator=gen)]]

    def pairs(p: torch.Tensor):
        return images.to_model(p).view(p.shape[0], -1), degrade(p, dcfg, gen)

    xs, ys = zip(*(pairs(rows(k)[: s.n]) for k in dcfg.sources))  # all rows of each source digit, capped at n
    X, Y, n = stack_sources(list(xs), list(ys))
    target = rows(dcfg.target)
    n_test = min(s.n_test, target.shape[0] // 2)  # disjoint: test first, the pool from the rest
    test_x, test_y = pairs(target[:n_test])
    pool_x, pool_y = pairs(target[n_test: n_test + s.n_target_pool])
    channels = 2 if dcfg.degradation == "inpaint" and dcfg.mask_channel else 1

    def extra_metrics(*, x_true, x_mean, y, **_):
        """psnr: the posterior mean vs the clean image; psnr_input: the degraded image itself (for reference)."""
        clean = images.to_pixels(x_true)
        return {"psnr": float(images.psnr(images.to_pixels(x_mean), clean).mean()),
                "psnr_input": float(images.psnr(images.to_pixels(y[:, : H * W]), clean).mean())}

    def preview(y, samples, x_true):
        rows_ = [y[:, : H * W], samples[:, 0], samples.mean(1)] + ([x_true] if x_true is not None else [])
        labels_ = ["degraded", "sample", "posterior mean", "clean"][: len(rows_)]
        return torch.stack([images.to_pixels(r).view(-1, H, W) for r in rows_]), labels_

    desc = (f"{name} {H}x{W}, {dcfg.degradation}, sources {''.join(map(str, dcfg.sources))}, "
            f"target {dcfg.target}")
    return TaskSet(name, X, Y, n, pool_x, pool_y, test_x, test_y, description=desc, image_shape=(H, W),
                   condition_shape=(channels, H, W), extra_metrics=extra_metrics, preview=preview)


def build(cfg: Config) -> TaskSet:
    pix, labels = load_sklearn_digits()
    return build_restoration("digits", pix, labels, cfg, cfg.suite.digits, "sklearn digits")


def build_mnist(cfg: Config) -> TaskSet:
    pix, labels = read_mnist(cfg.suite.mnist.path)
    return build_restoration("mnist", pix, labels, cfg, cfg.suite.mnist, cfg.suite.mnist.path)
