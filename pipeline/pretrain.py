"""Stage 2: train one member (a seed and a step budget) and save its checkpoint.

<runs>/<name>/checkpoint.pt   model, optimizer, member config, preprocessing
<runs>/<name>/config.json     the resolved config and the tool version
<runs>/<name>/log.jsonl       one record per logged step, then a final one
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from cache.layout import check_name
from pipeline import __version__, checkpoints
from pipeline.datasets import get_spec
from pipeline.errors import TimecatError
from pipeline.models import ARCHS, Classifier, build
from pipeline.prepare import beton_path, read_manifest
from pipeline.progress import get_logger, progress

log = get_logger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    """One member: its name, seed, budget, architecture and dataset, and the SGD recipe."""

    name: str  # run0, run1, ...
    dataset: str  # a prepared dataset under the data root
    seed: int  # initialisation and data order
    steps: int  # optimizer steps: the member's share of the total budget
    arch: str = "small-resnet"  # a key of pipeline.models.ARCHS
    width: int | None = None  # channel multiplier for the resnet50 family; None: the arch's default
    batch_size: int = 128  # images per step
    lr: float = 0.2  # peak SGD learning rate, after linear warmup, then cosine to 0
    warmup: float = 0.05  # fraction of steps spent warming up
    momentum: float = 0.9  # Nesterov
    weight_decay: float = 5e-4  # on conv and linear weights only, not BatchNorm or biases
    label_smoothing: float = 0.1
    resolution: int | None = None  # px input side; None takes the dataset's default
    num_workers: int = 2  # FFCV loader threads
    log_every: int = 50  # steps between log records

    def __post_init__(self):
        check_name("member", self.name)  # it becomes a folder and a cache path
        if self.arch not in ARCHS:
            raise TimecatError(f"unknown architecture {self.arch!r}; choose one of {sorted(ARCHS)}")
        for field in ("steps", "batch_size", "log_every", "num_workers"):
            if getattr(self, field) < 1:
                raise TimecatError(f"{field} must be at least 1, got {getattr(self, field)}")
        if not 0 <= self.warmup < 1:
            raise TimecatError(f"warmup is a fraction of steps in [0, 1), got {self.warmup}")


def run_dir(runs_root: Path, name: str) -> Path:
    """The folder that holds a member's checkpoint and logs."""
    return Path(runs_root) / name


def checkpoint_path(runs_root: Path, name: str) -> Path:
    """Where a member's checkpoint lives."""
    return run_dir(runs_root, name) / "checkpoint.pt"


def make_preprocess(config: PretrainConfig, manifest: dict):
    """Input preprocessing for this member: dataset defaults, the train split's pixel statistics."""
    from pipeline.loaders import Preprocess

    spec = get_spec(manifest["kind"])
    return Preprocess(
        resolution=config.resolution or spec.resolution,
        mean=tuple(manifest["mean"]),
        std=tuple(manifest["std"]),
        crop_scale=spec.crop_scale,
        crop_ratio=spec.crop_ratio,
    )


