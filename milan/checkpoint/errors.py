"""The error and the warning of the checkpoint readers.

:class:`CheckpointError` is a problem with a file (missing, truncated, corrupt, unsafe, or lying about its contents);
its message is one line that names the file and what is wrong. :class:`CheckpointWarning` is an assumption a reader
had to make because the file does not record a value (e.g. a teacher's activation); its message names the value
chosen, why, and the option that chooses another. The ``milan`` command line prints both as one line.
"""

from __future__ import annotations

import warnings

from milan.errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file that cannot be read safely (missing, truncated, corrupt, unsafe or lying about its size)."""


class CheckpointWarning(UserWarning):
    """A value the checkpoint does not record was assumed (the message says which, why, and how to set it)."""


def warn_assumption(message: str) -> None:
    """Issues ``message`` as a :class:`CheckpointWarning` (shown once per message by Python's default filter)."""
    warnings.warn(message, CheckpointWarning, stacklevel=3)
