"""User-facing errors.

Every user mistake (config, paths, corrupt files, impossible layouts) raises a subclass of
:class:`TridentError`. CLIs catch it in :func:`cli_main`, print one line naming the key, file or
byte offset plus a hint, and exit with the error's code (2 unless a distinct code is documented).
Internal bugs are ordinary exceptions and may traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

EXIT_USER_ERROR = 2
EXIT_LOSS_SCALE_COLLAPSE = 3
EXIT_NO_CHECKPOINT = 4


class TridentError(Exception):
    """A user-facing error; ``str()`` is the single line the CLI prints."""

    exit_code: int = EXIT_USER_ERROR

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        line = self.message if self.hint is None else f"{self.message} (hint: {self.hint})"
        return " ".join(line.split("\n"))


class ConfigError(TridentError):
    """Bad configuration: names the key path, e.g. ``optimizer.params.lr``."""


class DataError(TridentError):
    """Bad or corrupt data files: names the file and, where it applies, the byte offset."""


class CheckpointError(TridentError):
    """A checkpoint that is missing, corrupt or does not fit the model/layout."""


class NoCheckpointError(CheckpointError):
    """``--resume`` was asked for but no complete checkpoint exists."""

    exit_code = EXIT_NO_CHECKPOINT


class LossScaleCollapseError(TridentError):
    """fp16 loss scale sits at its floor and keeps overflowing: training cannot progress."""

    exit_code = EXIT_LOSS_SCALE_COLLAPSE


class LaunchError(TridentError):
    """The distributed environment could not be discovered or does not fit the config."""


def cli_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run a CLI ``main``; user errors become one line on stderr and their exit code."""
    try:
        code = main(argv)
    except TridentError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
