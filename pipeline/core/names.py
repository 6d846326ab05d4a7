"""The naming rules of members, datasets and splits, in one torch-free place.

A name becomes a folder and a cache path, so it is checked before anything is
made from it (``check_name``, the cache's own rule). A member given as a
checkpoint file (``path`` or ``name=path``, the paper's or AlgoPerf's members)
is named after the file unless a name is given. A member from timm or torchvision
(``name=timm:resnet18.a1_in1k``, ``name=torchvision:resnet50@weights.pth``;
pipeline.members.hub) is named after its model and tag unless a name is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cache.layout import check_name
from pipeline.core.errors import TimecatError

FOREIGN_SUFFIXES = (".pt", ".pth", ".tar", ".ckpt", ".bin")


HUB_LIBRARIES = ("timm", "torchvision")
_HUB_PREFIXES = tuple(f"{library}:" for library in HUB_LIBRARIES)


@dataclass(frozen=True)
class HubSpec:
    """A pretrained model of another library: ``library:model[.tag]`` or ``library:model@file``."""

    text: str  # as given, for provenance
    library: str  # timm | torchvision
    model: str  # the library's model name
    tag: str | None  # timm's pretrained tag or torchvision's weights enum name; None: the default
    file: Path | None  # local weights, instead of the library's


def hub_spec(member: str) -> str | None:
    """The ``timm:...`` or ``torchvision:...`` part of a member (bare, or after ``name=``), else None."""
    if member.startswith(_HUB_PREFIXES):
        return member
    _, eq, rest = member.partition("=")
    return rest if eq and rest.startswith(_HUB_PREFIXES) else None


def parse_hub_spec(text: str) -> HubSpec:
    """``timm:vit_tiny_patch16_224.augreg_in21k``, ``timm:resnet18@w.safetensors``, ``torchvision:resnet50``."""
    library, _, rest = text.partition(":")
    model, at, file = rest.partition("@")
    model, _, tag = model.partition(".")
    if library not in HUB_LIBRARIES or not model or (at and not file) or (at and tag):
        raise TimecatError(
            f"cannot read the member {text!r}: write LIBRARY:MODEL[.TAG] or LIBRARY:MODEL@FILE, "
            f"LIBRARY one of {list(HUB_LIBRARIES)} (e.g. timm:resnet18.a1_in1k, torchvision:resnet50@weights.pth)"
        )
    return HubSpec(text, library, model, tag or None, Path(file) if at else None)


def is_foreign(member: str) -> bool:
    """A member given as a checkpoint file (``path`` or ``name=path``) or a library's model, not a run name."""
    return "=" in member or "/" in member or member.endswith(FOREIGN_SUFFIXES) or member.startswith(_HUB_PREFIXES)


def foreign_name_and_path(member: str) -> tuple[str, Path]:
    """``name=path`` -> (name, path); a bare path is named after its file (``seed2.pt`` -> ``seed2``)."""
    name, _, path = member.rpartition("=")
    path = Path(path)
    return (name or path.name.split(".")[0]), path


def member_name(member: str) -> str:
    """The name a member is cached under: a run's own name, a checkpoint file's given or file name, or a
    library model's given name or its model and tag (``timm:resnet18.a1_in1k`` -> ``resnet18.a1_in1k``)."""
    spec = hub_spec(member)
    if spec is not None:
        given = member[: -len(spec)].removesuffix("=")
        return given or spec.partition(":")[2].partition("@")[0]
    return foreign_name_and_path(member)[0] if is_foreign(member) else member


__all__ = [
    "FOREIGN_SUFFIXES",
    "HUB_LIBRARIES",
    "HubSpec",
    "check_name",
    "foreign_name_and_path",
    "hub_spec",
    "is_foreign",
    "member_name",
    "parse_hub_spec",
]
