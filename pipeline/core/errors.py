"""The exception every stage raises for input it cannot use, and the checks of values read from files."""

import math


class TimecatError(Exception):
    """Bad input or state; the message names the problem and the fix."""


SEED_LIMIT = 2**32  # numpy's and torch's generators both take seeds below this


def check_seed(seed: int, what: str = "seed") -> int:
    """A seed both numpy and torch accept, or an error that gives the range."""
    if not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise TimecatError(f"{what} must be an integer from 0 to {SEED_LIMIT - 1}, got {seed!r}")
    return seed


def is_finite_number(value) -> bool:
    """An int or float that is finite, not a bool: what a number read from JSON must be before it is used."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
