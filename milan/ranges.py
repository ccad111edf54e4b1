"""Declarative value ranges of numeric config keys: ``mask_ratio: Fraction = 0.75``.

A field annotated ``Annotated[float, Range(...)]`` (or one of the aliases below) is checked when a config is read
(:func:`milan.train.config.load_config`) and when a job checks a config built in Python (its ``check_*``
function re-reads it as if from a file); the error names the dotted key, the allowed range and a valid value.
``milan config JOB`` prints the range next to the type.

Examples:
    >>> str(Range(0, 1, hi_open=True)), str(Range(1)), str(Range(0, lo_open=True))
    ('in [0, 1)', '>= 1', '> 0')
    >>> 1.0 in Range(0, 1, hi_open=True)
    False
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

from milan.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """An interval of allowed values; ``None`` bounds are open-ended, ``*_open`` bounds are excluded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def __str__(self) -> str:
        lo, hi = _num(self.lo), _num(self.hi)
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        return "any value"

    def check(self, value: Any, key: str, example: Any = None) -> None:
        """Raises :class:`ConfigError` naming ``key`` unless ``value`` is in the range.

        Args:
            value: The value.
            key: Its dotted config key.
            example: A valid value to suggest (e.g. the default); left out when it is not in the range.
        """
        if value is None or value in self:
            return
        if example is not None and example in self and "[" not in key:
            fix = f"e.g. {key}={_num(example)} (the default)"
        else:
            fix = f"set {key} to a value {self}"
        raise ConfigError(f"{key} must be {self}, got {value!r}; {fix}")


def _num(value: Any) -> str:
    """``1.0`` -> ``1``, ``0.75`` -> ``0.75``: numbers as a user would type them."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def range_of(metadata: tuple[Any, ...]) -> Range | None:
    """The :class:`Range` among an ``Annotated`` type's metadata, if any."""
    return next((m for m in metadata if isinstance(m, Range)), None)


# The common ranges. Fractions and probabilities are floats; counts and sizes are ints.
Positive = Annotated[int, Range(1)]  # a count or size: >= 1
NonNegative = Annotated[int, Range(0)]  # a count that may be 0 (0 often means "off")
PositiveFloat = Annotated[float, Range(0, lo_open=True)]  # > 0
NonNegativeFloat = Annotated[float, Range(0)]  # >= 0
Probability = Annotated[float, Range(0, 1)]  # in [0, 1]
Fraction = Annotated[float, Range(0, 1, hi_open=True)]  # in [0, 1): mask ratios, Adam betas, drop-path rates
