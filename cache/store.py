"""Opening a cache, reading features for any set of members, and adding arrays."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.buffer import default_buffer_prototype

from cache import layout, locks
from cache.errors import CacheError
from cache.writer import FeatureWriter

# zarr warns that consolidated metadata is not in the v3 spec yet; we rely on it
# only as a read-side speed-up and rewrite it after every stage.
warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)


def open(path: str, mode: str = "r", storage_options: dict | None = None) -> Cache:  # noqa: A001
    """Open the cache at ``path`` (a local path or any fsspec URL zarr accepts).

    ``mode`` is ``"r"`` to read, ``"a"`` to read and add arrays (created if absent).
    """
    if mode not in ("r", "a"):
        raise CacheError(f"unknown mode {mode!r}; choose 'r' or 'a'")
    try:
        if mode == "r":
            group = zarr.open_group(store=path, mode="r", storage_options=storage_options)
        else:
            # Writers never trust consolidated metadata: it may be stale.
            group = zarr.open_group(store=path, mode="a", use_consolidated=False, storage_options=storage_options)
            group.attrs.setdefault("format_version", layout.FORMAT_VERSION)
    except FileNotFoundError:
        raise CacheError(f"no feature cache at {path}: run `timecat extract` first") from None
    version = group.attrs.get("format_version")
    if version != layout.FORMAT_VERSION:
        raise CacheError(f"{path} is not a timecat cache of format {layout.FORMAT_VERSION} (found {version!r})")
    return Cache(group, path, mode)


def labels_digest(labels: np.ndarray) -> str:
    """sha256 of a label vector, stored with each member to prove row agreement."""
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()


class Cache:
    """A feature cache: datasets -> splits -> labels and one array per member."""

    def __init__(self, group: zarr.Group, path: str, mode: str):
        self.group = group
        self.path = path
        self.mode = mode

    def __repr__(self) -> str:
        return f"Cache({self.path!r}, datasets={self.datasets()})"

    # -- listing ---------------------------------------------------------------

    def datasets(self) -> list[str]:
        """Dataset names in the cache."""
        return sorted(name for name, _ in self.group.groups())

    def splits(self, dataset: str) -> list[str]:
        """Split names cached for ``dataset``."""
        ds = self._group(dataset)
        return sorted(name for name, _ in ds.groups())

    def members(self, dataset: str, split: str, complete_only: bool = False, *, view: int | None = None) -> list[str]:
        """Members with an array for this split, or for one augmented view of it (only complete ones if asked)."""
        path = layout.features_group(dataset, split, view)
        if path not in self.group:
            return []
        names = sorted(name for name, _ in self.group[path].arrays())
        if complete_only:
            names = [m for m in names if self.status(dataset, split, m, view=view) == layout.STATUS_COMPLETE]
        return names

    def views(self, dataset: str, split: str) -> list[int]:
        """Indices of the augmented views cached for a split (``timecat extract --views K``)."""
        path = layout.views_group(dataset, split)
        if path not in self.group:
            return []
        return sorted(int(name) for name, _ in self.group[path].groups())

    def arrays(self) -> Iterator[tuple[str, str, int | None, str]]:
        """Every feature array as ``(dataset, split, view, member)``; view is None for plain features."""
        for dataset in self.datasets():
            for split in self.splits(dataset):
                for view in [None, *self.views(dataset, split)]:
                    for member in self.members(dataset, split, view=view):
                        yield dataset, split, view, member

    def summary(self) -> list[dict]:
        """One row per array: dataset, split, view, member, shape, dtype, status and provenance."""
        rows = []
        for dataset, split, view, member in self.arrays():
            array = self._features_array(dataset, split, member, view)
            rows.append(
                {
                    "dataset": dataset,
                    "split": split,
                    "view": view,
                    "member": member,
                    "rows": array.shape[0],
                    "dim": array.shape[1],
                    "dtype": str(array.dtype),
                    "status": array.attrs.get("status"),
                    "provenance": dict(array.attrs.get("provenance", {})),
                }
            )
        return rows

    def verify(self) -> list[dict]:
        """Check every array: status, shape against the labels, a full NaN scan, label agreement.

        Returns one row per array with ``ok`` and a list of ``problems``.
        """
        rows, label_checks = [], {}
        for dataset, split, view, member in self.arrays():
            array = self._features_array(dataset, split, member, view)
            attrs = self.split_attrs(dataset, split)
            if (dataset, split) not in label_checks:  # once per split, not once per array
                labels = self.labels(dataset, split)
                found = []
                if len(labels) != attrs.get("rows"):
                    found.append(f"labels hold {len(labels)} rows, attributes say {attrs.get('rows')}")
                if labels_digest(labels) != attrs.get("labels_sha256"):
                    found.append("labels do not match their recorded sha256")
                label_checks[(dataset, split)] = (len(labels), found)
            n_labels, found = label_checks[(dataset, split)]
            problems = list(found)
            if array.attrs.get("status") != layout.STATUS_COMPLETE:
                problems.append(f"status is {array.attrs.get('status')!r}, not 'complete'")
            if array.shape[0] != n_labels:
                problems.append(f"{array.shape[0]} rows but the split has {n_labels}")
            prov = array.attrs.get("provenance", {})
            if prov.get("labels_sha256") != attrs.get("labels_sha256"):
                problems.append("extracted with other labels than the split's")
            if prov.get("dataset_fingerprint") != attrs.get("fingerprint"):
                problems.append("extracted from a different dataset fingerprint")
            first = self.first_unwritten_row(dataset, split, member, view=view)
            if first < array.shape[0]:
                problems.append(f"unwritten, unreadable or NaN rows from row {first}")
            rows.append(
                {
                    "dataset": dataset,
                    "split": split,
                    "view": view,
                    "member": member,
                    "shape": list(array.shape),
                    "ok": not problems,
                    "problems": problems,
                }
            )
        return rows

    # -- reading ---------------------------------------------------------------

    def labels(self, dataset: str, split: str) -> np.ndarray:
        """The (n,) int64 labels of a split, in dataset order."""
        return self._labels_array(dataset, split)[:]

    def split_attrs(self, dataset: str, split: str) -> dict:
        """Attributes of a split's labels: fingerprint, classes, rows."""
        return dict(self._labels_array(dataset, split).attrs)

    def status(self, dataset: str, split: str, member: str, *, view: int | None = None) -> str:
        """``writing`` or ``complete``."""
        return self._features_array(dataset, split, member, view).attrs.get("status")

    def provenance(self, dataset: str, split: str, member: str, *, view: int | None = None) -> dict:
        """Where a member's features came from: checkpoint sha256, arch, preprocessing..."""
        return dict(self._features_array(dataset, split, member, view).attrs.get("provenance", {}))

    def dim(self, dataset: str, split: str, member: str, *, view: int | None = None) -> int:
        """Feature width of one member."""
        return self._features_array(dataset, split, member, view).shape[1]

    def shape(self, dataset: str, split: str, member: str, *, view: int | None = None) -> tuple[int, int]:
        """(rows, dim) of one member's array."""
        return tuple(self._features_array(dataset, split, member, view).shape)

    def chunk_rows(self, dataset: str, split: str, member: str, *, view: int | None = None) -> int:
        """Rows per chunk of one member's array: the unit of writing, resuming and rank ownership."""
        return self._features_array(dataset, split, member, view).chunks[0]

    def check_members(
        self, dataset: str, split: str, members: Sequence[str], *, view: int | None = None
    ) -> list[zarr.Array]:
        """Refuse, by name, members that are unknown, unfinished, from other rows, or (views) other crops."""
        if not members:
            raise CacheError("no members given: pass at least one member name")
        if len(set(members)) != len(members):
            raise CacheError(f"a member is named twice in {list(members)}")
        where = layout.describe(dataset, split, view)
        available = self.members(dataset, split, view=view)
        unknown = [m for m in members if m not in available]
        if unknown:
            hint = "`timecat extract --views K`" if view is not None else "`timecat extract`"
            raise CacheError(f"unknown member(s) {unknown} for {where}; available: {available or f'none (run {hint})'}")
        split_attrs = self.split_attrs(dataset, split)
        digest = split_attrs.get("labels_sha256")
        arrays = []
        for m in members:
            array = self._features_array(dataset, split, m, view)
            status = array.attrs.get("status")
            if status != layout.STATUS_COMPLETE:
                raise CacheError(f"member {m} is {status!r} for {where}: rerun `timecat extract` for it")
            if array.nchunks_initialized < array.nchunks:  # e.g. a cache copied in part
                raise CacheError(
                    f"member {m} of {where} is missing {array.nchunks - array.nchunks_initialized} of its "
                    f"{array.nchunks} chunks: rerun `timecat extract` for it (it rewrites only those)"
                )
            prov = array.attrs.get("provenance", {})
            if array.shape[0] != split_attrs.get("rows"):
                raise CacheError(f"member {m} has {array.shape[0]} rows, the split has {split_attrs.get('rows')}")
            if prov.get("labels_sha256") != digest:
                raise CacheError(f"member {m} was extracted with other labels than {dataset}/{split}")
            if prov.get("dataset_fingerprint") != split_attrs.get("fingerprint"):
                raise CacheError(
                    f"member {m} was extracted from a different {dataset}/{split} "
                    f"(fingerprint {prov.get('dataset_fingerprint')} vs {split_attrs.get('fingerprint')})"
                )
            arrays.append(array)
        if view is not None:
            # View k must be the same crops of the same images for every member.
            seeds = {m: a.attrs.get("provenance", {}).get("view_seed") for m, a in zip(members, arrays, strict=True)}
            if len(set(seeds.values())) > 1:
                raise CacheError(f"members' views of {where} come from different view seeds {seeds}: re-extract them")
        return arrays

    def features(
        self, dataset: str, split: str, members: Sequence[str], *, view: int | None = None, scan_nan: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Concatenate members' features: ``(X float32 (n, sum of d), y int64 (n,))``.

        ``view=k`` reads augmented view k instead of the plain features. X is
        allocated once and each member fills its own column block in place: an
        ``np.hstack`` of per-member arrays would double peak memory and was 4-10x
        slower (REFERENCE.md).

        Every member is checked to be ``complete`` with all its chunks present (a
        missing chunk would read as NaN). ``scan_nan=True`` also scans every value,
        which adds about a third to the read time; ``verify()`` does the same for the
        whole cache.
        """
        arrays = self.check_members(dataset, split, members, view=view)
        n = arrays[0].shape[0]
        X = np.empty((n, sum(a.shape[1] for a in arrays)), dtype=np.float32)
        col = 0
        for member, array in zip(members, arrays, strict=True):
            block = X[:, col : col + array.shape[1]]
            _read_into(array, slice(0, n), block)
            # Scan a chunk of rows at a time: a whole-block isnan would allocate n x d bools.
            step = array.chunks[0]
            if scan_nan and any(np.isnan(block[i : i + step]).any() for i in range(0, n, step)):
                raise CacheError(
                    f"member {member} holds NaN rows in {layout.describe(dataset, split, view)}: re-extract it"
                )
            col += array.shape[1]
        return X, self.labels(dataset, split)

    def iter_rows(
        self,
        dataset: str,
        split: str,
        members: Sequence[str],
        block_rows: int | None = None,
        *,
        view: int | None = None,
    ) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
        """Yield ``(rows, X_block, y_block)`` over the concatenation, for data larger than RAM.

        ``block_rows`` defaults to one chunk of the first member.
        """
        arrays = self.check_members(dataset, split, members, view=view)
        n = arrays[0].shape[0]
        step = block_rows or arrays[0].chunks[0]
        labels = self._labels_array(dataset, split)
        width = sum(a.shape[1] for a in arrays)
        for start in range(0, n, step):
            rows = slice(start, min(n, start + step))
            X = np.empty((rows.stop - rows.start, width), dtype=np.float32)
            col = 0
            for array in arrays:
                _read_into(array, rows, X[:, col : col + array.shape[1]])
                col += array.shape[1]
            yield rows, X, labels[rows]

    # -- writing ---------------------------------------------------------------

    def write_labels(
        self,
        dataset: str,
        split: str,
        labels: np.ndarray,
        fingerprint: str,
        classes: list[str],
        kind: str | None = None,
    ) -> None:
        """Store a split's labels once; later calls must agree with them exactly.

        ``kind`` is the dataset's registered kind (cifar10, imagenet, ...), which picks
        probe recipes: a dataset prepared under another name keeps its kind's recipe.
        A cache written before kinds were recorded gets it on the next extraction.
        """
        self._require_writable()
        layout.check_name("dataset", dataset)
        layout.check_name("split", split)
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        path = layout.labels_path(dataset, split)
        if path in self.group:
            attrs = self.split_attrs(dataset, split)
            if attrs.get("fingerprint") != fingerprint or attrs.get("labels_sha256") != labels_digest(labels):
                raise CacheError(
                    f"{dataset}/{split} is cached from a different dataset (fingerprint "
                    f"{attrs.get('fingerprint')}, now {fingerprint}); use a new cache path or delete "
                    f"{self.path}/{dataset}/{split}"
                )
            if kind is not None and attrs.get("kind") != kind:
                if attrs.get("kind") is not None:
                    raise CacheError(f"{dataset}/{split} is cached as kind {attrs['kind']!r}, not {kind!r}")
                self._labels_array(dataset, split).attrs["kind"] = kind
            return
        array = self.group.create_array(path, shape=labels.shape, chunks=(1 << 20,), dtype=np.int64)
        array[:] = labels
        array.attrs.update(
            {
                "fingerprint": fingerprint,
                "labels_sha256": labels_digest(labels),
                "rows": len(labels),
                "classes": list(classes),
                "kind": kind,
            }
        )

    def create_features(
        self,
        dataset: str,
        split: str,
        member: str,
        dim: int,
        provenance: dict,
        dtype: str = "float32",
        compression: layout.Compression = layout.Compression.ZSTD,
        chunk_rows: int | None = None,
        *,
        view: int | None = None,
    ) -> FeatureWriter:
        """Create (or replace) a member's array, status ``writing``, and return its writer.

        ``chunk_rows`` overrides the ~8 MiB default (extraction rounds it to whole batches).
        ``view=k`` creates the array of augmented view k; its provenance should carry
        ``view_seed`` so that members' views can be checked to be the same crops.
        """
        self._require_writable()
        layout.check_name("member", member)
        if layout.labels_path(dataset, split) not in self.group:
            raise CacheError(f"write the labels of {dataset}/{split} before any member's features")
        rows = self.split_attrs(dataset, split)["rows"]
        np_dtype = layout.resolve_dtype(dtype)
        compressors = [ZstdCodec(level=1)] if compression is layout.Compression.ZSTD else None
        array = self.group.create_array(
            layout.features_path(dataset, split, member, view),
            shape=(rows, dim),
            chunks=(chunk_rows or layout.chunk_rows(dim, dtype), dim),
            dtype=np_dtype,
            fill_value=np.nan,  # unwritten chunks read as NaN, so gaps cannot hide
            compressors=compressors,
            overwrite=True,
        )
        prov = dict(provenance)
        prov["labels_sha256"] = self.split_attrs(dataset, split)["labels_sha256"]
        array.attrs.update({"status": layout.STATUS_WRITING, "provenance": prov})
        return FeatureWriter(array)

    def first_unwritten_row(
        self, dataset: str, split: str, member: str, start: int = 0, stop: int | None = None, *, view: int | None = None
    ) -> int:
        """Start of the first chunk in rows [start, stop) that is missing, unreadable or holds NaN; ``stop`` if none.

        A process killed mid-write can leave a truncated chunk on stores that do not
        write atomically: it fails to decode, and counts as unwritten.
        """
        array = self._features_array(dataset, split, member, view)
        step = array.chunks[0]
        stop = array.shape[0] if stop is None else stop
        for row in range(start, stop, step):
            try:
                block = array[row : min(stop, row + step)]
            except Exception:  # zarr/numcodecs raise several types for a damaged chunk
                return row
            if np.isnan(block).any():
                return row
        return stop

    def resume_features(
        self, dataset: str, split: str, member: str, start: int = 0, stop: int | None = None, *, view: int | None = None
    ) -> FeatureWriter:
        """A writer for rows [start, stop) of an existing array, from its first unwritten chunk there.

        Under torchrun each rank asks for its own chunk-aligned range (``layout.row_ranges``).
        """
        self._require_writable()
        array = self._features_array(dataset, split, member, view)
        stop = array.shape[0] if stop is None else stop
        return FeatureWriter(array, self.first_unwritten_row(dataset, split, member, start, stop, view=view), stop)

    def lock(self, dataset: str, split: str, member: str) -> contextlib.AbstractContextManager:
        """Hold an exclusive lock on one member's array while it is written.

        A second writer of the same member is refused with a message naming the
        holder, instead of interleaving rows. The lock is an flock on a file beside
        the store (``<path>.locks/``), so a killed process releases it at once.
        The lock covers the member's augmented views of the split too. Stores given
        as URLs other than file:// are not locked.
        """
        return _member_lock(self.path, dataset, split, member)

    def finish_features(self, dataset: str, split: str, member: str, *, view: int | None = None) -> None:
        """Check every row is written (no NaN) and mark the member ``complete``."""
        self._require_writable()
        array = self._features_array(dataset, split, member, view)
        start = self.first_unwritten_row(dataset, split, member, view=view)
        if start < array.shape[0]:
            raise CacheError(
                f"member {member} of {dataset}/{split} has unwritten or NaN rows from row {start}; it stays 'writing'"
            )
        array.attrs["status"] = layout.STATUS_COMPLETE

    def consolidate(self) -> None:
        """Rewrite consolidated metadata so readers see every array added since."""
        self._require_writable()
        zarr.consolidate_metadata(self.group.store)

    # -- helpers ---------------------------------------------------------------

    def _require_writable(self) -> None:
        if self.mode != "a":
            raise CacheError(f"cache {self.path} is open read-only; open it with mode='a' to write")

    def _group(self, dataset: str) -> zarr.Group:
        if dataset not in self.group:
            raise CacheError(f"dataset {dataset!r} is not in the cache; cached: {self.datasets() or 'none'}")
        return self.group[dataset]

    def _labels_array(self, dataset: str, split: str) -> zarr.Array:
        self._group(dataset)
        path = layout.labels_path(dataset, split)
        if path not in self.group:
            raise CacheError(f"split {split!r} of {dataset} is not cached; cached: {self.splits(dataset)}")
        return self.group[path]

    def _features_array(self, dataset: str, split: str, member: str, view: int | None = None) -> zarr.Array:
        path = layout.features_path(dataset, split, member, view)
        if path not in self.group:
            raise CacheError(
                f"member {member!r} has no features for {layout.describe(dataset, split, view)}; "
                f"available: {self.members(dataset, split, view=view) or 'none'}"
            )
        return self.group[path]


@contextlib.contextmanager
def _member_lock(path: str, dataset: str, split: str, member: str):
    if "://" in str(path) and not str(path).startswith("file://"):
        logging.getLogger("timecat.cache").warning("%s is not a local path: writers are not locked", path)
        yield
        return
    root = str(path).removeprefix("file://").rstrip("/")
    try:
        with locks.hold(os.path.join(f"{root}.locks", dataset, split, f"{member}.lock")):
            yield
    except locks.BusyError as e:
        raise CacheError(
            f"member {member} of {dataset}/{split} is being written by another process ({json.dumps(e.holder)}); "
            f"wait for it to finish (or stop it), then run again: finished chunks are kept"
        ) from None


def _read_into(array: zarr.Array, rows: slice, out: np.ndarray) -> None:
    """Decode ``array[rows]`` straight into ``out`` (a column-block view), no temporary copy."""
    if array.dtype != out.dtype:
        # Widening float16 needs a temporary of the block anyway.
        out[...] = array[rows]
        return
    buffer = default_buffer_prototype().nd_buffer.from_numpy_array(out)
    array.get_basic_selection((rows, slice(None)), out=buffer)
