"""Adding to a cache: a split's labels, members' arrays, their locks, and what to do with an existing array.

``cache.open(path, mode="a")`` returns a ``WritableCache``: a ``Cache`` that can
also write. Rows are appended by the row writers of ``cache.rows``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.sync import sync

from cache import checks, layout, locks
from cache.errors import NO_SPACE, CacheError, did_you_mean, disk_full
from cache.provenance import first_stale
from cache.reader import Cache, consolidated_metadata
from cache.rows import FeatureWriter

log = logging.getLogger("timecat.cache")


class WritableCache(Cache):
    """A cache opened with ``mode="a"``: reads as a ``Cache`` and adds labels and member arrays."""

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
        layout.check_name("dataset", dataset)
        layout.check_name("split", split)
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        attrs = {
            "fingerprint": fingerprint,
            "labels_sha256": checks.labels_digest(labels),
            "rows": len(labels),
            "classes": list(classes),
            "kind": kind,
        }
        # Concurrent extractions of other members create a split together: one creates it
        # while the others wait, then find it whole (its attributes and labels written).
        with _split_lock(self.path, dataset, split):
            if self._labels_current(dataset, split, attrs):
                return
            # New, unfinished (a full disk or a kill while writing) or damaged labels: write them whole.
            # The attributes go into the array's own metadata when it is created, not in a second step.
            array = self.group.create_array(
                layout.labels_path(dataset, split),
                shape=labels.shape,
                chunks=(1 << 20,),
                dtype=np.int64,
                attributes=attrs,
                dimension_names=("row",),  # so that xarray.open_zarr opens a split's group as it is
                overwrite=True,
            )
            try:
                array[:] = labels
            except OSError as e:
                raise _disk_error(e, f"the labels of {dataset}/{split}") from e

    def _labels_current(self, dataset: str, split: str, attrs: dict) -> bool:
        """Whether a split's stored labels are whole and these; refuse a finished split of another dataset."""
        try:
            current = self.split_attrs(dataset, split) if layout.labels_path(dataset, split) in self.group else {}
        except Exception:  # labels whose own metadata is garbage: as unfinished, written again
            return False
        if current.get("fingerprint") is None:  # new, or never finished
            return False
        fingerprint, kind = attrs["fingerprint"], attrs["kind"]
        if current["fingerprint"] != fingerprint:
            raise CacheError(
                f"{dataset}/{split} is cached from a different dataset (fingerprint "
                f"{current.get('fingerprint')}, now {fingerprint}); use a new cache path or delete "
                f"{self.path}/{dataset}/{split}"
            )
        if current.get("labels_sha256") != attrs["labels_sha256"]:
            # The fingerprint hashes the labels too, so equal fingerprints with other labels mean the
            # split's labels were changed after `timecat prepare` recorded its fingerprint (relabelled).
            raise CacheError(
                f"{dataset}/{split} is cached with other labels than the data now has, under the same fingerprint "
                f"{fingerprint} (labels sha256 {str(current.get('labels_sha256'))[:12]} cached, "
                f"{attrs['labels_sha256'][:12]} now): its labels were changed without `timecat prepare`; prepare "
                f"it again, then use a new cache path or delete {self.path}/{dataset}/{split}"
            )
        if kind is not None and current.get("kind") not in (None, kind):
            raise CacheError(f"{dataset}/{split} is cached as kind {current['kind']!r}, not {kind!r}")
        if not self._stored_labels_intact(dataset, split):
            return False
        if kind is not None and current.get("kind") is None:
            self._labels_array(dataset, split).attrs["kind"] = kind  # a cache from before kinds
        return True

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
            # Named for xarray.open_zarr: rows are shared by a split's arrays, widths are each member's own.
            dimension_names=("row", f"feature_{member}"),
            overwrite=True,
        )
        prov = dict(provenance)
        prov["labels_sha256"] = self.split_attrs(dataset, split)["labels_sha256"]
        prov["dtype"] = dtype  # what reads and repairs hold its metadata to (checks.metadata_problems)
        array.attrs.update({"status": layout.STATUS_WRITING, "provenance": prov})
        return FeatureWriter(array)

    def decide(
        self,
        dataset: str,
        split: str,
        member: str,
        provenance: dict,
        *,
        overwrite: bool = False,
        repair: bool = False,
        view: int | None = None,
        refusals_only: bool = False,
    ) -> str:
        """What to do with one array about to be extracted: ``keep`` it, ``resume`` it, or write it ``new``.

        ``refusals_only`` stops after the checks that refuse (returning "checked"), before the scan
        ``repair`` asks for: extract runs them for every split before it writes any.

        ``overwrite`` writes it anew whatever it holds. Without it, an array from another
        checkpoint, recipe, precision or view seed (``cache.provenance``) is refused, and so is
        one whose metadata no resume can mend (``checks.metadata_problems``: shape, width,
        dtype, provenance) unless ``repair``, which writes it anew in this run's dtype (the one
        its new provenance records), never in the edited one. ``repair`` also decodes a
        complete array to find a garbled chunk, which a listing of missing chunks cannot see.
        """
        if member not in self.members(dataset, split, view=view):
            return "new"
        if overwrite:
            return "new"
        where = layout.describe(dataset, split, view)
        array = self._features_array(dataset, split, member, view)  # garbage metadata: an error naming --overwrite
        cached = checks.provenance(array)
        stale = first_stale(cached, provenance) if cached else None
        if stale:
            what, field, old, new = stale
            raise CacheError(
                f"member {member} is cached for {where} from another {what} "
                f"({field} {str(old)[:64]}, now {str(new)[:64]}); "
                "pass --overwrite to re-extract it, or rename the member"
            )
        rows = self.split_attrs(dataset, split).get("rows")
        damaged = checks.metadata_problems(array, member, where, rows, provenance.get("feature_dim"))
        if damaged and not repair:
            raise CacheError(f"{'; '.join(damaged)}: pass --repair (or --overwrite) to extract it again")
        if refusals_only:
            return "checked"
        if damaged:
            log.warning("%s %s: %s; writing it anew", where, member, "; ".join(damaged))
            return "new"
        if array.attrs.get("status") == layout.STATUS_COMPLETE:
            return self._keep_or_repair(dataset, split, member, view, repair)
        return "resume" if cached.get("dataset_fingerprint") == provenance["dataset_fingerprint"] else "new"

    def _keep_or_repair(self, dataset: str, split: str, member: str, view: int | None, repair: bool) -> str:
        # A missing chunk costs a listing to notice; a garbled or non-finite one, a scan of every value,
        # so that is done when asked (repair), not on every rerun of a large cache.
        if not repair and not self.missing_chunks(dataset, split, member, view=view):
            return "keep"
        first = self.first_unwritten_row(dataset, split, member, view=view)
        if first == self.shape(dataset, split, member, view=view)[0]:
            return "keep"
        log.warning(
            "%s %s: complete but damaged from row %d (a missing, garbled or non-finite chunk): rewriting from there",
            layout.describe(dataset, split, view),
            member,
            first,
        )
        self.mark_writing(dataset, split, member, view=view)
        return "resume"

    def first_unwritten_row(
        self, dataset: str, split: str, member: str, start: int = 0, stop: int | None = None, *, view: int | None = None
    ) -> int:
        """Start of the first chunk in rows [start, stop) that is missing, unreadable or not finite; ``stop`` if none.

        A process killed mid-write can leave a truncated chunk on stores that do not
        write atomically: it fails to decode, and counts as unwritten.
        """
        return checks.first_bad_row(self._features_array(dataset, split, member, view), start, stop)

    def resume_features(
        self, dataset: str, split: str, member: str, start: int = 0, stop: int | None = None, *, view: int | None = None
    ) -> FeatureWriter:
        """A writer for rows [start, stop) of an existing array, from its first unwritten chunk there.

        Under torchrun each rank asks for its own chunk-aligned range (``layout.row_ranges``).
        """
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
        self._features_array(dataset, split, member, view).attrs["status"] = layout.STATUS_WRITING

    def finish_features(self, dataset: str, split: str, member: str, *, view: int | None = None) -> None:
        """Check every row is written (no NaN) and mark the member ``complete``."""
        array = self._features_array(dataset, split, member, view)
        start = self.first_unwritten_row(dataset, split, member, view=view)
        if start < array.shape[0]:
            raise CacheError(
                f"member {member} of {dataset}/{split} has unwritten or NaN rows from row {start}; it stays 'writing'"
            )
        array.attrs["status"] = layout.STATUS_COMPLETE

    def remove(
        self, dataset: str, member: str, splits: list[str] | None = None, *, views_only: bool = False
    ) -> list[tuple[str, int | None]]:
        """Delete a member's arrays of ``splits`` (default: every cached split), or only its augmented views.

        Each split is done under the member's lock, so an array a live ``extract`` is writing is
        refused, never pulled from under it. Arrays are found by the store's own listing, so
        ones whose metadata is garbage go too, and a view left with no member is deleted whole
        (probes expect views 0..K-1). Returns the ``(split, view)`` removed; view None is the plain features.
        """
        layout.check_name("dataset", dataset)
        layout.check_name("member", member)
        cached = self.splits(dataset)
        unknown = [s for s in splits or [] if s not in cached]
        if unknown:
            raise CacheError(f"split(s) {unknown} of {dataset} are not cached; cached: {cached}")
        for split in splits or cached:  # every link refused before anything is removed
            views = [int(v) for v in checks.children(self.group, layout.views_group(dataset, split)) if v.isdigit()]
            for view in [None, *views]:
                _refuse_link(self.path, layout.features_path(dataset, split, member, view))
            _refuse_link(f"{self.path}.locks", f"{dataset}/{split}")
        removed = []
        for split in splits or cached:
            with self.lock(dataset, split, member):
                removed += [(split, view) for view in self._remove_arrays(dataset, split, member, views_only)]
        if not removed:
            what = "augmented views" if views_only else "arrays"
            known = sorted({found[3] for found in checks.walk(self.group) if found[0] == dataset})
            hint = "" if member in known else did_you_mean(member, known)
            raise CacheError(f"member {member!r} has no {what} in {dataset}{hint}; cached members: {known}")
        self.consolidate()
        return removed

    def _remove_arrays(self, dataset: str, split: str, member: str, views_only: bool) -> list[int | None]:
        views = sorted(int(v) for v in checks.children(self.group, layout.views_group(dataset, split)) if v.isdigit())
        removed = []
        for view in ([] if views_only else [None]) + views:
            group = layout.features_group(dataset, split, view)
            if member in checks.children(self.group, group):
                _delete(self.group, layout.features_path(dataset, split, member, view))
                removed.append(view)
            if view is not None and not checks.children(self.group, group):
                _delete(self.group, group)  # a view no member has any more
        if views and not checks.children(self.group, layout.views_group(dataset, split)):
            _delete(self.group, layout.views_group(dataset, split))
        return removed

    def consolidate(self) -> None:
        """Rewrite consolidated metadata so readers see every array added since."""
        try:
            with consolidated_metadata():
                zarr.consolidate_metadata(self.group.store)
        except Exception as e:  # an array whose own metadata is garbage cannot be consolidated
            raise CacheError(
                f"could not rewrite the consolidated metadata of {self.path} ({type(e).__name__}): "
                "`timecat cache verify` names the damaged array; extract it again with --overwrite"
            ) from None


