"""Every stage's configuration, declared once: each field's default, unit and help text live here.

The frozen dataclasses below are what the stages take; ``cli.py`` builds its
options from these fields (``param`` metadata), so a default or a choice list
is never written twice. This module imports no torch, FFCV or zarr, so the
command line can build its help without them, and a notebook can make a
config without the heavy libraries.
"""

from __future__ import annotations

import difflib
import functools
import math
import numbers
import os
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from pipeline.core.errors import TimecatError, check_seed
from pipeline.core.names import HUB_LIBRARIES, check_name, hub_spec, member_name, parse_hub_spec
from pipeline.core.stats import RESAMPLES


def param(
    default=MISSING,
    text: str = "",
    *,
    flag=None,
    choices=None,
    unit=None,
    low=None,
    low_open=False,
    high=None,
    cli=True,
    aliases=None,
    rule=None,
):
    """A config field with what the command line needs: help, flag (default --field-name), choices, unit, bounds.

    Choices and bounds (``low``, ``high``; ``low_open``: strictly above ``low``) hold
    for every caller: click refuses a typed value as a usage error, and
    ``check_fields`` refuses it when a config is made from Python. ``aliases``:
    {old name: choice}, accepted and replaced by the choice it names. ``rule``: a
    check of this field alone beyond choices and bounds, ``rule(field_name, value)``
    raising TimecatError (the rules are below); rules across fields stay in the
    config's ``__post_init__``.

    ``cli``: True, or a sentence saying why the command line does not set this field itself.
    """
    meta = {"help": text, "flag": flag, "choices": choices, "unit": unit, "low": low, "low_open": low_open, "cli": cli}
    meta.update(high=high, aliases=aliases or {}, rule=rule)
    return field(metadata=meta) if default is MISSING else field(default=default, metadata=meta)


@functools.cache
def field_types(config_cls) -> dict[str, object]:
    """Each field's annotation of a config class, resolved (this module's annotations are strings)."""
    return typing.get_type_hints(config_cls)


def optional(hint) -> tuple[object, bool]:
    """``X | None`` -> (X, True); any other annotation -> (itself, False)."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and len(args) == 2 and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


_WHAT = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}


def _fits(value, hint) -> bool:
    """Whether ``value`` is of the field type ``hint``: a bool is no number, an int is a float, a str a Path."""
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple | list):
            return False
        items = args[:1] * len(value) if args[-1:] == (Ellipsis,) else args
        if len(items) != len(value):
            return False
        return all(_fits(v, a) for v, a in zip(value, items, strict=True))
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, numbers.Integral if hint is int else numbers.Real) and not isinstance(value, bool)
    return isinstance(value, str | os.PathLike) if hint is Path else isinstance(value, hint)


def _described(hint) -> str:
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if args[-1:] == (Ellipsis,):
            return f"a tuple of {_described(args[0]).removeprefix('an ').removeprefix('a ')}s"
        return f"a tuple ({', '.join(_described(a) for a in args)})"
    return _WHAT.get(hint, f"a {getattr(hint, '__name__', hint)}")


def check_fields(config) -> None:
    """Hold each field of ``config`` to its annotation and its ``param`` choices and bounds (aliases replaced).

    Run by every config (``@config``) before its own cross-field rules; the messages
    name the field and what it allows.
    """
    for f in fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if isinstance(value, str) and value in meta.get("aliases", {}):
            value = meta["aliases"][value]
            object.__setattr__(config, f.name, value)  # frozen: the alias's choice is what the stage sees
        hint, can_be_none = optional(field_types(type(config))[f.name])
        if value is None and can_be_none:
            continue
        if not _fits(value, hint):
            raise TimecatError(f"{f.name} must be {_described(hint)}, got {value!r}")
        choices = meta.get("choices")
        if choices and value not in choices:
            raise TimecatError(f"unknown {f.name} {value!r}; choose one of {list(choices)}{_guess(value, choices)}")
        _check_bounds(f.name, value, meta)
        if meta.get("rule") is not None:
            meta["rule"](f.name, value)


def _guess(value, choices) -> str:
    from cache.errors import did_you_mean  # here: this module imports no zarr (cache/__init__ does)

    return did_you_mean(value, choices) if isinstance(value, str) else ""


def _check_bounds(name: str, value, meta) -> None:
    low, high, unit = meta.get("low"), meta.get("high"), f" {meta['unit']}" if meta.get("unit") else ""
    # Written so that nan fails them: every comparison with nan is false.
    if low is not None and not (value > low if meta.get("low_open") else value >= low):
        above = "more than" if meta.get("low_open") else "at least"
        raise TimecatError(f"{name} must be {above} {low}{unit}, got {value}")
    if high is not None and not value <= high:
        raise TimecatError(f"{name} must be at most {high}{unit}, got {value}")


@typing.dataclass_transform(frozen_default=True, field_specifiers=(param, field))
def config(cls):
    """A frozen dataclass whose construction runs ``check_fields``, then the class's own ``__post_init__``.

    That ``__post_init__`` keeps only rules across fields (or beyond what ``param`` declares).
    """
    cross_field = cls.__dict__.get("__post_init__")

    def post_init(self):
        check_fields(self)
        if cross_field is not None:
            cross_field(self)

    cls.__post_init__ = post_init
    return dataclass(frozen=True)(cls)


# --- single-field rules (param(rule=...)), each keeping the message users already know ---


def _each(value) -> tuple:
    """A field's value as a tuple of items: a tuple or list (Python callers may pass one) as is, else one item."""
    return tuple(value) if isinstance(value, tuple | list) else (value,)


