"""Errors a user can fix, and the switch that shows their tracebacks.

The ``milan`` command prints a :class:`UserError` (a :class:`ConfigError` among them), a checkpoint error or an
operating-system error (a missing file, a folder that cannot be written, a full disk) as one line,
``milan: error: MESSAGE``, and exits non-zero: 2 for a usage error (a bad command line or config value), 1 for a
failure. ``milan --traceback ...`` or the environment variable ``MILAN_TRACEBACK=1`` shows the full traceback
instead; anything else (a bug) always prints its traceback.
"""

from __future__ import annotations

import os
import warnings

TRACEBACK_ENV = "MILAN_TRACEBACK"


class UserError(Exception):
    """A problem the user can fix; its message names it and the fix. ``exit_code``: 2 usage, 1 failure."""

    exit_code: int = 1


class ConfigError(UserError, ValueError):
    """An invalid configuration: unknown key, wrong type, bad value or unreadable file."""

    exit_code = 2


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file that cannot be used (missing, truncated, corrupt, unsafe, or lying about its contents)."""


class CheckpointNotFoundError(CheckpointError):
    """A checkpoint path (named on the command line or in a config) that does not exist: a usage error."""

    exit_code = 2


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGTERM or SIGINT after its current step, with a resumable checkpoint written.

    Here, not with the loop, so that the command line reads its exit status without importing torch.

    Attributes:
        exit_status: The conventional status of a process ended by that signal (128 + signum: 143, 130).
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + signum


class CheckpointWarning(UserWarning):
    """A value a checkpoint does not record was assumed (the message says which, why, and how to set it)."""


def warn_assumption(message: str) -> None:
    """Issues ``message`` as a :class:`CheckpointWarning` (shown once per message by Python's default filter)."""
    warnings.warn(message, CheckpointWarning, stacklevel=3)


def traceback_requested() -> bool:
    """Whether the user asked for full tracebacks (``milan --traceback`` or ``MILAN_TRACEBACK=1``)."""
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")
