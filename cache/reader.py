"""Reading a cache: listing it, checking members, and reading features for any set of members.

``cache.open(path)`` returns a ``Cache``; ``mode="a"`` returns its writing
subclass (``cache.writer``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.errors import ArrayNotFoundError

from cache import checks, layout
from cache.errors import CacheError, did_you_mean, not_readable

Rows = slice | Sequence[int] | np.ndarray | None  # a row subset: a slice, row numbers in any order, or a mask
READ_CHUNKS = 8  # chunks decoded per read call (bounds zarr's buffers; 8 x 8 MiB chunks = 64 MiB)
# Methods of the writing subclass, named in the error a read-only cache gives for them.
WRITE_METHODS = (
    "write_labels",
    "create_features",
    "resume_features",
    "decide",
    "lock",
    "mark_writing",
    "finish_features",
    "consolidate",
)


@contextlib.contextmanager
def consolidated_metadata():
    """Silence zarr's warning that consolidated metadata is not in the v3 spec yet, here only.

    timecat uses it only as a read-side speed-up and rewrites it after every
    stage; the filter is scoped to the calls that read or write it, so a
    notebook's own warnings are left as they are.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        yield


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
        """Members with an array for this split, or for one augmented view of it (only complete ones if asked).

        An unknown dataset or split is an error that lists what is cached.
        """
        if split not in self.splits(dataset):
            raise CacheError(f"split {split!r} of {dataset} is not cached; cached: {self.splits(dataset)}")
        path = layout.features_group(dataset, split, view)
        if path not in self.group:
            return []
        try:
            names = sorted(name for name, _ in self.group[path].arrays())
        except Exception:  # a member whose metadata is garbage: list by name; reading it names the problem
            names = checks.children(self.group, path)
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
                    "rows": array.shape[0] if array.ndim else None,
                    "dim": array.shape[1] if array.ndim == 2 else None,  # damaged metadata: `cache verify` names it
                    "dtype": str(array.dtype),
                    "status": array.attrs.get("status"),
                    "provenance": checks.provenance(array),
                }
            )
        return rows

    def verify(self) -> list[dict]:
        """Check every array: its own metadata, status, shape, labels, provenance, a full non-finite scan, and
        that each member's splits and views come from one checkpoint and each view from one seed.

        Every array is found by listing the store and read through its own metadata, never the
        consolidated copy, which a killed or edited store can leave stale. The checks are those
        every read makes (``cache.checks``), plus the scan. Returns one row per array with ``ok``
        and a list of ``problems``.
        """
        return checks.verify(zarr.open_group(store=self.group.store, mode="r", use_consolidated=False), self.path)

    def check_same_checkpoint(self, dataset: str, splits: Sequence[tuple[str, int | None]], members) -> dict:
        """Each member's checkpoint sha256 per (split, view) read; refuse a member whose arrays disagree.

        An interrupted ``extract --overwrite`` can leave one split from the new checkpoint and
        another from the old: concatenating them gives a number with no meaning.
        """
        shas = {}
        for member in members:
            shas[member] = {
                layout.describe(dataset, split, view): self.provenance(dataset, split, member, view=view).get(
                    "checkpoint_sha256"
                )
                for split, view in splits
            }
            problem = checks.checkpoint_problem(member, dataset, shas[member])
            if problem:
                raise CacheError(problem)
        return shas

    # -- reading ---------------------------------------------------------------

    def labels(self, dataset: str, split: str) -> np.ndarray:
        """The (n,) int64 labels of a split, in dataset order, checked against their recorded sha256 as read."""
        array = self._labels_array(dataset, split)
        try:
            labels = array[:]
        except PermissionError as e:
            raise CacheError(not_readable(array.path, e)) from None
        except Exception as e:  # zarr/numcodecs raise several types for a damaged chunk
            raise CacheError(
                f"labels of {dataset}/{split} are unreadable ({type(e).__name__}): {_relabel(self)}"
            ) from None
        if checks.labels_digest(labels) != array.attrs.get("labels_sha256"):
            raise CacheError(f"labels of {dataset}/{split} do not match their recorded sha256: {_relabel(self)}")
        # A label outside the classes would be a traceback in a fit, or silently scored wrong on eval rows.
        classes = array.attrs.get("classes")
        if len(labels) and isinstance(classes, list):
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= len(classes):
                bad = low if low < 0 else high
                raise CacheError(
                    f"labels of {dataset}/{split} hold {bad}, outside its {len(classes)} classes (0 to "
                    f"{len(classes) - 1}): fix the dataset's labels, rerun `timecat prepare` and `timecat extract`"
                )
        return labels

    def split_attrs(self, dataset: str, split: str) -> dict:
        """Attributes of a split's labels: fingerprint, classes, rows."""
        return dict(self._labels_array(dataset, split).attrs)

    def status(self, dataset: str, split: str, member: str, *, view: int | None = None) -> str:
        """``writing`` or ``complete``."""
        return self._features_array(dataset, split, member, view).attrs.get("status")

    def provenance(self, dataset: str, split: str, member: str, *, view: int | None = None) -> dict:
        """Where a member's features came from: checkpoint sha256, arch, preprocessing..."""
        return checks.provenance(self._features_array(dataset, split, member, view))

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
        """Refuse, by name, members that are unknown, unfinished, from other rows, or (views) other crops.

        The dataset and split are checked first, so a typo there is named as such.
        """
        split_attrs = self.split_attrs(dataset, split)
        members = _names(members)
        if not members:
            raise CacheError("no members given: pass at least one member name")
        if len(set(members)) != len(members):
            raise CacheError(f"a member is named twice in {list(members)}")
        where = layout.describe(dataset, split, view)
        available = self.members(dataset, split, view=view)
        unknown = [m for m in members if m not in available]
        if unknown:
            hint = "`timecat extract --views K`" if view is not None else "`timecat extract`"
            guesses = "".join(did_you_mean(m, available) for m in unknown)
            raise CacheError(
                f"unknown member(s) {unknown}{guesses} for {where}; available: {available or f'none (run {hint})'}"
            )
        arrays = [self._features_array(dataset, split, m, view) for m in members]
        for m, array in zip(members, arrays, strict=True):
            damaged = checks.metadata_problems(array, m, where, split_attrs.get("rows"))
            if damaged:
                raise CacheError(f"{'; '.join(damaged)}: rerun `timecat extract --repair` for it (it writes it anew)")
            problems = checks.member_problems(array, m, where, split_attrs, scan=False)
            if problems:
                raise CacheError(f"{'; '.join(problems)}: rerun `timecat extract` for it (--overwrite if it changed)")
        if view is not None:  # view k must be the same crops of the same images for every member
            seeds = {m: checks.provenance(a).get("view_seed") for m, a in zip(members, arrays, strict=True)}
            problem = checks.view_seed_problem(where, seeds)
            if problem:
                raise CacheError(problem)
        return arrays

    def features(
        self,
        dataset: str,
        split: str,
        members: Sequence[str] | str,
        *,
        rows: Rows = None,
        view: int | None = None,
        scan_nan: bool = False,
    ) -> Features:
        """Concatenate members' features: ``X, y = c.features(...)``, X float32 (n, sum of d), y int64 (n,).

        The result also carries ``columns``: each member's slice of X's columns, in
        the order given. ``rows`` reads a subset (a slice, an index array in any
        order, or a boolean mask) through the same checks, decoding only the chunks
        that hold those rows. ``view=k`` reads augmented view k instead of the plain
        features. A single string is taken as one member's name.

        X is allocated once and each member fills its own column block in place: an
        ``np.hstack`` of per-member arrays holds every member and the result at once,
        and takes longer (tests/benchmarks/test_cache_read.py measures both).
        Every member is checked to be ``complete`` with all its chunks present (a
        missing chunk would read as NaN). ``scan_nan=True`` also scans every value for
        NaN and inf, which adds to the read time (test_cache_read.py records how much);
        ``verify()`` does the same for the whole cache. The labels are hashed as they
        are read.
        """
        members = _names(members)
        arrays = self.check_members(dataset, split, members, view=view)
        selection = _selection(rows, arrays[0].shape[0])
        count = len(range(selection.start, selection.stop)) if isinstance(selection, slice) else len(selection)
        X = np.empty((count, sum(a.shape[1] for a in arrays)), dtype=np.float32)
        columns = self.columns(dataset, split, members, view=view)
        for member, array in zip(members, arrays, strict=True):
            block = X[:, columns[member]]
            _read_rows(array, selection, block)
            # Scan a chunk of rows at a time: a whole-block isfinite would allocate n x d bools.
            step = array.chunks[0]
            if scan_nan and not all(np.isfinite(block[i : i + step]).all() for i in range(0, count, step)):
                raise CacheError(
                    f"member {member} holds non-finite (NaN or inf) values in {layout.describe(dataset, split, view)}: "
                    "rerun `timecat extract --repair` for it (it writes again from the first damaged chunk)"
                )
        return Features(X, self.labels(dataset, split)[selection], columns)

    def columns(
        self, dataset: str, split: str, members: Sequence[str] | str, *, view: int | None = None
    ) -> dict[str, slice]:
        """Each member's columns in the concatenation of ``members`` (in that order), without reading features."""
        columns, col = {}, 0
        for member in _names(members):
            dim = self.dim(dataset, split, member, view=view)
            columns[member] = slice(col, col + dim)
            col += dim
        return columns

    def to_xarray(
        self,
        dataset: str,
        split: str,
        members: Sequence[str] | str,
        *,
        rows: Rows = None,
        view: int | None = None,
    ):
        """The concatenated features as an ``xarray.DataArray`` (dims ``row``, ``feature``), for notebooks.

        Coordinates: ``row`` (row numbers in the split), ``feature`` (0..d-1), ``member``
        (which member each column comes from), ``label`` and ``class_name`` (per row).
        Needs xarray (``pip install 'timecat[notebook]'``); the cache itself never does.
        """
        try:
            import xarray as xr  # optional: only this method uses it
        except ImportError:
            raise CacheError(
                "to_xarray needs xarray: pip install 'timecat[notebook]' (or pip install xarray)"
            ) from None
        members = _names(members)
        X, y = self.features(dataset, split, members, rows=rows, view=view)
        n = self.shape(dataset, split, members[0], view=view)[0]
        row_numbers = np.arange(n)[_selection(rows, n)]
        owner = np.empty(X.shape[1], dtype=object)
        for member, cols in self.columns(dataset, split, members, view=view).items():
            owner[cols] = member
        classes = np.asarray(self.split_attrs(dataset, split).get("classes") or [str(c) for c in range(y.max() + 1)])
        coords = {
            "row": row_numbers,
            "feature": np.arange(X.shape[1]),
            "member": ("feature", owner.astype(str)),
            "label": ("row", y),
            "class_name": ("row", classes[y]),
        }
        attrs = {"dataset": dataset, "split": split, "members": list(members), "view": -1 if view is None else view}
        return xr.DataArray(X, dims=("row", "feature"), coords=coords, name="features", attrs=attrs)

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

    # -- helpers ---------------------------------------------------------------

    def __getattr__(self, name: str):
        # Only reached for names the class lacks: a write on a read-only cache gets the fix, not an AttributeError.
        if name in WRITE_METHODS:
            raise CacheError(f"cache {self.path} is open read-only; open it with mode='a' to {name.replace('_', ' ')}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _group(self, dataset: str) -> zarr.Group:
        if dataset not in self.group:
            raise CacheError(
                f"dataset {dataset!r} is not in the cache{did_you_mean(dataset, self.datasets())}; "
                f"cached: {self.datasets() or 'none'}"
            )
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
        """The array at ``path`` read through its own metadata, None if absent, or a clean error when that is garbage.

        Never through the consolidated copy: an ``extract --overwrite`` killed before it rewrote
        that copy leaves it naming the old status and checkpoint, and a probe that trusted it
        read new features as old ones. One small read per array; listing still uses the copy.
        """
        try:
            return zarr.open_array(store=self.group.store, path=path, mode="r" if self.mode == "r" else "r+")
        except ArrayNotFoundError:
            return None
        except PermissionError as e:  # another user's file: not damage, and not for --overwrite
            raise CacheError(not_readable(path, e)) from None
        except Exception as e:  # zarr raises several types for metadata that is garbage
            raise CacheError(f"the metadata of {what} is unreadable ({type(e).__name__}): {fix}") from None


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
        raise _unreadable(array, f"in rows {rows.start}-{rows.stop - 1}", e) from None


def _unreadable(array: zarr.Array, rows: str, error: Exception) -> CacheError:
    """A chunk that cannot be read: damage (``--repair`` writes it again) or a permissions problem (it would not)."""
    if isinstance(error, PermissionError):
        return CacheError(not_readable(array.path, error))
    return CacheError(
        f"{array.path} has an unreadable chunk {rows} ({type(error).__name__}): "
        "rerun `timecat extract --repair` for it (it writes again from the first damaged chunk)"
    )


def _relabel(store: Cache) -> str:
    return (
        "the store is damaged; rerun `timecat extract` for this dataset (it writes the labels again) "
        f"or delete the split from {store.path}"
    )


class Features(tuple):
    """``(X, y)``, so that ``X, y = c.features(...)`` unpacks as always, with ``columns``: member -> slice of X."""

    def __new__(cls, X: np.ndarray, y: np.ndarray, columns: dict[str, slice]):
        out = super().__new__(cls, (X, y))
        out.columns = columns
        return out

    def __getnewargs__(self):  # pickle and deepcopy rebuild it from all three parts
        return (self[0], self[1], self.columns)

    @property
    def X(self) -> np.ndarray:  # noqa: N802 (the usual name of a design matrix)
        return self[0]

    @property
    def y(self) -> np.ndarray:
        return self[1]


def _names(members: Sequence[str] | str) -> list[str]:
    """Member names as a list: one string is one member (never its letters)."""
    if isinstance(members, str):
        return [members]
    members = list(members)
    bad = [m for m in members if not isinstance(m, str)]
    if bad:
        raise CacheError(f"member names must be strings, got {bad}")
    return members


def _selection(rows, n: int) -> slice | np.ndarray:
    """``rows`` as a contiguous slice or an int64 index array in [0, n); anything else is an error naming it."""
    if rows is None:
        return slice(0, n)
    if isinstance(rows, slice):
        start, stop, step = rows.indices(n)
        return slice(start, max(start, stop)) if step == 1 else np.arange(start, stop, step)
    index = np.asarray(rows)
    if index.size == 0 and index.ndim == 1:  # [] is float64 to numpy: no rows, whatever its dtype
        return np.empty(0, dtype=np.int64)
    if index.dtype == bool:
        if index.shape != (n,):
            raise CacheError(f"a boolean rows mask must have one entry per row ({n}), got shape {index.shape}")
        return np.flatnonzero(index)
    if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
        raise CacheError(f"rows must be a slice, a 1-d array of row numbers or a boolean mask; got {index.dtype}")
    if index.size and (index.min() < -n or index.max() >= n):
        raise CacheError(f"rows out of range: the split has {n} rows (0 to {n - 1}), got {index.min()}..{index.max()}")
    return np.where(index < 0, index + n, index).astype(np.int64)


def _read_rows(array: zarr.Array, selection: slice | np.ndarray, out: np.ndarray) -> None:
    """Fill ``out`` with ``array[selection]``, a few chunks per call; zarr decodes only the chunks involved."""
    # A few chunks per call: zarr buffers every chunk of a call before copying it out,
    # which for a whole member added 1.4x its size to the peak (270 MB for 50k x 2048).
    reads = array.chunks[0] * READ_CHUNKS
    if isinstance(selection, slice):
        for start in range(selection.start, selection.stop, reads):
            stop = min(selection.stop, start + reads)
            _read_into(array, slice(start, stop), out[start - selection.start : stop - selection.start])
        return
    for start in range(0, len(selection), reads):
        part = selection[start : start + reads]
        try:
            out[start : start + len(part)] = array.get_orthogonal_selection((part, slice(None)))
        except Exception as e:  # zarr/numcodecs raise several types for a garbled chunk
            raise _unreadable(array, f"among rows {part.min()}-{part.max()}", e) from None
