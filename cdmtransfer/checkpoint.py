"""Checkpoints: safetensors weights + JSON meta + a weights-only training state, written atomically.

Layout of one checkpoint directory `step_000500/`:
    model.safetensors   raw weights            ema.safetensors   EMA weights (what we evaluate and sample with)
    train_state.pt      optimiser state, step, RNG state: plain tensors and numbers, loaded with weights_only=True
    meta.json           format version, stage, model spec, resolved config
Each is written into `step_000500.tmp-<pid>/` and the directory is renamed into place only when complete, so a
reader never sees a half-written checkpoint. The slim export for inference (`model/`) holds only the EMA weights
and meta.json.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from cdmtransfer.errors import CdmError, DataError, StorageError

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


# Every file is serialised in memory first, so a full disk surfaces as an OSError with its errno when the bytes are
# written (torch.save and safetensors writing to a path hide it behind their own messages).

def _json_bytes(data: dict) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True).encode()


def _weights_bytes(state: dict, metadata: dict | None = None) -> bytes:
    return save(_tensors(state), metadata=metadata)


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _write_directory(final: Path, files: dict[str, bytes], what: str, kept: Callable[[], str]) -> None:
    """Make `final` hold exactly `files`, atomically: written into a temporary sibling, then renamed into place.

    On failure the partial directory is removed (freeing the space it took) and an OSError becomes a StorageError
    naming `what` could not be written and what is still intact (`kept()`).
    """
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for name, data in files.items():
            _write_bytes(tmp / name, data)
        _publish(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _storage_error(exc, what, final.parent, kept()) from None
        raise


def _storage_error(exc: OSError, what: str, directory: Path, kept: str) -> StorageError:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        free = shutil.disk_usage(directory).free / 2**20 if directory.exists() else float("nan")
        reason += f", {free:.1f} MiB free"
    return StorageError(f"{directory}: cannot write {what} ({reason}); {kept}")


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu().clone() for k, v in state.items()}


def _publish(tmp: Path, final: Path) -> None:
    """Make `tmp` visible as `final` in one rename (replacing an older `final`)."""
    _fsync_dir(tmp)
    if final.exists():
        old = final.with_name(final.name + f".old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def save_checkpoint(directory: Path, step: int, model_state: dict, ema_state: dict, train_state: dict,
                    meta: dict, keep: int = 2) -> Path:
    """Write checkpoint `step` under `directory` (= <home>/work/<run id>/checkpoints) atomically; keep the newest
    `keep`. Returns its path. A failed write (disk full, read-only) removes its partial files and raises
    StorageError naming the last good checkpoint."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in [*directory.glob("step_*.tmp-*"), *directory.glob("step_*.old-*")]:  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)  # (one writer per run: rank 0)
    final = directory / f"step_{step:06d}"
    files = {"model.safetensors": _weights_bytes(model_state), "ema.safetensors": _weights_bytes(ema_state),
             "train_state.pt": _torch_bytes(train_state),
             "meta.json": _json_bytes({**meta, "format_version": FORMAT_VERSION, "step": step})}

    def kept() -> str:
        previous = list_checkpoints(directory)
        if not previous:
            return "no earlier checkpoint exists"
        return (f"the last good checkpoint {previous[-1].name} is intact: free space, then rerun with "
                f"--resume {directory.parent.name}")

    _write_directory(final, files, f"checkpoint {final.name}", kept)
    for old in list_checkpoints(directory)[:-keep]:
        _discard(old)
    return final


def _discard(path: Path) -> None:
    """Delete a checkpoint directory without ever exposing it half-deleted: rename it out of sight first."""
    hidden = path.with_name(path.name + f".old-{os.getpid()}")
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints under `directory`, oldest first (temporary directories are ignored)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def read_meta(path: Path) -> dict:
    meta_path = path / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not a cdmtransfer checkpoint (no meta.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise DataError(f"{meta_path}: corrupt checkpoint metadata") from None
    except OSError as exc:  # a directory named meta.json, no permission
        raise DataError(f"{meta_path}: cannot read checkpoint metadata ({exc.strerror or exc})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: corrupt checkpoint metadata (not a JSON object)")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(f"{path}: checkpoint format version {version!r} is not supported "
                        f"(this cdmtransfer reads version {FORMAT_VERSION})")
    return meta


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: weights file not found") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"{path}: corrupt or truncated weights file ({_first_line(exc)})") from None


def load_checkpoint(path: Path) -> tuple[dict, dict, dict, dict]:
    """(model_state, ema_state, train_state, meta) of one checkpoint directory, loaded without running code."""
    meta = read_meta(path)
    model_state = load_weights(path / "model.safetensors")
    ema_state = load_weights(path / "ema.safetensors")
    try:
        train_state = torch.load(path / "train_state.pt", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: train_state.pt not found") from None
    except Exception as exc:  # the unpickler raises several types for a damaged file
        raise DataError(f"{path / 'train_state.pt'}: corrupt or unsafe training state ({_first_line(exc)})") from None
    return model_state, ema_state, train_state, meta


def _first_line(exc: BaseException) -> str:
    """The start of a library's message: torch's and safetensors' run over several lines."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def export_model(directory: Path, ema_state: dict, meta: dict) -> Path:
    """The slim inference export: EMA weights + meta.json, written atomically to `directory`."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    files = {"model.safetensors": _weights_bytes(ema_state, {"format_version": str(FORMAT_VERSION)}),
             "meta.json": _json_bytes({**meta, "format_version": FORMAT_VERSION})}
    _write_directory(directory, files, f"the model export {directory.name}",
                     lambda: "the training checkpoints are intact")
    return directory


def load_export(directory: Path) -> tuple[dict, dict]:
    """(weights, meta) of an exported model directory (or of a checkpoint's EMA weights)."""
    if not directory.is_dir():
        raise DataError(f"{directory}: model directory not found")
    meta = read_meta(directory)
    weights_file = directory / "model.safetensors"
    if not weights_file.exists() and (directory / "ema.safetensors").exists():
        weights_file = directory / "ema.safetensors"
    return load_weights(weights_file), meta


def check_writable(directory: Path) -> None:
    """Fail early, with a clear message, when checkpoints could not be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CdmError(f"{directory}: cannot write checkpoints here ({exc.strerror or exc})") from None
