"""Stage 1: write each dataset split as an FFCV .beton with a JSON manifest.

    <data_root>/<name>/<split>.beton   the images and labels
    <data_root>/<name>/<split>.json    manifest: rows, classes, pixel statistics, fingerprint

The manifest is written last, and only after the .beton has been renamed into
place from a temporary name, so a killed ``prepare`` never leaves a split that
looks complete.
"""

from __future__ import annotations

import json
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.configs import PrepareConfig
from pipeline.core import files
from pipeline.core.errors import TimecatError
from pipeline.core.progress import get_logger, progress
from pipeline.data.datasets import BetonFormat, FileImages, SourceOptions, Split, get_spec
from pipeline.data.splits import SPLITS, beton_path, is_complete, manifest_path, read_manifest

log = get_logger(__name__)


# How images are stored, against disk and decoding time. "mixed" is FFCV's ImageNet recipe:
# half of the images as raw pixels, which decode for free, at about 4x the disk of "jpeg" here
# (568 against 136 MiB: tests/benchmarks/test_training_throughput.py).
# pipeline.configs.STORAGES names them for the command line; tests/test_configs.py keeps the two equal.
STORAGE = {
    "jpeg": {"write_mode": "jpg"},
    "mixed": {"write_mode": "proportion", "compress_probability": 0.5},
    "raw": {"write_mode": "raw"},
}


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


def _decode_error(images: FileImages, i: int) -> str | None:
    try:
        images[i]
    except (OSError, ValueError, SyntaxError) as e:  # what Pillow raises for truncated or foreign files
        return f"{e.__class__.__name__}: {e}"
    return None


def find_corrupt(split: Split, name: str, num_workers: int) -> list[dict]:
    """Decode every image file once; return ``{"path", "error"}`` for each one that fails.

    FFCV's writer hangs when a worker dies on a bad file, so they are found here
    first. Threads suffice: Pillow releases the GIL while it decodes.
    """
    if not isinstance(split.images, FileImages):
        return []
    images = split.images
    with ThreadPoolExecutor(max(1, num_workers)) as pool, warnings.catch_warnings():
        # Pillow warns of images above 89 MP; MAX_IMAGE_PIXELS refuses them itself, naming the file.
        # Scoped here, in the thread that starts the pool: nothing global changes for a caller.
        warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit", module=r"PIL\.Image")
        errors = pool.map(lambda i: _decode_error(images, i), range(len(images)), chunksize=64)
        bar = progress(errors, total=len(images), desc=f"check {name} images", unit="img")
        return [{"path": str(images.paths[i]), "error": e} for i, e in enumerate(bar) if e is not None]


def drop_corrupt(split: Split, name: str, on_corrupt: str, num_workers: int) -> tuple[Split, list[dict]]:
    """Fail on unreadable images, or (``skip``) return the split without them and their list."""
    bad = find_corrupt(split, name, num_workers)
    if not bad:
        return split, []
    if on_corrupt == "fail":
        shown = [f"{b['path']} ({b['error']})" for b in bad[:3]]
        raise TimecatError(
            f"{len(bad)} unreadable image(s) in {name}, e.g. {shown}; fix or remove them, "
            "or pass --on-corrupt skip to leave them out (they are listed in the manifest)"
        )
    bad_paths = {b["path"] for b in bad}
    keep = np.array([str(p) not in bad_paths for p in split.images.paths])
    log.warning("%s: skipping %d unreadable image(s), listed under 'skipped' in its manifest", name, len(bad))
    images = FileImages([p for p, k in zip(split.images.paths, keep, strict=True) if k], split.images.root)
    return replace(split, images=images, labels=split.labels[keep]), bad


def validate_split(split: Split, where: str, train: bool) -> None:
    """Refuse a split timecat cannot use: a train split of one class, or file or class names that are not UTF-8."""
    if train and len(np.unique(split.labels)) < 2:
        raise TimecatError(
            f"{where} holds a single class ({split.classes[int(split.labels[0])] if len(split.labels) else 'none'}): "
            "a classifier needs at least two; point prepare at the dataset's whole train folder"
        )
    names = [*split.classes, *(str(p) for p in getattr(split.images, "paths", []))]
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            shown = name.encode("utf-8", "backslashreplace").decode()
            raise TimecatError(
                f"{where}: the name {shown!r} is not valid UTF-8, which manifests and caches cannot record; "
                "rename it (e.g. with convmv) and run again"
            ) from None


