"""Seeded augmented views of a batch: random-resized crops and flips, row by row.

A view's crop of image ``row`` depends only on ``(seed, view, row)``, never on
the batch, the rank or the member, so every member sees the same crops, and a
resumed or multi-process extraction reproduces them exactly. torchvision's
RandomResizedCrop draws from torch's global RNG, and FFCV's from numba's
unseeded one, so the parameters are drawn here with one numpy generator per row.
Scale, ratio, flip and resizing come from the dataset kind's recipe
(pipeline.data.recipes): CIFAR's views are bicubic, as the paper's code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from pipeline.core.errors import TimecatError
from pipeline.data.recipes import INTERPOLATIONS, Recipe


@dataclass(frozen=True)
class ViewSpec:
    """How augmented view ``k`` of each image is drawn."""

    seed: int = 0
    scale: tuple[float, float] = (0.08, 1.0)  # crop area / image area, as torchvision's RandomResizedCrop
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop width / height
    flip: bool = True  # horizontal flip with probability 1/2
    interpolation: str = "area"  # area: roi_align's footprint averaging; bicubic: antialiased bicubic (PIL's)

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise TimecatError(f"unknown interpolation {self.interpolation!r}; choose one of {list(INTERPOLATIONS)}")

    @classmethod
    def for_recipe(cls, recipe: Recipe, seed: int) -> ViewSpec:
        """The views a dataset kind's recipe asks for, drawn with ``seed``."""
        return cls(seed, recipe.view_scale, recipe.view_ratio, recipe.flip, recipe.interpolation)

    def describe(self, source_px: int, out_px: int) -> str:
        """One line for provenance."""
        flip = ", horizontal flip p=0.5" if self.flip else ""
        resize = ", bicubic" if self.interpolation == "bicubic" else ""  # area: unchanged from older caches
        return (
            f"random-resized-crop scale {self.scale} ratio ({self.ratio[0]:.3f}, {self.ratio[1]:.3f}) of the "
            f"centre square at {source_px} px, resized to {out_px} px{resize}{flip}"
        )


