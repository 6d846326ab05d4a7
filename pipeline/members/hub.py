"""Members from timm and torchvision: any of their architectures to pretrain, their weights to cache.

An architecture ``timm:<model>`` is a name of timm's registry (``timm.list_models()``), and
``torchvision:<model>`` one of ``torchvision.models.list_models()``. A member named for extraction
may be one of their pretrained models (``pipeline.core.names`` parses the spec):

    NAME=timm:<model>[.<tag>]          timm's pretrained weights (the model's default tag if none)
    NAME=timm:<model>@<file>           weights from a local file: safetensors, or a torch state dict
    NAME=torchvision:<model>[.<enum>]  torchvision's weights (``DEFAULT`` if none, e.g. IMAGENET1K_V2)
    NAME=torchvision:<model>@<file>

Weights are read from the local caches only: timm's from the Hugging Face cache (``HF_HUB_CACHE``,
default ~/.cache/huggingface/hub) or, for its older URL weights, torch hub's (``TORCH_HOME``, like
torchvision's); ``--download`` fetches what is missing. Every file is read weights-only.

The feature layer is the input of the model's classifier: timm's pre-logits,
``forward_head(forward_features(x), pre_logits=True)``, and for torchvision the input of the
model's last Linear layer, which becomes an Identity. A pretrained member's preprocessing is
its own pretrained config's (timm's ``resolve_model_data_config``; torchvision's weights
transforms): input side, centre-crop ratio, mean and std, and its resize kernel, which
extraction applies on the device (``model_resize``).
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from pipeline.core.errors import TimecatError
from pipeline.core.names import HUB_LIBRARIES, HubSpec
from pipeline.members.torch_io import load_state_strict, read_torch

TIMM_LAYER = "timm pre-logits: forward_head(forward_features(x), pre_logits=True)"
TORCHVISION_LAYER = "torchvision: the input of the model's last Linear layer (its classifier)"
STRIP_PREFIXES = ("_orig_mod.", "module.")  # torch.compile's and DDP's wrappers


class TimmBackbone(nn.Module):
    """A timm model without its classifier: (B, 3, H, W) -> (B, pre-logits width)."""

    feature_layer = TIMM_LAYER

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        # head_hidden_size: the width forward_head(pre_logits=True) returns (a pre-logits MLP's, where one exists)
        self.out_dim = int(getattr(net, "head_hidden_size", None) or net.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)


class TorchvisionBackbone(nn.Module):
    """A torchvision model whose last Linear layer is an Identity: (B, 3, H, W) -> (B, its in_features)."""

    feature_layer = TORCHVISION_LAYER

    def __init__(self, net: nn.Module, arch: str):
        super().__init__()
        linears = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise TimecatError(
                f"{arch} has no Linear classifier, so it has no pre-logits features; timecat takes torchvision "
                "models whose classifier ends in a Linear layer (resnet*, vit_*, convnext_*, efficientnet_*, ...)"
            )
        name, last = linears[-1]
        self.classifier = name  # the key prefix its file's classifier weights carry
        self.out_dim = last.in_features
        net.set_submodule(name, nn.Identity())
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def is_hub_arch(arch) -> bool:
    """Whether ``arch`` names a timm or torchvision architecture (``timm:<model>``, ``torchvision:<model>``)."""
    return isinstance(arch, str) and arch.partition(":")[0] in HUB_LIBRARIES and ":" in arch


def _close(name: str, known: list[str]) -> str:
    matches = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    return f"close matches: {', '.join(matches)}" if matches else "no close match"


def _timm():
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is a default dependency
        raise TimecatError(f"timm is not installed ({e}); pip install -e . installs it") from None
    return timm


def check_model(library: str, model: str) -> None:
    """Refuse a model name the library does not register, naming close matches."""
    if library == "timm":
        timm = _timm()
        if not timm.is_model(model):
            raise TimecatError(
                f"unknown timm model {model!r} ({_close(model, timm.list_models())}); "
                "see timm.list_models() for every name"
            )
    else:
        import torchvision

        known = torchvision.models.list_models(module=torchvision.models)  # classifiers, not detection or video
        if model not in known:
            raise TimecatError(
                f"unknown torchvision model {model!r} ({_close(model, known)}); "
                "see torchvision.models.list_models() for every name"
            )


def _with_size(create, img_size: int | None, size_kwarg: str):
    """``create(**{size_kwarg: img_size})`` where the constructor takes a size (ViTs), else ``create()``."""
    if img_size is None:
        return create()
    try:
        return create(**{size_kwarg: img_size})
    except TypeError as e:
        if size_kwarg not in str(e):
            raise
        return create()


def backbone(arch: str, img_size: int | None = None, tag: str | None = None) -> nn.Module:
    """A randomly initialised backbone of ``timm:<model>`` or ``torchvision:<model>``.

    ``img_size``: the input side, passed to constructors that fix one (a ViT's position
    embeddings); other models take any side. ``tag``: a timm pretrained tag whose config
    (mean, std, input size) the model carries.
    """
    library, model = arch.split(":", 1)
    check_model(library, model)
    if library == "timm":
        timm = _timm()
        name = f"{model}.{tag}" if tag else model
        net = _with_size(
            lambda **kw: timm.create_model(name, pretrained=False, num_classes=0, **kw), img_size, "img_size"
        )
        return TimmBackbone(net)
    import torchvision

    net = _with_size(lambda **kw: torchvision.models.get_model(model, weights=None, **kw), img_size, "image_size")
    return TorchvisionBackbone(net, arch)


def check_sides(net: nn.Module, arch: str, sides: list[int]) -> None:
    """Refuse, before training, an input side the architecture cannot take (a ViT's patch grid), naming why."""
    was_training = net.training
    net.eval()
    try:
        for side in sorted(set(sides)):
            try:
                with torch.no_grad():
                    net(torch.zeros(1, 3, side, side))
            except Exception as e:  # any failure of the forward: the model's own words say why
                patch = getattr(getattr(getattr(net, "net", None), "patch_embed", None), "patch_size", None)
                takes = f"; it takes sides that are multiples of its patch {next(iter(patch))} px" if patch else ""
                raise TimecatError(
                    f"architecture {arch} cannot take {side} px inputs ({str(e).splitlines()[0][:200]}){takes}; "
                    "pass --resolution (and --min-resolution) sides it takes"
                ) from None
        net.train()  # training mode too: some return auxiliary outputs there (inception, googlenet)
        out = net(torch.zeros(2, 3, max(sides), max(sides)))
        if not isinstance(out, torch.Tensor):
            raise TimecatError(
                f"architecture {arch} returns a {type(out).__name__} when training, not its features; timecat "
                "trains models whose forward returns one tensor (timm's, or torchvision's without auxiliary heads)"
            )
    finally:
        net.train(was_training)


# --- pretrained members --------------------------------------------------------------------------


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a torch file (under 'state_dict', 'model' or the top level)."""
    path = Path(path)
    if not path.is_file():
        raise TimecatError(f"no weight file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:  # safetensors raises its own types for a damaged header
            raise TimecatError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    else:
        state = read_torch(path)
        for key in ("state_dict", "model", "model_params"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TimecatError(f"{path}: no state dict of tensors (at the top level, or under 'state_dict' or 'model')")
    out = {}
    for key, value in state.items():
        for prefix in STRIP_PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def _cached_or_downloaded(where: str, cached: Path | None, fetch, download: bool, spec: HubSpec) -> Path:
    if cached is not None:
        return cached
    if download:
        return Path(fetch())
    raise TimecatError(
        f"the weights of {spec.text} are not in the local cache ({where}); pass --download to fetch them, "
        f"or give a file: NAME={spec.library}:{spec.model}@FILE"
    )


def timm_weights(spec: HubSpec, download: bool) -> tuple[Path, str]:
    """The local file of timm's pretrained weights for ``spec`` (fetched only if ``download``), and its tag."""
    timm = _timm()
    try:
        cfg = timm.models.get_pretrained_cfg(f"{spec.model}.{spec.tag}" if spec.tag else spec.model)
    except RuntimeError:
        cfg = None
    tags = [name.split(".", 1)[1] for name in timm.list_pretrained(f"{spec.model}.*")]
    if cfg is None or (spec.tag and cfg.tag != spec.tag):
        raise TimecatError(
            f"timm has no pretrained weights {spec.model}.{spec.tag or '(default)'}; its tags: {tags or 'none'}"
        )
    if cfg.hf_hub_id:
        import huggingface_hub
        from huggingface_hub import constants

        # The files timm itself would load: a named file (with its safetensors twin first), or its defaults.
        named = getattr(cfg, "hf_hub_filename", None)
        names = [_safetensors_twin(named), named] if named else ["model.safetensors", "pytorch_model.bin"]
        names = list(dict.fromkeys(n for n in names if n))
        found = None
        for name in names:
            hit = huggingface_hub.try_to_load_from_cache(cfg.hf_hub_id, name)
            if isinstance(hit, str):
                found = Path(hit)
                break

        def fetch():
            for name in names:
                try:
                    return huggingface_hub.hf_hub_download(cfg.hf_hub_id, name)
                except huggingface_hub.errors.EntryNotFoundError:
                    continue
                except Exception as e:  # offline, gated, or a server error: one line, no traceback
                    why = f"{type(e).__name__}: {e}"
                    raise TimecatError(f"could not download {name} of {cfg.hf_hub_id}: {why}") from None
            raise TimecatError(f"{cfg.hf_hub_id} holds none of {names}")

        where = f"{constants.HF_HUB_CACHE}, Hugging Face repository {cfg.hf_hub_id}"
        return _cached_or_downloaded(where, found, fetch, download, spec), cfg.tag
    if cfg.url:
        return _url_weights(cfg.url, download, spec), cfg.tag
    raise TimecatError(f"timm's {spec.model}.{cfg.tag} names no file to load its weights from")


def _safetensors_twin(filename: str) -> str | None:
    """The safetensors file timm prefers to a named .bin (timm's _get_safe_alternatives)."""
    if filename == "pytorch_model.bin":
        return "model.safetensors"
    if filename == "open_clip_pytorch_model.bin":
        return "open_clip_model.safetensors"
    return filename.removesuffix(".bin") + ".safetensors" if filename.endswith(".bin") else None


def _url_weights(url: str, download: bool, spec: HubSpec) -> Path:
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)

    def fetch():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except Exception as e:  # offline or a server error: one line, no traceback
            raise TimecatError(f"could not download {url}: {type(e).__name__}: {e}") from None
        return path

    return _cached_or_downloaded(f"{path.parent}, from {url}", path if path.is_file() else None, fetch, download, spec)


