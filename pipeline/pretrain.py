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

OPTIMIZERS = ("sgd", "schedulefree")
SCHEDULES = ("cosine", "step")
BN_BATCHES = 50  # batches of the train split used to re-estimate BatchNorm statistics


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
    optimizer: str = "sgd"  # sgd | schedulefree (schedule-free AdamW, as the paper's members)
    schedule: str = "cosine"  # sgd: cosine to 0, or step (x0.1 at 1/3 and 2/3 of the steps)
    lr: float = 0.2  # peak learning rate after linear warmup (schedule-free AdamW wants about 1e-3 to 5e-3)
    warmup: float = 0.05  # fraction of steps spent warming up
    momentum: float = 0.9  # Nesterov
    weight_decay: float = 5e-4  # on conv and linear weights only, not BatchNorm or biases
    label_smoothing: float = 0.1
    resolution: int | None = None  # px input side; None takes the dataset's default
    num_workers: int = 2  # FFCV loader threads
    log_every: int = 50  # steps between log records
    eval_every: int = 0  # steps between test-set evaluations logged during training; 0: only at the end

    def __post_init__(self):
        check_name("member", self.name)  # it becomes a folder and a cache path
        if self.arch not in ARCHS:
            raise TimecatError(f"unknown architecture {self.arch!r}; choose one of {sorted(ARCHS)}")
        if self.eval_every < 0:
            raise TimecatError(f"eval_every must be 0 (only at the end) or more, got {self.eval_every}")
        for field in ("steps", "batch_size", "log_every", "num_workers"):
            if getattr(self, field) < 1:
                raise TimecatError(f"{field} must be at least 1, got {getattr(self, field)}")
        if not 0 <= self.warmup < 1:
            raise TimecatError(f"warmup is a fraction of steps in [0, 1), got {self.warmup}")
        if self.optimizer not in OPTIMIZERS:
            raise TimecatError(f"unknown optimizer {self.optimizer!r}; choose one of {list(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise TimecatError(f"unknown schedule {self.schedule!r}; choose one of {list(SCHEDULES)}")
        if self.optimizer == "schedulefree" and self.lr > 0.05:
            raise TimecatError(f"lr {self.lr} is an SGD rate; schedule-free AdamW wants about 1e-3 to 5e-3: pass --lr")


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
    """SGD with Nesterov momentum, or schedule-free AdamW; no weight decay on BatchNorm parameters or biases."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "schedulefree":
        import schedulefree

        warmup = round(config.warmup * config.steps)
        return schedulefree.AdamWScheduleFree(groups, lr=config.lr, warmup_steps=warmup)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)


def make_scheduler(optimizer: torch.optim.Optimizer, config: PretrainConfig):
    """The SGD learning-rate schedule; schedule-free AdamW has none (its warmup is built in)."""
    if config.optimizer == "schedulefree":
        return None
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config.steps, config.warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: step_factor(s, config.steps, config.warmup))


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup, then cosine decay to 0."""
    warm = max(1, round(warmup * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def step_factor(step: int, total: int, warmup: float) -> float:
    """Linear warmup, then x0.1 at one and two thirds of the steps."""
    warm = max(1, round(warmup * total))
    if step < warm:
        return (step + 1) / warm
    return 0.1 ** sum(step >= total * k / 3 for k in (1, 2))


@torch.no_grad()
def reestimate_bn(model: nn.Module, loader, device: torch.device, batches: int = BN_BATCHES) -> int:
    """Recompute every BatchNorm's running statistics for the current weights; return the rows used.

    Schedule-free AdamW evaluates an average of the iterates, not the weights the
    running statistics were collected with, so they must be re-estimated before
    every evaluation and checkpoint (REFERENCE.md). A cumulative average
    (momentum None) over ``batches`` batches, in train mode, gradients off.
    """
    from pipeline.loaders import to_model_input

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    rows = 0
    for i, (images, labels) in enumerate(loader):
        if i == batches:
            break
        images, _ = to_model_input(images, labels, device)
        model(images)
        rows += len(images)
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    model.eval()
    return rows


def train_one_step(model, images, labels, criterion, optimizer, scheduler) -> dict:
    """One SGD step; returns the batch loss and the lr it used."""
    lr = optimizer.param_groups[0]["lr"]
    loss = criterion(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
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


def evaluate_member(model, optimizer, config: PretrainConfig, data_root: Path, pre, device) -> tuple[dict, dict]:
    """Test-set metrics of the weights that would be saved now, and extra fields for schedule-free AdamW.

    Schedule-free evaluates its averaged weights, whose BatchNorm statistics are
    re-estimated first; the top-1 with the stale ones is reported beside it.
    """
    from pipeline.loaders import eval_loader

    test_loader = eval_loader(beton_path(data_root, config.dataset, "test"), pre, 512, config.num_workers)
    extra = {}
    if config.optimizer == "schedulefree":
        optimizer.eval()  # the averaged weights, which are the ones evaluated and saved
        extra["test_top1_stale_bn"] = evaluate(model, test_loader, device)["top1"]
        # Deterministic batches (no augmentation), so the saved statistics can be recomputed exactly.
        bn_loader = eval_loader(beton_path(data_root, config.dataset, "train"), pre, 256, config.num_workers)
        extra["bn_reestimated_rows"] = reestimate_bn(model, bn_loader, device)
    return evaluate(model, test_loader, device), extra


def _back_to_training(model: nn.Module, optimizer, config: PretrainConfig) -> None:
    model.train()
    if config.optimizer == "schedulefree":
        optimizer.train()  # schedule-free keeps two weight sets: train mode steps the gradient point


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
    from pipeline.loaders import to_model_input, train_loader

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
    scheduler = make_scheduler(optimizer, config)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    loader = train_loader(
        beton_path(data_root, config.dataset, "train"), pre, config.batch_size, config.seed, config.num_workers
    )
    step, epoch, started = 0, 0, time.perf_counter()
    window_start, window_loss, window_steps = started, 0.0, 0
    with open(out / "log.jsonl", "w") as metrics, progress(total=config.steps, desc=config.name, unit="step") as bar:
        _back_to_training(model, optimizer, config)
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
                if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                    test, extra = evaluate_member(model, optimizer, config, data_root, pre, device)
                    record = {"event": "eval", "step": step, "test_top1": test["top1"], "test_loss": test["loss"]}
                    metrics.write(json.dumps({**record, **extra}) + "\n")
                    _back_to_training(model, optimizer, config)
                if step == config.steps:
                    break
            epoch += 1
        train_seconds = time.perf_counter() - started
        test, extra = evaluate_member(model, optimizer, config, data_root, pre, device)
        final = {
            "event": "end",
            "step": step,
            "train_seconds": train_seconds,
            "images_per_s": step * config.batch_size / train_seconds,
            "test_top1": test["top1"],
            "test_loss": test["loss"],
            **extra,
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
