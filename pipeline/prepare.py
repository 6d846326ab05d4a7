"""Stage 1: write each dataset split as an FFCV .beton with a JSON manifest.

    <data_root>/<name>/<split>.beton   the images and labels
    <data_root>/<name>/<split>.json    manifest: rows, classes, pixel statistics, fingerprint

The manifest is written last, and only after the .beton has been renamed into
place from a temporary name, so a killed ``prepare`` never leaves a split that
looks complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cache.layout import check_name
from pipeline import __version__
from pipeline.datasets import BetonFormat, FileImages, SourceOptions, Split, get_spec
from pipeline.errors import TimecatError
from pipeline.progress import get_logger, progress

log = get_logger(__name__)

SPLITS = ("train", "test")


@dataclass(frozen=True)
class PrepareConfig:
    """What to prepare and where."""

    dataset: str  # a kind from pipeline.datasets.DATASETS
    data_root: Path
    name: str | None = None  # folder name under data_root; defaults to the kind
    train_dir: Path | None = None  # imagefolder only
    test_dir: Path | None = None  # imagefolder only
    download: bool = False  # allow torchvision to download fashion-mnist / cifar
    num_workers: int = 2  # FFCV writer processes
    stats_images: int = 10_000  # images sampled (seeded) for per-channel mean/std

    def __post_init__(self):
        check_name("dataset", self.stored_name)  # it becomes a folder and a cache path

    @property
    def stored_name(self) -> str:
        """The folder name under the data root."""
        return self.name or self.dataset


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
            f"dataset {name!r} split {split!r} is not prepared under {data_root} (no {beton.name} with its manifest); "
            f"run `timecat prepare {name}` (prepared there: {prepared or 'none'})"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("bytes") != beton.stat().st_size:
        raise TimecatError(f"{beton} does not match its manifest (size changed); run `timecat prepare {name}` again")
    return manifest


def is_complete(data_root: Path, name: str, split: str) -> bool:
    """True when the split's .beton and manifest are both in place and agree."""
    try:
        read_manifest(data_root, name, split)
    except (TimecatError, json.JSONDecodeError):
        return False
    return True


def pixel_stats(split: Split, max_images: int, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the 0-255 scale, over a seeded sample of images."""
    rng = np.random.default_rng(seed)
    n = len(split.images)
    indices = np.sort(rng.choice(n, size=min(n, max_images), replace=False))
    sample = split.images.sample(indices)
    if isinstance(split.images, FileImages):
        mean = sample[:, 0].mean(axis=0)  # images differ in size: average per-image moments
        std = np.sqrt(np.maximum(sample[:, 1].mean(axis=0) - mean**2, 1e-12))
    else:
        mean, std = sample.mean(axis=(0, 1, 2)), sample.std(axis=(0, 1, 2))
    return [round(float(v), 4) for v in mean], [round(float(max(v, 1e-3)), 4) for v in std]


def validate_files(split: Split, name: str) -> None:
    """Decode every image file once, so a corrupt one is reported by path before writing."""
    if not isinstance(split.images, FileImages):
        return
    bad = []
    for i in progress(range(len(split.images)), desc=f"check {name} images", unit="img"):
        try:
            split.images[i]
        except (OSError, ValueError, SyntaxError) as e:
            bad.append(f"{split.images.paths[i]} ({e})")
    if bad:
        raise TimecatError(f"{len(bad)} unreadable image(s), e.g. {bad[:3]}; fix or remove them and run again")


def write_split(split: Split, out: Path, fmt: BetonFormat, num_workers: int) -> None:
    """Write one split's .beton to a temporary name, then rename it into place."""
    from pipeline.loaders import write_beton  # FFCV is only needed from here on

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        write_beton(tmp, split.images, split.labels, fmt, num_workers)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def prepare(config: PrepareConfig) -> list[dict]:
    """Write the train and test .beton files of a dataset; complete splits are kept as they are."""
    spec = get_spec(config.dataset)
    name = config.stored_name
    if all(is_complete(config.data_root, name, s) for s in SPLITS):
        log.info("%s is already prepared under %s", name, Path(config.data_root) / name)
        return [read_manifest(config.data_root, name, s) for s in SPLITS]
    options = SourceOptions(config.train_dir, config.test_dir, config.download)
    splits = spec.read(Path(config.data_root), options)
    (Path(config.data_root) / name).mkdir(parents=True, exist_ok=True)
    manifests = []
    for split_name in SPLITS:
        split = splits[split_name]
        if is_complete(config.data_root, name, split_name):
            manifests.append(read_manifest(config.data_root, name, split_name))
            continue
        if split.classes != splits["train"].classes:
            raise TimecatError(f"{split.source}: its classes differ from the train split's")
        validate_files(split, f"{name}/{split_name}")
        out = beton_path(config.data_root, name, split_name)
        log.info("writing %s (%d images)", out, len(split.labels))
        write_split(split, out, spec.beton, config.num_workers)
        mean, std = pixel_stats(split, config.stats_images)
        manifest = {
            "name": name,
            "kind": config.dataset,
            "split": split_name,
            "rows": len(split.labels),
            "classes": list(split.classes),
            "class_counts": np.bincount(split.labels, minlength=len(split.classes)).tolist(),
            "mean": mean,  # per channel, 0-255
            "std": std,
            "fingerprint": split.fingerprint(),
            "source": split.source,
            "format": asdict(spec.beton),
            "bytes": out.stat().st_size,
            "timecat_version": __version__,
        }
        tmp = manifest_path(config.data_root, name, split_name).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, manifest_path(config.data_root, name, split_name))
        manifests.append(manifest)
    return manifests