def names_of(kind: str):
    """A rule: the name (or each of a tuple of names) of a ``kind``: it becomes a folder and a cache path."""

    def rule(field_name: str, value) -> None:
        for name in _each(value):
            check_name(kind, name)

    return rule


def seed_rule(what: str = "seed"):
    """A rule: a seed (or each of a tuple of seeds) that numpy and torch accept; a tuple holds at least one."""

    def rule(field_name: str, value) -> None:
        if isinstance(value, tuple | list) and not value:
            raise TimecatError("give at least one seed")
        for seed in _each(value):
            check_seed(seed, what)
        if isinstance(value, tuple | list) and len(set(value)) != len(value):
            raise TimecatError(f"a {what} is given twice in {tuple(value)}: give each once")

    return rule


def members_given(field_name: str, members: tuple) -> None:
    """At least one member, each a valid name (probe: cached members)."""
    if not members:
        raise TimecatError("no members given: pass --members run0,run1,...")
    names_of("member")(field_name, members)


def members_or_files(field_name: str, members: tuple) -> None:
    """At least one member, each a name, a NAME=PATH file or a [NAME=]timm:/torchvision: model, no name twice."""
    for m in members:
        spec = hub_spec(m)
        if spec is not None:
            parse_hub_spec(spec)
    members_given(field_name, tuple(member_name(m) for m in members))
    names = [member_name(m) for m in members]
    if len(set(names)) != len(names):
        raise TimecatError(f"a member is named twice in {list(members)}: name each once")


def members_compared(field_name: str, members: tuple) -> None:
    """At least two members, each a valid name, none twice (diversity compares pairs)."""
    names_of("member")(field_name, members)
    if len(members) < 2:
        raise TimecatError(f"diversity compares at least 2 members, got {list(members)}")
    if len(set(members)) != len(members):
        raise TimecatError(f"a member is named twice: {list(members)}")


def positive_numbers(field_name: str, values: tuple) -> None:
    """At least one number, each finite and above 0 (a grid of C or of weight decays)."""
    if not values:
        raise TimecatError(f"{field_name} is one or more finite positive numbers, got {tuple(values)}")
    each_positive(field_name, values)


def each_positive(field_name: str, values: tuple) -> None:
    """Numbers each finite and above 0, or none (the C search's refinement multipliers: none, no refinement)."""
    if any(not (0 < v < math.inf) for v in values):
        raise TimecatError(f"{field_name} holds finite positive numbers only, got {tuple(values)}")


def finite(field_name: str, value: float) -> None:
    """A finite number (bounds alone let nan through: every comparison with nan is false)."""
    if not math.isfinite(value):
        raise TimecatError(f"{field_name} must be a finite number, got {value}")


def rate(field_name: str, value: float) -> None:
    """An optimizer rate: finite and non-negative; lr strictly positive."""
    if not math.isfinite(value) or value < 0 or (field_name == "lr" and value == 0):
        kind = "positive" if field_name == "lr" else "non-negative"
        raise TimecatError(f"{field_name} must be a finite {kind} number, got {value}")


def fraction_below_one(field_name: str, value: float) -> None:
    """A rate that is a fraction in [0, 1) (warmup of the steps, label smoothing)."""
    rate(field_name, value)
    if not value < 1:
        raise TimecatError(f"{field_name} is a fraction in [0, 1), got {value}")


def open_fraction(field_name: str, value: float) -> None:
    """A fraction strictly between 0 and 1 (the held-out share of train rows)."""
    if not 0 < value < 1:
        raise TimecatError(f"{field_name} is a fraction in (0, 1), got {value}")


# --- prepare ------------------------------------------------------------------

ON_CORRUPT = ("fail", "skip")  # what prepare does with an image file it cannot decode
STORAGES = ("jpeg", "mixed", "raw")  # pipeline.data.prepare.STORAGE: how images are stored in a .beton


