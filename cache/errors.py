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
