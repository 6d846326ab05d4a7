"""Row writers: appending rows to one member's feature array, whole chunks at a time (in the background)."""

from __future__ import annotations

import queue
import threading

import numpy as np
import zarr

from cache.errors import NO_SPACE, CacheError

FLOAT16_MAX = float(np.finfo(np.float16).max)


class FeatureWriter:
    """Writes rows of one (n, d) array in dataset order.

    Rows are buffered until a whole chunk is ready, because a write smaller than
    a chunk makes zarr re-read and re-compress it (28x slower, measured with
    zarr-python 3 on a 2-core machine), and
    chunk-aligned writes are what lets a resumed or multi-process extraction own
    disjoint chunks.
    """

    def __init__(self, array: zarr.Array, start_row: int = 0, stop_row: int | None = None):
        self.array = array
        self.rows_per_chunk = array.chunks[0]
        self.stop_row = array.shape[0] if stop_row is None else stop_row  # this writer owns [start_row, stop_row)
        for row in (start_row, self.stop_row):
            if row % self.rows_per_chunk and row != array.shape[0]:
                raise CacheError(f"row {row} is not a multiple of the chunk size {self.rows_per_chunk}")
        self.next_row = start_row  # first row not yet written to the store
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0

    def append(self, block: np.ndarray) -> None:
        """Queue a (rows, d) block that directly follows the rows given before."""
        d = self.array.shape[1]
        if block.ndim != 2 or block.shape[1] != d:
            raise CacheError(f"feature block has shape {block.shape}, expected (rows, {d})")
        if self.next_row + self._pending_rows + len(block) > self.stop_row:
            raise CacheError(f"more rows than this writer owns (up to row {self.stop_row})")
        first = self.next_row + self._pending_rows
        bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
        if len(bad):
            rows = (first + bad[:5]).tolist()
            raise CacheError(
                f"{self.array.path}: {len(bad)} row(s) of non-finite features (NaN or inf), e.g. rows {rows}; "
                "the member stays 'writing': check the checkpoint and its preprocessing"
            )
        if self.array.dtype == np.float16:
            _check_float16_range(block)
        self._pending.append(np.asarray(block, dtype=self.array.dtype))
        self._pending_rows += len(block)
        if self._pending_rows >= self.rows_per_chunk:
            self._flush(whole_chunks_only=True)

    def close(self) -> int:
        """Write what is left (the final, possibly short, chunk); return rows written."""
        self._flush(whole_chunks_only=False)
        return self.next_row

    def _flush(self, whole_chunks_only: bool) -> None:
        if not self._pending_rows:
            return
        rows = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        take = len(rows)
        if whole_chunks_only:
            take -= take % self.rows_per_chunk
        if take:
            try:
                self.array[self.next_row : self.next_row + take] = rows[:take]
            except OSError as e:
                if e.errno not in NO_SPACE:
                    raise CacheError(_write_failed(self.array.path, self.next_row, self.next_row + take, e)) from e
                # next_row stays put: nothing from this write counts as written, and a
                # rerun's resume scan treats any partly written chunk as missing.
                raise CacheError(
                    f"no space left on the device while writing rows {self.next_row}-{self.next_row + take - 1} "
                    f"of {self.array.path} ({e.strerror}); free some space and run the same command again: "
                    f"it resumes from row {self.next_row}"
                ) from e
            self.next_row += take
        rest = rows[take:]
        self._pending = [rest] if len(rest) else []
        self._pending_rows = len(rest)


class BackgroundWriter:
    """Appends blocks to FeatureWriters on a thread, so checks, compression and disk
    writes overlap the next forward pass instead of stalling it.

    The queue is bounded: a slow disk makes the producer wait instead of filling
    RAM. An error on the thread is raised again by the next ``append`` or by ``close``.
    """

    def __init__(self, max_pending: int = 8):
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._flush_at_end = True
        self._thread = threading.Thread(target=self._run, name="timecat-cache-writer", daemon=True)
        self._thread.start()

    def append(self, writer: FeatureWriter, block: np.ndarray) -> None:
        """Queue ``block`` for ``writer``; waits while ``max_pending`` blocks are queued."""
        self._raise_error()
        self._queue.put((writer, block))

    def close(self) -> None:
        """Write everything queued, flush each writer's last rows, and raise any error."""
        self._queue.put(None)
        self._thread.join()
        self._raise_error()

    def abort(self) -> None:
        """Stop after the queued blocks without flushing partial chunks, and raise nothing.

        For a producer that is failing: its own error is the one to report, and
        whole chunks already queued are still written, so a rerun resumes after them.
        """
        self._flush_at_end = False
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        writers = []
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining so the producer never blocks on a dead consumer
            writer, block = item
            try:
                writer.append(block)
                if writer not in writers:
                    writers.append(writer)
            except BaseException as e:  # re-raised in the producer's thread
                self._error = e
        if self._error is None and self._flush_at_end:
            try:
                for writer in writers:
                    writer.close()
            except BaseException as e:
                self._error = e

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error


def _check_float16_range(block: np.ndarray) -> None:
    # float16 silently turns large values into inf; refuse rather than store garbage.
    peak = float(np.abs(block).max(initial=0.0))
    if peak > FLOAT16_MAX:
        raise CacheError(f"feature value {peak:.4g} exceeds float16's range ({FLOAT16_MAX}); use dtype float32")


def _write_failed(path: str, start: int, stop: int, error: OSError) -> str:
    """The message for a chunk write the filesystem refused: what stood in the way, and the fix."""
    where = error.filename2 or error.filename or path  # os.replace names the chunk it could not replace second
    if isinstance(error, PermissionError):
        fix = "it is not writable by this user: ask its owner to fix its permissions, or use another --cache"
    elif isinstance(error, IsADirectoryError):
        fix = "a folder stands where a chunk belongs: rerun with --overwrite, which writes the array anew"
    else:
        fix = "rerun with --overwrite, which writes the array anew"
    return f"cannot write rows {start}-{stop - 1} of {path} to {where} ({error.strerror}); {fix}"
