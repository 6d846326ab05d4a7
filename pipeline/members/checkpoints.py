"""A member's checkpoint: one dict, written atomically, loaded strictly.

    {"model": state_dict, "optimizer": state_dict, "member": MemberConfig fields,
     "step": int, "complete": bool, "num_classes": int, "preprocess": Preprocess fields,
     "dataset_fingerprint": str, "timecat_version": str}

Loading uses ``weights_only=True``: a checkpoint is a pickle, and may come from a stranger.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import MISSING, dataclass
from pathlib import Path

from cache import locks
from cache.errors import CacheError, elsewhere, shown
from pipeline.configs import MAX_RESOLUTION, MIN_RESOLUTION
from pipeline.core import files
from pipeline.core.errors import TimecatError, is_finite_number
from pipeline.core.names import check_name, foreign_name_and_path, hub_spec, is_foreign, member_name, parse_hub_spec
from pipeline.data.splits import Preprocess
from pipeline.members import hub, interop
from pipeline.members.hub import is_hub_arch
from pipeline.members.models import ARCHS, MAX_CLASSES, Classifier, build, width_problem
from pipeline.members.torch_io import load_state_strict, read_torch, write_torch


def run_dir(runs_root: Path, name: str) -> Path:
    """The folder that holds a member's checkpoint and logs."""
    return Path(runs_root) / name


def checkpoint_path(runs_root: Path, name: str) -> Path:
    """Where a member's checkpoint lives."""
    return run_dir(runs_root, name) / "checkpoint.pt"


def lock_path(runs_root: Path, name: str) -> Path:
    """The lock a training process holds on its member's folder."""
    return run_dir(runs_root, name) / ".lock"


@contextlib.contextmanager
def hold_run(runs_root: Path, name: str):
    """Hold the member's folder for one training job; a second job is refused with the holder's pid and host."""
    files.check_real_folders(runs_root, name, f"member {name}'s folder")  # before the lock is created in it
    held = contextlib.ExitStack()
    try:  # only taking the lock is translated: an error of the training itself passes as it is
        held.enter_context(locks.hold(str(lock_path(runs_root, name))))
    except locks.BusyError as e:
        raise TimecatError(
            f"member {name} is being trained by another process ({json.dumps(e.holder)}); "
            "wait for it or stop it: a stopped member resumes from its last checkpoint"
        ) from None
    except CacheError as e:  # a planted symlink, a full disk, a filesystem without locks
        raise TimecatError(str(e)) from None
    with held:
        yield


def holder(runs_root: Path, name: str) -> dict | None:
    """Who trains the member now (pid, host), or None."""
    return locks.holder(str(lock_path(runs_root, name)))


RESUMABLE = ("complete", "step", "member", "final")  # what deciding to keep or resume a member reads


def existing(runs_root: Path, name: str, asked: dict) -> dict | None:
    """The member's checkpoint (finished or resumable), None if there is none, an error if it is another member.

    ``asked`` is the recipe about to be trained (its config without operational fields);
    fields added since the checkpoint was saved count as unchanged.
    """
    ckpt = checkpoint_path(runs_root, name)
    if not ckpt.is_file():
        return None
    payload = require(load(ckpt), RESUMABLE, ckpt)
    if not payload["complete"]:  # only a resume reads these
        require(payload, ("optimizer", "rng", "dataset_fingerprint", "scheduler"), ckpt)
    saved = {**asked, **{k: v for k, v in payload["member"].items() if k in asked}}
    if saved != asked:
        diff = {k: (v, asked.get(k)) for k, v in saved.items() if asked.get(k) != v}
        raise TimecatError(
            f"member {name} already exists at {ckpt} with another config (saved vs asked: {diff}); "
            "choose another --name or delete that folder"
        )
    return payload


def save(path: Path, payload: dict) -> None:
    """Write ``payload`` to a temporary file beside ``path``, then rename it into place."""
    files.replace(Path(path), lambda tmp: write_torch(payload, tmp))