@config
class PrepareConfig:
    """What to prepare and where."""

    kind: str = param(
        text="A registered dataset kind (pipeline.data.recipes.RECIPES).",
        cli="the command's KIND argument",
        rule=names_of("dataset"),  # the dataset's name when --name is not given: a folder and a cache path
    )
    data_root: Path = param(text="Folder of prepared datasets.", cli="the shared --data-root option")
    name: str | None = param(
        None,
        "The prepared dataset's name: its folder under the data root, and what --dataset takes (default: KIND).",
        rule=names_of("dataset"),
    )
    train_dir: Path | None = param(
        None,
        "imagefolder, imagenet: train folder of <class>/<image> (imagenet default: DATA_ROOT/imagenet/train).",
        flag="--train",
    )
    test_dir: Path | None = param(
        None,
        "imagefolder, imagenet: test folder (imagenet: val/<wnid>/, or flat with LOC_val_solution.csv or "
        "val_labels.txt).",
        flag="--test",
    )
    download: bool = param(False, "Let torchvision download fashion-mnist or cifar if absent.")
    num_workers: int = param(2, "Writer processes (and image-check threads).", flag="--workers")
    stats_images: int = param(10_000, "Images sampled (seeded) for the per-channel mean and std.", low=1)
    on_corrupt: str = param(
        "fail",
        "An undecodable image file fails the run, naming each path, or is skipped and listed (path and error) under "
        "`skipped` in the manifest and on stderr.",
        choices=ON_CORRUPT,
    )
    storage: str | None = param(
        None,
        "Image storage (default: the dataset's): JPEG q90; mixed, half raw (FFCV's ImageNet recipe: faster "
        "loading, about 4x the disk of JPEG); raw. A prepared split is never rewritten another way: give --name "
        "for a second copy.",
        choices=STORAGES,
    )

    @property
    def stored_name(self) -> str:
        """The folder name under the data root."""
        return self.name or self.kind


# --- pretrain -----------------------------------------------------------------

ARCH_NAMES = ("resnet50", "resnet50w2", "small-resnet")  # pipeline.members.models.ARCHS holds their builders
_HUB_ARCH = re.compile(r"[A-Za-z0-9_]+")  # a timm or torchvision model name, no tag: trained from scratch


