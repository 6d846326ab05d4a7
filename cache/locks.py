"""Exclusive, crash-safe locks on local files: one writer of a member at a time.

An flock dies with its process, so a writer killed by SIGKILL or preemption
never leaves a stale lock behind. The lock file holds the holder's pid, host and
start time, so a refused second writer can say who is in the way.
"""

from __future__ import annotations

import contextlib
import fcntl  # POSIX only, like the clusters timecat runs on
import json
import os
import socket
import time

from cache.errors import CacheError


class BusyError(CacheError):
    """The lock is held by another process; ``holder`` says which."""

    def __init__(self, path: str, holder: dict):
        super().__init__(f"{path} is locked by {holder}")
        self.holder = holder


@contextlib.contextmanager
def hold(lock_path: str):
    """Hold an exclusive lock on ``lock_path`` (created with its folders), or raise BusyError at once."""
    os.makedirs(os.path.dirname(lock_path) or ".", exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BusyError(lock_path, _read_holder(fd)) from None
        os.ftruncate(fd, 0)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def holder(lock_path: str) -> dict | None:
    """Who holds ``lock_path`` now (pid, host, since), or None when nobody does."""
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
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
