"""The cache's invariants, stated once: what can be wrong with a split, a member array, or a set of arrays.

Both ``Cache.check_members`` (before every read) and ``Cache.verify`` (the
whole store) ask these functions, so the two cannot drift apart: a cache that
``verify`` passes is one that every read accepts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import zarr
from zarr.core.sync import sync

from cache import layout
from cache.errors import CacheError, not_readable


def labels_digest(labels: np.ndarray) -> str:
    """sha256 of a label vector, stored with each member to prove row agreement."""
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()


def first_bad_row(array: zarr.Array, start: int = 0, stop: int | None = None) -> int:
    """Start of the first chunk in rows [start, stop) that is missing, unreadable or not finite; ``stop`` if none."""
    step = array.chunks[0]
    stop = array.shape[0] if stop is None else stop
    for row in range(start, stop, step):
        try:
            block = array[row : min(stop, row + step)]
        except PermissionError as e:  # not damage: writing it again would not help, and must not be tried
            raise CacheError(not_readable(array.path, e)) from None
        except Exception:  # zarr/numcodecs raise several types for a damaged chunk
            return row
        if not np.isfinite(block).all():  # NaN: never written; inf: damaged (writers refuse both)
            return row
    return stop


def provenance(array: zarr.Array) -> dict:
    """An array's provenance record, or ``{}`` when it is absent or not a record (``metadata_problems`` names that)."""
    prov = array.attrs.get("provenance", {})
    return dict(prov) if isinstance(prov, dict) else {}


def metadata_problems(
    array: zarr.Array, member: str, where: str, rows: int | None, dim: int | None = None
) -> list[str]:
    """What no resume can mend: own metadata that is not what timecat wrote (shape, width, dtype, provenance).

    ``rows`` is the split's; ``dim`` the width expected (default: the one its provenance records).
    Such an array is refused by every read and verify, and written anew only by
    ``extract --overwrite`` or ``--repair``: rows kept under a changed shape or dtype
    would be read as other values.
    """
    prov = array.attrs.get("provenance", {})
    if not isinstance(prov, dict):
        return [f"member {member}'s provenance in {where} is a {type(prov).__name__}, not a record"]
    if array.ndim != 2:
        return [f"member {member} of {where} has shape {tuple(array.shape)}, not (rows, features)"]
    problems = []
    if rows is not None and array.shape[0] != rows:
        problems.append(f"member {member} has {array.shape[0]} rows, the split has {rows}")
    dim = prov.get("feature_dim") if dim is None else dim
    if dim is not None and array.shape[1] != dim:
        problems.append(f"member {member} of {where} has {array.shape[1]} features, its model gives {dim}")
    # The dtype timecat wrote is the one its provenance records (older arrays: one of layout.DTYPES).
    # Another dtype means edited metadata: its chunks would decode as other numbers.
    wrote = prov.get("dtype")
    allowed = [wrote] if wrote is not None else list(layout.DTYPES)
    if str(array.dtype) not in allowed:
        problems.append(
            f"member {member} of {where} is stored as {array.dtype}, not {' or '.join(allowed)} "
            "as timecat wrote it (its metadata was changed)"
        )
    return problems


def member_problems(array: zarr.Array, member: str, where: str, split_attrs: dict, *, scan: bool) -> list[str]:
    """Every problem of one member array against its split (``where``), each a sentence naming the member.

    ``scan=False`` (a read) counts the chunks present, a listing; ``scan=True`` (verify)
    decodes every chunk and finds the first missing, unreadable or non-finite row.
    """
    damaged = metadata_problems(array, member, where, split_attrs.get("rows"))
    if damaged:  # the checks below would read its rows under the wrong shape or dtype
        return damaged
    problems = []
    status = array.attrs.get("status")
    if status != layout.STATUS_COMPLETE:
        problems.append(f"member {member} is {status!r}, not 'complete', for {where}")
    prov = provenance(array)
    if split_attrs and prov.get("labels_sha256") != split_attrs.get("labels_sha256"):
        problems.append(f"member {member} was extracted with other labels than {where}")
    if split_attrs and prov.get("dataset_fingerprint") != split_attrs.get("fingerprint"):
        problems.append(
            f"member {member} was extracted from a different {where} "
            f"(fingerprint {prov.get('dataset_fingerprint')} vs {split_attrs.get('fingerprint')})"
        )
    if scan:
        try:
            first = first_bad_row(array)
        except CacheError as e:  # a chunk this user may not read: verify names it and goes on
            return [*problems, str(e)]
        if first < array.shape[0]:
            problems.append(f"member {member} has unwritten, unreadable or non-finite rows from row {first}")
    elif array.nchunks_initialized < array.nchunks:  # e.g. a cache copied in part
        missing = array.nchunks - array.nchunks_initialized
        problems.append(f"member {member} of {where} is missing {missing} of its {array.nchunks} chunks")
    return problems


def split_problems(root: zarr.Group, dataset: str, split: str) -> tuple[int | None, dict, list[str]]:
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