def write_split(split: Split, out: Path, fmt: BetonFormat, num_workers: int) -> None:
    """Write one split's .beton to a temporary name, then rename it into place."""
    from pipeline.data.loaders import write_beton  # FFCV is only needed from here on

    for stale in files.remove_stale(out):
        log.info("removed %s, left by a writer that died", stale)
    # FFCV writes to a path, so the temporary is made (exclusively, unguessably) and handed over.
    files.replace(out, lambda tmp: write_beton(tmp, split.images, split.labels, fmt, num_workers))


def storage_format(default: BetonFormat, storage: str | None) -> BetonFormat:
    """The dataset's .beton format with ``--storage`` applied (None keeps the default)."""
    if storage is None:
        return default
    return replace(default, **STORAGE[storage])


def _check_prepared_storage(config: PrepareConfig, name: str, fmt) -> None:
    """Refuse a --storage that differs from how a split is already prepared (it is kept, not rewritten)."""
    for split_name in SPLITS:
        if is_complete(config.data_root, name, split_name):
            stored = read_manifest(config.data_root, name, split_name)["format"]
            if config.storage is not None and stored != asdict(fmt):
                raise TimecatError(
                    f"{name}/{split_name} is already prepared as {stored['write_mode']}, not --storage "
                    f"{config.storage}; prepare another copy with --name {name}-{config.storage}"
                )


def prepare(config: PrepareConfig) -> list[dict]:
    """Write the train and test .beton files of a dataset; complete splits are kept as they are."""
    spec = get_spec(config.kind)
    name = config.stored_name
    log.info("prepare %s (kind %s) under %s", name, config.kind, config.data_root)
    fmt = storage_format(spec.beton, config.storage)
    _check_prepared_storage(config, name, fmt)
    if all(is_complete(config.data_root, name, s) for s in SPLITS):
        log.info("%s is already prepared under %s", name, Path(config.data_root) / name)
        return [read_manifest(config.data_root, name, s) for s in SPLITS]
    # Before reading every image: a link there would have the .beton files written wherever it points.
    fix = (
        "make it a real folder and link the raw files or subfolders inside it (imagefolder and imagenet also "
        "take --train PATH --test PATH)"
    )
    files.check_real_folders(config.data_root, name, f"dataset {name}'s folder", fix)
    files.check_writable(Path(config.data_root) / name, "the data folder")
    options = SourceOptions(config.train_dir, config.test_dir, config.download)
    splits = spec.read(Path(config.data_root), options)
    for split_name in SPLITS:  # everything that can refuse, before anything is written
        validate_split(splits[split_name], f"{name}/{split_name}", train=split_name == "train")
    (Path(config.data_root) / name).mkdir(parents=True, exist_ok=True)
    manifests = []
    for split_name in SPLITS:
        split = splits[split_name]
        if is_complete(config.data_root, name, split_name):
            manifests.append(read_manifest(config.data_root, name, split_name))
            continue
        if split.classes != splits["train"].classes:
            raise TimecatError(f"{split.source}: its classes differ from the train split's")
        split, skipped = drop_corrupt(split, f"{name}/{split_name}", config.on_corrupt, config.num_workers)
        out = beton_path(config.data_root, name, split_name)
        log.info("writing %s (%d images)", out, len(split.labels))
        write_split(split, out, fmt, config.num_workers)
        mean, std = pixel_stats(split, config.stats_images)
        manifest = {
            "name": name,
            "kind": config.kind,
            "split": split_name,
            "rows": len(split.labels),
            "classes": list(split.classes),
            "class_counts": np.bincount(split.labels, minlength=len(split.classes)).tolist(),
            "mean": mean,  # per channel, 0-255
            "std": std,
            "fingerprint": split.fingerprint(),
            "source": split.source,
            "format": asdict(fmt),
            "bytes": out.stat().st_size,
            "skipped": skipped,  # unreadable files left out with --on-corrupt skip: path and error
            "timecat_version": __version__,
        }
        text = json.dumps(manifest, indent=1, allow_nan=False)  # statistics are finite: strict JSON
        files.write_text(manifest_path(config.data_root, name, split_name), text)
        manifests.append(manifest)
    return manifests
