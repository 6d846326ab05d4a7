"""The paper's probe recipe for each dataset kind, and where timecat departs from it.

The paper's probe code (facebookresearch/richreps-timecat, its linear-probe
script) treats datasets differently:

- CIFAR-10/100: train RandomResizedCrop(224, scale 0.8-1, bicubic) + flip,
  eval Resize(256, bicubic) + CenterCrop(224), CIFAR mean and std, even for
  ImageNet-pretrained backbones; weight decays {1e-2, 5e-2, 1e-4, 5e-4, 1e-3, 5e-3}.
- ImageNet and iNat18: train RandomResizedCrop(224) (scale 0.08-1) + flip,
  eval Resize(256) + CenterCrop(224), ImageNet mean and std; weight decays
  {1e-4, 5e-4} (ImageNet) and {1e-6, 1e-5, 1e-4} (iNat18).

A recipe is looked up by the dataset's registered kind (recorded by
``timecat prepare`` in the manifest and by ``timecat extract`` in the cache),
never by the name a dataset was prepared under. Kinds the paper never probed
get timecat's documented default. This module imports nothing heavy: the
probe reads it without torch's image code.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from pipeline.core.errors import TimecatError

# 0-255 scale, as the loaders use.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
CIFAR_MEAN = tuple(round(255 * v, 4) for v in (0.4914, 0.4822, 0.4465))  # the paper's code's values
CIFAR_STD = tuple(round(255 * v, 4) for v in (0.2023, 0.1994, 0.2010))

INTERPOLATIONS = ("area", "bicubic")
# The kernels of PIL's antialiased resize that torch reproduces (F.interpolate with antialias=True), by the
# names timm's and torchvision's pretrained configs give them: a timm or torchvision member is resized with
# its own (every pretrained config of timm 1.0.31 and torchvision 0.29 names one of these two).
KERNELS = ("bicubic", "bilinear")
CIFAR_GRID = (1e-2, 5e-2, 1e-4, 5e-4, 1e-3, 5e-3)


@dataclass(frozen=True)
class Recipe:
    """How a probe sees one dataset kind: its augmented views, imported members' preprocessing, weight decays."""

    name: str  # cifar | imagenet | inat2018 | default
    paper: bool  # True: the paper's code does this for the kind; False: timecat's default for kinds it never probed
    view_scale: tuple[float, float]  # RandomResizedCrop area range of the cached views
    wd_grid: tuple[float, ...]  # protocol bn-linear: the weight decays to try
    # area: FFCV's area resize when decoding, roi_align's footprint averaging for view crops.
    # bicubic: images decoded at their fixed side `source_px` without resizing, then resized
    # with torch's antialiased bicubic (PIL's kernel, a = -0.5), as torchvision's PIL transforms.
    interpolation: str = "area"
    source_px: int | None = None  # bicubic only: the dataset's fixed image side
    view_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop width / height
    flip: bool = True  # views: horizontal flip with probability 1/2
    # Preprocessing of a checkpoint imported from elsewhere (the paper's members): input side,
    # eval centre-crop ratio and normalisation. timecat's own members keep their pretraining's.
    foreign: dict = field(default_factory=dict)
    differences: tuple[str, ...] = ()  # where timecat's run of this recipe departs from the paper's code

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise TimecatError(f"unknown interpolation {self.interpolation!r}; choose one of {list(INTERPOLATIONS)}")
        if self.interpolation == "bicubic" and not self.source_px:
            raise TimecatError(f"recipe {self.name}: bicubic resizing needs the images' fixed side (source_px)")

    def describe(self) -> dict:
        """The recipe's identity for records: name, whether it is the paper's, and the departures."""
        return {"name": self.name, "paper": self.paper, "differences": list(self.differences)}


def _preprocess(mean: tuple, std: tuple) -> dict:
    return {"resolution": 224, "mean": mean, "std": std, "crop_ratio": 224 / 256, "crop_scale": (0.08, 1.0)}


IMAGENET = Recipe(
    name="imagenet",
    paper=True,
    view_scale=(0.08, 1.0),
    wd_grid=(1e-4, 5e-4),
    foreign=_preprocess(IMAGENET_MEAN, IMAGENET_STD),
    differences=(
        "resizing uses FFCV's area interpolation (eval) and roi_align's averaging (views), "
        "where the paper's code resizes with PIL's bilinear filter",
        "views are cropped from the decoded 256 px centre square, not from the whole image",
    ),
)
CIFAR = Recipe(
    name="cifar",
    paper=True,
    view_scale=(0.8, 1.0),
    wd_grid=CIFAR_GRID,
    interpolation="bicubic",
    source_px=32,
    foreign=_preprocess(CIFAR_MEAN, CIFAR_STD),
    differences=("images are normalised before resizing, the same up to PIL's clamping of bicubic overshoot to 0-255",),
)
DEFAULT = Recipe(
    name="default",
    paper=False,
    view_scale=(0.08, 1.0),
    wd_grid=CIFAR_GRID,
    foreign=_preprocess(IMAGENET_MEAN, IMAGENET_STD),
    differences=(
        "the paper never probed this kind: views are torchvision's RandomResizedCrop defaults (scale 0.08-1) "
        "and a flip at the member's input side, imported members get ImageNet's preprocessing, and the "
        "weight decays are the paper's CIFAR grid (its widest)",
    ),
)

# The registry of dataset kinds: every kind timecat knows, by exact key, with its recipe. It is
# torch- and numpy-free, so the probe and `timecat prepare --help` read the kinds here;
# pipeline.data.datasets.DATASETS gives each kind its reader (tests/test_configs.py keeps the keys equal).
RECIPES: dict[str, Recipe] = {
    "fashion-mnist": DEFAULT,
    "cifar10": CIFAR,
    "cifar100": CIFAR,
    "digits": DEFAULT,
    "imagenet": IMAGENET,
    "inat2018": replace(IMAGENET, name="inat2018", wd_grid=(1e-6, 1e-5, 1e-4)),
    "dominoes-mixture": DEFAULT,
    "dominoes-balanced": DEFAULT,
    "imagefolder": DEFAULT,
}


KINDS = tuple(RECIPES)  # the kinds, in the registry's order


def for_kind(kind: str | None, where: str) -> Recipe:
    """The recipe of a registered dataset kind, or an error naming the kinds (``where``: for the message)."""
    if kind is None:
        raise TimecatError(
            f"{where} does not record its dataset kind (extracted before timecat recorded kinds): rerun the same "
            "`timecat extract` (it keeps the cached arrays and records the kind), or pass --wd-grid to protocol "
            "bn-linear"
        )
    try:
        return RECIPES[kind]
    except KeyError:
        raise TimecatError(f"{where}: unknown dataset kind {kind!r}; choose one of {sorted(RECIPES)}") from None
