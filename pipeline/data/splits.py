"""The prepared splits on disk: their names, .beton and manifest paths, completeness, preprocessing.

``timecat prepare`` writes them; pretrain and extract read them. This module is
their one owner, and imports no FFCV, so any stage (or a notebook) can find
and check a prepared split without the image libraries.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from cache.errors import elsewhere, shown
from pipeline.core.errors import TimecatError, is_finite_number

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Preprocess:
    """How images become a member's input; saved in checkpoints and cache provenance."""

    resolution: int  # px, side of the square input
    mean: tuple[float, float, float]  # per channel, 0-255 scale
    std: tuple[float, float, float]
    crop_ratio: float = 1.0  # eval: centre crop side / image side (224/256 for ImageNet)
    crop_scale: tuple[float, float] = (0.35, 1.0)  # train: RandomResizedCrop area range
    flip: bool = True  # train: random horizontal flip

    def to_dict(self) -> dict:
        """Plain fields, for checkpoints and cache provenance."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        """Rebuild from ``to_dict`` output (JSON turns tuples into lists)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def beton_path(data_root: Path, name: str, split: str) -> Path:
    """Where a prepared split's .beton lives."""
    return Path(data_root) / name / f"{split}.beton"


def manifest_path(data_root: Path, name: str, split: str) -> Path:
    """Where a prepared split's manifest lives."""
    return Path(data_root) / name / f"{split}.json"


def read_manifest(data_root: Path, name: str, split: str) -> dict:
    """The manifest of a prepared split, or an error telling how to prepare it."""
    path = manifest_path(data_root, name, split)
    beton = beton_path(data_root, name, split)
    if not path.is_file() or not beton.is_file():
        prepared = sorted(p.name for p in Path(data_root).glob("*") if (p / "train.json").is_file())
        raise TimecatError(
            f"dataset {name!r} split {split!r} is not prepared under {shown(data_root)} (no {beton.name} with its "
            f"manifest); run {prepare_command(name)} (prepared there: {prepared or 'none'}; to look elsewhere: "
            f"{elsewhere('data')})"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TimecatError(f"{path}: not a readable manifest ({e}); run {prepare_command(name)} again") from None
    missing = [k for k in MANIFEST_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise TimecatError(f"{path}: manifest lacks {missing}; run {prepare_command(name)} again")
    problem = manifest_problem(manifest)
    if problem:
        raise TimecatError(f"{path}: {problem}, which prepare never writes; run {prepare_command(name)} again")
    if manifest.get("bytes") != beton.stat().st_size:
        raise TimecatError(f"{beton} does not match its manifest (size changed); run {prepare_command(name)} again")
    return manifest


MANIFEST_KEYS = ("name", "kind", "split", "rows", "classes", "mean", "std", "fingerprint", "format", "bytes")
PIXEL_MAX = 255.0  # manifests give pixel statistics on the 0-255 scale


def manifest_problem(manifest: dict) -> str | None:
    """What makes a manifest's values impossible (None when they are fine): a std of 0 would divide every
    input by zero, a class list shorter than the labels would be indexed past its end."""
    rows, classes, counts = manifest["rows"], manifest["classes"], manifest.get("class_counts")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        return f"rows is {rows!r}, not a positive integer"
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        return f"classes is {str(classes)[:80]}, not a list of class names"
    for key in ("mean", "std"):
        values = manifest[key]
        if not (isinstance(values, list) and len(values) == 3 and all(is_finite_number(v) for v in values)):
            return f"{key} is {str(values)[:80]}, not three finite numbers (one per channel)"
        if (key == "std" and min(values) <= 0) or not all(0 <= v <= PIXEL_MAX for v in values):
            return f"{key} is {values}: each must be {'above' if key == 'std' else 'at least'} 0 and at most 255"
    if counts is not None and (
        not isinstance(counts, list) or len(counts) != len(classes) or not all(isinstance(c, int) for c in counts)
    ):
        return f"class_counts is {str(counts)[:80]}, not one count for each of the {len(classes)} classes"
    if counts is not None and sum(counts) != rows:
        return f"class_counts add up to {sum(counts)}, not the {rows} rows"
    return None


def prepare_command(name: str) -> str:
    """The command that prepares ``name``: `timecat prepare NAME`, or with --name when NAME is not a kind."""
    from pipeline.data.datasets import DATASETS, closest_kind

    if name in DATASETS:
        return f"`timecat prepare {name}`"
    guess = closest_kind(name)
    if guess:  # a typo of a kind is likelier than a dataset of its own with that name
        return f"`timecat prepare {guess}` (did you mean --dataset {guess}?), or `timecat prepare KIND --name {name}`"
    return f"`timecat prepare KIND --name {name}` (KIND one of {sorted(DATASETS)})"


def is_complete(data_root: Path, name: str, split: str) -> bool:
    """True when the split's .beton and manifest are both in place and agree."""
    try:
        read_manifest(data_root, name, split)
    except (TimecatError, json.JSONDecodeError):
        return False
    return True
