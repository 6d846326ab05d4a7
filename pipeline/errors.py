"""The exception every stage raises for input it cannot use."""


class TimecatError(Exception):
    """Bad input or state; the message names the problem and the fix."""
