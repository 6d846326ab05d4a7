"""Members trained elsewhere: the paper's and AlgoPerf's checkpoints, torchvision weights, and export.

A foreign checkpoint is a pickle from a stranger, so it is read with
``torch.load(weights_only=True)``. Its state dict may sit under ``model_params``
(AlgoPerf, the paper's code) or ``state_dict``, or be the top level. Keys lose
the wrappers that DDP and torch.compile add, and the paper's ``downsample.conv``
/ ``downsample.bn`` names become torchvision's ``downsample.0`` / ``downsample.1``.
The ``fc`` head is dropped: only the backbone's features are used.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from pipeline import files, recipes
from pipeline.errors import TimecatError
from pipeline.models import build
from pipeline.torch_io import load_state_strict, read_torch, write_torch

# Longest first: "module.model0." must win over "module.".
PREFIXES = ("_orig_mod.module.", "module.model0.", "_orig_mod.", "module.")
RENAMES = (
    (re.compile(r"\.downsample\.conv\."), ".downsample.0."),
    (re.compile(r"\.downsample\.bn\."), ".downsample.1."),
)

# The paper's members are ImageNet ResNet-50s evaluated at a 224/256 centre crop with
# ImageNet statistics (0-255 scale): the checkpoint's own preprocessing. Extraction
# replaces it with the paper's preprocessing for the dataset's kind (pipeline.recipes).
IMAGENET_PREPROCESS = {**recipes.IMAGENET.foreign, "flip": True}


def backbone_state(obj: dict, source: str) -> dict[str, torch.Tensor]:
    """The backbone's state dict from any supported layout, in torchvision's names, ``fc`` dropped."""
    state = obj
    for key in ("model_params", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            state = obj[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TimecatError(f"{source}: no state dict of tensors under 'model_params', 'state_dict' or the top level")
    out = {}
    for key, value in state.items():
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        for pattern, replacement in RENAMES:
            key = pattern.sub(replacement, key)
        if not key.startswith("fc."):
            out[key] = value
    return out


def load_foreign(path: Path, arch: str = "resnet50") -> dict:
    """A timecat-style checkpoint payload for a foreign file: model (backbone only), member, preprocess."""
    path = Path(path)
    if not path.is_file():
        raise TimecatError(f"no checkpoint file at {path}")
    state = backbone_state(read_torch(path), str(path))
    model = build(arch, num_classes=1)
    load_state_strict(model.backbone, state, f"{path} (as a {arch} backbone)")
    return {
        "model": model.state_dict(),
        "member": {"name": path.stem, "arch": arch, "seed": None, "dataset": "imported", "source": str(path)},
        "step": None,
        "complete": True,
        "num_classes": 1,  # the head is not used: features come from the backbone
        "preprocess": dict(IMAGENET_PREPROCESS),
    }


def export_torchvision(payload: dict, out: Path) -> Path:
    """Write a member as a plain state dict that ``torchvision.models.resnet50(num_classes=k)`` loads."""
    arch = payload["member"]["arch"]
    if not arch.startswith("resnet50"):
        raise TimecatError(f"only resnet50-family members export to torchvision; this one is {arch!r}")
    model = payload["model"]
    state = {k.removeprefix("backbone."): v for k, v in model.items() if k.startswith("backbone.")}
    state.update({f"fc.{k.removeprefix('head.')}": v for k, v in model.items() if k.startswith("head.")})
    return files.replace(Path(out), lambda tmp: write_torch(state, tmp))