def make_optimizer(model: nn.Module, config: PretrainConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum; no weight decay on BatchNorm parameters or biases."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup, then cosine decay to 0."""
    warm = max(1, round(warmup * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def train_one_step(model, images, labels, criterion, optimizer, scheduler) -> dict:
    """One SGD step; returns the batch loss and the lr it used."""
    lr = optimizer.param_groups[0]["lr"]
    loss = criterion(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return {"loss": loss.item(), "lr": lr}


@torch.no_grad()
def evaluate(model: Classifier, loader, device: torch.device) -> dict:
    """Top-1 accuracy (%) and mean loss over a whole loader, model in eval mode."""
    from pipeline.loaders import to_model_input

    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for images, labels in loader:
        images, labels = to_model_input(images, labels, device)
        logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        total += len(labels)
    return {"top1": 100.0 * correct / total, "loss": loss_sum / total, "rows": total}


def _existing(ckpt: Path, config: PretrainConfig) -> dict | None:
    """The finished checkpoint of this exact member, None if there is none, an error if it differs."""
    if not ckpt.is_file():
        return None
    payload = checkpoints.load(ckpt)
    asked = asdict(config)
    saved = {**asked, **payload["member"]}  # fields added since it was saved count as unchanged
    if saved != asked:
        diff = {k: (v, asked.get(k)) for k, v in saved.items() if asked.get(k) != v}
        raise TimecatError(
            f"member {config.name} already exists at {ckpt} with another config (saved vs asked: {diff}); "
            "choose another --name or delete that folder"
        )
    return payload if payload.get("complete") else None


def pretrain(config: PretrainConfig, data_root: Path, runs_root: Path) -> dict:
    """Train one member to its step budget; a finished identical member is kept, not retrained."""
    from pipeline.loaders import eval_loader, to_model_input, train_loader

    ckpt = checkpoint_path(runs_root, config.name)
    done = _existing(ckpt, config)
    if done is not None:
        log.info("member %s is already trained (%d steps): %s", config.name, done["step"], ckpt)
        return {"name": config.name, "checkpoint": str(ckpt), "skipped": True, **done["final"]}
    train_manifest = read_manifest(data_root, config.dataset, "train")
    pre = make_preprocess(config, train_manifest)
    if config.batch_size > train_manifest["rows"]:
        raise TimecatError(f"batch size {config.batch_size} exceeds the {train_manifest['rows']} training images")
    out = run_dir(runs_root, config.name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(
        json.dumps({"config": asdict(config), "preprocess": pre.to_dict(), "timecat_version": __version__}, indent=1)
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(config.seed)
    model = build(config.arch, len(train_manifest["classes"]), config.width)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config.steps, config.warmup))
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    loader = train_loader(
        beton_path(data_root, config.dataset, "train"), pre, config.batch_size, config.seed, config.num_workers
    )
    step, epoch, started = 0, 0, time.perf_counter()
    window_start, window_loss, window_steps = started, 0.0, 0
    with open(out / "log.jsonl", "w") as metrics, progress(total=config.steps, desc=config.name, unit="step") as bar:
        model.train()
        while step < config.steps:
            for images, labels in loader:
                images, labels = to_model_input(images, labels, device)
                result = train_one_step(model, images, labels, criterion, optimizer, scheduler)
                step += 1
                window_loss += result["loss"]
                window_steps += 1
                bar.update(1)
                if step % config.log_every == 0 or step == config.steps:
                    now = time.perf_counter()
                    record = {
                        "step": step,
                        "epoch": epoch,
                        "loss": window_loss / window_steps,  # mean over the steps since the last record
                        "lr": result["lr"],
                        "images_per_s": window_steps * config.batch_size / (now - window_start),
                        "elapsed_s": now - started,
                    }
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    bar.set_postfix(loss=f"{record['loss']:.3f}")
                    window_start, window_loss, window_steps = now, 0.0, 0
                if step == config.steps:
                    break
            epoch += 1
        train_seconds = time.perf_counter() - started
        test = evaluate(
            model,
            eval_loader(beton_path(data_root, config.dataset, "test"), pre, 512, config.num_workers),
            device,
        )
        final = {
            "event": "end",
            "step": step,
            "train_seconds": train_seconds,
            "images_per_s": step * config.batch_size / train_seconds,
            "test_top1": test["top1"],
            "test_loss": test["loss"],
        }
        metrics.write(json.dumps(final) + "\n")
    checkpoints.save(
        ckpt,
        {
            "model": {k: v.cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "member": asdict(config),
            "step": step,
            "complete": True,
            "num_classes": len(train_manifest["classes"]),
            "preprocess": pre.to_dict(),
            "dataset_fingerprint": train_manifest["fingerprint"],
            "timecat_version": __version__,
            "final": final,
        },
    )
    log.info("%s: %d steps in %.0f s, test top-1 %.2f%%", config.name, step, train_seconds, test["top1"])
    return {"name": config.name, "checkpoint": str(ckpt), "skipped": False, **final}
