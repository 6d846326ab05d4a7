"""Members trained elsewhere: the paper's and AlgoPerf's checkpoints, torchvision weights, and export.

A foreign checkpoint is a pickle from a stranger, so it is read with
``torch.load(weights_only=True)``. Its state dict may sit under ``model_params``
(AlgoPerf, the paper's code) or ``state_dict``, or be the top level. Keys lose
the wrappers that DDP and torch.compile add, and the paper's ``downsample.conv``
/ ``downsample.bn`` names become torchvision's ``downsample.0`` / ``downsample.1``.
The file's ``fc`` is kept as the member's head (features come from the backbone
alone, but ``timecat export`` writes it back); a file without one gets a
placeholder head that export leaves out.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import torch

from pipeline import __version__
from pipeline.core import files
from pipeline.core.errors import TimecatError
from pipeline.core.progress import get_logger
from pipeline.data import recipes
from pipeline.members.models import MAX_CLASSES, build
from pipeline.members.torch_io import load_state_strict, read_torch, write_torch

log = get_logger(__name__)

# Longest first: "module.model0." must win over "module.".
PREFIXES = ("_orig_mod.module.", "module.model0.", "_orig_mod.", "module.")
RENAMES = (
    (re.compile(r"\.downsample\.conv\."), ".downsample.0."),
    (re.compile(r"\.downsample\.bn\."), ".downsample.1."),
)

# The paper's members are ImageNet ResNet-50s evaluated at a 224/256 centre crop with
# ImageNet statistics (0-255 scale): the checkpoint's own preprocessing. Extraction
# replaces it with the paper's preprocessing for the dataset's kind (pipeline.data.recipes).
IMAGENET_PREPROCESS = {**recipes.IMAGENET.foreign, "flip": True}


def backbone_state(obj: dict, source: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The backbone's state dict from any supported layout, in torchvision's names, and the ``fc`` head's
    (``weight``, ``bias``; empty when the file has none)."""
    state = obj
    for key in ("model_params", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            state = obj[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TimecatError(f"{source}: no state dict of tensors under 'model_params', 'state_dict' or the top level")
    backbone, fc = {}, {}
    for key, value in state.items():
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        for pattern, replacement in RENAMES:
            key = pattern.sub(replacement, key)
        if key.startswith("fc."):
            fc[key.removeprefix("fc.")] = value
        else:
            backbone[key] = value
    return backbone, fc


# ResNet depths by block type and blocks per stage, to name what a foreign file holds.
DEPTHS = {
    ("Bottleneck", (3, 4, 6, 3)): 50,
    ("Bottleneck", (3, 4, 23, 3)): 101,
    ("Bottleneck", (3, 8, 36, 3)): 152,
    ("BasicBlock", (2, 2, 2, 2)): 18,
    ("BasicBlock", (3, 4, 6, 3)): 34,
}
ACCEPTED = (
    "timecat takes foreign checkpoints of torchvision's resnet50 only (3 input channels, layer1.0.conv2 of "
    "64 channels), in torchvision's, AlgoPerf's or the paper's key names, or timecat's own checkpoints"
)


def looks_like(state: dict) -> str:
    """What architecture a torchvision-style state dict seems to be, from its key names and shapes."""
    conv1 = state.get("conv1.weight")
    if not isinstance(conv1, torch.Tensor) or conv1.dim() != 4:
        return "not a torchvision-style ResNet (it has no 4-D conv1.weight)"
    blocks = tuple(
        len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.") and k.split(".")[1].isdigit()})
        for i in range(1, 5)
    )
    kind = "Bottleneck" if "layer1.0.conv3.weight" in state else "BasicBlock"
    depth = DEPTHS.get((kind, blocks))
    name = f"resnet{depth}" if depth else f"a ResNet of {kind} blocks {list(blocks)} per stage"
    stem, inner = conv1.shape[0], state.get("layer1.0.conv2.weight")
    if isinstance(inner, torch.Tensor) and inner.dim() == 4 and kind == "Bottleneck" and inner.shape[0] == 2 * stem:
        name = f"wide_resnet{depth or ''}_2 (layer1.0.conv2 of {inner.shape[0]} channels, twice the stem's {stem})"
    elif stem != 64:
        name += f" with a {stem}-channel stem (torchvision's has 64)"
    return f"{name}, with {conv1.shape[1]} input channel(s) in conv1"


def load_foreign(path: Path, arch: str = "resnet50") -> dict:
    """A timecat-style checkpoint payload for a foreign file: model, member, preprocess.

    The file's ``fc`` becomes the head (``head``: "original"); without one, the head is a
    one-class placeholder that export leaves out (``head``: "none").
    """
    path = Path(path)
    if not path.is_file():
        raise TimecatError(f"no checkpoint file at {path}")
    return from_foreign(read_torch(path), path, arch)


def from_foreign(obj, path: Path, arch: str = "resnet50") -> dict:
    """``load_foreign`` of an object already read from ``path``."""
    state, fc = backbone_state(obj, str(path))
    fix = f"it looks like {looks_like(state)}; {ACCEPTED}"
    if fc and not _linear(fc):
        # A self-supervised file's projection MLP (fc.0.*, fc.2.*) or a head without a bias: the features
        # come from the backbone, so such a head is left out, as it always was, and export says so.
        log.warning("%s: its fc (%s) is not one Linear layer; export leaves it out", path, ", ".join(sorted(fc)))
        fc = {}
    num_classes = fc["weight"].shape[0] if fc else 1
    if num_classes > MAX_CLASSES:  # before a head that size is allocated a second time
        raise TimecatError(f"{path}: its fc has {num_classes:,} classes (allowed: 1 to {MAX_CLASSES:,})")
    model = build(arch, num_classes=num_classes)
    load_state_strict(model.backbone, state, f"{path} (as a {arch} backbone)", fix)
    if fc:
        load_state_strict(model.head, fc, f"{path} (its fc as the head of a {arch})", fix)
    return {
        "model": model.state_dict(),
        "member": {"name": path.stem, "arch": arch, "seed": None, "dataset": "imported", "source": str(path)},
        "step": None,
        "complete": True,
        "num_classes": num_classes,  # features come from the backbone; the head is kept for export
        "head": "original" if fc else "none",
        "preprocess": dict(IMAGENET_PREPROCESS),
    }


def _linear(fc: dict) -> bool:
    """Whether an ``fc`` state is exactly one Linear layer: a 2-D weight and its 1-D bias."""
    weight, bias = fc.get("weight"), fc.get("bias")
    return (
        fc.keys() == {"weight", "bias"} and weight.dim() == 2 and bias.dim() == 1 and bias.shape[0] == weight.shape[0]
    )


HEADS = {  # a payload's "head", as export says it (timecat's own checkpoints have none: their head is trained)
    "trained": "fc is the member's own trained head",
    "original": "fc is the original file's own head, kept",
    "none": (
        "backbone only: the original file has no fc of one Linear layer; load with strict=False, "
        "or set fc = nn.Identity() first"
    ),
}


def export_torchvision(payload: dict, out: Path) -> tuple[Path, str]:
    """Write a member as a plain state dict that ``torchvision.models.resnet50(num_classes=k)`` loads.

    Returns the path and what its ``fc`` is, as also recorded in the file's metadata:
    ``torch.load(out)._metadata["timecat"]`` (torch keeps a state dict's ``_metadata``, and
    ``load_state_dict`` reads only its modules' entries from it).
    """
    arch = payload["member"]["arch"]
    if not arch.startswith("resnet50"):
        raise TimecatError(f"only resnet50-family members export to torchvision; this one is {arch!r}")
    head = payload.get("head", "trained")
    model = payload["model"]
    state = OrderedDict((k.removeprefix("backbone."), v) for k, v in model.items() if k.startswith("backbone."))
    if head != "none":
        state.update((f"fc.{k.removeprefix('head.')}", v) for k, v in model.items() if k.startswith("head."))
    what = HEADS[head]
    state._metadata = OrderedDict(
        timecat={
            "head": head,
            "fc": what,
            "num_classes": payload["num_classes"] if head != "none" else None,
            "source": payload["member"].get("source") or payload["member"].get("name"),
            "timecat_version": __version__,
        }
    )
    return files.replace(Path(out), lambda tmp: write_torch(state, tmp)), what
