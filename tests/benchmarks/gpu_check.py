"""GPU readiness in one command (`make gpu-check`): gpu tests, probe, extraction and training speed, one JSON.

On one H100 or H200 it is meant to finish in under 8 minutes:

1. every `gpu`-marked test (pytest -m gpu);
2. the batched probe (C search and refit, every fit to its gap: bf16 products
   with float32 outputs, then a float32 phase) on generated features of
   ImageNet's shape (Cat4 of 2,048-d members: 1.28M x 8,192, 1,000 classes) and
   iNat18's (437k x 10,240, 8,142 classes): wall time, evaluations per
   precision phase, estimated gaps (target: the ImageNet-shaped Cat4 probe in
   under 5 minutes on one H100); and one fit of the one-C-at-a-time torch and
   cuML backends (cuML when the gpu extra is installed) on a stated slice;
3. extraction images/s of ResNet-50 at 224 px (bf16 autocast, channels_last):
   on batches already on the device, and fed by the real FFCV eval loader from
   generated ImageNet-size JPEGs;
4. training images/s of ResNet-50 at 160 and 224 px (bf16 autocast,
   channels_last, SGD), on batches already on the device.

Each part records its figures or its error, so one failure never hides the
rest. Features are synthetic (Gaussian classes): their top-1 says the probe
learnt, not what a real member would score. A run's figures go to
tests/benchmarks/last_run_gpu_check.json (not committed); once measured they
are recorded in this docstring, as the other benchmarks record theirs, and the
README quotes them. None are recorded yet. ``--smoke`` runs every part at toy
sizes on the CPU, so CI keeps this script working on machines without a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a script: the package is the repository


@dataclass(frozen=True)
class Shapes:
    """Sizes of every part; FULL on a GPU, SMOKE on a CPU."""

    imagenet: tuple[int, int, int, int]  # train rows, eval rows, member dim, classes (4 members)
    inat: tuple[int, int, int, int]
    backend_rows: int  # rows of the one-fit backend slice (ImageNet's shape otherwise)
    arch: str
    resolution: int
    batch: int
    steps: int  # timed steps or batches per measurement (after `warmup`)
    warmup: int
    jpegs: int  # generated JPEGs for the FFCV extraction
    train_resolutions: tuple[int, ...]


FULL = Shapes(
    (1_281_167, 50_000, 2048, 1000),
    (437_513, 24_426, 2560, 8142),
    262_144,
    "resnet50",
    224,
    256,
    40,
    10,
    4096,
    (160, 224),
)
SMOKE = Shapes((3000, 500, 16, 10), (2000, 400, 16, 40), 1000, "small-resnet", 32, 32, 3, 1, 64, (24, 32))


def gpu_tests(smoke: bool) -> dict:
    """pytest -m gpu; on the smoke run, one file's gpu tests only collected (they skip without a GPU)."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(REPO / "tests")]
    if smoke:  # one file that has gpu tests, collected only: the command works, in seconds
        command[-1] = str(REPO / "tests" / "test_logreg_backends.py")
        command.append("--collect-only")
    started = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        return {"error": "pytest -m gpu ran past 240 s", "wall_s": round(time.perf_counter() - started, 1)}
    tail = result.stdout.strip().splitlines()[-1:] or [""]
    return {"returncode": result.returncode, "summary": tail[0], "wall_s": round(time.perf_counter() - started, 1)}


def synthetic_blocks(rows: int, dim: int, classes: int, members: int, split: int, where, dtype):
    """Gaussian classes split into member blocks: unit noise around class means, built in row chunks.

    The class means depend on the member only; ``split`` seeds the rows, so a
    train and an eval split share classes but never rows.
    """
    rows_rng = torch.Generator(device=where).manual_seed(1000 + split)
    y = torch.randint(classes, (rows,), generator=rows_rng, device=where)
    blocks = {}
    for j in range(members):
        means = torch.randn(classes, dim, generator=torch.Generator(device=where).manual_seed(j), device=where)
        means *= 1.5 / dim**0.5  # a class mean of norm 1.5 per member, 3 over a Cat4: learnable, not trivial
        out = torch.empty(rows, dim, dtype=dtype, device=where)
        for start in range(0, rows, 65536):
            stop = min(start + 65536, rows)
            noise = torch.randn(stop - start, dim, generator=rows_rng, device=where)
            out[start:stop] = (noise + means[y[start:stop]]).to(dtype)
        blocks[j] = out
    return blocks, y


