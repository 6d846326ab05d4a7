"""Stage 2: train one member (a seed and a step budget) and save its checkpoint.

<runs>/<name>/checkpoint.pt   model, optimizer, member config, preprocessing (pipeline.members.checkpoints)
<runs>/<name>/config.json     the resolved config and the tool version
<runs>/<name>/log.jsonl       one record per logged step, evaluations, then a final one
<runs>/<name>/.lock           held while a process trains the member (timecat status: running)

One process, or many under torchrun (DDP: NCCL on GPU, gloo on CPU). The batch
size is the global batch; each of W ranks takes batch / W rows of every step, the
same rows a single process would take (pipeline.data.seeded), so W only changes speed
and BatchNorm's per-rank statistics. A resumable checkpoint is written every
``checkpoint_every`` steps; a killed run started again continues from it and, on
CPU, ends with the same weights bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from pipeline import __version__
from pipeline.configs import OPERATIONAL, PretrainConfig
from pipeline.core import distributed, files, preemption
from pipeline.core.errors import TimecatError
from pipeline.core.progress import get_logger, plural, progress
from pipeline.data.datasets import get_spec
from pipeline.data.splits import Preprocess, beton_path, read_manifest
from pipeline.members import checkpoints, torch_io
from pipeline.members.checkpoints import checkpoint_path, run_dir
from pipeline.members.hub import check_sides, is_hub_arch
from pipeline.members.models import Classifier, build

log = get_logger(__name__)

BN_BATCHES = 50  # batches of the train split used to re-estimate BatchNorm statistics


def recipe(config: PretrainConfig) -> dict:
    """The fields that define the member (everything but OPERATIONAL)."""
    return {f.name: getattr(config, f.name) for f in fields(config) if f.name not in OPERATIONAL}


def make_preprocess(config: PretrainConfig, manifest: dict):
    """Input preprocessing for this member: dataset defaults, the train split's pixel statistics."""

    spec = get_spec(manifest["kind"])
    return Preprocess(
        resolution=config.resolution or spec.resolution,
        mean=tuple(manifest["mean"]),
        std=tuple(manifest["std"]),
        crop_scale=spec.crop_scale,
        crop_ratio=spec.crop_ratio,
    )


RESOLUTION_STEP = 32  # progressive resizing grows in steps of a ResNet's total stride, as FFCV's recipe does


def resolution_at(step: int, config: PretrainConfig, final: int) -> int:
    """Input side for the epoch that starts at ``step``: FFCV's progressive resizing, by fraction of the budget.

    ``config.min_resolution`` until ``ramp[0]`` of the steps, then linear growth
    in steps of RESOLUTION_STEP px up to ``final`` at ``ramp[1]``. A function of
    the step alone, so resumed and multi-process runs agree.
    """
    low = config.min_resolution
    if low is None:
        return final
    start, end, done = *config.ramp, step / config.steps
    if done <= start:
        return low
    if done >= end:
        return final
    grown = (final - low) * (done - start) / (end - start)
    return min(final, low + round(grown / RESOLUTION_STEP) * RESOLUTION_STEP)


