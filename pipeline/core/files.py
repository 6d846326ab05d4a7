"""timecat's files in shared folders: written whole or not at all, never through a planted symlink.

Every file timecat writes is written to a temporary name beside it and renamed
into place (a rename replaces a symlink at the destination instead of
following it, and a reader never sees half a file); files that are appended
to (JSON-lines logs) are opened with O_NOFOLLOW. A full disk becomes one
message that says so, and leaves the file as it was. JSON-lines files are read
tolerating lines torn by a crash.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cache.errors import NO_SPACE, NOT_WRITABLE, disk_full
from pipeline.core.errors import TimecatError

WRITE_BLOCK = 1 << 16  # bytes per write() when appending; the results lock keeps writers' blocks apart


def disk_error(error: OSError, what: str) -> TimecatError:
    """The user-facing error for a failed write of ``what``: a full disk says so and how to go on."""
    if error.errno in NO_SPACE:
        return TimecatError(disk_full(what, error.strerror))
    if error.errno in NOT_WRITABLE:
        return TimecatError(f"cannot write {what} ({error.strerror}): the folder is not writable")
    if error.errno == errno.ELOOP:
        return TimecatError(f"{what} is a symbolic link: refusing to follow it; remove it and run again")
    return TimecatError(f"cannot write {what}: {error}")


def check_writable(folder: Path, what: str) -> None:
    """Refuse, before any work, a folder (or its nearest existing parent) that cannot be written."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():  # a file is "writable", yet no folder can be made in it
        raise TimecatError(
            f"{what} {folder} is not a folder ({existing} is a file): name a folder, or move the file away"
        )
    if not os.access(existing, os.W_OK):
        raise TimecatError(
            f"{what} {folder} is not writable ({existing} refuses writes): fix its permissions or choose another"
        )


# What a destination other than a regular file is, for the refusal: os.replace would put a file in its place.
NOT_REGULAR = (
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISFIFO, "FIFO (named pipe)"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISDIR, "folder"),
)


def check_destination(path: Path) -> Path:
    """Refuse a destination that exists and is not a regular file, or is a symlink to one that is not.

    A rename onto a device node or a FIFO replaces it (as root, ``/dev/null`` became a PNG).
    A symlink to a regular file, or to nothing, is fine: the rename replaces the link, never
    the file it names. Commands call this before their work; ``replace`` calls it again.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode  # follows a symlink: what a reader of ``path`` would reach
    except FileNotFoundError:
        return path  # nothing there, or a dangling symlink: the rename replaces it
    except OSError as e:
        if e.errno == errno.ELOOP:  # a symlink loop names no file: the rename replaces the link
            return path
        raise disk_error(e, str(path)) from e
    for test, kind in NOT_REGULAR:
        if test(mode):
            link = f" (a symbolic link to {os.path.realpath(path)})" if path.is_symlink() else ""
            raise TimecatError(
                f"{path} is a {kind}{link}, not a regular file: timecat writes only regular files, "
                "and would replace it; choose another path"
            )
    return path


def check_real_folders(root: Path, relative: str, what: str, fix: str = "remove the link and run again") -> Path:
    """Refuse when a folder from below ``root`` down to ``root/relative`` is a symbolic link; return that path.

    timecat's own folders (a member's, a dataset's, a split's) are written into: a link planted
    there (``runs/evil -> ~/victim``) would have training replace the files it points at. The
    roots themselves (runs, data, results, a cache) may be links: the user chose them.
    """
    current = Path(root)
    for part in Path(relative).parts:
        current = current / part
        if current.is_symlink():
            raise TimecatError(
                f"{what} {current} is a symbolic link (to {os.readlink(current)}): timecat writes only into real "
                f"folders below {root}, never through a link; {fix}"
            )
    return current


def replace(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` for a temporary file beside ``path``, then rename it onto ``path``.

    A symlink at ``path`` is replaced, never followed; a device, FIFO, socket or folder there
    (or a symlink to one) is refused. On any error ``path`` is untouched and the temporary
    file is removed.
    """
    path = check_destination(Path(path))
    tmp = None
    try:
        tmp = temporary(path)
        write(tmp)
        fsync(tmp)  # the bytes reach the disk before the name: a crash never leaves a whole-sized file of zeros
        os.replace(tmp, path)
    except OSError as e:
        raise disk_error(e, str(path)) from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    return path


def fsync(path: Path) -> None:
    """Flush a written file's data to the disk (os.fsync; a read-only descriptor suffices on Linux)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary(path: Path) -> Path:
    """A new, empty file beside ``path`` with an unguessable name: ``.NAME.tmp-HOST-PID-RANDOM``.

    Created exclusively (O_EXCL), so nothing planted under a name can be written through;
    the host and pid in the name let ``remove_stale`` tell a dead writer's file from a live one's.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # what a plain open() would give, not mkstemp's 0600
    os.close(fd)
    return Path(name)


STALE_AFTER_S = 7 * 24 * 3600  # another host's temporary this old is taken for a dead writer's


def remove_stale(path: Path) -> list[Path]:
    """Delete temporaries beside ``path`` left by writers that died; return them.

    On this host, a writer is dead when its pid is gone. Another host's temporary (the
    folder may be shared) is only removed once it is a week old: its pid means nothing here.
    """
    removed = []
    for tmp in Path(path).parent.glob(f".{Path(path).name}.tmp-*"):
        parts = tmp.name.rsplit(".tmp-", 1)[1].split("-")
        if len(parts) >= 3 and parts[-2].isdigit():
            host, pid = "-".join(parts[:-2]), int(parts[-2])
        elif len(parts) == 1 and parts[0].isdigit():  # the older .NAME.tmp-PID form
            host, pid = socket.gethostname(), int(parts[0])
        else:
            continue
        here = host == socket.gethostname()
        with contextlib.suppress(OSError):
            if (here and not _alive(pid)) or (not here and time.time() - tmp.stat().st_mtime > STALE_AFTER_S):
                tmp.unlink()
                removed.append(tmp)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine (another user's counts)."""
    return _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` whole (temporary file, then rename)."""
    return replace(path, lambda tmp: tmp.write_text(text))


@contextlib.contextmanager
def open_append(path: Path) -> Iterator[int]:
    """A file descriptor that appends to ``path`` (created if absent); a symlink there is refused."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # read: the last byte
    except OSError as e:
        raise disk_error(e, str(path)) from e
    try:
        yield fd
    finally:
        os.close(fd)


def append_all_or_nothing(fd: int, data: bytes, what: str) -> None:
    """Append ``data`` in bounded writes; on any error cut the file back to where it was, and say why.

    A file whose last line was torn by an earlier crash gets a newline first, so the
    new line starts clean. The caller holds whatever lock keeps other writers out.
    """
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        data = b"\n" + data
    view = memoryview(data)
    try:
        while view:
            written = os.write(fd, view[:WRITE_BLOCK])
            view = view[written:]
    except OSError as e:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)  # all or nothing: no torn line for the next writer to glue onto
        raise disk_error(e, what) from e


def read_jsonl(path: Path) -> tuple[list[tuple[int, dict]], list[int]]:
    """``(line number, object)`` for each JSON object of a JSON-lines file, and the numbers of the lines
    that are not one (torn by a crash, or edited)."""
    records, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad.append(number)
                continue
            if isinstance(record, dict):
                records.append((number, record))
            else:
                bad.append(number)
    return records, bad


def json_safe(value):
    """``value`` with every non-finite float (at any depth) as None: JSON has no NaN or Infinity, and
    Python's json would write them as bare tokens that no other JSON reader accepts."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
