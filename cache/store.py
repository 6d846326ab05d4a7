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
from zarr.core.sync import sync

from cache import layout, locks
from cache.errors import NO_SPACE, CacheError, disk_full
from cache.writer import FeatureWriter


@contextlib.contextmanager
def _consolidated_metadata():
    """Silence zarr's warning that consolidated metadata is not in the v3 spec yet, here only.

    timecat uses it only as a read-side speed-up and rewrites it after every
    stage; the filter is scoped to the calls that read or write it, so a
    notebook's own warnings are left as they are.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        yield


# fsspec URL schemes and the package that serves each (for the error when it is missing).
FSSPEC_DRIVERS = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "hf": "huggingface_hub"}


READ_CHUNKS = 8  # chunks decoded per read call (bounds zarr's buffers; 8 x 8 MiB chunks = 64 MiB)


def open(  # noqa: A001
    path: str, mode: str = "r", storage_options: dict | None = None, use_consolidated: bool | None = None
) -> Cache:
    """Open the cache at ``path`` (a local path or any fsspec URL zarr accepts).

    ``mode`` is ``"r"`` to read, ``"a"`` to read and add arrays (created if absent).
    ``use_consolidated=False`` reads every array's own metadata (``verify`` does).
    """
    if mode not in ("r", "a"):
        raise CacheError(f"unknown mode {mode!r}; choose 'r' or 'a'")
    path = str(path)
    if mode == "a":
        _check_writable(path)
    try:
        with _consolidated_metadata():
            group = _open_group(path, mode, storage_options, use_consolidated)
    except FileNotFoundError:
        raise CacheError(
            f"no feature cache at {path}: run `timecat extract` first (--cache or TIMECAT_CACHE names another)"
        ) from None
    except ImportError as e:  # fsspec or its driver for the URL's scheme
        scheme = path.split("://", 1)[0]
        package = FSSPEC_DRIVERS.get(scheme, "fsspec and the driver for " + scheme)
        raise CacheError(f"{path}: reading {scheme}:// caches needs {package} (pip install {package}): {e}") from None
    except PermissionError as e:
        raise CacheError(f"cache {path} cannot be read ({e.strerror}): check its permissions") from None
    except (ValueError, TypeError, KeyError) as e:  # a root zarr.json that is not metadata
        raise CacheError(f"{path} is not a readable zarr store ({type(e).__name__}: {e})") from None
    version = group.attrs.get("format_version")
    if version != layout.FORMAT_VERSION:
        raise CacheError(f"{path} is not a timecat cache of format {layout.FORMAT_VERSION} (found {version!r})")
    return Cache(group, path, mode)


def _open_group(path: str, mode: str, storage_options, use_consolidated) -> zarr.Group:
    if mode == "r":
        return zarr.open_group(store=path, mode="r", storage_options=storage_options, use_consolidated=use_consolidated)
    # Writers never trust consolidated metadata: it may be stale.
    group = zarr.open_group(store=path, mode="a", use_consolidated=False, storage_options=storage_options)
    group.attrs.setdefault("format_version", layout.FORMAT_VERSION)
    return group


def _check_writable(path: str) -> None:
    """Refuse, before any work, a cache that writes cannot reach or keep."""
    if path.startswith("memory://"):
        raise CacheError(f"{path}: a memory:// cache keeps nothing once the process ends; give a path or a URL")
    if "://" in path and not path.startswith("file://"):
        return  # remote stores report their own permission errors
    local = path.removeprefix("file://")
    existing = local
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing.rstrip("/")) or "."
    if not os.access(existing or ".", os.W_OK):
        raise CacheError(
            f"cache {path} is not writable ({existing} refuses writes): check its permissions or use another --cache"
        )


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
        try:
            names = sorted(name for name, _ in self.group[path].arrays())
        except Exception:  # a member whose metadata is garbage: list by name; reading it names the problem
            names = _children(self.group, path)
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
        """Check every array: its own metadata, status, shape, labels, provenance, a full non-finite scan, and
        that each member's splits and views come from one checkpoint and each view from one seed.

        Every array is found by listing the store and read through its own metadata, never the
        consolidated copy, which a killed or edited store can leave stale. Returns one row per
        array with ``ok`` and a list of ``problems``.
        """
        root = zarr.open_group(store=self.group.store, mode="r", use_consolidated=False)
        rows, splits = [], {}
        for dataset, split, view, member, array, error in _walk(root):
            if (dataset, split) not in splits:  # once per split, not once per array
                splits[(dataset, split)] = _split_problems(root, dataset, split)
            n_labels, attrs, problems = splits[(dataset, split)]
            problems = list(problems)
            prov = {}
            if error is not None:
                where = layout.features_path(dataset, split, member, view)
                problems.append(f"array metadata unreadable ({error}): delete {self.path}/{where} and re-extract")
            else:
                prov = dict(array.attrs.get("provenance", {}))
                problems += _array_problems(array, prov, attrs, n_labels)  # (labels checks only where readable)
            rows.append(
                {
                    "dataset": dataset,
                    "split": split,
                    "view": view,
                    "member": member,
                    "shape": list(array.shape) if error is None else None,
                    "checkpoint_sha256": prov.get("checkpoint_sha256"),
                    "view_seed": prov.get("view_seed"),
                    "problems": problems,
                }
            )
        _cross_problems(rows)
        for dataset in _children(root, ""):  # a split whose labels are broken, with no array yet to report it
            for split in _children(root, dataset):
                if (dataset, split) not in splits and layout.LABELS in _children(root, f"{dataset}/{split}"):
                    _, _, problems = _split_problems(root, dataset, split)
                    if problems:
                        rows.append(
                            {
                                "dataset": dataset,
                                "split": split,
                                "view": None,
                                "member": None,
                                "shape": None,
                                "checkpoint_sha256": None,
                                "view_seed": None,
                                "problems": problems,
                            }
                        )
        for row in rows:
            row["ok"] = not row["problems"]
        return rows

    def check_same_checkpoint(self, dataset: str, splits: Sequence[tuple[str, int | None]], members) -> dict:
        """Each member's checkpoint sha256 per (split, view) read; refuse a member whose arrays disagree.

        An interrupted ``extract --overwrite`` can leave one split from the new checkpoint and
        another from the old: concatenating them gives a number with no meaning.
        """
        shas = {}
        for member in members:
            found = {
                layout.describe(dataset, split, view): self.provenance(dataset, split, member, view=view).get(
                    "checkpoint_sha256"
                )
                for split, view in splits
            }
            if len(set(found.values())) > 1:
                shown = {where: str(sha)[:12] for where, sha in found.items()}
                raise CacheError(
                    f"member {member}'s arrays come from different checkpoints ({shown}): an extraction was "
                    f"interrupted; rerun `timecat extract --members {member} --dataset {dataset} --overwrite`"
                )
            shas[member] = found
        return shas

    # -- reading ---------------------------------------------------------------

    def labels(self, dataset: str, split: str) -> np.ndarray:
        """The (n,) int64 labels of a split, in dataset order, checked against their recorded sha256 as read."""
        array = self._labels_array(dataset, split)
        try:
            labels = array[:]
        except Exception as e:  # zarr/numcodecs raise several types for a damaged chunk
            raise CacheError(
                f"labels of {dataset}/{split} are unreadable ({type(e).__name__}): {_relabel(self)}"
            ) from None
        if labels_digest(labels) != array.attrs.get("labels_sha256"):
            raise CacheError(f"labels of {dataset}/{split} do not match their recorded sha256: {_relabel(self)}")
        return labels

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
                    f"{array.nchunks} chunks: rerun `timecat extract` for it (it writes again from the first missing)"
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
        slower (measured with zarr-python 3 on a 2-core machine; README, Performance).

        Every member is checked to be ``complete`` with all its chunks present (a
        missing chunk would read as NaN). ``scan_nan=True`` also scans every value for
        NaN and inf, which adds about a third to the read time; ``verify()`` does the
        same for the whole cache. The labels are hashed as they are read.
        """
        arrays = self.check_members(dataset, split, members, view=view)
        n = arrays[0].shape[0]
        X = np.empty((n, sum(a.shape[1] for a in arrays)), dtype=np.float32)
        col = 0
        for member, array in zip(members, arrays, strict=True):
            block = X[:, col : col + array.shape[1]]
            # A few chunks per call: zarr buffers every chunk of a call before copying it out,
            # which for a whole member added 1.4x its size to the peak (270 MB for 50k x 2048).
            reads = array.chunks[0] * READ_CHUNKS
            for start in range(0, n, reads):
                _read_into(array, slice(start, min(n, start + reads)), block[start : start + reads])
            # Scan a chunk of rows at a time: a whole-block isfinite would allocate n x d bools.
            step = array.chunks[0]
            if scan_nan and not all(np.isfinite(block[i : i + step]).all() for i in range(0, n, step)):
                raise CacheError(
                    f"member {member} holds non-finite (NaN or inf) values in {layout.describe(dataset, split, view)}: "
                    "rerun `timecat extract --repair` for it (it writes again from the first damaged chunk)"
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
        labels = self.labels(dataset, split)  # (n,) int64: small beside the features, and hashed as read
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
        attrs = {
            "fingerprint": fingerprint,
            "labels_sha256": labels_digest(labels),
            "rows": len(labels),
            "classes": list(classes),
            "kind": kind,
        }
        # Concurrent extractions of other members create a split together: one creates it
        # while the others wait, then find it whole (its attributes and labels written).
        with _split_lock(self.path, dataset, split):
            path = layout.labels_path(dataset, split)
            try:
                current = self.split_attrs(dataset, split) if path in self.group else {}
            except Exception:  # labels whose own metadata is garbage: as unfinished, written again below
                current = {}
            if current.get("fingerprint") is not None:  # a finished split: it must be this dataset's
                if (current["fingerprint"], current.get("labels_sha256")) != (fingerprint, attrs["labels_sha256"]):
                    raise CacheError(
                        f"{dataset}/{split} is cached from a different dataset (fingerprint "
                        f"{current.get('fingerprint')}, now {fingerprint}); use a new cache path or delete "
                        f"{self.path}/{dataset}/{split}"
                    )
                if kind is not None and current.get("kind") not in (None, kind):
                    raise CacheError(f"{dataset}/{split} is cached as kind {current['kind']!r}, not {kind!r}")
                if self._stored_labels_intact(dataset, split):
                    if kind is not None and current.get("kind") is None:
                        self._labels_array(dataset, split).attrs["kind"] = kind  # a cache from before kinds
                    return
            # New, unfinished (a full disk or a kill while writing) or damaged labels: write them whole.
            # The attributes go into the array's own metadata when it is created, not in a second step.
            array = self.group.create_array(
                path, shape=labels.shape, chunks=(1 << 20,), dtype=np.int64, attributes=attrs, overwrite=True
            )
            try:
                array[:] = labels
            except OSError as e:
                raise _disk_error(e, f"the labels of {dataset}/{split}") from e

    def _stored_labels_intact(self, dataset: str, split: str) -> bool:
        try:
            self.labels(dataset, split)
        except CacheError:
            return False
        return True

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
        """Start of the first chunk in rows [start, stop) that is missing, unreadable or not finite; ``stop`` if none.

        A process killed mid-write can leave a truncated chunk on stores that do not
        write atomically: it fails to decode, and counts as unwritten.
        """
        return _first_bad_row(self._features_array(dataset, split, member, view), start, stop)

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

    def missing_chunks(self, dataset: str, split: str, member: str, *, view: int | None = None) -> int:
        """How many chunks of a member's array are absent from the store (a listing, no decoding)."""
        array = self._features_array(dataset, split, member, view)
        return array.nchunks - array.nchunks_initialized

    def mark_writing(self, dataset: str, split: str, member: str, *, view: int | None = None) -> None:
        """Set a damaged complete array back to ``writing`` before its bad chunks are written again."""
        self._require_writable()
        self._features_array(dataset, split, member, view).attrs["status"] = layout.STATUS_WRITING

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
        try:
            with _consolidated_metadata():
                zarr.consolidate_metadata(self.group.store)
        except Exception as e:  # an array whose own metadata is garbage cannot be consolidated
            raise CacheError(
                f"could not rewrite the consolidated metadata of {self.path} ({type(e).__name__}): "
                "`timecat cache verify` names the damaged array; extract it again with --overwrite"
            ) from None

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
        array = self._node(
            layout.labels_path(dataset, split),
            f"the labels of {dataset}/{split}",
            "rerun `timecat extract` for this dataset (it writes the labels again)",
        )
        if array is None:
            raise CacheError(f"split {split!r} of {dataset} is not cached; cached: {self.splits(dataset)}")
        return array

    def _features_array(self, dataset: str, split: str, member: str, view: int | None = None) -> zarr.Array:
        where = layout.describe(dataset, split, view)
        array = self._node(
            layout.features_path(dataset, split, member, view),
            f"member {member} in {where}",
            "extract it again with `timecat extract --overwrite`",
        )
        if array is None:
            raise CacheError(
                f"member {member!r} has no features for {where}; "
                f"available: {self.members(dataset, split, view=view) or 'none'}"
            )
        return array

    def _node(self, path: str, what: str, fix: str) -> zarr.Array | None:
        """The array at ``path``, None if absent, or a clean error when its own metadata is garbage."""
        try:
            return self.group.get(path)  # None when absent (KeyError); garbage metadata raises
        except Exception as e:  # zarr raises several types for metadata that is garbage
            raise CacheError(f"the metadata of {what} is unreadable ({type(e).__name__}): {fix}") from None


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
    try:
        if array.dtype != out.dtype:
            # Widening float16 needs a temporary of the block anyway.
            out[...] = array[rows]
            return
        buffer = default_buffer_prototype().nd_buffer.from_numpy_array(out)
        array.get_basic_selection((rows, slice(None)), out=buffer)
    except Exception as e:  # zarr/numcodecs raise several types for a garbled chunk
        raise CacheError(
            f"{array.path} has an unreadable chunk in rows {rows.start}-{rows.stop - 1} ({type(e).__name__}): "
            "rerun `timecat extract --repair` for it (it writes again from the first damaged chunk)"
        ) from None


def _first_bad_row(array: zarr.Array, start: int = 0, stop: int | None = None) -> int:
    """Start of the first chunk in rows [start, stop) that is missing, unreadable or not finite; ``stop`` if none."""
    step = array.chunks[0]
    stop = array.shape[0] if stop is None else stop
    for row in range(start, stop, step):
        try:
            block = array[row : min(stop, row + step)]
        except Exception:  # zarr/numcodecs raise several types for a damaged chunk
            return row
        if not np.isfinite(block).all():  # NaN: never written; inf: damaged (writers refuse both)
            return row
    return stop


def _relabel(store: Cache) -> str:
    return (
        "the store is damaged; rerun `timecat extract` for this dataset (it writes the labels again) "
        f"or delete the split from {store.path}"
    )


def _disk_error(error: OSError, what: str) -> CacheError:
    if error.errno in NO_SPACE:
        return CacheError(disk_full(what, error.strerror))
    return CacheError(f"cannot write {what}: {error}")


@contextlib.contextmanager
def _split_lock(path: str, dataset: str, split: str):
    """Wait for the lock that serialises creating a split's labels (local stores only)."""
    if "://" in str(path) and not str(path).startswith("file://"):
        yield
        return
    root = str(path).removeprefix("file://").rstrip("/")
    with locks.hold(os.path.join(f"{root}.locks", dataset, split, ".labels.lock"), wait=True):
        yield


def _children(group: zarr.Group, prefix: str) -> list[str]:
    """Names of the entries under ``prefix``, from the store's own listing (not from metadata)."""

    async def collect() -> list[str]:
        return [key async for key in group.store.list_dir(prefix)]

    # zarr's stores list asynchronously; sync() is how zarr's own synchronous API waits on them.
    return sorted(k for k in sync(collect()) if k != "zarr.json" and not k.startswith("."))


def _walk(root: zarr.Group) -> Iterator[tuple[str, str, int | None, str, zarr.Array | None, str | None]]:
    """Every member array as ``(dataset, split, view, member, array, error)``, opened from its own metadata."""
    for dataset in _children(root, ""):
        for split in _children(root, dataset):
            groups = [(None, layout.features_group(dataset, split))]
            groups += [
                (int(v), layout.features_group(dataset, split, int(v)))
                for v in _children(root, layout.views_group(dataset, split))
                if v.isdigit()
            ]
            for view, group in groups:
                for member in _children(root, group):
                    try:
                        yield (
                            dataset,
                            split,
                            view,
                            member,
                            zarr.open_array(store=root.store, path=f"{group}/{member}", mode="r"),
                            None,
                        )
                    except Exception as e:  # missing or garbage metadata: zarr raises several types
                        yield dataset, split, view, member, None, f"{type(e).__name__}: {e}"


def _split_problems(root: zarr.Group, dataset: str, split: str) -> tuple[int | None, dict, list[str]]:
    """(rows of the labels, their attributes, problems) of one split, from the labels' own metadata."""
    try:
        array = zarr.open_array(store=root.store, path=layout.labels_path(dataset, split), mode="r")
        labels, attrs = array[:], dict(array.attrs)
    except Exception as e:  # missing or unreadable labels
        return None, {}, [f"the split's labels are missing or unreadable ({type(e).__name__})"]
    problems = []
    if attrs.get("fingerprint") is None:
        problems.append("the split's labels were never finished (no fingerprint): rerun `timecat extract`")
    if len(labels) != attrs.get("rows"):
        problems.append(f"labels hold {len(labels)} rows, attributes say {attrs.get('rows')}")
    if labels_digest(labels) != attrs.get("labels_sha256"):
        problems.append("labels do not match their recorded sha256")
    return len(labels), attrs, problems


def _array_problems(array: zarr.Array, prov: dict, split_attrs: dict, n_labels: int | None) -> list[str]:
    """What is wrong with one member array against its split."""
    problems = []
    if array.attrs.get("status") != layout.STATUS_COMPLETE:
        problems.append(f"status is {array.attrs.get('status')!r}, not 'complete'")
    if n_labels is not None and array.shape[0] != n_labels:
        problems.append(f"{array.shape[0]} rows but the split has {n_labels}")
    if split_attrs and prov.get("labels_sha256") != split_attrs.get("labels_sha256"):
        problems.append("extracted with other labels than the split's")
    if split_attrs and prov.get("dataset_fingerprint") != split_attrs.get("fingerprint"):
        problems.append("extracted from a different dataset fingerprint")
    first = _first_bad_row(array)
    if first < array.shape[0]:
        problems.append(f"unwritten, unreadable or non-finite rows from row {first}")
    return problems


def _cross_problems(rows: list[dict]) -> None:
    """Add the invariants between arrays: one checkpoint per member and dataset, one seed per view."""
    shas, seeds = {}, {}
    for row in rows:
        where = layout.describe(row["dataset"], row["split"], row["view"])
        if row["shape"] is not None:  # an array whose metadata is unreadable has its own problem already
            shas.setdefault((row["dataset"], row["member"]), {})[where] = row["checkpoint_sha256"]
        if row["view"] is not None:
            seeds.setdefault((row["dataset"], row["split"], row["view"]), {})[row["member"]] = row["view_seed"]
    for row in rows:
        found = shas.get((row["dataset"], row["member"]), {})
        if len(set(found.values())) > 1:
            shown = {where: str(sha)[:12] for where, sha in found.items()}
            row["problems"].append(f"the member's splits come from different checkpoints {shown}: re-extract it")
        if row["view"] is not None:
            drawn = seeds[(row["dataset"], row["split"], row["view"])]
            if len(set(drawn.values())) > 1:
                row["problems"].append(f"members' views were drawn with different seeds {drawn}: re-extract them")