def crop_params(spec: ViewSpec, view: int, row: int, height: int, width: int) -> tuple[int, int, int, int, bool]:
    """``(top, left, h, w, flip)`` of view ``view`` of image ``row``: torchvision's algorithm, seeded per row."""
    rng = np.random.default_rng([spec.seed, view, row])
    area = height * width
    log_ratio = (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    flip = bool(spec.flip and rng.random() < 0.5)
    for _ in range(10):
        target = area * rng.uniform(*spec.scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w, flip
    # Fallback, as torchvision: the largest centre crop within the ratio range.
    in_ratio = width / height
    if in_ratio < spec.ratio[0]:
        w, h = width, round(width / spec.ratio[0])
    elif in_ratio > spec.ratio[1]:
        h, w = height, round(height * spec.ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w, flip


def augment(images: torch.Tensor, rows: np.ndarray, spec: ViewSpec, view: int, out_px: int) -> torch.Tensor:
    """View ``view`` of a batch: (B, C, H, W) normalized images of dataset rows ``rows`` -> (B, C, out_px, out_px).

    One roi_align call crops and resizes the whole batch; its adaptive sampling
    averages over each output pixel's footprint, so downscaling does not alias.
    """
    _, _, height, width = images.shape
    params = [crop_params(spec, view, int(r), height, width) for r in rows]
    if spec.interpolation == "bicubic":
        # One interpolate per image: every crop has its own size. Views only; cheap next to the forward.
        crops = torch.cat(
            [_bicubic(images[i : i + 1, :, t : t + h, c : c + w], out_px) for i, (t, c, h, w, _) in enumerate(params)]
        )
    else:
        boxes = torch.tensor(
            [[i, left, top, left + w, top + h] for i, (top, left, h, w, _) in enumerate(params)],
            dtype=images.dtype,
            device=images.device,
        )  # (B, 5): batch index, x1, y1, x2, y2 in pixel-edge coordinates
        crops = roi_align(
            images.contiguous(), boxes, (out_px, out_px), spatial_scale=1.0, sampling_ratio=0, aligned=True
        )
    flips = torch.tensor([p[4] for p in params], device=images.device).view(-1, 1, 1, 1)
    return torch.where(flips, crops.flip(-1), crops).contiguous(memory_format=torch.channels_last)


def resize(images: torch.Tensor, out_px: int, kernel: str = "bicubic") -> torch.Tensor:
    """(B, C, H, W) -> (B, C, out_px, out_px) with PIL's antialiased ``kernel`` (recipes.KERNELS)."""
    # antialias=True selects torch's separable kernels with PIL's coefficients (bicubic a = -0.5),
    # which torchvision's PIL transforms use; plain bicubic uses a = -0.75.
    return F.interpolate(images, size=(out_px, out_px), mode=kernel, antialias=True, align_corners=False)


def _bicubic(images: torch.Tensor, out_px: int) -> torch.Tensor:
    return resize(images, out_px, "bicubic")


def resize_center(images: torch.Tensor, out_px: int, resize_px: int, kernel: str = "bicubic") -> torch.Tensor:
    """Resize(resize_px, kernel) then CenterCrop(out_px), as torchvision: (B, C, H, W) -> (B, C, out, out).

    The paper's CIFAR eval transform is Resize(256, bicubic) + CenterCrop(224); a timm model's is
    Resize(floor(side / crop_pct), its kernel) + CenterCrop(side).
    """
    resized = resize(images, resize_px, kernel)
    top = round((resize_px - out_px) / 2.0)  # torchvision's CenterCrop offset
    return resized[:, :, top : top + out_px, top : top + out_px].contiguous(memory_format=torch.channels_last)


def resized_size(height: int, width: int, resize_px: int, crop_mode: str) -> tuple[int, int]:
    """The size torchvision's Resize(resize_px) gives an image: its shorter side to ``resize_px``, the longer in
    proportion, truncated (torchvision's ``_compute_resized_output_size``); timm's ``squash``: both sides."""
    if crop_mode == "squash":
        return resize_px, resize_px
    longer = int(resize_px * max(height, width) / min(height, width))
    return (longer, resize_px) if width <= height else (resize_px, longer)


def model_transform(
    images: torch.Tensor, sizes: np.ndarray, out_px: int, resize_px: int, kernel: str, crop_mode: str, mean, std
) -> torch.Tensor:
    """A timm or torchvision model's own eval transform, in torch on the batch's device.

    ``images``: (B, 3, H, W) uint8 with image k unresized, ``sizes[k]`` = (height, width), in its top-left corner
    (pipeline.data.whole). Each image is resized as torchvision's Resize(resize_px) does (``resized_size``) with
    PIL's ``kernel``, rounded and clamped to 0-255 as PIL's uint8 output is, centre-cropped to ``out_px`` at
    torchvision's CenterCrop offsets, and normalised with ``mean`` and ``std`` (0-255 scale):
    (B, 3, out_px, out_px) float32. Images of one size share one interpolate call.
    """
    out = torch.empty((len(images), 3, out_px, out_px), dtype=torch.float32, device=images.device)
    sizes = np.asarray(sizes).reshape(-1, 2)
    for height, width in np.unique(sizes, axis=0).tolist():
        rows = torch.from_numpy(np.flatnonzero((sizes == (height, width)).all(axis=1))).to(images.device)
        new_h, new_w = resized_size(height, width, resize_px, crop_mode)
        image = images[rows, :, :height, :width].float()
        image = F.interpolate(image, size=(new_h, new_w), mode=kernel, antialias=True, align_corners=False)
        top, left = round((new_h - out_px) / 2.0), round((new_w - out_px) / 2.0)  # torchvision's CenterCrop
        out[rows] = image[:, :, top : top + out_px, left : left + out_px].round().clamp(0, 255)
    mean = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return ((out - mean) / std).contiguous(memory_format=torch.channels_last)
