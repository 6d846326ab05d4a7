"""Architectures by exact name, each split into a feature backbone and a linear head.

A member's penultimate features are ``Classifier.backbone(x)``: the global
average pool output (2048-d for ResNet-50). The head exists for pretraining only.
Any timm or torchvision architecture is a backbone too (``timm:<model>``,
``torchvision:<model>``: pipeline.members.hub), its features the input of its classifier.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import TimecatError
from pipeline.members import hub
from pipeline.members.hub import is_hub_arch

FEATURE_LAYER = "global average pool (penultimate)"


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al. 2016)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A residual net for 28-32 px images, sized to train on two CPU cores in minutes.

    A 3x3 stem at full resolution, then one block per stage, each halving the
    resolution: (B, 3, 28, 28) -> (B, w0, 28, 28) -> (B, w1, 14, 14) -> (B, w2, 7, 7)
    -> pool -> (B, w2). Widths (16, 32, 128) measured 2,400 train / 8,000 eval img/s
    on 2 cores; a full-resolution block would cost 2-3x for little gain at this size.
    """

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 128)):
        super().__init__()
        w0, w1, w2 = widths
        self.stem = nn.Sequential(nn.Conv2d(3, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(w0, w1, 2)
        self.layer2 = BasicBlock(w1, w2, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.layer2(self.layer1(self.stem(x)))), 1)


def resnet50_backbone(width: int = 1) -> nn.Module:
    """ResNet-50 up to the average pool: (B, 3, H, W) -> (B, 2048 * width).

    width 1 is torchvision's own ResNet-50; width K multiplies every layer's
    channels by K, as the "ResNet-50 (2x)" of the paper's Table 2 (about 94M
    parameters at width 2). torchvision's wide_resnet50_2 widens only the inner
    3x3 convolutions (69M), which is a different network.
    """
    if width == 1:
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        net.out_dim = net.fc.in_features
        net.fc = nn.Identity()
        return net
    return ScaledResNet50(width)


class ScaledResNet50(nn.Module):
    """ResNet-50 with every width multiplied by ``width``, in torchvision's module names."""

    def __init__(self, width: int):
        super().__init__()
        from torchvision.models.resnet import Bottleneck, conv1x1

        stem = 64 * width
        self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = stem
        for i, (planes, blocks, stride) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), (1, 2, 2, 2), strict=True)):
            planes *= width
            out = planes * Bottleneck.expansion
            downsample = nn.Sequential(conv1x1(inplanes, out, stride), nn.BatchNorm2d(out))
            layers = [Bottleneck(inplanes, planes, stride, downsample)]
            layers += [Bottleneck(out, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            inplanes = out
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = inplanes
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class Classifier(nn.Module):
    """backbone (features) + head (linear classifier used in pretraining)."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_dim, num_classes)

    @property
    def feature_dim(self) -> int:
        """Width of the penultimate features."""
        return self.backbone.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@dataclass(frozen=True)
class Arch:
    """A registered architecture: a backbone builder taking a width multiplier."""

    build_backbone: Callable[[int], nn.Module]
    description: str
    default_width: int = 1
    widths: tuple[int, ...] | None = (1,)  # the widths it accepts; None: 1 to MAX_WIDTH


# Widest ResNet-50 built: x8 is about 1.5B parameters (6 GB of float32), past what any
# published wide ResNet-50 used (SimCLR's x4); a wider one is a typo or a damaged checkpoint.
MAX_WIDTH = 8
# A head row per class: iNat2018 has 8,142 classes, ImageNet-21k 21,841. More is a damaged
# checkpoint field, refused before the head is allocated.
MAX_CLASSES = 100_000


ARCHS: dict[str, Arch] = {
    "resnet50": Arch(resnet50_backbone, "ResNet-50, 2048*width-d features, for 160-224 px images", 1, None),
    "resnet50w2": Arch(resnet50_backbone, "ResNet-50 with every width doubled (94M params, 4096-d)", 2, (2,)),
    "small-resnet": Arch(lambda width: SmallResNet(), "3-stage residual net, 128-d, for 28-32 px (the demo)"),
}


def width_problem(arch: str, width) -> str | None:
    """Why ``width`` is not a width of the registered ``arch`` (naming the allowed ones), or None."""
    if is_hub_arch(arch):
        return None if width in (None, 1) else f"architecture {arch} takes no width multiplier, got {width!r}"
    spec = ARCHS[arch]
    allowed = range(1, MAX_WIDTH + 1) if spec.widths is None else spec.widths
    if isinstance(width, int) and not isinstance(width, bool) and width in allowed:
        return None
    shown = f"an integer from 1 to {MAX_WIDTH}" if spec.widths is None else list(spec.widths)
    return f"architecture {arch} does not take width {width!r}; allowed: {shown}"


def build(arch: str, num_classes: int, width: int | None = None, img_size: int | None = None) -> Classifier:
    """A freshly initialised classifier of a registered architecture (width: its multiplier, if it takes one),
    or of ``timm:<model>`` / ``torchvision:<model>`` (``img_size``: the input side, for models that fix one)."""
    if is_hub_arch(arch):
        problem = width_problem(arch, width)
        if problem:
            raise TimecatError(problem)
        library_model, _, tag = arch.partition(".")
        return Classifier(hub.backbone(library_model, img_size, tag or None), num_classes)
    try:
        spec = ARCHS[arch]
    except (KeyError, TypeError):
        raise TimecatError(
            f"unknown architecture {arch!r}; choose one of {sorted(ARCHS)}, or timm:<model> or torchvision:<model>"
        ) from None
    width = spec.default_width if width is None else width
    problem = width_problem(arch, width)
    if problem:
        raise TimecatError(problem)
    return Classifier(spec.build_backbone(width), num_classes)
