"""Exclusive, crash-safe locks on local files: one writer of a member at a time.

An flock dies with its process, so a writer killed by SIGKILL or preemption
never leaves a stale lock behind. The lock file holds the holder's pid, host and
start time, so a refused second writer can say who is in the way.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl  # POSIX only, like the clusters timecat runs on
import json
import os
import socket
import time

from cache.errors import NO_SPACE, NOT_WRITABLE, CacheError


class BusyError(CacheError):
    """The lock is held by another process; ``holder`` says which."""

    def __init__(self, path: str, holder: dict):
        super().__init__(f"{path} is locked by {holder}")
        self.holder = holder


# flock errors that mean the filesystem cannot lock (NFS without lockd, some FUSE and
# parallel filesystems), as opposed to another process holding the lock.
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class UnsupportedError(CacheError):
    """The filesystem refuses file locks: concurrent writers could not be kept apart there."""


@contextlib.contextmanager
def hold(lock_path: str, wait: bool = False):
    """Hold an exclusive lock on ``lock_path`` (created with its folders).

    Raises BusyError at once when another process holds it, or waits for it with
    ``wait``. A symlink planted at ``lock_path`` is refused, not followed.
    """
    try:
        os.makedirs(os.path.dirname(lock_path) or ".", exist_ok=True)
        fd = _open(lock_path, os.O_RDWR | os.O_CREAT)
    except OSError as e:
        if e.errno in NO_SPACE:
            raise CacheError(f"no space left on the device to create the lock {lock_path}: free some space") from None
        if e.errno in NOT_WRITABLE:
            raise CacheError(f"cannot create the lock {lock_path} ({e.strerror}): the folder is not writable") from None
        raise
    try:
        try:
            lock_fd(fd, lock_path, wait)
        except BlockingIOError:
            raise BusyError(lock_path, _read_holder(fd)) from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
        except OSError as e:
            if e.errno in NO_SPACE:  # the lock is held; only its note of the holder is lost
                pass
            else:
                raise
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def lock_fd(fd: int, path: str, wait: bool = True) -> None:
    """flock ``fd`` exclusively (waiting, or BlockingIOError at once); a filesystem without locks is named."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise
    except OSError as e:
        if e.errno in UNSUPPORTED:
            raise UnsupportedError(
                f"{path}: this filesystem does not support file locks ({e.strerror}), so concurrent "
                "writers could not be kept apart; put the runs folder, the cache and the results on a local disk "
                "or a filesystem with working flock (ext4, xfs, NFSv4 with locking, Lustre mounted with -o flock)"
            ) from None
        raise


def _open(path: str, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CacheError(f"{path} is a symbolic link: refusing to follow it; remove it and run again") from None
        raise


def holder(lock_path: str) -> dict | None:
    """Who holds ``lock_path`` now (pid, host, since), or None when nobody does."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_NOFOLLOW)
    except (FileNotFoundError, OSError):  # absent, or a planted symlink: nobody holds it
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        return None
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict:
    text = os.pread(fd, 4096, 0).decode(errors="replace")
    try:
        return json.loads(text)
    except ValueError:  # written between truncate and write: the holder is known to exist, not who
        return {"pid": "unknown"}