def checkpoint_problem(member: str, dataset: str, found: dict) -> str | None:
    """A member whose arrays (``where -> checkpoint sha256``) come from more than one checkpoint."""
    if len(set(found.values())) <= 1:
        return None
    shown = {where: str(sha)[:12] for where, sha in found.items()}
    return (
        f"member {member}'s arrays come from different checkpoints ({shown}): an extraction was "
        f"interrupted; rerun `timecat extract --members {member} --dataset {dataset} --overwrite`"
    )


def view_seed_problem(where: str, seeds: dict) -> str | None:
    """Members' arrays of one augmented view (``member -> view seed``) that are not the same crops."""
    if len(set(seeds.values())) <= 1:
        return None
    return f"members' views of {where} come from different view seeds {seeds}: re-extract them"


def cross_problems(rows: list[dict]) -> None:
    """Add the invariants between arrays to verify's rows: one checkpoint per member and dataset, one seed per view."""
    shas, seeds = {}, {}
    for row in rows:
        where = layout.describe(row["dataset"], row["split"], row["view"])
        # An array whose metadata is unreadable, or that records no checkpoint (a provenance that is
        # not a record), has its own problem already; nor did `timecat extract` write it as it is.
        if row["shape"] is not None and row["checkpoint_sha256"] is not None:
            shas.setdefault((row["dataset"], row["member"]), {})[where] = row["checkpoint_sha256"]
        if row["view"] is not None:
            seeds.setdefault((row["dataset"], row["split"], row["view"]), {})[row["member"]] = row["view_seed"]
    for row in rows:
        found = [checkpoint_problem(row["member"], row["dataset"], shas.get((row["dataset"], row["member"]), {}))]
        if row["view"] is not None:
            where = layout.describe(row["dataset"], row["split"], row["view"])
            found.append(view_seed_problem(where, seeds[(row["dataset"], row["split"], row["view"])]))
        row["problems"] += [problem for problem in found if problem]


def children(group: zarr.Group, prefix: str) -> list[str]:
    """Names of the entries under ``prefix``, from the store's own listing (not from metadata)."""

    async def collect() -> list[str]:
        return [key async for key in group.store.list_dir(prefix)]

    # zarr's stores list asynchronously; sync() is how zarr's own synchronous API waits on them.
    return sorted(k for k in sync(collect()) if k != "zarr.json" and not k.startswith("."))


def walk(root: zarr.Group) -> Iterator[tuple[str, str, int | None, str, zarr.Array | None, str | None]]:
    """Every member array as ``(dataset, split, view, member, array, error)``, opened from its own metadata;
    ``error`` says why an array could not be opened (damaged metadata, or ``not_readable``'s permissions text)."""
    for dataset in children(root, ""):
        for split in children(root, dataset):
            groups = [(None, layout.features_group(dataset, split))]
            groups += [
                (int(v), layout.features_group(dataset, split, int(v)))
                for v in children(root, layout.views_group(dataset, split))
                if v.isdigit()
            ]
            for view, group in groups:
                for member in children(root, group):
                    path = f"{group}/{member}"
                    try:
                        array = zarr.open_array(store=root.store, path=path, mode="r")
                    except PermissionError as e:  # another user's file: not damage, nothing to re-extract
                        yield dataset, split, view, member, None, not_readable(path, e)
                        continue
                    except Exception as e:  # missing or garbage metadata: zarr raises several types
                        yield dataset, split, view, member, None, f"array metadata unreadable ({type(e).__name__}: {e})"
                        continue
                    yield dataset, split, view, member, array, None


def _row(dataset, split, view, member, shape, prov, problems) -> dict:
    return {
        "dataset": dataset,
        "split": split,
        "view": view,
        "member": member,
        "shape": shape,
        "checkpoint_sha256": prov.get("checkpoint_sha256"),
        "view_seed": prov.get("view_seed"),
        "problems": problems,
    }


def verify(root: zarr.Group, path: str) -> list[dict]:
    """One row per array (and per split whose labels are broken) with ``ok`` and its ``problems``."""
    rows, splits = [], {}
    for dataset, split, view, member, array, error in walk(root):
        if (dataset, split) not in splits:  # once per split, not once per array
            splits[(dataset, split)] = split_problems(root, dataset, split)
        _, attrs, problems = splits[(dataset, split)]
        problems, prov = list(problems), {}
        if error is not None:
            where = layout.features_path(dataset, split, member, view)
            damaged = not error.endswith("nothing needs repairing")  # not_readable's: a permissions problem
            problems.append(f"{error}: delete {path}/{where} and re-extract" if damaged else error)
        else:
            prov = provenance(array)
            problems += member_problems(array, member, layout.describe(dataset, split, view), attrs, scan=True)
        shape = list(array.shape) if error is None else None
        rows.append(_row(dataset, split, view, member, shape, prov, problems))
    cross_problems(rows)
    for dataset in children(root, ""):  # a split whose labels are broken, with no array yet to report it
        for split in children(root, dataset):
            if (dataset, split) not in splits and layout.LABELS in children(root, f"{dataset}/{split}"):
                problems = split_problems(root, dataset, split)[2]
                if problems:
                    rows.append(_row(dataset, split, None, None, None, {}, problems))
    for row in rows:
        row["ok"] = not row["problems"]
    return rows
