"""A member's checkpoint: one dict, written atomically, loaded strictly.

    {"model": state_dict, "optimizer": state_dict, "member": MemberConfig fields,
     "step": int, "complete": bool, "num_classes": int, "preprocess": Preprocess fields,
     "dataset_fingerprint": str, "timecat_version": str}

Loading uses ``weights_only=True``: a checkpoint is a pickle, and may come from a stranger.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from pipeline import files
from pipeline.errors import TimecatError
from pipeline.models import Classifier, build


def run_dir(runs_root: Path, name: str) -> Path:
    """The folder that holds a member's checkpoint and logs."""
    return Path(runs_root) / name


def checkpoint_path(runs_root: Path, name: str) -> Path:
    """Where a member's checkpoint lives."""
    return run_dir(runs_root, name) / "checkpoint.pt"


def save(path: Path, payload: dict) -> None:
    """Write ``payload`` to a temporary file beside ``path``, then rename it into place."""
    files.replace(Path(path), lambda tmp: write_torch(payload, tmp))


def write_torch(obj, path: Path) -> None:
    """``torch.save`` through a Python file, so a full disk raises ENOSPC (as a path, torch says 'unexpected pos')."""
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            # On a failed write, torch's zip writer fails again while closing ('unexpected pos') and
            # that error hides the real one: raise the OSError it hides, so a full disk says so.
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise


def load(path: Path, mmap: bool = False) -> dict:
    """Read a checkpoint dict (tensors and plain values only).

    ``mmap``: map tensors from the file instead of reading them, for callers that
    only look at metadata (``timecat status`` on a plan of ResNet-50 members).
    """
    path = Path(path)
    if not path.is_file():
        raise TimecatError(f"no checkpoint at {path}")
    return require(read_torch(path, mmap), REQUIRED, path)


REQUIRED = ("model", "member", "num_classes", "member.arch")  # what rebuilding the model reads


def require(payload, keys: tuple[str, ...], path: Path) -> dict:
    """``payload`` if it is a dict with every key (``a.b``: key b of dict a), else an error listing what lacks."""
    if not isinstance(payload, dict):
        raise TimecatError(f"{path}: not a timecat checkpoint (it holds a {type(payload).__name__}, not a dict)")
    missing = []
    for key in keys:
        outer, _, inner = key.partition(".")
        if outer not in payload or (inner and not (isinstance(payload[outer], dict) and inner in payload[outer])):
            missing.append(key)
    if missing:
        raise TimecatError(f"{path}: not a timecat checkpoint (it lacks {missing}); train it again, or name another")
    return payload


def read_torch(path: Path, mmap: bool = False):
    """``torch.load(weights_only=True)``, with one clean error for a file that is damaged or holds code.

    torch's own message for an unsafe pickle advises ``weights_only=False``, which would
    run whatever the file holds; that advice is not passed on.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises several types for a corrupt or unsafe file
        reason = (
            "it holds objects other than tensors and plain values" if "weights_only" in str(e) else type(e).__name__
        )
        raise TimecatError(
            f"{path}: not a loadable checkpoint ({reason}); timecat loads only tensors and plain values, never code"
        ) from None


def sha256(path: Path, block: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def load_state_strict(model: torch.nn.Module, state: dict, source: str) -> None:
    """``load_state_dict`` that names every missing and unexpected key on failure."""
    missing, unexpected = model.state_dict().keys() - state.keys(), state.keys() - model.state_dict().keys()
    if missing or unexpected:
        raise TimecatError(
            f"{source}: weights do not fit the architecture; missing {sorted(missing)[:10]} "
            f"({len(missing)} in all), unexpected {sorted(unexpected)[:10]} ({len(unexpected)} in all)"
        )
    model.load_state_dict(state, strict=True)


def load_model(payload: dict, source: str) -> Classifier:
    """Rebuild a member's classifier from its checkpoint (architecture from the checkpoint, not flags)."""
    model = build(payload["member"]["arch"], payload["num_classes"], payload["member"].get("width"))
    load_state_strict(model, payload["model"], source)
    return model
