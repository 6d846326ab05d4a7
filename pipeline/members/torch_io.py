"""Reading and writing torch files safely: weights-only loads, writes that report a full disk, strict state loads.

Shared by timecat's own checkpoints (``pipeline.members.checkpoints``) and foreign ones
(``pipeline.members.interop``), so neither imports the other for them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.core.errors import TimecatError


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


def load_state_strict(model: torch.nn.Module, state: dict, source: str, fix: str = "") -> None:
    """``load_state_dict`` that names every missing, unexpected and misshapen key on failure, before copying any.

    ``fix`` ends the message: what the weights look like and what to do (the caller knows).
    """
    expected = model.state_dict()
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    ending = f"; {fix}" if fix else ""
    if missing or unexpected:
        raise TimecatError(
            f"{source}: weights do not fit the architecture; missing {sorted(missing)[:10]} "
            f"({len(missing)} in all), unexpected {sorted(unexpected)[:10]} ({len(unexpected)} in all){ending}"
        )
    # torch's own size-mismatch error is a traceback that names no file: name the tensors here instead.
    wrong = [
        f"{key} {_shape(value)}, not {tuple(expected[key].shape)}"
        for key, value in state.items()
        if not isinstance(value, torch.Tensor) or value.shape != expected[key].shape
    ]
    if wrong:
        raise TimecatError(
            f"{source}: weights do not fit the architecture; {len(wrong)} tensor(s) of another shape, "
            f"e.g. {wrong[:3]}{ending}"
        )
    model.load_state_dict(state, strict=True)


def _shape(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else f"(a {type(value).__name__})"
