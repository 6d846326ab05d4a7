"""Stage 3: run frozen members over every split of a dataset and cache their features.

Each batch is decoded once and fed to every member that shares its
preprocessing, so caching N members costs one pass over the images, not N.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

import cache
from cache.layout import check_name
from pipeline import __version__, checkpoints, distributed, interop
from pipeline.errors import TimecatError
from pipeline.models import FEATURE_LAYER, Classifier
from pipeline.prepare import SPLITS, beton_path, read_manifest
from pipeline.pretrain import checkpoint_path
from pipeline.progress import get_logger, progress
from pipeline.views import ViewSpec, augment

if TYPE_CHECKING:
    from pipeline.loaders import Preprocess  # FFCV is imported only when images are read

log = get_logger(__name__)


@dataclass(frozen=True)
class ExtractConfig:
    """Which members to run over which dataset, and how features are stored."""

    dataset: str  # a prepared dataset under the data root
    members: tuple[str, ...]  # member names under the runs folder
    splits: tuple[str, ...] = SPLITS
    batch_size: int = 512  # images per forward pass
    num_workers: int = 2  # FFCV loader threads
    dtype: str = "float32"  # float32 | float16 (half the disk, refuses values out of range)
    compression: str = "zstd"  # zstd | none
    overwrite: bool = False  # replace a member cached from a different checkpoint
    chunk_rows: int | None = None  # rows per chunk; None: ~8 MiB rounded down to whole batches
    views: int = 0  # K seeded augmented views of each image of view_splits, per member (0: none)
    view_splits: tuple[str, ...] = ("train",)  # the splits a probe trains on
    view_spec: ViewSpec = field(default_factory=ViewSpec)  # crop scale, ratio, flip and seed of the views

    def __post_init__(self):
        if not self.members:
            raise TimecatError("no members given: pass --members run0,run1,...")
        if self.chunk_rows is not None and (self.chunk_rows < 1 or self.chunk_rows % self.batch_size):
            raise TimecatError(
                f"chunk rows ({self.chunk_rows}) must be a multiple of the batch size ({self.batch_size})"
            )
        if self.views < 0:
            raise TimecatError(f"views must be 0 or more, not {self.views}")
        if self.compression not in {c.value for c in cache.Compression}:
            raise TimecatError(
                f"unknown compression {self.compression!r}; choose one of {[c.value for c in cache.Compression]}"
            )


@dataclass
class Member:
    """A frozen member ready to extract: its model, checkpoint identity and preprocessing."""

    name: str
    model: Classifier
    sha256: str
    payload: dict

    def provenance(self, dataset: str, split: str, fingerprint: str) -> dict:
        cfg = self.payload["member"]
        return {
            "member": self.name,
            "checkpoint_sha256": self.sha256,
            "arch": cfg["arch"],
            "params": sum(p.numel() for p in self.model.backbone.parameters()),  # for parameter-matched tables
            "seed": cfg["seed"],
            "steps": self.payload["step"],
            "pretrain_dataset": cfg["dataset"],
            "feature_layer": FEATURE_LAYER,
            "feature_dim": self.model.feature_dim,
            "preprocessing": {"eval": "centre crop, resize, normalize", **self.payload["preprocess"]},
            "dataset": dataset,
            "split": split,
            "dataset_fingerprint": fingerprint,
            "timecat_version": __version__,
            "extracted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


def load_member(runs_root: Path, name: str, device: torch.device) -> Member:
    """Load a member as a frozen model in eval mode.

    ``name`` is a run under ``runs_root``, or a checkpoint file trained elsewhere
    (``path`` or ``name=path``: the paper's, AlgoPerf's or torchvision's ResNet-50).
    """
    if interop.is_foreign(name):
        name, path = interop.foreign_name_and_path(name)
        check_name("member", name)
        payload = interop.load_foreign(path)
    else:
        path = checkpoint_path(runs_root, name)
        if not path.is_file():
            known = sorted(p.parent.name for p in Path(runs_root).glob("*/checkpoint.pt"))
            raise TimecatError(f"unknown member {name!r}: no {path}; trained members: {known or 'none'}")
        payload = checkpoints.load(path)
    if not payload.get("complete"):
        raise TimecatError(f"member {name} has not finished training ({path}); run its `timecat pretrain` again")
    model = checkpoints.load_model(payload, str(path)).to(device, memory_format=torch.channels_last).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Member(name, model, checkpoints.sha256(path), payload)


@torch.inference_mode()
def extract_batch(models: list[Classifier], images: torch.Tensor) -> list[np.ndarray]:
    """Penultimate features of one batch for each model: a list of (B, d) float32 arrays.

    On GPU the forward runs under bf16 autocast; features are stored as float32.
    """
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
        return [m.backbone(images).float().cpu().numpy() for m in models]


def _plan(
    store: cache.Cache, split: str, member: Member, view: int | None, provenance: dict, config: ExtractConfig
) -> str:
    """What to do for one array: ``keep`` it, ``resume`` an unfinished one, or write it ``new``."""
    dataset = config.dataset
    if member.name not in store.members(dataset, split, view=view):
        return "new"
    cached = store.provenance(dataset, split, member.name, view=view)
    for key, what in (("checkpoint_sha256", "checkpoint"), ("view_seed", "view seed")):
        if cached.get(key) != provenance.get(key):
            if not config.overwrite:
                raise TimecatError(
                    f"member {member.name} is cached for {cache.layout.describe(dataset, split, view)} from another "
                    f"{what} ({key} {str(cached.get(key))[:12]}, now {str(provenance.get(key))[:12]}); "
                    "pass --overwrite to re-extract it, or rename the member"
                )
            return "new"
    if store.status(dataset, split, member.name, view=view) == cache.layout.STATUS_COMPLETE:
        return "keep"
    return "resume" if cached.get("dataset_fingerprint") == provenance["dataset_fingerprint"] else "new"


def chunk_rows(config: ExtractConfig, dim: int) -> int:
    """Rows per chunk: the ~8 MiB default rounded down to whole batches.

    Whole batches per chunk mean a resumed run, or a rank starting at its own
    chunk, feeds the model exactly the batches a single uninterrupted run would,
    so its features are bitwise identical.
    """
    if config.chunk_rows:
        return config.chunk_rows
    default = cache.layout.chunk_rows(dim, config.dtype)
    return max(config.batch_size, default - default % config.batch_size)


def targets(config: ExtractConfig, split: str) -> list[int | None]:
    """The arrays each member gets for a split: plain features (None), then views 0..K-1."""
    return [None, *range(config.views if split in config.view_splits else 0)]


def view_preprocess(pre: Preprocess) -> Preprocess:
    """Decode for views: the whole centre square at the eval crop's source size (256 px for 224 at 0.875)."""
    return replace(pre, resolution=round(pre.resolution / pre.crop_ratio), crop_ratio=1.0)


def prepare_arrays(
    store: cache.Cache, config: ExtractConfig, split: str, members: list[Member], manifest: dict, labels: np.ndarray
) -> list[tuple[str, int | None]]:
    """Rank 0's part: write the split's labels and create the arrays to fill; return ``(member, view)`` to do."""
    from pipeline.loaders import Preprocess

    fingerprint = manifest["fingerprint"]
    store.write_labels(config.dataset, split, labels, fingerprint, manifest["classes"])
    todo = []
    for m in members:
        for view in targets(config, split):
            provenance = m.provenance(config.dataset, split, fingerprint)
            if view is not None:
                pre = Preprocess.from_dict(m.payload["preprocess"])
                source = view_preprocess(pre).resolution
                provenance.update(
                    view=view, view_seed=config.view_spec.seed, views=config.view_spec.describe(source, pre.resolution)
                )
            action = _plan(store, split, m, view, provenance, config)
            if action == "new":
                store.create_features(
                    config.dataset,
                    split,
                    m.name,
                    m.model.feature_dim,
                    provenance,
                    dtype=config.dtype,
                    compression=cache.Compression(config.compression),
                    chunk_rows=chunk_rows(config, m.model.feature_dim),
                    view=view,
                )
            if action != "keep":
                todo.append((m.name, view))
    return todo


def _group_writers(
    store: cache.Cache, config: ExtractConfig, split: str, todo: list[tuple[Member, int | None]], d: distributed.Dist
) -> dict[tuple, list[tuple[Member, int | None, cache.FeatureWriter]]]:
    """This rank's writers, grouped by what the loader must decode: (preprocess, views?, start row, stop row)."""
    from pipeline.loaders import Preprocess

    groups: dict[tuple, list] = {}
    for m, view in todo:
        rows = store.shape(config.dataset, split, m.name, view=view)[0]
        chunk = store.chunk_rows(config.dataset, split, m.name, view=view)
        lo, hi = cache.layout.row_ranges(rows, chunk, d.world_size)[d.rank]
        writer = store.resume_features(config.dataset, split, m.name, lo, hi, view=view)
        if writer.next_row >= hi:
            continue
        if writer.next_row > lo:
            where = cache.layout.describe(config.dataset, split, view)
            log.info("%s %s: resuming at row %d", where, m.name, writer.next_row)
        key = (Preprocess.from_dict(m.payload["preprocess"]), view is not None, writer.next_row, hi)
        groups.setdefault(key, []).append((m, view, writer))
    return groups


def run_members(
    store: cache.Cache,
    config: ExtractConfig,
    data_root: Path,
    split: str,
    todo: list[tuple[Member, int | None]],
    labels: np.ndarray,
    d: distributed.Dist,
) -> None:
    """This rank's part: fill its chunk-aligned row range of each (member, view) array.

    Arrays that need the same decoded images and rows share one pass over them:
    every member's plain features in one pass, every member's views in another.
    """
    from pipeline.loaders import eval_loader, to_model_input

    beton = beton_path(data_root, config.dataset, split)
    for (pre, views, start, stop), group in _group_writers(store, config, split, todo, d).items():
        names = ",".join(sorted({m.name for m, _, _ in group}))
        desc = f"extract {config.dataset}/{split}{' views' if views else ''} [{names}]"
        background = cache.BackgroundWriter(max_pending=4 * len(group))
        decode = view_preprocess(pre) if views else pre
        loader = eval_loader(beton, decode, config.batch_size, config.num_workers, start_row=start, stop_row=stop)
        row = start
        with progress(total=stop - start, desc=desc, unit="img") as bar:
            try:
                for images, batch_labels in loader:
                    images, batch_labels = to_model_input(images, batch_labels, d.device)
                    # The loader is sequential: its labels must be the stored ones, row for row.
                    if not np.array_equal(batch_labels.cpu().numpy(), labels[row : row + len(batch_labels)]):
                        raise TimecatError(f"{beton}: rows came out of dataset order at row {row}")
                    if views:  # each view's crops once per batch, shared by every member
                        rows = np.arange(row, row + len(batch_labels))
                        inputs = {
                            v: augment(images, rows, config.view_spec, v, pre.resolution)
                            for v in sorted({view for _, view, _ in group})
                        }
                    else:
                        inputs = {None: images}
                    for m, view, writer in group:
                        background.append(writer, extract_batch([m.model], inputs[view])[0])
                    row += len(batch_labels)
                    bar.update(len(batch_labels))
            except BaseException:
                background.abort()  # keep whole chunks, report this error rather than the writer's
                raise
            background.close()


def extract_split(
    store: cache.Cache, config: ExtractConfig, data_root: Path, split: str, members: list[Member], d: distributed.Dist
) -> list[tuple[str, int | None]]:
    """Cache the features (and views) of ``members`` for one split on every rank; return what was written."""
    from pipeline.loaders import read_labels

    manifest = read_manifest(data_root, config.dataset, split)
    labels = read_labels(beton_path(data_root, config.dataset, split))
    todo = prepare_arrays(store, config, split, members, manifest, labels) if d.is_main else None
    todo = d.broadcast(todo)  # every rank waits here until rank 0 has created the arrays
    by_name = {m.name: m for m in members}
    run_members(store, config, data_root, split, [(by_name[name], view) for name, view in todo], labels, d)
    d.barrier()
    if d.is_main:
        # Rank 0 alone marks arrays complete, after a scan of every chunk of every rank.
        for name, view in todo:
            store.finish_features(config.dataset, split, name, view=view)
    return todo


def extract(config: ExtractConfig, data_root: Path, runs_root: Path, cache_path: str) -> list[dict]:
    """Cache every member's features for every split; already-cached members are kept.

    Run it as a plain process, or under ``torchrun --nproc-per-node K`` where each
    rank fills its own chunk-aligned row ranges.
    """
    d = distributed.init()
    try:
        return _extract(config, data_root, runs_root, cache_path, d)
    finally:
        distributed.shutdown(d)


def _extract(config, data_root, runs_root, cache_path, d: distributed.Dist) -> list[dict]:
    members = [load_member(runs_root, name, d.device) for name in config.members]
    with contextlib.ExitStack() as locks:
        store = None
        if d.is_main:
            store = cache.open(cache_path, mode="a")  # creates the root group once
            for split in config.splits:
                for m in members:
                    locks.enter_context(store.lock(config.dataset, split, m.name))
        d.barrier()
        store = store or cache.open(cache_path, mode="a")
        summary = []
        try:
            for split in config.splits:
                started = time.perf_counter()
                written = extract_split(store, config, data_root, split, members, d)
                seconds = time.perf_counter() - started
                for m in members:
                    for view in targets(config, split):
                        state = "written" if (m.name, view) in written else "kept"
                        row = {"dataset": config.dataset, "split": split, "member": m.name, "state": state}
                        summary.append(row if view is None else {**row, "view": view})
                if written:
                    log.info("%s/%s: cached %d array(s) in %.1f s", config.dataset, split, len(written), seconds)
        finally:
            if d.is_main:
                store.consolidate()
    return summary