def probe_shape(name: str, shape: tuple[int, int, int, int], where: torch.device) -> dict:
    """The batched logreg probe (defaults: C search and refit, each fit to its gap) on one synthetic Cat4 problem.

    Reports the wall time, and per fit its evaluations per precision phase and its estimated gap to the
    optimum (a float64 reference at this size would cost more than the probe).
    """
    from pipeline.configs import ProbeConfig
    from pipeline.probe import c_search
    from pipeline.probe.heldout import topk_accuracy

    n_train, n_eval, dim, classes = shape
    # The budget bounds the solver's state and working memory: a quarter of the device, beside the features.
    budget = torch.cuda.get_device_properties(where).total_memory / 2**32 if where.type == "cuda" else 1.0
    config = ProbeConfig(name, ("m0", "m1", "m2", "m3"), memory_gib=budget)
    if where.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(where)  # this part's peak, not the previous part's
    started = time.perf_counter()
    train, y_train = synthetic_blocks(n_train, dim, classes, 4, 0, where, torch.float32)
    evals, y_eval = synthetic_blocks(n_eval, dim, classes, 4, 1, where, torch.float32)
    generated = time.perf_counter() - started
    y_train, y_eval = y_train.cpu().numpy(), y_eval.cpu().numpy()
    _sync(where)
    started = time.perf_counter()
    (fitted,) = c_search.probe_subsets(train, y_train, lambda: (evals, y_eval), [(0, 1, 2, 3)], config, classes)
    measured = fitted.fields
    _sync(where)
    wall = time.perf_counter() - started
    precision, why = measured["precision"], measured["precision_reason"]  # as the probe resolved it

    def fit(end: dict) -> dict:
        phases = {
            p["precision"]: {"iterations": p["iterations"], "evaluations": p["evaluations"]} for p in end["phases"]
        }
        return {"status": end["status"], "gap_estimate": end["gap_estimate"], "phases": phases}

    return {
        "shape": {"train_rows": n_train, "eval_rows": n_eval, "dims": 4 * dim, "classes": classes, "members": 4},
        "precision": precision,
        "precision_reason": why,
        "wall_s": round(wall, 3),
        "generate_s": round(generated, 1),
        "chosen_C": measured["chosen"]["C"],
        "refit": fit(measured["chosen"]["fit"]),
        "search": [{"C": t["C"], **fit(t["fit"])} for t in measured["search"]],
        "evaluations": sum(t["fit"]["evaluations"] for t in [*measured["search"], measured["chosen"]]),
        "preconditioner": measured["solver"]["preconditioner"],
        "top1_synthetic": round(topk_accuracy(fitted.eval_top5, y_eval, 1), 2),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated(where) / 2**30, 1) if where.type == "cuda" else None,
    }


def one_fit_backends(shape: tuple[int, int, int, int], rows: int) -> dict:
    """One fit at C = 1 of the torch (ours, to its gap) and cuML (300 iterations at most) backends on a slice."""
    from pipeline.probe import logreg_backends

    _, _, dim, classes = shape
    X, y = synthetic_blocks(rows, 4 * dim, classes, 1, 2, torch.device("cpu"), torch.float32)
    X, y = X[0].numpy(), y.numpy()
    out = {"shape": {"rows": rows, "dims": 4 * dim, "classes": classes}, "C": 1.0, "max_iter": 300}
    for name in ("torch", "cuml"):
        if name == "cuml" and not torch.cuda.is_available():
            out[name] = {"skipped": "no GPU"}
            continue
        try:
            fitter = logreg_backends.make(name, logreg_backends.FitOptions(classes, precision="auto"))
            started = time.perf_counter()
            end = fitter.fit(X, y, 1.0, 300)
            out[name] = {"wall_s": round(time.perf_counter() - started, 3), "status": end["status"]}
            out[name] |= {k: end[k] for k in ("iterations", "evaluations", "gap_estimate") if k in end}
        except Exception as e:  # cuML absent (no gpu extra) or refusing the shape: say so, go on
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    return out


def forward_rate(model, images: torch.Tensor, s: Shapes, precision: str) -> float:
    """Images/s of the members' penultimate features on batches already on the device."""
    from pipeline.features.extract import extract_batch

    for _ in range(s.warmup):
        extract_batch([model], images, precision)
    _sync(images.device)
    started = time.perf_counter()
    for _ in range(s.steps):
        extract_batch([model], images, precision)
    _sync(images.device)
    return s.steps * len(images) / (time.perf_counter() - started)


def _jpeg(args) -> None:
    path, seed = args
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(300, 501, size=2))
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + c + rng.random() * 6) + np.cos(5 * yy * (c + 1)) for c in range(3)], -1)
    pixels = (base * 60 + 128 + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)