def load(path: Path, mmap: bool = False) -> dict:
    """Read a checkpoint dict (tensors and plain values only).

    ``mmap``: map tensors from the file instead of reading them, for callers that
    only look at metadata (``timecat status`` on a plan of ResNet-50 members).
    """
    path = Path(path)
    if not path.is_file():
        raise TimecatError(f"no checkpoint at {path}")
    return check_fields(require(read_torch(path, mmap), REQUIRED, path), path)


REQUIRED = ("model", "member", "num_classes", "member.arch")  # what rebuilding the model reads


def check_fields(payload: dict, path: Path) -> dict:
    """``payload`` if the fields that size the model and its inputs are in range, else one error naming each.

    Checked before anything is built: a damaged ``num_classes``, ``width`` or ``resolution``
    would otherwise be allocated (or fail deep in torch) first.
    """
    problems = []
    n = payload["num_classes"]
    if not _is_int(n) or not 1 <= n <= MAX_CLASSES:
        problems.append(f"num_classes {n!r} (allowed: an integer from 1 to {MAX_CLASSES:,})")
    arch = payload["member"]["arch"]
    if not isinstance(arch, str) or not (arch in ARCHS or is_hub_arch(arch)):
        problems.append(f"member.arch {arch!r} (allowed: {sorted(ARCHS)}, timm:<model>, torchvision:<model>)")
    elif payload["member"].get("width") is not None:
        problem = width_problem(arch, payload["member"]["width"])
        problems += [f"member.width: {problem}"] if problem else []
    if "preprocess" in payload:
        problems += preprocess_problems(payload["preprocess"])
    if problems:
        raise TimecatError(f"{path}: a damaged timecat checkpoint: {'; '.join(problems)}; train it again")
    return payload


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _numbers(value, count: int, low: float, high: float) -> bool:
    """``value`` is a list of ``count`` numbers, each in [low, high]."""
    return (
        isinstance(value, (list, tuple))
        and len(value) == count
        and all(is_finite_number(v) and low <= v <= high for v in value)
    )


def preprocess_problems(pre) -> list[str]:
    """What is wrong with a checkpoint's preprocessing fields (``splits.Preprocess``), each with its allowed range."""
    if not isinstance(pre, dict):
        return [f"preprocess is a {type(pre).__name__}, not a dict of Preprocess fields"]
    fields = set(Preprocess.__dataclass_fields__)
    required = {f for f, v in Preprocess.__dataclass_fields__.items() if v.default is MISSING}
    if not required <= pre.keys() <= fields:
        return [f"preprocess keys {sorted(pre)} (allowed: {sorted(fields)}, with {sorted(required)})"]
    problems = []
    resolution = pre["resolution"]
    # The bounds pretrain takes: a larger side is a damaged field (100,000 px asked a 76 TB batch buffer).
    if not _is_int(resolution) or not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        problems.append(
            f"preprocess.resolution {resolution!r} (allowed: an integer from {MIN_RESOLUTION} to {MAX_RESOLUTION} px)"
        )
    if not _numbers(pre["mean"], 3, 0, 255):
        problems.append(f"preprocess.mean {pre['mean']!r} (allowed: 3 numbers from 0 to 255)")
    if not _numbers(pre["std"], 3, 1e-3, 255):
        problems.append(f"preprocess.std {pre['std']!r} (allowed: 3 numbers from 0.001 to 255)")
    if "crop_ratio" in pre and not _numbers([pre["crop_ratio"]], 1, 1e-3, 1):
        problems.append(f"preprocess.crop_ratio {pre['crop_ratio']!r} (allowed: a number from 0.001 to 1)")
    scale = pre.get("crop_scale", (0.5, 1))
    if not _numbers(scale, 2, 1e-3, 1) or scale[0] > scale[1]:
        problems.append(f"preprocess.crop_scale {scale!r} (allowed: 2 increasing numbers from 0.001 to 1)")
    if not isinstance(pre.get("flip", True), bool):
        problems.append(f"preprocess.flip {pre['flip']!r} (allowed: true or false)")
    return problems


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


