"""A saved logreg head applied to cached features: reuse a probe on any split of the same members.

``results.head`` loads a probe's head (``heads/<id>.npz``); this reads the
same members' cached features for a dataset and split, checks that they come
from the checkpoints the head was fit on, and ranks every row's classes. When
the split has the head's classes, it also scores top-1 (with its bootstrap
interval) and top-5. Nothing is written unless asked (``write``).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

import cache
from pipeline.core import files, stats
from pipeline.core.errors import TimecatError
from pipeline.probe import results
from pipeline.probe.heldout import topk_accuracy

OUTPUTS = (".npz", ".csv")  # what ``write`` can save: arrays, or a table of class names


def predict(results_root: Path, record_id: str, dataset: str, split: str, cache_path: str, k: int = 5) -> dict:
    """Rank the classes of every row of ``dataset``/``split`` with probe ``record_id``'s head.

    Returns the summary (rows, members, and top-1/top-5 when the split has the
    head's classes) and ``topk`` ((n, <=k) class indices into ``classes``, best
    first), ``labels`` (the split's, (n,)) and ``label_names`` (the split's classes).
    """
    if k < 1:
        raise TimecatError(f"--top-k must be at least 1, got {k}")
    root = Path(results_root)
    head = results.head(root, record_id)
    record = results.find(results.load(root), record_id, root)
    store = cache.open(cache_path)
    try:
        store.check_members(dataset, split, list(head.members))
        _check_same_features(store, dataset, split, head, record)
        X, labels = store.features(dataset, split, list(head.members), scan_nan=True)
        split_classes = tuple(map(str, store.split_attrs(dataset, split)["classes"]))
    except cache.CacheError as e:
        raise TimecatError(str(e)) from None
    best = head.topk(X, k)
    summary = {
        "id": record_id,
        "dataset": dataset,
        "split": split,
        "rows": len(labels),
        "members": list(head.members),
        "C": head.C,
        "classes": list(head.classes),
        "same_classes": split_classes == head.classes,
    }
    if summary["same_classes"]:
        summary["top1"] = topk_accuracy(best, labels, 1)
        summary["top1_ci95"] = stats.top1_interval(best[:, 0] == labels)
        summary["top5"] = topk_accuracy(best, labels, 5)
    return {**summary, "topk": best, "labels": labels, "label_names": split_classes}


def _check_same_features(store: cache.Cache, dataset: str, split: str, head: results.Head, record: dict) -> None:
    """Refuse features of another width or another checkpoint than the head was fit on."""
    for member, dim in zip(head.members, head.dims, strict=True):
        have = store.dim(dataset, split, member)
        if have != dim:
            raise TimecatError(
                f"{member} has {have}-d features in {dataset}/{split}, but record {record['id']}'s head was fit on "
                f"{dim}-d ones: apply it to the members it was fit on"
            )
        fit_on = (record.get("member_provenance", {}).get(member) or {}).get("checkpoint_sha256")
        here = store.provenance(dataset, split, member).get("checkpoint_sha256")
        if fit_on and here and fit_on != here:
            raise TimecatError(
                f"{member}'s {dataset}/{split} features come from checkpoint {here[:12]}, but record {record['id']}'s "
                f"head was fit on checkpoint {fit_on[:12]}'s: the head would read another network's features "
                f"(re-extract {member} from that checkpoint, or probe again)"
            )


def write(path: Path, predicted: dict, classes: tuple[str, ...] | list[str]) -> Path:
    """Save the ranked classes: ``.npz`` (topk class indices, labels, class names) or ``.csv`` (one row per
    example: its label and its top-k class names). Written atomically; nothing else is touched."""
    path = Path(path)
    if path.suffix not in OUTPUTS:
        raise TimecatError(f"--out {path}: unknown file type {path.suffix!r}; choose one of {list(OUTPUTS)}")
    files.check_writable(path.parent, "the --out folder")
    names = np.array(classes)

    def save(tmp: Path) -> None:
        if path.suffix == ".npz":
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
                topk = predicted["topk"].astype(np.int32)
                np.savez_compressed(f, topk=topk, labels=predicted["labels"], classes=names)
            return
        with open(tmp, "w", newline="") as f:
            table = csv.writer(f)
            table.writerow(["row", "label", *[f"top{i + 1}" for i in range(predicted["topk"].shape[1])]])
            label_names = predicted["label_names"]
            for row, (label, best) in enumerate(zip(predicted["labels"], predicted["topk"], strict=True)):
                table.writerow([row, label_names[label], *names[best]])

    return files.replace(path, save)


def format_summary(summary: dict, out: Path | None) -> list[str]:
    """The lines ``timecat predict`` prints."""
    where = f"{summary['dataset']}/{summary['split']}"
    members = ",".join(summary["members"])
    line = f"{summary['id']}  {members} head (C={summary['C']:.3g}) on {where}: {summary['rows']:,} rows"
    if summary["same_classes"]:
        lo, hi = summary["top1_ci95"]
        line += f", top-1 {summary['top1']:.2f}% [95% CI {lo:.2f}, {hi:.2f}], top-5 {summary['top5']:.2f}%"
    else:
        line += f" (its classes are not the head's {len(summary['classes'])}: ranked, not scored)"
    return [line + (f" -> {out}" if out is not None else "")]
