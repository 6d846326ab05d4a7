"""The one exception type the cache raises for bad input or a broken store, and the errnos it names."""

import errno

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or a full quota
NOT_WRITABLE = (errno.EACCES, errno.EROFS, errno.EPERM)


class CacheError(Exception):
    """A cache request that cannot be served; the message names the fix."""


def disk_full(what: str, strerror: str) -> str:
    """The message for a write of ``what`` that found the disk (or quota) full."""
    return (
        f"no space left on the device while writing {what} ({strerror}); free some space and run the same "
        "command again: nothing written before is lost"
    )


def not_readable(path, error: OSError) -> str:
    """The message for a file this user may not read: a permissions problem, not damage.

    ``--repair`` or deleting it would not help a reader of another user's files, and must
    not be what they are told.
    """
    where = getattr(error, "filename", None) or path
    return (
        f"{where} is not readable by this user ({error.strerror or error}): ask its owner to fix its "
        "permissions (or fix them yourself if it is yours, e.g. chmod -R u+rX); nothing needs repairing"
    )


# Where each location comes from on the command line: (flag, environment variable, folder of the workspace).
LOCATIONS = {
    "data": ("--data-root", "TIMECAT_DATA", "data"),
    "runs": ("--runs", "TIMECAT_RUNS", "runs"),
    "cache": ("--cache", "TIMECAT_CACHE", "features.zarr"),
    "results": ("--results", "TIMECAT_RESULTS", "results"),
}


def elsewhere(location: str) -> str:
    """How to point a command at another ``location`` ("data", "runs", "cache" or "results"), for not-found errors."""
    flag, env, folder = LOCATIONS[location]
    return f"{flag} PATH, or --workdir DIR for DIR/{folder}; env {env}, TIMECAT_WORKDIR"


def shown(path) -> str:
    """A path as given, with its absolute form when it is relative (a not-found error says where it looked)."""
    import os

    path = str(path)
    if "://" in path or os.path.isabs(path):
        return path
    return f"{path} ({os.path.abspath(path)})"


def did_you_mean(name: str, known) -> str:
    """`` (did you mean 'run0'?)`` for the closest known name, or an empty string."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
