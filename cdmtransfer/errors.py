"""Errors a user can act on. Each carries the exit code the CLI returns (DESIGN.md, Conventions)."""


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