def ffcv_rate(model, s: Shapes, where: torch.device, workdir: Path, precision: str) -> dict:
    """Images/s of extraction fed by the FFCV eval loader: generated ImageNet-size JPEGs, prepared as timecat does."""
    from pipeline.configs import PrepareConfig
    from pipeline.data.loaders import eval_loader, one_epoch, to_model_input
    from pipeline.data.prepare import prepare
    from pipeline.data.splits import Preprocess, beton_path
    from pipeline.features.extract import extract_batch

    root, workers = workdir / "data", max(1, len(_cpus()))
    jobs = [
        (root / "imagenet" / split / f"n{i % 10:08d}" / f"{i}.JPEG", i)
        for split, n in (("train", s.jpegs), ("val", 10))
        for i in range(n)
    ]
    with get_context("spawn").Pool(workers) as pool:  # no fork of a process that holds a CUDA context
        pool.map(_jpeg, jobs)
    prepare(PrepareConfig("imagenet", root, num_workers=workers))
    pre = Preprocess(s.resolution, (124.0, 116.0, 104.0), (58.0, 57.0, 57.0), crop_ratio=224 / 256)
    loader = eval_loader(beton_path(root, "imagenet", "train"), pre, s.batch, workers)
    rates = []
    for _ in range(2):  # the first epoch compiles FFCV's pipeline and warms the page cache
        _sync(where)
        started, rows = time.perf_counter(), 0
        with one_epoch(loader) as batches:
            for images, labels in batches:
                images, _ = to_model_input(images, labels, where)
                extract_batch([model], images, precision)
                rows += len(images)
        _sync(where)
        rates.append(rows / (time.perf_counter() - started))
    return {
        "img_per_s": round(rates[-1]),
        "first_epoch_img_per_s": round(rates[0]),
        "images": s.jpegs,
        "loader_workers": workers,
    }


def train_rate(s: Shapes, resolution: int, where: torch.device) -> float:
    """Training images/s (forward, backward, SGD step; bf16 autocast on GPU) on batches on the device."""
    from pipeline.members.models import build
    from pipeline.train.pretrain import train_one_step

    model = build(s.arch, 1000).to(where, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    images = torch.randn(s.batch, 3, resolution, resolution, device=where).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(1000, (s.batch,), device=where)
    for step in range(s.warmup + s.steps):
        if step == s.warmup:
            _sync(where)
            started = time.perf_counter()
        train_one_step(model, images, labels, criterion, optimizer, None)
    _sync(where)
    return s.steps * s.batch / (time.perf_counter() - started)


def extraction(s: Shapes, where: torch.device, workdir: Path) -> dict:
    from pipeline.members.models import build

    precision = "bf16" if where.type == "cuda" else "fp32"
    model = build(s.arch, 1000).to(where, memory_format=torch.channels_last).eval()
    images = torch.randn(s.batch, 3, s.resolution, s.resolution, device=where).contiguous(
        memory_format=torch.channels_last
    )
    out = {"arch": s.arch, "resolution": s.resolution, "batch": s.batch, "precision": precision}
    out["on_device_img_per_s"] = round(forward_rate(model, images, s, precision))
    out["ffcv"] = _guarded(lambda: ffcv_rate(model, s, where, workdir, precision))
    return out


def _guarded(part) -> dict:
    """A part's figures, or its error and traceback: one failing part never hides the others."""
    try:
        return part()
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}


def _sync(where: torch.device) -> None:
    if where.type == "cuda":
        torch.cuda.synchronize(where)


def _cpus() -> set[int]:
    import os

    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def machine(where: torch.device) -> dict:
    info = {"platform": platform.platform(), "cpus": len(_cpus()), "torch": torch.__version__}
    if where.type == "cuda":
        props = torch.cuda.get_device_properties(where)
        info |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30), "cuda": torch.version.cuda}
    return info


def run(smoke: bool, workdir: Path) -> dict:
    where = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    s = SMOKE if smoke else FULL
    started = time.perf_counter()
    report = {"smoke": smoke, "machine": machine(where), "shapes": s.__dict__}
    report["gpu_tests"] = _guarded(lambda: gpu_tests(smoke))
    report["probe"] = {
        "imagenet_cat4": _guarded(lambda: probe_shape("imagenet", s.imagenet, where)),
        "inat18_cat4": _guarded(lambda: probe_shape("inat18", s.inat, where)),
        "one_fit_backends": _guarded(lambda: one_fit_backends(s.imagenet, s.backend_rows)),
    }
    if where.type == "cuda":
        torch.cuda.empty_cache()  # the probes' features go before the models come
    report["extraction"] = _guarded(lambda: extraction(s, where, workdir))
    report["training"] = {
        f"{r}px": _guarded(lambda r=r: {"img_per_s": round(train_rate(s, r, where)), "batch": s.batch})
        for r in s.train_resolutions
    }
    report["wall_s"] = round(time.perf_counter() - started, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "benchmarks" / "last_run_gpu_check.json")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/timecat-gpu-check"))
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (CI)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print(
            "gpu-check needs a CUDA GPU (torch.cuda.is_available() is False); --smoke runs it at toy sizes on the CPU"
        )
        return 2
    report = run(args.smoke, args.workdir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
