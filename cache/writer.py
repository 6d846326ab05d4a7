"""Appending rows to one member's feature array, whole chunks at a time."""

from __future__ import annotations

import numpy as np
import zarr

from cache.errors import CacheError

FLOAT16_MAX = float(np.finfo(np.float16).max)


class FeatureWriter:
    """Writes rows of one (n, d) array in dataset order.

    Rows are buffered until a whole chunk is ready, because a write smaller than
    a chunk makes zarr re-read and re-compress it (28x slower, REFERENCE.md), and
    chunk-aligned writes are what lets a resumed or multi-process extraction own
    disjoint chunks.
    """

    def __init__(self, array: zarr.Array, start_row: int = 0):
        self.array = array
        self.rows_per_chunk = array.chunks[0]
        if start_row % self.rows_per_chunk:
            raise CacheError(f"start row {start_row} is not a multiple of the chunk size {self.rows_per_chunk}")
        self.next_row = start_row  # first row not yet written to the store
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0

    def append(self, block: np.ndarray) -> None:
        """Queue a (rows, d) block that directly follows the rows given before."""
        n, d = self.array.shape
        if block.ndim != 2 or block.shape[1] != d:
            raise CacheError(f"feature block has shape {block.shape}, expected (rows, {d})")
        if self.next_row + self._pending_rows + len(block) > n:
            raise CacheError(f"more rows than the split holds ({n})")
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
            self.array[self.next_row : self.next_row + take] = rows[:take]
            self.next_row += take
        rest = rows[take:]
        self._pending = [rest] if len(rest) else []
        self._pending_rows = len(rest)


def _check_float16_range(block: np.ndarray) -> None:
    # float16 silently turns large values into inf; refuse rather than store garbage.
    peak = float(np.abs(block).max(initial=0.0))
    if peak > FLOAT16_MAX:
        raise CacheError(f"feature value {peak:.4g} exceeds float16's range ({FLOAT16_MAX}); use dtype float32")