def sha256(path: Path, block: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def load_model(payload: dict, source: str) -> Classifier:
    """Rebuild a member's classifier from its checkpoint (architecture from the checkpoint, not flags)."""
    arch, width, n = payload["member"]["arch"], payload["member"].get("width"), payload["num_classes"]
    # A timm or torchvision model trained here that fixes its input side (a ViT) is rebuilt at the side it
    # trained at; a pretrained one (its "model_config" recorded) at its library's default, as it was loaded.
    own = is_hub_arch(arch) and "model_config" not in payload
    side = (payload.get("preprocess") or {}).get("resolution") if own else None
    model = build(arch, n, width, img_size=side)
    if not isinstance(payload["model"], dict):
        raise TimecatError(f"{source}: its model is a {type(payload['model']).__name__}, not a state dict")
    fix = f"they do not match its own fields (arch {arch}, width {width}, num_classes {n}): it is damaged"
    load_state_strict(model, payload["model"], source, fix)
    return model


@dataclass(frozen=True)
class Loaded:
    """A member's checkpoint as found: its name, file and payload, and whether it was trained elsewhere."""

    name: str
    path: Path
    payload: dict
    foreign: bool
    model: Classifier | None = None  # a library's pretrained model, loaded as its builder made it (hub)


def is_timecat(obj) -> bool:
    """Whether a loaded file is one of timecat's own checkpoints (a dict with its model and member config)."""
    return isinstance(obj, dict) and "model" in obj and isinstance(obj.get("member"), dict)


def load_file(name: str, path: Path) -> Loaded:
    """A member given as a file: a timecat checkpoint (another workspace's run) as it is, else a foreign one.

    A run folder (``run1=/other/runs/run1``) stands for the checkpoint in it.
    """
    path = Path(path)
    if path.is_dir() and (path / "checkpoint.pt").is_file():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise TimecatError(f"no checkpoint file at {path}")
    obj = read_torch(path)
    if is_timecat(obj):
        return Loaded(name, path, check_fields(require(obj, REQUIRED, path), path), False)
    return Loaded(name, path, interop.from_foreign(obj, path), True)


def load_member(runs_root: Path, member: str, *, finished: bool = True, download: bool = False) -> Loaded:
    """Find and load a member: a run under ``runs_root``, a checkpoint file trained elsewhere, or a library's model.

    ``member`` is a run name, ``path`` / ``name=path`` for the paper's, AlgoPerf's or
    torchvision's ResNet-50 (converted by ``pipeline.members.interop``), or ``[name=]timm:...`` /
    ``[name=]torchvision:...`` (``pipeline.members.hub``; ``download`` fetches weights missing from
    the local caches). ``finished`` refuses a member whose training has not ended (extraction
    needs the final weights).
    """
    spec = hub_spec(member)
    if spec is not None:
        name = check_name("member", member_name(member))
        payload, path, model = hub.load_member(name, parse_hub_spec(spec), download)
        return Loaded(name, path, payload, True, model)
    if is_foreign(member):
        name, path = foreign_name_and_path(member)
        check_name("member", name)
        loaded = load_file(name, path)
    else:
        path = checkpoint_path(runs_root, check_name("member", member))
        if not path.is_file():
            known = sorted(p.parent.name for p in Path(runs_root).glob("*/checkpoint.pt"))
            raise TimecatError(
                f"unknown member {member!r}: no {shown(path)}; trained members: {known or 'none'} "
                f"(other runs: {elsewhere('runs')})"
            )
        loaded = Loaded(member, path, load(path), False)
    require(loaded.payload, ("step", "preprocess", "member.seed", "member.dataset"), path)
    if finished and not loaded.payload.get("complete"):
        raise TimecatError(f"member {loaded.name} has not finished training ({path}); run its `timecat pretrain` again")
    return loaded