@contextlib.contextmanager
def _member_lock(path: str, dataset: str, split: str, member: str):
    if layout.is_remote(path):
        log.warning("%s is not a local path: writers are not locked", path)
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


def _refuse_link(root: str, prefix: str) -> None:
    """Refuse a folder from below a local store's ``root`` down to ``prefix`` that is a symbolic link:
    deleting through it would delete whatever it points at (``files.check_real_folders``, for writes)."""
    if layout.is_remote(root):
        return  # remote stores have no links
    current = root.removeprefix("file://")
    for part in prefix.split("/"):
        current = os.path.join(current, part)
        if os.path.islink(current):
            raise CacheError(
                f"{current} is a symbolic link (to {os.readlink(current)}): timecat removes only real folders "
                "below the cache, never through a link; remove the link yourself"
            )


def _delete(group: zarr.Group, prefix: str) -> None:
    """Delete everything under ``prefix`` from the store, whatever its metadata holds."""
    sync(group.store.delete_dir(prefix))  # zarr's stores delete asynchronously; sync() is how zarr waits


def _disk_error(error: OSError, what: str) -> CacheError:
    if error.errno in NO_SPACE:
        return CacheError(disk_full(what, error.strerror))
    return CacheError(f"cannot write {what}: {error}")


@contextlib.contextmanager
def _split_lock(path: str, dataset: str, split: str):
    """Wait for the lock that serialises creating a split's labels (local stores only)."""
    if layout.is_remote(path):
        yield
        return
    root = str(path).removeprefix("file://").rstrip("/")
    with locks.hold(os.path.join(f"{root}.locks", dataset, split, ".labels.lock"), wait=True):
        yield
