"""The on-disk layout of a feature cache, in one place.

    <root>/                                  group, attrs: format_version
      <dataset>/<split>/labels               int64 (n,), attrs: fingerprint, classes
      <dataset>/<split>/features/<member>    float32 (n, d), attrs: status, provenance
      <dataset>/<split>/views/<k>/<member>   float32 (n, d): augmented view k (optional)

Rows are in dataset order, identical for every member of a split, so members'
arrays can be concatenated column-wise without any join. View k of every
member holds the features of the same random crop and flip of each image.
"""

from __future__ import annotations

import enum
import itertools
import re

import numpy as np

from cache.errors import CacheError

FORMAT_VERSION = 1

# Measured with zarr-python 3 on a 2-core machine when timecat's cache was designed: whole-row
# chunks of about 8 MiB (1,024 rows x 2,048 float32) read faster than 4,096- or 16,384-row
# chunks, and stay cheap to rewrite on resume.
CHUNK_BYTES = 8 * 1024 * 1024

STATUS_WRITING = "writing"
STATUS_COMPLETE = "complete"

DTYPES = {"float32": np.float32, "float16": np.float16}


class Compression(enum.Enum):
    """How feature chunks are compressed on disk."""

    # Read time and peak memory of each: tests/benchmarks/test_cache_read.py.
    ZSTD = "zstd"  # ZstdCodec level 1: 1.29x smaller on disk (measured when the cache was designed)
    NONE = "none"  # larger on disk, faster to read


LABELS = "labels"  # the name of a split's label array


def labels_path(dataset: str, split: str) -> str:
    """Path of a split's label array inside the store."""
    return f"{dataset}/{split}/{LABELS}"


def views_group(dataset: str, split: str) -> str:
    """Path of the group that holds one group per augmented view of a split."""
    return f"{dataset}/{split}/views"


def features_group(dataset: str, split: str, view: int | None = None) -> str:
    """Path of the group that holds one array per member for a split (or one view of it)."""
    if view is None:
        return f"{dataset}/{split}/features"
    if not isinstance(view, int) or view < 0:
        raise CacheError(f"view must be a non-negative integer or None, not {view!r}")
    return f"{views_group(dataset, split)}/{view}"


def features_path(dataset: str, split: str, member: str, view: int | None = None) -> str:
    """Path of one member's feature array for a split (or one view of it)."""
    return f"{features_group(dataset, split, view)}/{member}"


def describe(dataset: str, split: str, view: int | None = None) -> str:
    """``dataset/split`` or ``dataset/split view k``, for messages."""
    return f"{dataset}/{split}" + ("" if view is None else f" view {view}")


def chunk_rows(dim: int, dtype: str) -> int:
    """Rows per chunk so that one chunk of whole rows is about CHUNK_BYTES."""
    itemsize = np.dtype(resolve_dtype(dtype)).itemsize
    return max(1, CHUNK_BYTES // (dim * itemsize))


def row_ranges(rows: int, chunk_rows: int, parts: int) -> list[tuple[int, int]]:
    """Split rows [0, rows) into ``parts`` contiguous, chunk-aligned ranges, in order.

    Concurrent writers must each own whole chunks (interleaved or unaligned
    writers lost thousands of rows in zarr-python 3 tests when the cache was designed);
    a part may be empty when there are more
    parts than chunks.
    """
    chunks = -(-rows // chunk_rows)
    bounds = [min(rows, (chunks * p // parts) * chunk_rows) for p in range(parts + 1)]
    return list(itertools.pairwise(bounds))


def resolve_dtype(dtype: str) -> type:
    """The numpy dtype for a storage dtype name, or a CacheError naming the choices."""
    try:
        return DTYPES[dtype]
    except KeyError:
        raise CacheError(f"unknown feature dtype {dtype!r}; choose one of {sorted(DTYPES)}") from None


# One rule for every name that becomes a folder, a file or a store path: members, datasets,
# splits, plan members. ASCII only, so names survive every filesystem, shell and log line.
NAME_RULE = "1 to 128 ASCII letters, digits, '-', '_' or '.', not starting with '.' or '-'"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def check_name(kind: str, name: str) -> str:
    """Refuse names that would break the store's paths or a shell: the error states the rule."""
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise CacheError(f"invalid {kind} name {name!r}: use {NAME_RULE}")
    return name


def is_remote(path) -> bool:
    """Whether a store path is a URL other than file:// (S3, GCS, memory): no local folders, links or flocks."""
    path = str(path)
    return "://" in path and not path.startswith("file://")
