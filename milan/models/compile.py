"""``torch.compile`` for MILAN with a clean eager fallback.

Only the ``forward`` of a module is replaced (an instance attribute shadowing the method), so the module keeps
its parameters, state-dict keys and hooks, DDP can wrap it as usual, and forward hooks run eagerly around the
compiled region (no recompilation when hooks are added or removed). If compiling fails (no C++ compiler on a CPU
machine, an unsupported op, a backend error), the module warns once and runs eagerly from then on.

Compilation happens on the first call, when the forward graph is traced and compiled; the backward graph is
compiled at the first backward pass, where a failure cannot be caught here (set ``TORCH_COMPILE_DISABLE=1`` then).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from milan.models.milan import MILAN


class EagerFallback:
    """Calls a compiled function; on an error, warns once and calls the eager function from then on.

    Out-of-memory errors are re-raised (falling back to eager would only use more memory).

    Args:
        compiled: The ``torch.compile`` result.
        eager: The original function.
        what: Name used in the warning.
    """

    def __init__(self, compiled: Callable[..., Any], eager: Callable[..., Any], what: str) -> None:
        self.compiled: Callable[..., Any] | None = compiled
        self.eager = eager
        self.what = what

    @property
    def active(self) -> bool:
        """Whether the compiled function is still in use."""
        return self.compiled is not None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # any compile-stack error; a genuine model error re-raises eagerly below
                reason = f"{type(exc).__name__}: {_first_line(exc)}"
                cause = exc.__cause__ or getattr(exc, "inner_exception", None)  # dynamo wraps backend errors
                if isinstance(cause, BaseException):
                    reason += f" {type(cause).__name__}: {_first_line(cause)}"
                warnings.warn(
                    f"torch.compile of {self.what} failed ({reason}); running it eagerly",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.compiled = None
        return self.eager(*args, **kwargs)


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, at most 300 characters."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def compile_method(module: nn.Module, name: str = "forward", **compile_kwargs: Any) -> EagerFallback:
    """Replaces ``module.<name>`` with a compiled version that falls back to eager on failure.

    Args:
        module: The module to compile in place.
        name: The method to compile (``forward`` or another method the module's ``forward`` calls).
        **compile_kwargs: Passed to ``torch.compile`` (``mode``, ``backend``, ``fullgraph``, ``dynamic``).

    Returns:
        The installed wrapper (``.active`` tells whether compilation is still in use).
    """
    undo_compile(module, name)
    eager = getattr(module, name)
    wrapper = EagerFallback(torch.compile(eager, **compile_kwargs), eager, f"{type(module).__name__}.{name}")
    setattr(module, name, wrapper)
    return wrapper


def undo_compile(module: nn.Module, name: str = "forward") -> None:
    """Restores the eager method if :func:`compile_method` replaced it."""
    if isinstance(module.__dict__.get(name), EagerFallback):
        delattr(module, name)


def compile_milan(
    model: MILAN, *, mode: str | None = None, backend: str = "inductor", teacher: bool = True
) -> list[EagerFallback]:
    """Compiles the student (encoder + decoder, forward and backward) and the teacher's inference pass.

    The mask draw and the loss stay eager (small, and ``torch.multinomial`` breaks graphs). With
    ``mode="reduce-overhead"`` inductor replays CUDA graphs of the compiled parts.

    Args:
        model: The MILAN model, modified in place (state dict and DDP wrapping are unaffected).
        mode: ``torch.compile`` mode (``None``, ``"max-autotune-no-cudagraphs"``, ``"reduce-overhead"``, ...).
        backend: ``torch.compile`` backend.
        teacher: Also compile the teacher.

    Returns:
        The wrappers installed.
    """
    kwargs: dict[str, Any] = {"backend": backend} if mode is None else {"backend": backend, "mode": mode}
    wrappers = [compile_method(model.student, "forward", **kwargs)]
    if teacher and model.teacher is not None:
        wrappers.append(compile_method(model.teacher, "_forward", **kwargs))
    return wrappers