def torchvision_weights(spec: HubSpec):
    """torchvision's weights enum member for ``spec`` (``DEFAULT`` without a tag), refused with the choices."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(spec.model)
    except ValueError:
        return None
    choices = list(enum.__members__)  # DEFAULT among them
    if (spec.tag or "DEFAULT") not in choices:
        raise TimecatError(f"torchvision's {spec.model} has no weights {spec.tag!r}; choose one of {choices}")
    return enum[spec.tag or "DEFAULT"]


def _timm_preprocess(net: nn.Module) -> tuple[dict, dict]:
    """timecat's preprocessing from timm's data config of the model, and that config as timm states it."""
    from timm.data import resolve_model_data_config

    config = resolve_model_data_config(net)
    width = config["input_size"][-1]
    pre = {
        "resolution": int(width),
        "mean": [round(255 * v, 4) for v in config["mean"]],
        "std": [round(255 * v, 4) for v in config["std"]],
        "crop_ratio": float(config["crop_pct"]),
        "crop_scale": [0.08, 1.0],
        "flip": True,
    }
    return pre, {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def _torchvision_preprocess(weights) -> tuple[dict, dict]:
    """timecat's preprocessing from torchvision's weights transforms (ImageNet's 224/256 without weights)."""
    if weights is None:
        crop, resize, mean, std, kernel = 224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear"
    else:
        t = weights.transforms()
        crop, resize, mean, std = t.crop_size[0], t.resize_size[0], t.mean, t.std
        kernel = t.interpolation.value
    pre = {
        "resolution": int(crop),
        "mean": [round(255 * v, 4) for v in mean],
        "std": [round(255 * v, 4) for v in std],
        "crop_ratio": crop / resize,
        "crop_scale": [0.08, 1.0],
        "flip": True,
    }
    return pre, {
        "crop_size": crop,
        "resize_size": resize,
        "mean": list(mean),
        "std": list(std),
        "interpolation": kernel,
    }


def model_resize(model: str, stated: dict) -> dict:
    """The model's eval resize as its library states it: the kernel, and the side the image's shorter edge is
    resized to before the centre crop (timm: floor(side / crop_pct), as timm's eval transform; torchvision:
    its weights' resize_size). A kernel torch cannot apply as PIL does is refused."""
    from pipeline.data.recipes import KERNELS

    kernel = stated["interpolation"]
    if kernel not in KERNELS:
        raise TimecatError(
            f"{model}'s pretrained config resizes with {kernel!r}, which timecat cannot apply on the device as "
            f"PIL does (it applies {list(KERNELS)}); give the model's weights a config with one of those"
        )
    if "resize_size" in stated:  # torchvision
        side, resize = int(stated["crop_size"]), {"resize_px": int(stated["resize_size"]), "crop_mode": "center"}
    else:  # timm's eval transform
        side = int(stated["input_size"][-1])
        resize = {"resize_px": math.floor(side / stated["crop_pct"]), "crop_mode": stated.get("crop_mode", "center")}
    if resize["crop_mode"] not in ("center", "squash") or resize["resize_px"] < side:
        raise TimecatError(
            f"{model}'s pretrained config crops {side} px from a resize to {resize['resize_px']} px in crop mode "
            f"{resize['crop_mode']!r}; timecat applies a centre or squash crop from at least the input side"
        )
    return {"kernel": kernel, **resize}


def load_member(name: str, spec: HubSpec, download: bool) -> tuple[dict, Path, nn.Module]:
    """A pretrained timm or torchvision model as a member: its timecat-style payload, the weight file it was
    read from, and the loaded ``Classifier`` (extraction uses it as built: a library's builder may shape the
    model by its weights, e.g. a ViT's side, which a rebuild from the name alone would not).

    The payload's model is that classifier's state (backbone, and a one-class placeholder head that export
    leaves out); its preprocessing is the model's own.
    """
    from pipeline.members.models import Classifier

    check_model(spec.library, spec.model)
    if spec.library == "timm":
        tag = None
        if spec.file is None:
            path, tag = timm_weights(spec, download)
            body = _timm_pretrained(spec.model, tag, read_weights(path), path)
        else:
            path = spec.file
            body = backbone(f"timm:{spec.model}")
            state = read_weights(path)
            classifier = body.net.pretrained_cfg.get("classifier") or ()
            for prefix in (classifier,) if isinstance(classifier, str) else classifier:
                state = {k: v for k, v in state.items() if not k.startswith(f"{prefix}.")}
            load_state_strict(body.net, state, f"{path} (as timm's {spec.model})", _fits(spec))
        pre, stated = _timm_preprocess(body.net)
        arch = f"timm:{spec.model}.{tag}" if tag else f"timm:{spec.model}"
        weights = {"library": "timm", "tag": tag} if tag else {"library": "timm", "file": str(path)}
    else:
        enum = torchvision_weights(spec)
        if spec.file is None:
            if enum is None:
                raise TimecatError(f"torchvision has no pretrained weights for {spec.model}; give a file: @FILE")
            path = _url_weights(enum.url, download, spec)
            body = _torchvision_pretrained(spec, enum, read_weights(path), path)
        else:  # the architecture as its builder makes it without weights, the file's state loaded strictly
            path = spec.file
            body = backbone(f"torchvision:{spec.model}")
            state = {k: v for k, v in read_weights(path).items() if not k.startswith(f"{body.classifier}.")}
            load_state_strict(body.net, state, f"{path} (as torchvision's {spec.model})", _fits(spec))
        pre, stated = _torchvision_preprocess(enum)
        arch = f"torchvision:{spec.model}"
        weights = {"library": "torchvision"}
        weights |= {"file": str(path)} if spec.file is not None else {"weights": str(enum).split(".", 1)[1]}
    model = Classifier(body, 1)
    payload = {
        "model": model.state_dict(),
        "member": {"name": name, "arch": arch, "seed": None, "dataset": "imported", "source": spec.text},
        "weights": {**weights, "path": str(path)},
        "step": None,
        "complete": True,
        "num_classes": 1,
        "head": "none",
        "preprocess": pre,
        "model_config": stated,  # the model's preprocessing as its library states it
        "resize": model_resize(spec.text, stated),  # applied at extraction (pipeline.features.extract)
    }
    return payload, Path(path), model


def _one_line(error: Exception) -> str:
    """A library's error in one line (torch's load errors span several), cut to 300 characters."""
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def _fits(spec: HubSpec) -> str:
    return f"the file does not hold the weights of {spec.library}'s {spec.model}; name the model it was saved from"


def _timm_pretrained(model: str, tag: str, state: dict, path: Path) -> TimmBackbone:
    """timm's own loading of its pretrained weights, from ``state`` (read weights-only here): the model is made
    with its tag's classes, so timm's registered conversion of the file applies and its load is strict; the
    classifier is then removed."""
    timm = _timm()
    try:
        net = timm.create_model(f"{model}.{tag}", pretrained=True, pretrained_cfg_overlay={"state_dict": state})
    except Exception as e:  # timm's conversions raise what they raise (KeyError, AssertionError, RuntimeError)
        raise TimecatError(
            f"{path}: timm could not load it as {model}.{tag} ({_one_line(e)}); the cached file is damaged or "
            "another model's: delete it and fetch it again with --download"
        ) from None
    net.reset_classifier(0)
    return TimmBackbone(net)


def _torchvision_pretrained(spec: HubSpec, enum, state: dict, path: Path) -> TorchvisionBackbone:
    """torchvision's builder with ``enum``'s weights, as torchvision makes it (a SWAG ViT's side, inception's
    input transform, densenet's key renaming), the weights taken from ``state`` instead of a download."""
    import torchvision

    def from_state(self, *args, **kwargs):
        return state

    original = type(enum).get_state_dict
    type(enum).get_state_dict = from_state  # the builder's only way to its weights; put back below
    try:
        net = torchvision.models.get_model(spec.model, weights=enum)
    except Exception as e:  # a load_state_dict that does not fit, or the builder's own checks
        raise TimecatError(
            f"{path}: torchvision could not load it as {spec.model} with weights {enum} "
            f"({_one_line(e)}); the cached file is damaged: delete it and use --download"
        ) from None
    finally:
        type(enum).get_state_dict = original
    return TorchvisionBackbone(net.eval(), f"torchvision:{spec.model}")