def arch_rule(field_name: str, arch) -> None:
    """One of ``ARCH_NAMES``, or ``timm:<model>`` / ``torchvision:<model>`` (the library checks the name when the
    model is built, naming close matches; here only its form, without importing either)."""
    if arch is None or arch in ARCH_NAMES:
        return
    library, colon, model = str(arch).partition(":")
    if colon and library in HUB_LIBRARIES and _HUB_ARCH.fullmatch(model):
        return
    close = difflib.get_close_matches(str(arch), ARCH_NAMES, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise TimecatError(
        f"unknown architecture {arch!r}{hint}; choose one of {list(ARCH_NAMES)}, or timm:<model> "
        "(a name of timm.list_models()) or torchvision:<model>"
    )


ARCH_TEXT = (
    "small-resnet (128-d features, for 28-32 px images); resnet50 (torchvision's, 2048-d); resnet50w2 (every "
    "width doubled, 93.9M backbone parameters, as the paper's Table 2); or any timm:<model> or "
    "torchvision:<model>, trained from scratch (a ViT is built for the input side)."
)
OPTIMIZERS = ("sgd", "schedulefree")
SCHEDULES = ("cosine", "step")
PRESETS = ("paper-table3", "paper-table2")  # pipeline.train.plan.PRESETS: the paper's experiments


# px, the input side a member trains at: 8 is the smallest dataset's (digits); 1024 is 4.6x ImageNet's
# 224, where one batch of 128 float32 inputs alone is 1.6 GB. Larger sides (4096) failed deep inside FFCV
# or torch with a traceback, after the member's folder was made.
MIN_RESOLUTION, MAX_RESOLUTION = 8, 1024


def side(field_name: str, value: int) -> None:
    """An input side in px that a member can train at."""
    if not MIN_RESOLUTION <= value <= MAX_RESOLUTION:
        raise TimecatError(
            f"{field_name} must be at least {MIN_RESOLUTION} px and at most {MAX_RESOLUTION} px (the input side), "
            f"got {value}"
        )


def ramp_fractions(field_name: str, value: tuple) -> None:
    """Two budget fractions START,END with 0 <= START <= END <= 1."""
    if not (len(value) == 2 and 0 <= value[0] <= value[1] <= 1):
        raise TimecatError(f"{field_name} is two budget fractions START,END with 0 <= START <= END <= 1, got {value}")


@config
class PretrainConfig:
    """One member: its name, seed, budget, architecture and dataset, and the SGD recipe."""

    name: str = param(text="Member name, e.g. run0.", rule=names_of("member"))
    dataset: str = param(text="Prepared dataset to train on.", rule=names_of("dataset"))
    seed: int = param(text="Seed of initialisation and data order.", rule=seed_rule())
    steps: int = param(text="Optimizer steps: this member's budget.", low=1)
    arch: str = param("small-resnet", ARCH_TEXT, rule=arch_rule)
    width: int | None = param(None, "Channel multiplier of the resnet50 family (default: the arch's).")
    batch_size: int = param(128, "Images per step, across all processes (DDP splits it).", low=1)
    optimizer: str = param(
        "sgd",
        "SGD (Nesterov, label smoothing) or schedule-free AdamW (BatchNorm re-estimated before eval and save).",
        choices=OPTIMIZERS,
    )
    schedule: str = param("cosine", "SGD: cosine to 0, or step (x0.1 at 1/3 and 2/3 of the steps).", choices=SCHEDULES)
    lr: float = param(0.2, "Peak learning rate after warmup (schedule-free AdamW: ~1e-3..5e-3).", rule=rate)
    warmup: float = param(
        0.05, "Fraction of the steps spent warming up linearly.", unit="fraction", rule=fraction_below_one
    )
    momentum: float = param(0.9, "SGD Nesterov momentum.", rule=rate)
    weight_decay: float = param(5e-4, "On conv and linear weights only, not BatchNorm or biases.", rule=rate)
    label_smoothing: float = param(
        0.1, "Label smoothing of the cross-entropy.", unit="fraction", rule=fraction_below_one
    )
    resolution: int | None = param(
        None, f"Input side, {MIN_RESOLUTION} to {MAX_RESOLUTION} (default: the dataset's).", unit="px", rule=side
    )
    min_resolution: int | None = param(
        None,
        "Progressive resizing: train at this side first, growing to --resolution in 32 px steps (FFCV: 160 -> 192).",
        unit="px",
        rule=side,
    )
    ramp: tuple[float, float] = param(
        (0.74, 0.86),
        "With --min-resolution: START,END fractions of the budget where the side starts and stops growing.",
        rule=ramp_fractions,
    )
    num_workers: int = param(2, "Loader threads.", flag="--workers", low=1)
    log_every: int = param(50, "Steps between log records.", low=1)
    eval_every: int = param(0, "Steps between logged test evaluations (0: only at the end).", low=0)
    checkpoint_every: int = param(500, "Steps between resumable checkpoints (0: only the final one).", low=0)
    compile: bool = param(False, "torch.compile the model (worth it on GPU).")
    tensorboard: bool = param(False, "Also write TensorBoard scalars to RUNS/NAME/tensorboard.")
    threads: int | None = param(
        None,
        "Torch CPU threads (default: every CPU available); on a CPU the weights depend on it, so a resume keeps it.",
        low=1,
        high=4096,
    )

    def __post_init__(self):
        if self.optimizer == "schedulefree" and self.lr > 0.05:
            raise TimecatError(f"lr {self.lr} is an SGD rate; schedule-free AdamW wants about 1e-3 to 5e-3: pass --lr")


# How a run is operated, not what it trains: changing these never makes a member "another member".
# threads is checked on its own: a resume on CPU must keep it (restore), a finished member never cares.
OPERATIONAL = ("num_workers", "log_every", "eval_every", "checkpoint_every", "compile", "tensorboard", "threads")


# --- extract ------------------------------------------------------------------

SPLITS = ("train", "test")  # pipeline.data.splits.SPLITS: what prepare writes
EXTRACT_PRECISIONS = ("bf16", "fp32")
DTYPES = ("float32", "float16")
COMPRESSIONS = ("zstd", "none")  # cache.Compression's values


# The most augmented views extract caches per image. Protocol bn-linear trains its head for 28 epochs
# (bn_linear.HeadRecipe.epochs, a test keeps the two equal), epoch e on view e mod K, so views
# beyond 28 are never read; each one costs a full copy of the split's features. Unbounded, a typo
# (--views 10000) created thousands of empty arrays before any work.
MAX_VIEWS = 28


def view_count(field_name: str, value: int) -> None:
    """Augmented views per image: 0 to MAX_VIEWS."""
    if not 0 <= value <= MAX_VIEWS:
        raise TimecatError(
            f"{field_name} must be 0 to {MAX_VIEWS}, not {value}: protocol bn-linear trains {MAX_VIEWS} epochs on one "
            "view each, so more views would never be read"
        )


@config
class ExtractConfig:
    """Which members to run over which dataset, and how features are stored."""

    dataset: str = param(text="Prepared dataset to extract.", rule=names_of("dataset"))
    members: tuple[str, ...] = param(
        text="Comma-separated member names under RUNS, checkpoint files (NAME=PATH), or pretrained models "
        "(NAME=timm:MODEL[.TAG], NAME=timm:MODEL@FILE, NAME=torchvision:MODEL[.WEIGHTS|@FILE]), e.g. run0,run1.",
        rule=members_or_files,
    )
    splits: tuple[str, ...] = param(SPLITS, "Comma-separated splits to extract.", rule=names_of("split"))
    batch_size: int = param(512, "Images per forward pass.", low=1)
    num_workers: int = param(2, "Loader threads.", flag="--workers", low=1)
    dtype: str = param("float32", "Stored dtype (float16: half the disk, refuses values out of range).", choices=DTYPES)
    compression: str = param(
        "zstd",
        "Chunk compression: zstd level 1, or none (larger on disk, faster to read; "
        "tests/benchmarks/test_cache_read.py).",
        choices=COMPRESSIONS,
    )
    overwrite: bool = param(False, "Write the members' arrays anew even when cached (e.g. from another checkpoint).")
    chunk_rows: int | None = param(None, "Rows per Zarr chunk, a multiple of the batch size (default ~8 MiB).")
    views: int = param(
        0,
        f"Also cache K augmented views (at most {MAX_VIEWS}) of each image of --view-splits: the BatchNorm + Linear "
        "probe trains epoch e on view e mod K.",
        rule=view_count,
    )
    view_splits: tuple[str, ...] = param(
        ("train",), "Comma-separated splits that get views (the ones a probe fits on)."
    )
    view_seed: int = param(0, "Seed of the views' crops and flips.", rule=seed_rule("view seed"))
    precision: str | None = param(
        None,
        "Forward pass: bf16 autocast or fp32 (the paper's numerics). Default: bf16 on GPU, fp32 on CPU. Recorded.",
        choices=EXTRACT_PRECISIONS,
    )
    threads: int | None = param(None, "Torch CPU threads (default: every CPU available).", low=1, high=4096)
    repair: bool = param(
        False,
        "Scan every value of the arrays kept and write again from a garbled or non-finite chunk (missing chunks "
        "are always written again).",
    )
    download: bool = param(
        False,
        "Fetch timm or torchvision weights missing from the local caches (Hugging Face's, torch hub's); "
        "without it nothing is downloaded.",
    )

    def __post_init__(self):
        _check_view_splits(self.view_splits, self.splits, self.views)
        if self.chunk_rows is not None and (self.chunk_rows < 1 or self.chunk_rows % self.batch_size):
            raise TimecatError(
                f"chunk rows ({self.chunk_rows}) must be a multiple of the batch size ({self.batch_size})"
            )


def _check_view_splits(view_splits: tuple[str, ...], splits: tuple[str, ...], views: int) -> None:
    """Refuse a --view-splits name that is not a split (a typo made no views, silently), and views asked of splits
    this run does not extract."""
    from cache.errors import did_you_mean  # here: this module imports no zarr (cache/__init__ does)

    for split in view_splits:
        if split not in SPLITS:
            raise TimecatError(
                f"unknown view split {split!r}{did_you_mean(split, SPLITS)} in --view-splits; choose among "
                f"{list(SPLITS)}"
            )
    if views and not set(view_splits) & set(splits):
        raise TimecatError(
            f"--views {views} makes views of --view-splits {','.join(view_splits)}, but --splits "
            f"{','.join(splits)} extracts none of them: add the split to --splits, or name it in --view-splits"
        )


# --- probe --------------------------------------------------------------------

PROTOCOLS = ("logreg", "bn-linear", "knn")
# Former protocol names, still accepted (config, command line, records on disk) and read as the current one.
PROTOCOL_ALIASES = {"tc": "bn-linear"}


def protocol_name(name: str) -> str:
    """The current name of a protocol (``tc`` -> ``bn-linear``); any other name unchanged."""
    return PROTOCOL_ALIASES.get(name, name)


PROBE_BACKENDS = ("auto", "sklearn", "torch", "cuml", "batched")  # auto: batched for logreg
PROBE_PRECISIONS = ("auto", "bf16", "fp32")
K_GRID = (10, 20, 100, 200)  # DINO's k values


def k_values(field_name: str, value: tuple) -> None:
    """At least one neighbour count, each at least 1."""
    if not value or min(value) < 1:
        raise TimecatError(f"knn needs k values >= 1, got {value}")


TEMPERATURE = 0.07  # DINO's softmax temperature on cosine similarities


@config
class ProbeConfig:
    """Which members to probe on which dataset, and the model-selection recipe."""

    dataset: str = param(text="Cached dataset to probe.", rule=names_of("dataset"))
    members: tuple[str, ...] = param(
        text="Members to concatenate.", cli="--members, or each subset of --cat/--from", rule=members_given
    )
    train_split: str = param(
        "train", "Split the probe fits on (C is chosen on held-out rows of it).", rule=names_of("split")
    )
    eval_split: str = param("test", "Split the probe is scored on, never used for a choice.", rule=names_of("split"))
    holdout: float = param(
        0.2, "Fraction of the train split held out to choose C.", unit="fraction", rule=open_fraction
    )
    seed: int = param(0, "Seed of the held-out split, solver, subset sample and few-shot draws.", rule=seed_rule())
    search_rows: int = param(
        10_000,
        "Train rows that fit each C candidate (a stratified sample), or --search-per-class x classes if more.",
        low=1,
    )
    search_per_class: int = param(
        10, "Train rows per class the C search fits at least (iNat18: 81,420 rows for 8,142 classes).", low=1
    )
    c_grid: tuple[float, ...] = param(
        (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0),
        "Coarse C candidates, comma-separated (one per decade).",
        rule=positive_numbers,
    )
    refine: tuple[float, ...] = param(
        (10**-0.5, 10**0.5), "Multipliers of the best coarse C also tried.", rule=each_positive
    )
    gap: float = param(
        1e-5,
        "batched and torch: a fit stops when its estimated gap to the optimum is at most this fraction of its "
        "objective (3 iterations in a row, in float32); 10x inside the 1e-4 the probe promises.",
        low=0,
        low_open=True,
    )
    iter_cap: int = param(
        5000, "batched and torch: L-BFGS iterations per precision phase before a fit stops short (recorded).", low=1
    )
    search_iter: int = param(100, "sklearn, cuml: L-BFGS iterations per C candidate of the search.", low=1)
    max_iter: int = param(300, "sklearn, cuml: L-BFGS iterations of the final refit.", low=1)
    tol: float = param(
        1e-4,
        "sklearn, cuml: L-BFGS stopping tolerance (largest gradient entry; scikit-learn's default).",
        low=0,
        low_open=True,
    )
    backend: str = param(
        "auto",
        "logreg solver. auto = batched: every C candidate (and, with --cat, every subset) in one L-BFGS pass; "
        "sklearn, torch, cuml (the gpu extra and a GPU) fit one C at a time. Recorded.",
        choices=PROBE_BACKENDS,
    )
    precision: str = param(
        "auto",
        "batched: matrix products in bf16 (float32 accumulation, weights and loss) or fp32; auto = bf16 where the "
        "GPU has bf16 tensor cores, or the CPU has avx512_bf16/amx_bf16 and blocks are 512+ columns wide. Recorded.",
        choices=PROBE_PRECISIONS,
    )
    memory_gib: float = param(
        4.0,
        "batched: memory budget of one batch of subsets (solver state and working logits).",
        unit="GiB",
        low=0,
        low_open=True,
    )
    protocol: str = param(
        "logreg",
        "logreg: L-BFGS logistic regression, C chosen on held-out train rows. bn-linear (formerly tc): the "
        "paper's BatchNorm+Linear head, SGD 28 epochs, on cached views when present. knn: DINO's weighted k-NN "
        "(k chosen on held-out train rows).",
        choices=PROTOCOLS,
        aliases=PROTOCOL_ALIASES,
    )
    wd_grid: tuple[float, ...] | None = param(
        None,
        "bn-linear: comma-separated weight decays to try (default: the paper's grid for the dataset's kind).",
        rule=positive_numbers,
    )
    k_grid: tuple[int, ...] = param(K_GRID, "knn: neighbour counts to try (DINO's).", rule=k_values)
    temperature: float = param(TEMPERATURE, "knn: votes weigh exp(cosine similarity / T).", low=0, low_open=True)
    shots: int | None = param(
        None, "Few-shot: probe on K seeded train rows per class (e.g. 1, 2, 5, 10, 25); one record per draw.", low=1
    )
    draws: int = param(5, "Few-shot: seeded draws of the shots, each probed; mean ± std over draws.", low=1)
    fixed_c: float = param(
        1.0, "C when no train row can be held out (1 shot per class): no search is possible.", low=0, low_open=True
    )
    bootstrap: int = param(RESAMPLES, "Resamples of the eval rows for top-1's 95% interval.", low=RESAMPLES)
    allow_same_split: bool = param(
        False, "Let the eval split be the train split (memorisation, not transfer; report leaves it out)."
    )

    def __post_init__(self):
        self._check_same_split()
        self._check_shots()

    @property
    def batched(self) -> bool:
        """Whether this probe runs on the batched solver (logreg with backend auto or batched)."""
        return self.protocol == "logreg" and self.backend in ("auto", "batched")

    def _check_same_split(self) -> None:
        if self.train_split == self.eval_split and not self.allow_same_split:
            raise TimecatError(
                f"train and eval split are both {self.train_split!r}: a probe fit and scored on the same rows measures "
                "memorisation, not transfer; pass --allow-same-split to run it anyway (report leaves such records out)"
            )

    def _check_shots(self) -> None:
        if self.shots is not None and not self.batched:
            raise TimecatError(
                f"--shots runs the logreg protocol on the batched solver, not protocol {self.protocol} with backend "
                f"{self.backend}: use --protocol logreg --backend auto"
            )


# --- experiments (pipeline.experiments) -----------------------------------------

PENALTIES = ("weight-decay", "l1", "none")  # the toy rule's sparsity bias
LOSSES = ("sigmoid", "logistic")


@config
class ToyConfig:
    """The paper's Section 3 counterexample: how many mixtures, and the loss and sparsity bias of each rule."""

    mixtures: int = param(200, "Random mixture weights drawn, Dirichlet(1,1,1,1).", low=1, high=1_000_000)
    seed: int = param(0, "Seed of the mixtures and initial weights.", rule=seed_rule())
    loss: str = param("sigmoid", "sigmoid: a smooth 0-1 loss (the paper's best rule); logistic.", choices=LOSSES)
    temperature: float = param(0.1, "sigmoid loss: sigma(-margin / temperature).", low=0, low_open=True, rule=finite)
    penalty: str = param(
        "l1",
        "Sparsity bias: explicit L1 on a linear rule, weight decay on a two-layer diagonal linear net, or none.",
        choices=PENALTIES,
    )
    strength: float = param(0.01, "Penalty coefficient (the L1 weight, or weight decay).", low=0, rule=finite)
    steps: int = param(3000, "Full-batch gradient steps of each rule.", low=1, high=10_000_000)
    lr: float = param(0.1, "Step size.", low=0, low_open=True, rule=finite)
    used: float = param(0.05, "A feature is kept when its weight is above this fraction of the largest.", rule=finite)
    collapsed: float = param(1e-3, "A rule whose largest weight is below this reads no feature at all.", rule=finite)


@config
class DiversityConfig:
    """Which cached members to compare (linear CKA, and probes), on which split."""

    dataset: str = param(text="Cached dataset.", rule=names_of("dataset"))
    members: tuple[str, ...] = param(
        text="Comma-separated cached members, e.g. run3,run4,run5,run6.", rule=members_compared
    )
    split: str = param("test", "Split whose rows CKA is measured on.", rule=names_of("split"))
    rows: int = param(10_000, "At most this many rows (a seeded sample) enter CKA.", low=2)
    seed: int = param(0, "Seed of the row sample.", rule=seed_rule())
    probe: bool = param(True, "Also probe (logreg) each member alone and their concatenation.")


@config
class DominoesConfig:
    """The paper's spurious-feature test (Table 1): seeds, budget and folders."""

    workdir: Path = param(Path("dominoes"), "Folder for the experiment's runs/, features.zarr and results/.")
    data_root: Path | None = param(
        None, "Folder of prepared datasets (None: WORKDIR/data).", cli="the shared --data-root option"
    )
    seeds: tuple[int, ...] = param((0, 1, 2), "Comma-separated seeds, one run of each model.", rule=seed_rule())
    steps: int = param(300, "SGD steps of every CNN, direct or pretrained (equal budgets).", low=1)
    batch_size: int = param(128, "Images per step.")
    arch: str = param("small-resnet", "Architecture of every CNN.", choices=ARCH_NAMES)

    @property
    def data(self) -> Path:
        """The prepared datasets: ``data_root``, or the workspace's own WORKDIR/data."""
        return Path(self.data_root) if self.data_root is not None else Path(self.workdir) / "data"


@config
class DemoConfig:
    """The demo: its budget, members and datasets."""

    workdir: Path = param(Path("demo"), "Folder for the demo's runs/, features.zarr and results/.")
    data_root: Path | None = param(
        None, "Folder of prepared datasets (None: WORKDIR/data).", cli="the shared --data-root option"
    )
    total_steps: int = param(1000, "Budget B shared by every CatN (N members x B/N steps).", low=1)
    cats: tuple[int, ...] = param((1, 2, 4), "The CatN compared.")
    arch: str = param("small-resnet", "Architecture of every member.", choices=ARCH_NAMES)
    batch_size: int = param(128, "Images per step.", low=1)
    pretrain_dataset: str = param("fashion-mnist", "Dataset the members pretrain on.")
    transfer_datasets: tuple[str, ...] = param(
        ("fashion-mnist", "digits"), "Datasets probed: in- and out-of-distribution."
    )
    precision: str = param(
        "auto",
        "The probes' matrix products, as for `timecat probe` (auto: bf16 where it pays, so tables from two "
        "machines can differ by a few eval rows; give fp32 to compare). Recorded.",
        choices=PROBE_PRECISIONS,
    )

    def __post_init__(self):
        bad = [n for n in self.cats if n < 1 or self.total_steps % n]
        if bad:
            raise TimecatError(f"total steps {self.total_steps} must split evenly into N members for N in {bad}")

    @property
    def data(self) -> Path:
        """The prepared datasets: ``data_root``, or the workspace's own WORKDIR/data."""
        return Path(self.data_root) if self.data_root is not None else Path(self.workdir) / "data"

    @property
    def runs(self) -> Path:
        """Where the demo's members go."""
        return self.workdir / "runs"

    @property
    def cache(self) -> str:
        """The demo's feature cache."""
        return str(self.workdir / "features.zarr")

    @property
    def results(self) -> Path:
        """The demo's probe records and plot."""
        return self.workdir / "results"


# --- cluster jobs -----------------------------------------------------------------

LAUNCHERS = ("local", "slurm")  # submitit's executors: processes of this machine, or SLURM jobs


def slurm_pairs(field_name: str, values: tuple) -> None:
    """Extra sbatch parameters as KEY=VALUE (e.g. exclusive=true, mail_type=END), passed to submitit as they are."""
    for item in values:
        key, eq, _ = str(item).partition("=")
        if not eq or not re.fullmatch(r"[a-z][a-z0-9_]*", key):
            raise TimecatError(f"--slurm-extra {item!r}: write KEY=VALUE, KEY an sbatch option in snake_case")


@config
class LaunchConfig:
    """Where a plan's members run: this process (no launcher), or jobs submitted through submitit.

    The defaults suit one 8-GPU node per member, as the paper's Table 3 was trained.
    """

    launcher: str | None = param(None, "Submit the work as jobs: local (processes here) or slurm.", choices=LAUNCHERS)
    partition: str | None = param(None, "SLURM partition.", flag="--slurm-partition")
    account: str | None = param(None, "SLURM account.", flag="--slurm-account")
    qos: str | None = param(None, "SLURM quality of service.", flag="--slurm-qos")
    time_min: int = param(72 * 60, "Time limit of each job; at its end the job is requeued and resumes.", unit="min",
                          flag="--slurm-time", low=1)  # fmt: skip
    nodes: int = param(1, "Nodes per job (DDP across them).", flag="--slurm-nodes", low=1)
    gpus_per_node: int = param(8, "GPUs per node: one process each (at least one process on a CPU).",
                               flag="--slurm-gpus-per-node", low=0)  # fmt: skip
    cpus_per_task: int = param(10, "CPUs per process.", flag="--slurm-cpus-per-task", low=1)
    mem_gb: int | None = param(None, "Memory per node (default: the partition's).", unit="GiB", flag="--slurm-mem-gb",
                               low=1)  # fmt: skip
    constraint: str | None = param(None, "SLURM constraint, e.g. h100.", flag="--slurm-constraint")
    slurm_extra: tuple[str, ...] = param(
        (), "More sbatch options, KEY=VALUE,...", flag="--slurm-extra", rule=slurm_pairs
    )
    jobs: Path | None = param(None, "Folder of the jobs' scripts and logs (default: RUNS/.jobs).", flag="--jobs-dir")
    wait: bool = param(False, "Wait for the submitted jobs to end, then exit 1 if one failed.")


# --- plan and report --------------------------------------------------------------


@config
class PlanConfig:
    """A fixed-compute CatN experiment to plan (``pipeline.train.plan.make_plan``)."""

    dataset: str = param(text="Prepared dataset the members train on.")
    cat: int | None = param(None, "N members sharing the budget.", low=1)
    total_steps: int | None = param(None, "Total steps S (each member: S / N); per member for paper-table2.", low=1)
    preset: str | None = param(None, "The paper's experiments.", choices=PRESETS)
    arch: str | None = param(
        None,
        "Architecture of --cat members (default: small-resnet for registered kinds of 64 px or less, such as "
        "fashion-mnist and cifar10; resnet50 above, and for presets); also timm:<model> or torchvision:<model>.",
        rule=arch_rule,
    )
    seeds: tuple[int, ...] | None = param(
        None, "Comma-separated seeds (default: the paper's 2,550,23,477,8529, then 0,1,...).", rule=seed_rule()
    )
    batch_size: int = param(128, "Images per step, for every member.", low=1)


REPORT_LAYOUTS = ("table3", "table2")  # pipeline.report.tables.LAYOUTS
REPORT_METRICS = ("top1", "top1_eval_selected")  # pipeline.report.tables.METRICS


@config
class ReportConfig:
    """Which records a report shows, and how."""

    layout: str = param(
        "table3",
        "table3: CatN at fixed total steps. table2: parameter-matched (architectures and CatN).",
        choices=REPORT_LAYOUTS,
    )
    protocol: str = param("logreg", "Which protocol's records to report.", choices=PROTOCOLS, aliases=PROTOCOL_ALIASES)
    metric: str = param(
        "top1",
        "top1: chosen on held-out train rows. top1_eval_selected (bn-linear): the paper's code's best epoch and weight "
        "decay on the eval split, OPTIMISTIC, only to compare with its tables.",
        choices=REPORT_METRICS,
    )
