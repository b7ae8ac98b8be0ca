"""The checks every part of merging shares, written once: finite numbers, fractions, and
key/shape layouts compared in full (every offending key named, not just the first one hit)."""

from __future__ import annotations

import math
import numbers
from typing import Mapping, Sequence

LISTED = 5


class TaskVectorError(ValueError):
    """Bad input to task arithmetic: mismatched keys or shapes, bad arguments, refused files."""


def listing(items: Sequence[str]) -> str:
    more = len(items) - LISTED
    return ", ".join(items[:LISTED]) + (f" ... and {more} more" if more > 0 else "")


def finite(name: str, value: object) -> float:
    """``value`` as a float; bools and strings are refused rather than coerced."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TaskVectorError(f"{name}={value!r} is not allowed: it must be a finite number.")
    return float(value)


def fraction(name: str, value: object, *, low_open: bool) -> float:
    """A probability-like setting: ``(0, 1]`` (``low_open``, e.g. a density) or ``[0, 1)``
    (e.g. a drop rate, where 1 would drop everything and divide by zero)."""
    number = finite(name, value)
    if low_open and not 0 < number <= 1:
        raise TaskVectorError(f"{name}={value!r} is not allowed: it must be in (0, 1].")
    if not low_open and not 0 <= number < 1:
        raise TaskVectorError(f"{name}={value!r} is not allowed: it must be in [0, 1).")
    return number


def check_keys(a: Mapping[str, tuple], b: Mapping[str, tuple], a_name: str, b_name: str,
               *, allow_extra_b: bool = False, context: str = "") -> None:
    """Raise one error naming every offending key (truncated), prefixed by ``context``."""
    problems = []
    if missing := sorted(set(a) - set(b)):
        problems.append(f"keys missing from {b_name}: {listing(missing)}")
    if (extra := sorted(set(b) - set(a))) and not allow_extra_b:
        problems.append(f"keys missing from {a_name}: {listing(extra)}")
    if shapes := [f"{k} {a[k]} vs {b[k]}" for k in sorted(set(a) & set(b)) if a[k] != b[k]]:
        problems.append(f"shape mismatch ({a_name} vs {b_name}): {listing(shapes)}")
    if problems:
        raise TaskVectorError(context + "; ".join(problems))
