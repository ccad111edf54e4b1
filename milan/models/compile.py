"""``torch.compile`` of MILAN's student and teacher, with torch's own eager fallback.

Only a method of a module is replaced (an instance attribute shadowing it), so the module keeps its parameters,
state-dict keys and hooks, DDP can wrap it as usual, and forward hooks run eagerly around the compiled region (no
recompilation when hooks are added or removed). If compiling fails (no C++ compiler on a CPU machine, an unsupported
op, a backend error), ``torch._dynamo.config.suppress_errors`` runs that code eagerly from then on; torch logs the
failure with its traceback, which is turned into one :class:`CompileWarning` line per function here.

Compilation happens on the first call; the backward graph is compiled at the first backward pass, where torch does
not suppress a failure (set ``TORCHDYNAMO_DISABLE=1`` then).
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

import torch.nn as nn

from milan.models.milan import MILAN


class CompileWarning(RuntimeWarning):
    """``torch.compile`` failed and the code runs eagerly."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


class _OneWarning(logging.Filter):
    """Turns dynamo's "WON'T CONVERT ... Traceback" log records into one :class:`CompileWarning` per function.

    After a function's frame fails, dynamo also tries (and fails on) every frame it calls; those repeat the reason
    already reported and are dropped. Dynamo names the failing frame only inside its pre-formatted message
    (``WON'T CONVERT <name> <file> line <n>``), which is matched against the methods :func:`compile_method` compiled.
    """

    def __init__(self) -> None:
        super().__init__()
        self.compiled: dict[tuple[str, int], str] = {}  # (file, first line) of a compiled method -> its name
        self.reported: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.levelno < logging.WARNING or exc is None:
            return True
        reason = f"{type(exc).__name__}: {_first_line(exc)}"
        cause = exc.__cause__ or getattr(exc, "inner_exception", None)  # dynamo wraps backend errors
        if isinstance(cause, BaseException):
            reason += f" {type(cause).__name__}: {_first_line(cause)}"
        frame = re.match(r"WON'T CONVERT \S+ (.+) line (\d+)", record.getMessage())
        what = self.compiled.get((frame.group(1), int(frame.group(2)))) if frame else None
        if what is not None and what not in self.reported:
            self._warn(f"torch.compile of {what}", reason)
        elif what is None and reason not in self.reported:  # a frame we did not compile ourselves
            self._warn("torch.compile", reason)
        self.reported.update({reason} if what is None else {reason, what})
        return False

    @staticmethod
    def _warn(what: str, reason: str) -> None:
        warnings.warn(f"{what} failed ({reason}); running it eagerly", CompileWarning, stacklevel=3)


_FILTER = _OneWarning()


def compile_method(module: nn.Module, name: str = "forward", **compile_kwargs: Any) -> None:
    """Replaces ``module.<name>`` with its ``torch.compile`` version, which runs eagerly if compilation fails.

    Dynamo's caches are cleared first (compile at set-up, before anything compiled runs).

    Args:
        module: The module to compile in place.
        name: The method to compile (``forward`` or another method the module's ``forward`` calls).
        **compile_kwargs: Passed to ``torch.compile`` (``mode``, ``backend``, ``fullgraph``, ``dynamic``).
    """
    import torch._dynamo  # imported here: heavy, and only needed when compiling

    # A failed compilation marks its code as not compilable for the rest of the process: start each compile afresh.
    torch._dynamo.reset()
    _FILTER.reported.clear()
    torch._dynamo.config.suppress_errors = True
    logger = logging.getLogger("torch._dynamo.convert_frame")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    module.__dict__.pop(name, None)  # compiling twice compiles the eager method again
    method = getattr(module, name)
    code = getattr(getattr(method, "__func__", method), "__code__", None)
    if code is not None:
        _FILTER.compiled[(code.co_filename, code.co_firstlineno)] = f"{type(module).__name__}.{name}"
    setattr(module, name, torch.compile(method, **compile_kwargs))


def compile_milan(model: MILAN, *, mode: str | None = None, backend: str = "inductor", teacher: bool = True) -> None:
    """Compiles the student (encoder + decoder, forward and backward) and the teacher's inference pass.

    The mask draw and the loss stay eager (small). With ``mode="reduce-overhead"`` inductor replays CUDA graphs of
    the compiled parts. The model is modified in place (state dict and DDP wrapping are unaffected).
    """
    compile_method(model.student, "forward", mode=mode, backend=backend)
    if teacher and model.teacher is not None:
        compile_method(model.teacher, "_forward", mode=mode, backend=backend)
