"""Errors a user can act on. Each carries the exit code the CLI returns (DESIGN.md, Conventions)."""


_stop = {"requested": False}


def request_stop() -> None:
    """SIGTERM's handler (cli.main) marks the process to stop as well as raising KeyboardInterrupt: that exception can
    be lost (raised inside a garbage-collector callback, Python ignores it) or turned into another by library code;
    the training loop then stops at its next step (`check_stop`) and the run is still marked KILLED, exit 130."""
    _stop["requested"] = True


def stop_requested() -> bool:
    return _stop["requested"]


def check_stop() -> None:
    """Raise KeyboardInterrupt if a stop was requested (called once per training step)."""
    if _stop["requested"]:
        raise KeyboardInterrupt


def clear_stop() -> None:
    _stop["requested"] = False


def one_line(text: str) -> str:
    """`text` as one line: a file name or value with a line break must not split the CLI's error line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


class CdmError(Exception):
    """A failure with a one-line message for the user; `exit_code` is what the CLI exits with."""

    exit_code = 1


class ConfigError(CdmError):
    """Usage or configuration error: a bad recipe, key, value or option (exit 2)."""

    exit_code = 2


class DataError(CdmError):
    """Bad data: a missing or malformed file, wrong shapes, NaN/inf, too few rows (exit 3)."""

    exit_code = 3


class TrainingError(CdmError):
    """Training could not go on (e.g. a non-finite loss); the last good checkpoint is kept (exit 1)."""

    exit_code = 1


class StorageError(CdmError):
    """A file could not be written (disk full, quota, read-only or unwritable directory); earlier files are kept."""

    exit_code = 1
