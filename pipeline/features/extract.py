"""Stage 3: run frozen members over every split of a dataset and cache their features.

Each batch is decoded once and fed to every member that shares its
preprocessing, so caching N members costs one pass over the images, not N.
How images are resized and augmented follows the dataset kind's recipe
(pipeline.data.recipes); a member trained elsewhere gets the recipe's
preprocessing for the kind, a timecat member its own pretraining's, and a
timm or torchvision model its own eval transform, applied in torch to whole,
unresized images (``Decode.whole``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

import cache
from pipeline import __version__
from pipeline.configs import ExtractConfig
from pipeline.core import distributed, files
from pipeline.core.errors import TimecatError
from pipeline.core.progress import get_logger, plural, progress
from pipeline.data import recipes
from pipeline.data.splits import Preprocess, beton_path, read_manifest
from pipeline.features.views import ViewSpec, augment, model_transform, resize_center
from pipeline.members import checkpoints
from pipeline.members.models import FEATURE_LAYER, Classifier

log = get_logger(__name__)


@dataclass
class Member:
    """A frozen member ready to extract: its model, checkpoint identity and preprocessing."""

    name: str
    model: Classifier
    sha256: str
    payload: dict
    path: str = ""  # the file its weights were read from
    foreign: bool = False  # trained elsewhere (the paper's, AlgoPerf's or torchvision's weights)
    preprocess: dict | None = None  # for the dataset being extracted; set by ``use_recipe``

    def weights_source(self) -> dict:
        return _weights_source(self.payload, self.path, self.sha256)

    def use_recipe(self, recipe: recipes.Recipe) -> None:
        """Preprocess for the dataset kind: a foreign checkpoint gets the recipe's; a timecat member keeps its
        own pretraining's, and a timm or torchvision model its own pretrained config's (input side, crop, mean
        and std)."""
        own = not self.foreign or "model_config" in self.payload
        self.preprocess = dict(self.payload["preprocess"]) if own else dict(recipe.foreign)

    def provenance(
        self, dataset: str, split: str, fingerprint: str, recipe: recipes.Recipe, precision: str, own_kernel=False
    ) -> dict:
        """What this member's array of ``split`` records; ``own_kernel``: resized with the model's own eval
        transform (a timm or torchvision model's plain features, not its views)."""
        cfg = self.payload["member"]
        return {
            "member": self.name,
            "checkpoint_sha256": self.sha256,
            "arch": cfg["arch"],
            "weights": self.weights_source(),
            "params": sum(p.numel() for p in self.model.backbone.parameters()),  # for parameter-matched tables
            "seed": cfg["seed"],
            "steps": self.payload["step"],
            "pretrain_dataset": cfg["dataset"],
            "feature_layer": getattr(self.model.backbone, "feature_layer", FEATURE_LAYER),
            "feature_dim": self.model.feature_dim,
            "preprocessing": self._preprocessing(recipe, own_kernel),
            "recipe": recipe.name,
            "precision": precision,
            "dataset": dataset,
            "split": split,
            "dataset_fingerprint": fingerprint,
            "timecat_version": __version__,
            "extracted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def _preprocessing(self, recipe: recipes.Recipe, own_kernel: bool) -> dict:
        if not own_kernel:
            return {
                "eval": "centre crop, resize, normalize",
                **self.preprocess,
                "interpolation": recipe.interpolation,
                **({"model_config": self.payload["model_config"]} if "model_config" in self.payload else {}),
            }
        resize, side = self.payload["resize"], self.preprocess["resolution"]
        return {
            "eval": f"Resize({resize['resize_px']}, {resize['kernel']}) + CenterCrop({side}), normalize: in torch",
            **self.preprocess,
            "interpolation": resize["kernel"],
            "resize_px": resize["resize_px"],
            "model_config": self.payload["model_config"],  # the model's preprocessing as its library states it
            # PIL rounds between its two resize passes; torch keeps floats there and rounds at the end
            "differences": ["PIL's rounding between its horizontal and vertical resize passes"],
        }

    def own_kernel(self) -> bool:
        """A timm or torchvision model: resized on the device with its pretrained config's kernel."""
        return "resize" in self.payload


def _weights_source(payload: dict, path: str, sha256: str) -> dict:
    """Where a member's weights come from: a timecat run, a checkpoint file, or a library's tag or file."""
    if "weights" in payload:  # a timm or torchvision model (pipeline.members.hub)
        return {**payload["weights"], "sha256": sha256}
    kind = "imported checkpoint" if payload["member"].get("dataset") == "imported" else "timecat run"
    return {"kind": kind, "path": path, "sha256": sha256}


def frozen_member(runs_root: Path, name: str, device: torch.device, download: bool = False) -> Member:
    """A member as a frozen model in eval mode, on ``device``: a run under ``runs_root``, a checkpoint
    file trained elsewhere (``path`` or ``name=path``: the paper's, AlgoPerf's or torchvision's ResNet-50),
    or a timm or torchvision model (``name=timm:...``; ``download`` fetches weights not cached locally).
    """
    loaded = checkpoints.load_member(runs_root, name, download=download)
    model = loaded.model if loaded.model is not None else checkpoints.load_model(loaded.payload, str(loaded.path))
    model = model.to(device, memory_format=torch.channels_last).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    sha = checkpoints.sha256(loaded.path)
    return Member(loaded.name, model, sha, loaded.payload, str(loaded.path), foreign=loaded.foreign)


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """bf16 or fp32: the asked precision, else bf16 autocast on GPU and fp32 on CPU."""
    return precision or ("bf16" if device.type == "cuda" else "fp32")


@torch.inference_mode()
def extract_batch(models: list[Classifier], images: torch.Tensor, precision: str = "fp32") -> list[np.ndarray]:
    """Penultimate features of one batch for each model: a list of (B, d) float32 arrays.

    ``bf16`` runs the forward under bf16 autocast (GPU default); ``fp32`` is the
    paper's numerics. Features are stored as float32 either way.
    """
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        return [m.backbone(images).float().cpu().numpy() for m in models]


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


@dataclass(frozen=True)
class Setting:
    """What one extraction resolves from the dataset's kind and the device."""

    kind: str  # the dataset's registered kind, from its manifest
    recipe: recipes.Recipe  # the kind's views, resizing and imported members' preprocessing
    view_spec: ViewSpec  # the views' crops: the recipe's scale and resizing, the config's seed
    precision: str  # bf16 | fp32


def resolve(config: ExtractConfig, data_root: Path, device: torch.device) -> Setting:
    """The recipe of the dataset's kind (refused if unknown) and the forward's precision."""
    manifest = read_manifest(data_root, config.dataset, config.splits[0])
    kind = manifest.get("kind")
    recipe = recipes.for_kind(kind, f"the manifest of {Path(data_root) / config.dataset}")
    spec = ViewSpec.for_recipe(recipe, config.view_seed)
    return Setting(kind, recipe, spec, resolve_precision(config.precision, device))


@dataclass(frozen=True)
class Decode:
    """What the loader decodes for a group of arrays, and the resize torch applies after it."""

    loader: Preprocess  # FFCV's centre crop, area resize and normalisation (whole images: mean and std only)
    resize: tuple[int, int, str] | None = None  # torch's Resize + CenterCrop: (output side, resize side, kernel)
    out_px: int = 0  # the members' input side (views are resized to it)
    whole: tuple[int, int] | None = None  # (height, width) holding every image, decoded whole and unresized
    crop_mode: str = "center"  # whole images: timm's crop mode (center or squash)

    def apply(self, images: torch.Tensor, sizes: np.ndarray | None) -> torch.Tensor:
        """The members' input from a decoded batch (views are cropped from it instead); ``sizes``: each image's
        (height, width), for ``whole`` images."""
        if self.whole:
            return model_transform(images, sizes, *self.resize, self.crop_mode, self.loader.mean, self.loader.std)
        return resize_center(images, *self.resize) if self.resize else images


def decode_for(
    pre: Preprocess, recipe: recipes.Recipe, views: bool, resize: dict | None = None, largest=(0, 0)
) -> Decode:
    """How to decode for one member's preprocessing under the kind's recipe (plain features or views).

    Area recipes let FFCV crop and resize. Bicubic ones (CIFAR) decode each image at
    its own fixed side without resizing, so torch can resize it bicubically: Resize
    + CenterCrop for plain features, random-resized crops for views.

    A timm or torchvision model's plain features (``resize``: its own, from pipeline.members.hub) follow its
    eval transform, Resize(resize_px, kernel) + CenterCrop(side): FFCV copies each image whole and unresized
    into a buffer of ``largest`` (height, width), and torch resizes each from its own pixels.
    """
    if resize is not None and not views:
        body = (pre.resolution, resize["resize_px"], resize["kernel"])
        return Decode(pre, body, pre.resolution, whole=tuple(largest), crop_mode=resize["crop_mode"])
    if recipe.interpolation == "area":
        return Decode(view_preprocess(pre) if views else pre, None, pre.resolution)
    native = replace(pre, resolution=recipe.source_px, crop_ratio=1.0)
    resize = None if views else (pre.resolution, round(pre.resolution / pre.crop_ratio), "bicubic")
    return Decode(native, resize, pre.resolution)


def image_sizes(data_root: Path, dataset: str, split: str) -> np.ndarray:
    """The (n, 2) height and width of each stored image of a split, from the .beton's metadata."""
    from pipeline.data.loaders import image_sizes as sizes

    return sizes(beton_path(data_root, dataset, split))


def member_decode(m: Member, recipe: recipes.Recipe, views: bool, sizes: np.ndarray | None = None) -> Decode:
    """``decode_for`` one member's arrays of a split: a timm or torchvision model's plain features from whole
    images (``sizes``: the split's ``image_sizes``), resized with its own eval transform."""
    pre = Preprocess.from_dict(m.preprocess)
    if m.own_kernel() and not views:
        return decode_for(pre, recipe, views, m.payload["resize"], sizes.max(axis=0, initial=1).tolist())
    return decode_for(pre, recipe, views)


def prepare_arrays(
    store: cache.WritableCache,
    config: ExtractConfig,
    setting: Setting,
    split: str,
    members: list[Member],
    manifest: dict,
    labels: np.ndarray,
) -> list[tuple[str, int | None]]:
    """Rank 0's part: write the split's labels and create the arrays to fill; return ``(member, view)`` to do."""

    fingerprint = manifest["fingerprint"]
    store.write_labels(config.dataset, split, labels, fingerprint, manifest["classes"], kind=setting.kind)
    todo = []
    for m in members:
        for view in targets(config, split):
            provenance = array_provenance(m, config, setting, split, fingerprint, view)
            action = store.decide(
                config.dataset, split, m.name, provenance, overwrite=config.overwrite, repair=config.repair, view=view
            )
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


def array_provenance(
    m: Member, config: ExtractConfig, setting: Setting, split: str, fingerprint: str, view: int | None
) -> dict:
    """What the array of member ``m`` (and ``view``) for ``split`` will record of where its features come from."""
    own = m.own_kernel() and view is None
    provenance = m.provenance(config.dataset, split, fingerprint, setting.recipe, setting.precision, own)
    if view is not None:
        decode = member_decode(m, setting.recipe, views=True)
        spec = setting.view_spec
        provenance.update(view=view, view_seed=spec.seed, views=spec.describe(decode.loader.resolution, decode.out_px))
    return provenance


def refuse_before_writing(store: cache.WritableCache, config: ExtractConfig, setting: Setting, data_root, members):
    """Every split's refusals (an array from another checkpoint, or metadata no resume mends) before any split is
    written: the last split's refusal used to come after the first split's features, hours of them at scale."""
    cached = store.splits(config.dataset) if config.dataset in store.datasets() else []
    for split in (s for s in config.splits if s in cached):  # a split not cached yet has nothing to refuse
        fingerprint = read_manifest(data_root, config.dataset, split)["fingerprint"]
        for m in members:
            for view in targets(config, split):
                provenance = array_provenance(m, config, setting, split, fingerprint, view)
                store.decide(
                    config.dataset,
                    split,
                    m.name,
                    provenance,
                    overwrite=config.overwrite,
                    repair=config.repair,
                    view=view,
                    refusals_only=True,
                )


def _group_writers(
    store: cache.WritableCache,
    config: ExtractConfig,
    setting: Setting,
    sizes: np.ndarray | None,
    split: str,
    todo: list[tuple[Member, int | None]],
    d: distributed.Dist,
) -> dict[tuple, list[tuple[Member, int | None, cache.FeatureWriter]]]:
    """This rank's writers, grouped by what the loader must decode: (decode, views?, start row, stop row);
    ``sizes``: the split's image sizes, where a member decodes whole images."""

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
        decode = member_decode(m, setting.recipe, view is not None, sizes)
        key = (decode, view is not None, writer.next_row, hi)
        groups.setdefault(key, []).append((m, view, writer))
    return groups


def run_members(
    store: cache.WritableCache,
    config: ExtractConfig,
    setting: Setting,
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
    from pipeline.data.loaders import eval_loader, to_model_input, whole_loader

    beton = beton_path(data_root, config.dataset, split)
    whole = any(m.own_kernel() and view is None for m, view in todo)  # read the split's sizes once, if needed
    sizes = image_sizes(data_root, config.dataset, split) if whole else None
    groups = _group_writers(store, config, setting, sizes, split, todo, d)
    for (decode, views, start, stop), group in groups.items():
        names = ",".join(sorted({m.name for m, _, _ in group}))
        desc = f"extract {config.dataset}/{split}{' views' if views else ''} [{names}]"
        background = cache.BackgroundWriter(max_pending=4 * len(group))
        if decode.whole:
            loader = whole_loader(beton, decode.whole, config.batch_size, config.num_workers, start, stop)
        else:
            loader = eval_loader(beton, decode.loader, config.batch_size, config.num_workers, start, stop)
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
                            v: augment(images, rows, setting.view_spec, v, decode.out_px)
                            for v in sorted({view for _, view, _ in group})
                        }
                    else:
                        batch_sizes = sizes[row : row + len(batch_labels)] if decode.whole else None
                        inputs = {None: decode.apply(images, batch_sizes)}
                    for m, view, writer in group:
                        background.append(writer, extract_batch([m.model], inputs[view], setting.precision)[0])
                    row += len(batch_labels)
                    bar.update(len(batch_labels))
            except BaseException:
                background.abort()  # keep whole chunks, report this error rather than the writer's
                raise
            background.close()


def extract_split(
    store: cache.WritableCache,
    config: ExtractConfig,
    setting: Setting,
    data_root: Path,
    split: str,
    members: list[Member],
    d: distributed.Dist,
) -> list[tuple[str, int | None]]:
    """Cache the features (and views) of ``members`` for one split on every rank; return what was written."""
    from pipeline.data.loaders import read_labels

    manifest = read_manifest(data_root, config.dataset, split)
    labels = read_labels(beton_path(data_root, config.dataset, split), manifest)
    todo = prepare_arrays(store, config, setting, split, members, manifest, labels) if d.is_main else None
    todo = d.broadcast(todo)  # every rank waits here until rank 0 has created the arrays
    by_name = {m.name: m for m in members}
    run_members(store, config, setting, data_root, split, [(by_name[n], view) for n, view in todo], labels, d)
    d.barrier()
    if d.is_main:
        # Rank 0 alone marks arrays complete, after a scan of every chunk of every rank.
        for name, view in todo:
            store.finish_features(config.dataset, split, name, view=view)
    return todo


def refuse_linked_folders(cache_path: str, config: ExtractConfig, members: list[Member]) -> None:
    """Refuse, before anything is written, a dataset, split or member folder of a local cache that is a symlink.

    zarr writes through such a link, into whatever it points at; the cache root (and its
    lock folder) may be a link, as the user chose it.
    """
    if cache.layout.is_remote(cache_path):
        return  # remote stores have no symlinks
    root = Path(cache_path.removeprefix("file://"))
    for split in config.splits:
        files.check_real_folders(Path(f"{root}.locks"), f"{config.dataset}/{split}", "the cache's lock folder")
        files.check_real_folders(root, cache.layout.labels_path(config.dataset, split), "the cache folder")
        for m in members:
            for view in targets(config, split):
                relative = cache.layout.features_path(config.dataset, split, m.name, view)
                files.check_real_folders(root, relative, f"the cache folder of member {m.name}")


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
    distributed.use_threads(config.threads)
    log.info("extract %s on %s into %s", ",".join(config.members), config.dataset, cache_path)
    setting = resolve(config, data_root, d.device)
    from pipeline.data.loaders import read_labels

    for split in config.splits:  # a .beton that disagrees with its manifest is refused before the cache is opened
        read_labels(beton_path(data_root, config.dataset, split), read_manifest(data_root, config.dataset, split))
    members = [frozen_member(runs_root, name, d.device, config.download) for name in config.members]
    for m in members:
        m.use_recipe(setting.recipe)
    with contextlib.ExitStack() as locks:
        store = None
        if d.is_main:
            refuse_linked_folders(cache_path, config, members)
            store = cache.open(cache_path, mode="a")  # creates the root group once
            for split in config.splits:
                for m in members:
                    locks.enter_context(store.lock(config.dataset, split, m.name))
            refuse_before_writing(store, config, setting, data_root, members)
        d.barrier()
        store = store or cache.open(cache_path, mode="a")
        summary = []
        try:
            for split in config.splits:
                started = time.perf_counter()
                written = extract_split(store, config, setting, data_root, split, members, d)
                seconds = time.perf_counter() - started
                for m in members:
                    for view in targets(config, split):
                        state = "written" if (m.name, view) in written else "kept"
                        row = {"dataset": config.dataset, "split": split, "member": m.name, "state": state}
                        summary.append(row if view is None else {**row, "view": view})
                if written:
                    log.info(
                        "%s/%s: cached %s in %.1f s", config.dataset, split, plural(len(written), "array"), seconds
                    )
        except BaseException:
            if d.is_main:  # still consolidate what was written, but report the first error, not this one
                with contextlib.suppress(cache.CacheError):
                    store.consolidate()
            raise
        if d.is_main:
            store.consolidate()
    return summary