def make_optimizer(model: nn.Module, config: PretrainConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum, or schedule-free AdamW; no weight decay on normalisation parameters or
    biases, nor on what a timm model lists in ``no_weight_decay()`` (a ViT's position embedding, class token)."""
    net = getattr(model.backbone, "net", None) if isinstance(model, Classifier) else None
    exempt = {f"backbone.net.{n}" for n in net.no_weight_decay()} if hasattr(net, "no_weight_decay") else set()
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.ndim > 1 and n not in exempt]
    no_decay = [p for n, p in named if p.ndim <= 1 or n in exempt]
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
    every evaluation and checkpoint (the schedulefree package's BatchNorm caveat;
    without it, AlgoPerf's ResNet-50 runs plateaued near 65% top-1). A cumulative average
    (momentum None) over ``batches`` batches, in train mode, gradients off.
    """
    from pipeline.data.loaders import one_epoch, to_model_input

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    rows = 0
    with one_epoch(loader) as epoch:
        for i, (images, labels) in enumerate(epoch):
            if i == batches:
                break
            images, _ = to_model_input(images, labels, device)
            model(images)
            rows += len(images)
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    model.eval()
    return rows


def autocast(device: torch.device):
    """bf16 autocast on GPU (weights and optimizer state stay float32); off on CPU, where bf16 is slower."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_one_step(model, images, labels, criterion, optimizer, scheduler) -> dict:
    """One optimizer step; returns the batch loss (a 0-d tensor: read at log time, no GPU sync) and the lr used."""
    lr = optimizer.param_groups[0]["lr"]
    with autocast(images.device):
        loss = criterion(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return {"loss": loss.detach(), "lr": lr}


@torch.no_grad()
def evaluate(model: Classifier, loader, device: torch.device) -> dict:
    """Top-1 accuracy (%) and mean loss over a whole loader, model in eval mode."""
    from pipeline.data.loaders import to_model_input

    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for images, labels in loader:
        images, labels = to_model_input(images, labels, device)
        with autocast(device):
            logits = model(images).float()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        total += len(labels)
    return {"top1": 100.0 * correct / total, "loss": loss_sum / total, "rows": total}


@dataclass
class Run:
    """The live objects of one member's training (state, not configuration)."""

    config: PretrainConfig
    d: distributed.Dist
    data_root: Path
    manifest: dict  # the train split's manifest
    pre: Preprocess
    model: Classifier  # the plain model: evaluated and saved
    net: nn.Module  # what trains: the model, wrapped in DDP and/or torch.compile
    optimizer: torch.optim.Optimizer
    scheduler: object  # a LambdaLR, or None for schedule-free
    criterion: nn.Module
    loader: object  # this rank's FFCV train loader
    order: object  # its pipeline.data.seeded.StepOrder
    threads: int = 1  # torch CPU threads
    saved_step: int | None = None  # the step of the resumable checkpoint on disk, if any
    _eval_loaders: dict | None = None

    def eval_loader(self, split: str):
        """Deterministic batches of a split (built once: each FFCV loader costs a compile)."""
        from pipeline.data.loaders import eval_loader

        if self._eval_loaders is None:
            self._eval_loaders = {}
        if split not in self._eval_loaders:
            beton = beton_path(self.data_root, self.config.dataset, split)
            self._eval_loaders[split] = eval_loader(beton, self.pre, 256, self.config.num_workers)
        return self._eval_loaders[split]


def check_splits(data_root: Path, dataset: str, manifest: dict) -> None:
    """Refuse, before training, a train or test .beton that disagrees with its manifest (rows, labels
    within the classes): a bad test label would otherwise fail only at the final evaluation."""
    from pipeline.data.loaders import read_labels

    test = read_manifest(data_root, dataset, "test")
    if test["classes"] != manifest["classes"]:
        raise TimecatError(
            f"{dataset}: the test split's classes differ from the train split's; run `timecat prepare` again"
        )
    for split, split_manifest in (("train", manifest), ("test", test)):
        read_labels(beton_path(data_root, dataset, split), split_manifest)


def sides_used(config: PretrainConfig, final: int) -> list[int]:
    """Every input side the run trains or evaluates at (progressive resizing's, then the final one)."""
    stride = max(1, config.steps // 1000)  # a side lasts at least an epoch of a ramp: sampling cannot miss one
    return sorted({final, *(resolution_at(step, config, final) for step in range(0, config.steps, stride))})


def check_arch(config: PretrainConfig, manifest: dict) -> None:
    """A timm or torchvision architecture, built once and fed each side the run uses, before the member's
    folder exists: an unknown name or a side it cannot take (a ViT's patch grid) is one error, nothing written."""
    if not is_hub_arch(config.arch):
        return
    pre = make_preprocess(config, manifest)
    try:
        model = build(config.arch, len(manifest["classes"]), config.width, img_size=pre.resolution)
    except TimecatError:
        raise
    except Exception as e:  # a constructor's own check (a side its patches do not tile): one line
        raise TimecatError(
            f"architecture {config.arch} cannot be built for {pre.resolution} px inputs ({type(e).__name__}: "
            f"{str(e)[:200]}); pass a --resolution it takes"
        ) from None
    check_sides(model.backbone, config.arch, sides_used(config, pre.resolution))


def build_run(config: PretrainConfig, data_root: Path, d: distributed.Dist) -> Run:
    """Model (seeded), optimizer, schedule and this rank's loader for ``config``."""
    from pipeline.data.loaders import train_loader

    manifest = read_manifest(data_root, config.dataset, "train")
    pre = make_preprocess(config, manifest)
    if config.batch_size > manifest["rows"]:
        raise TimecatError(f"batch size {config.batch_size} exceeds the {manifest['rows']} training images")
    if config.min_resolution is not None and config.min_resolution >= pre.resolution:
        raise TimecatError(
            f"--min-resolution {config.min_resolution} must be below the training resolution {pre.resolution}; "
            "pass a larger --resolution or a smaller --min-resolution"
        )
    threads = distributed.use_threads(config.threads)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = build(config.arch, len(manifest["classes"]), config.width, img_size=pre.resolution)
    model = model.to(d.device, memory_format=torch.channels_last)
    net = model
    if d.world_size > 1:
        device_ids = [d.device.index] if d.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if config.compile:
        net = torch.compile(net)
    optimizer = make_optimizer(model, config)
    if config.optimizer == "schedulefree":
        optimizer.train()  # it starts in eval mode; train mode steps the gradient point
    beton = beton_path(data_root, config.dataset, "train")
    loader, order = train_loader(beton, pre, config.batch_size, config.seed, config.num_workers, d.rank, d.world_size)
    return Run(
        config,
        d,
        Path(data_root),
        manifest,
        pre,
        model,
        net,
        optimizer,
        make_scheduler(optimizer, config),
        nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
        loader,
        order,
        threads,
    )


def model_size(model: Classifier) -> dict:
    """The member's feature width and backbone parameter count, as its checkpoint and config.json record them."""
    return {"feature_dim": model.feature_dim, "backbone_params": sum(p.numel() for p in model.backbone.parameters())}


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def weights_to_save(run: Run, test: bool) -> tuple[dict, dict]:
    """The weights a checkpoint saves now (a CPU state dict) and, if ``test``, their test metrics.

    SGD evaluates its weights as they are. Schedule-free evaluates its averaged
    weights after re-estimating BatchNorm statistics for them (see reestimate_bn), and
    reports the stale-statistics top-1 beside it; the training iterate and its
    BatchNorm buffers are then put back bit for bit, because ``optimizer.train()``
    recomputes the iterate by interpolation, which is not exact.
    """
    model, device = run.model, run.d.device
    schedule_free = run.config.optimizer == "schedulefree"
    metrics = {}
    snapshot = _cpu_state(model) if schedule_free else None
    model.eval()
    if schedule_free:
        run.optimizer.eval()  # the averaged weights, which are the ones evaluated and saved
        if test:
            metrics["test_top1_stale_bn"] = evaluate(model, run.eval_loader("test"), device)["top1"]
        # Deterministic batches (no augmentation), so the saved statistics can be recomputed exactly.
        metrics["bn_reestimated_rows"] = reestimate_bn(model, run.eval_loader("train"), device)
    if test:
        result = evaluate(model, run.eval_loader("test"), device)
        metrics.update(test_top1=result["top1"], test_loss=result["loss"])
    state = _cpu_state(model)
    if schedule_free:
        run.optimizer.train()
        model.load_state_dict(snapshot)
    model.train()
    return state, metrics


def checkpoint_payload(run: Run, step: int, weights: dict, final: dict | None) -> dict:
    """One dict with everything needed to use the member (``weights``) or to resume it at ``step``."""
    schedule_free = run.config.optimizer == "schedulefree"
    return {
        "model": weights,  # the evaluation weights: what extract and export read
        # Schedule-free trains another weight set than it evaluates; resuming needs that one.
        "train_model": _cpu_state(run.model) if schedule_free and final is None else None,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
        "rng": {"torch": torch.get_rng_state()},  # batches are seeded separately (pipeline.data.seeded)
        "member": asdict(run.config),  # seed, arch, optimizer, steps (the planned budget), recipe
        "step": step,
        "planned_steps": run.config.steps,
        "complete": final is not None,
        "num_classes": len(run.manifest["classes"]),
        **model_size(run.model),
        "preprocess": run.pre.to_dict(),
        "dataset_fingerprint": run.manifest["fingerprint"],
        "world_size": run.d.world_size,
        "threads": run.threads,  # torch CPU threads this member trained with
        "timecat_version": __version__,
        "final": final,
    }


def restore(run: Run, payload: dict) -> int:
    """Load a resumable checkpoint into ``run``; returns the step it resumes from."""
    if payload["dataset_fingerprint"] != run.manifest["fingerprint"]:
        raise TimecatError(
            f"member {run.config.name} was started on another version of {run.config.dataset} "
            f"(fingerprint {payload['dataset_fingerprint']} vs now {run.manifest['fingerprint']}); "
            "restore that data, or delete the member's folder to start over"
        )
    saved_threads = payload.get("threads")
    if run.d.device.type == "cpu" and saved_threads not in (None, run.threads):
        raise TimecatError(
            f"member {run.config.name} was trained on {saved_threads} CPU thread(s) up to step {payload['step']}, "
            f"and this run would use {run.threads}: on a CPU the weights depend on it. Pass --threads "
            f"{saved_threads} to resume it bit for bit"
        )
    weights = payload["train_model"] if payload.get("train_model") is not None else payload["model"]
    torch_io.load_state_strict(run.model, weights, f"checkpoint of {run.config.name}")
    run.optimizer.load_state_dict(payload["optimizer"])
    if run.scheduler is not None:
        run.scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["rng"]["torch"])
    return payload["step"]


def json_line(record: dict) -> str:
    """One JSON line; a non-finite number is written as null, never as the bare NaN or Infinity
    that Python's json writes by default and no JSON reader accepts."""
    return json.dumps(files.json_safe(record), allow_nan=False) + "\n"


@contextlib.contextmanager
def metrics_log(path: Path, active: bool, resume_step: int | None, tensorboard: Path | None = None):
    """A function that appends one JSON record to log.jsonl (rank 0; a no-op elsewhere).

    On resume, records past the checkpoint are dropped: those steps are trained again.
    The log is never emptied by a run that fails to start: everything that can refuse
    (the TensorBoard writer) is set up first, and the kept records are written to a new
    file renamed into place. A line torn by a crash is dropped. ``tensorboard``: also
    write every number of every record there as a scalar (``train/loss``,
    ``eval/test_top1``, ...) at the record's step.
    """
    if not active:
        yield lambda record: None
        return
    with _tensorboard(tensorboard) as board:
        kept = []
        if resume_step is not None and path.is_file():
            lines, torn = files.read_jsonl(path)
            if torn:
                log.warning("%s: dropped %d torn line(s) %s", path, len(torn), torn[:5])
            kept = [record for _, record in lines if record.get("step", 0) <= resume_step]
        files.write_text(path, "".join(json_line(record) for record in kept))
        with files.open_append(path) as fd:

            def write(record: dict) -> None:
                # One write() per record: readable while training runs (timecat status, tail -f).
                files.append_all_or_nothing(fd, json_line(record).encode(), f"the log {path}")
                if board is not None:
                    group = record.get("event", "train")
                    for key, value in record.items():
                        if isinstance(value, int | float) and key != "step":
                            board.add_scalar(f"{group}/{key}", value, record["step"])

            yield write


@contextlib.contextmanager
def _tensorboard(folder: Path | None):
    if folder is None:
        yield None
        return
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TimecatError(
            "--tensorboard needs the tensorboard package: pip install -e '.[tensorboard]' (or pip install tensorboard)"
        ) from None
    board = SummaryWriter(str(folder))
    try:
        yield board
    finally:
        board.close()


def _mean_over_ranks(value: torch.Tensor, d: distributed.Dist) -> float:
    if d.world_size > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= d.world_size
    return value.item()


def train(run: Run, start: int, ckpt: Path, write, bar) -> None:
    """Steps ``start`` to the budget: log, evaluate and checkpoint at their intervals."""
    from pipeline.data.loaders import one_epoch, set_train_resolution, to_model_input

    config, d = run.config, run.d
    epoch, offset = divmod(start, run.order.steps_per_epoch)
    run.loader.next_epoch = epoch  # the loader's epoch counter, which seeds its order and crops
    run.order.resume_at(epoch, offset)
    step, window_start, window_loss, window_steps = start, time.perf_counter(), 0.0, 0
    window = []  # the window's 0-d losses, kept to name the first non-finite one
    run.model.train()
    while step < config.steps:
        resolution = resolution_at(run.loader.next_epoch * run.order.steps_per_epoch, config, run.pre.resolution)
        set_train_resolution(run.loader, resolution)
        with one_epoch(run.loader) as batches:
            for images, labels in batches:
                images, labels = to_model_input(images, labels, d.device)
                result = train_one_step(run.net, images, labels, run.criterion, run.optimizer, run.scheduler)
                step, window_loss, window_steps = step + 1, window_loss + result["loss"], window_steps + 1
                window.append(result["loss"])
                bar.update(1)
                if step % config.log_every == 0 or step == config.steps:
                    now = time.perf_counter()
                    loss = checked_loss(run, window_loss / window_steps, window, step)  # the window's and ranks' mean
                    write(
                        {
                            "step": step,
                            "epoch": (step - 1) // run.order.steps_per_epoch,
                            "loss": loss,
                            "lr": result["lr"],
                            "resolution": resolution,
                            "images_per_s": window_steps * config.batch_size / (now - window_start),
                        }
                    )
                    bar.set_postfix(loss=f"{loss:.3f}")
                    window_start, window_loss, window_steps, window = now, 0.0, 0, []
                if preemption.requested():  # a job's signal (pipeline.jobs): save first, nothing else
                    _periodic(run, step, ckpt, write, window_loss / max(1, window_steps), window, preempted=True)
                    log.warning("%s: checkpoint at step %d on the job's preemption signal", config.name, step)
                    preemption.handle(d.rank)  # submitit requeues the job, which resumes at this step
                if step < config.steps:
                    _periodic(run, step, ckpt, write, window_loss / max(1, window_steps), window)
                if step == config.steps:
                    break


def checked_loss(run: Run, mean: torch.Tensor, window: list[torch.Tensor], step: int) -> float:
    """The window's mean loss over the ranks, or a Diverged error at its first non-finite loss.

    Read where the log reads it anyway: the loss only becomes a number here (one GPU sync per
    logged step, as before), and every rank sees the same mean, so all stop together.
    """
    loss = _mean_over_ranks(mean, run.d)
    if math.isfinite(loss):
        return loss
    losses = torch.stack(window).float().cpu()  # only once, on the way out
    bad = torch.nonzero(~torch.isfinite(losses)).flatten()
    first, value = (step - len(window) + 1 + int(bad[0]), losses[bad[0]].item()) if len(bad) else (step, loss)
    raise diverged(run, first, f"the training loss was {value}")


def diverged(run: Run, step: int, what: str) -> TimecatError:
    """Training that left finite numbers: nothing after it is saved, the member is never marked complete."""
    config = run.config
    if run.saved_step is None:
        kept = "no checkpoint was saved"
    else:
        kept = f"its checkpoint at step {run.saved_step} is kept, not marked complete"
    return TimecatError(
        f"member {config.name} diverged: {what} at step {step} (--lr {config.lr:g}); training stopped and "
        f"{kept}. Train it with a lower --lr (e.g. {config.lr / 10:g}) under another --name, or delete the "
        "member's folder first"
    )


def check_weights(run: Run, step: int) -> None:
    """Refuse to evaluate or save non-finite weights (one GPU sync, only when a checkpoint or evaluation is due).

    Each rank checks its own copy (DDP keeps them equal), so all ranks stop together.
    """
    state = run.model.state_dict().values()
    finite = torch.stack([torch.isfinite(t).all() for t in state if t.is_floating_point()]).all()
    if not bool(finite):
        raise diverged(run, step, "the weights or BatchNorm statistics became non-finite")


def _periodic(run: Run, step: int, ckpt: Path, write, mean: torch.Tensor, window: list, preempted=False) -> None:
    """Test evaluation and resumable checkpoint when their intervals come round (rank 0 works, all wait);
    ``preempted``: the checkpoint alone, now.

    The losses since the last log record and the weights are checked first, so a diverged member
    never overwrites its last good checkpoint.
    """
    config, d = run.config, run.d
    evaluate_now = not preempted and config.eval_every and step % config.eval_every == 0
    save_now = preempted or (config.checkpoint_every and step % config.checkpoint_every == 0)
    if not (evaluate_now or save_now):
        return
    if window:
        checked_loss(run, mean, window, step)
    check_weights(run, step)
    if d.is_main:
        weights, metrics = weights_to_save(run, test=bool(evaluate_now))
        if evaluate_now:
            write({"event": "eval", "step": step, **metrics})
        if save_now:
            checkpoints.save(ckpt, checkpoint_payload(run, step, weights, final=None))
        if preempted:
            write({"event": "preempted", "step": step})
    if save_now:
        run.saved_step = step
    d.barrier()


def _claim(config: PretrainConfig, runs_root: Path, stack: contextlib.ExitStack) -> dict | None:
    """Lock the member for this job (rank 0) and read its checkpoint, if any (another member's is refused)."""
    stack.enter_context(checkpoints.hold_run(runs_root, config.name))
    return checkpoints.existing(runs_root, config.name, recipe(config))


def pretrain(config: PretrainConfig, data_root: Path, runs_root: Path, d: distributed.Dist | None = None) -> dict:
    """Train one member to its step budget, resuming from its checkpoint; a finished member is not retrained.

    ``d``: this process's place in a torchrun job (default: a single process).
    """
    d = d or distributed.init()
    ckpt = checkpoint_path(runs_root, config.name)
    log.info(
        "pretrain %s: %s on %s, seed %d, %s",
        config.name,
        config.arch,
        config.dataset,
        config.seed,
        plural(config.steps, "step"),
    )
    # An unprepared dataset, or a .beton that disagrees with its manifest, is refused before the lock is made.
    manifest = read_manifest(data_root, config.dataset, "train")
    check_splits(data_root, config.dataset, manifest)
    check_arch(config, manifest)
    with contextlib.ExitStack() as stack:
        claimed = None
        if d.is_main:
            try:
                claimed = ("ok", _claim(config, runs_root, stack))
            except TimecatError as e:
                claimed = ("error", str(e))
        status, payload = d.broadcast(claimed)  # every rank resumes from rank 0's reading
        if status == "error":
            raise TimecatError(payload)
        if payload is not None and payload["complete"]:
            log.info("member %s is already trained (%s): %s", config.name, plural(payload["step"], "step"), ckpt)
            return {"name": config.name, "checkpoint": str(ckpt), "skipped": True, **payload["final"]}
        return _train_member(config, data_root, runs_root, d, payload)


def _train_member(config, data_root: Path, runs_root: Path, d: distributed.Dist, payload: dict | None) -> dict:
    run = build_run(config, data_root, d)
    start = restore(run, payload) if payload is not None else 0
    run.saved_step = start or None
    out, ckpt = run_dir(runs_root, config.name), checkpoint_path(runs_root, config.name)
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        resolved = {
            "config": asdict(config),
            "preprocess": run.pre.to_dict(),
            **model_size(run.model),
            "world_size": d.world_size,
            "threads": run.threads,
        }
        config_text = json.dumps({**resolved, "timecat_version": __version__}, indent=1, allow_nan=False)
        files.write_text(out / "config.json", config_text)
    started = time.perf_counter()
    board = out / "tensorboard" if config.tensorboard else None
    with metrics_log(out / "log.jsonl", d.is_main, start if payload is not None else None, board) as write:
        if start:
            log.info("%s: resuming from its checkpoint at step %d of %d", config.name, start, config.steps)
            write({"event": "resume", "step": start, "world_size": d.world_size})
        with progress(total=config.steps, initial=start, desc=config.name, unit="step") as bar:
            train(run, start, ckpt, write, bar)
        preemption.release()  # the final stage runs as any job's: a signal now requeues from the last checkpoint
        train_seconds = time.perf_counter() - started
        check_weights(run, config.steps)  # the last steps' losses were checked by their log record
        final = None
        if d.is_main:
            weights, metrics = weights_to_save(run, test=True)
            final = {
                "event": "end",
                "step": config.steps,
                "train_seconds": train_seconds,
                "resumed_from": start,
                "images_per_s": (config.steps - start) * config.batch_size / train_seconds,
                **metrics,
            }
            write(final)
            checkpoints.save(ckpt, checkpoint_payload(run, config.steps, weights, final))
            # DEBUG: the command prints this result itself; a second copy in the log would repeat it.
            log.debug("%s: %d steps, test top-1 %.2f%%", config.name, config.steps, final["test_top1"])
    final = d.broadcast(final)
    return {"name": config.name, "checkpoint": str(ckpt), "skipped": False, **final}


def pretrain_all(configs: list[PretrainConfig], data_root: Path, runs_root: Path) -> list[dict]:
    """Train members one after another in this process or torchrun job."""
    d = distributed.init()
    try:
        return [pretrain(config, data_root, runs_root, d) for config in configs]
    finally:
        distributed.shutdown(d)
