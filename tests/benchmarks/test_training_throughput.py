"""Benchmarks: does FFCV loading keep training fed, and how much faster is it than torchvision's loader?

1. Training steps/s of the demo model (small-resnet, batch 128, 2 loader threads,
   CPU) fed by the real seeded FFCV loader, divided by steps/s on the same
   batches already decoded in memory. Goal: at least 0.9.
2. Images/s of timecat's FFCV train loader (seeded random-resized-crop + flip +
   normalise) on generated ImageNet-size JPEGs, divided by a torchvision
   ImageFolder + DataLoader with the same augmentation and the same number of
   workers. Goal: at least 3x, with the images stored as FFCV's ImageNet recipe
   stores them (half JPEG, half raw pixels: `prepare --storage mixed`). Measured
   too: all-JPEG storage (timecat's default), FFCV's stock (unseeded) decoder,
   and the most an all-JPEG loader could reach here: libjpeg-turbo's whole-image
   decode alone, on the same threads.

Timings on the 2-core machine vary by +-15%, so each side runs more than once,
interleaved, and the best of each is compared. Run with `make bench`.

Figures, 2026-11-22, dev-11-22 (a cloud machine of 2 vCPUs and 24 GiB, no
GPU; its CPU and flags were not recorded); absolute times drift by 1.5x
between runs, so compare the ratios. The README's Performance section quotes
them.

1. The demo's recipe (`small-resnet`, batch 128, 28 px Fashion-MNIST, 2 loader
   threads, 2 torch threads, CPU; 120 timed steps after 10, best of 3
   interleaved runs): 15.7 steps/s with the seeded FFCV loader against 17.5 in
   memory, 0.90 (the goal, at least 0.9, is met; single runs 0.84-0.97). On
   two cores the loader's threads take their share of the same CPUs as the
   model.
2. 2,000 generated images of 300-500 px, JPEG quality 90; random-resized-crop
   8-100% to 224 px, flip, normalise; batch 64, 2 workers each, best of 3
   interleaved runs. Images/s, and against torchvision:

   - timecat's FFCV loader, `prepare --storage mixed` (FFCV's ImageNet recipe:
     half raw pixels, 568 MiB): 2,126, 3.70x (the goal, at least 3x, is met);
   - the same, default JPEG storage (136 MiB): 1,450, 2.52x;
   - FFCV's stock decoder, flip and NormalizeImage (unseeded), JPEG storage:
     1,370, 2.38x;
   - libjpeg-turbo decoding the whole JPEGs alone, 2 threads (no crop, resize
     or normalising): 2,473, 4.30x;
   - torchvision `ImageFolder` + `DataLoader`, 2 worker processes: 575, 1.

   With all-JPEG storage two vCPUs are decode-bound: whole-image decoding
   alone (0.8 ms an image) runs at 4.3x, and the crop's resize (FFCV's OpenCV
   area resize, 0.3 ms on average) and the normalisation on top leave 2.5x.
   timecat's decoder is faster than FFCV's stock pipeline although it seeds
   every crop: it flips and normalises in the same pass (FFCV's lookup table,
   the same numbers bit for bit), 0.16 ms less per image than a flip copy and
   a separate NormalizeImage pass. Decoding only the crop's rows and columns
   (libjpeg-turbo 3's partial decoding, which FFCV 1.0.2 does not ship) would
   cut the JPEG cost further; DCT-domain scaling does not help here (the
   5/8-7/8 scales decode slower than full size, measured).
"""

import json
import time
from pathlib import Path

import numpy as np
import torch
from conftest import make_fashion_root

from pipeline.configs import PrepareConfig, PretrainConfig
from pipeline.core.distributed import init
from pipeline.data.loaders import one_epoch, to_model_input
from pipeline.data.prepare import prepare
from pipeline.data.splits import beton_path, read_manifest
from pipeline.train.pretrain import build_run, make_preprocess, train_one_step

STEPS, WARMUP, REPEATS = 120, 10, 3  # timed steps, untimed first steps, interleaved repeats
JPEGS, CLASSES, WORKERS, BATCH = 2_000, 10, 2, 64  # loader benchmark: generated ImageNet-size set


def _loader_steps_s(run) -> float:
    """Seconds for STEPS training steps fed by the FFCV loader, after WARMUP untimed ones."""
    device, step, started = run.d.device, 0, None
    while step < WARMUP + STEPS:
        with one_epoch(run.loader) as batches:
            for images, labels in batches:
                if step == WARMUP:
                    started = time.perf_counter()
                images, labels = to_model_input(images, labels, device)
                train_one_step(run.net, images, labels, run.criterion, run.optimizer, run.scheduler)
                step += 1
                if step == WARMUP + STEPS:
                    break
    return time.perf_counter() - started


def _memory_steps_s(run, batches: list) -> float:
    """Seconds for STEPS training steps cycling through batches already decoded in memory."""
    device = run.d.device
    for i in range(WARMUP + STEPS):
        if i == WARMUP:
            started = time.perf_counter()
        images, labels = to_model_input(*batches[i % len(batches)], device)  # as the loader side does
        train_one_step(run.net, images, labels, run.criterion, run.optimizer, run.scheduler)
    return time.perf_counter() - started


def test_training_is_not_starved_by_the_loader(tmp_path):
    data = make_fashion_root(tmp_path / "data", n_train=20_000, n_test=500)
    prepare(PrepareConfig("fashion-mnist", data))
    config = PretrainConfig("bench", "fashion-mnist", 0, steps=10_000, batch_size=128)  # the demo's recipe
    d = init()
    with one_epoch(build_run(config, data, d).loader) as epoch:  # the same kind of batches, held in memory
        held = [(x.clone(), y.clone()) for _, (x, y) in zip(range(40), epoch, strict=False)]
    times = {"ffcv": [], "memory": []}
    for _ in range(REPEATS):
        times["ffcv"].append(_loader_steps_s(build_run(config, data, d)))
        times["memory"].append(_memory_steps_s(build_run(config, data, d), held))
    best = {k: min(v) for k, v in times.items()}
    figures = {
        "model": "small-resnet",
        "batch": 128,
        "loader_threads": config.num_workers,
        "torch_threads": torch.get_num_threads(),
        "seconds": {k: [round(t, 2) for t in v] for k, v in times.items()},
        "steps_per_s": {k: round(STEPS / t, 1) for k, t in best.items()},
        "ratio": round(best["memory"] / best["ffcv"], 3),
    }
    print(json.dumps(figures, indent=1))
    (Path(__file__).parent / "last_run_training.json").write_text(json.dumps(figures, indent=1))
    assert figures["ratio"] >= 0.9, f"training with the FFCV loader runs at {figures['ratio']}x in-memory batches"


def _write_jpegs(root: Path) -> None:
    """ImageNet-like folders: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, 300-500 px, JPEG quality 90.

    Smooth colour fields plus noise, so the files compress like photographs (about 60 KB) rather than
    like flat colour or pure noise.
    """
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", JPEGS), ("val", CLASSES)):
        for i in range(n):
            folder = root / "imagenet" / split / f"n{i % CLASSES:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            h, w = (int(v) for v in rng.integers(300, 501, size=2))
            yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
            base = np.stack([np.sin(6 * xx + c + rng.random() * 6) + np.cos(5 * yy * (c + 1)) for c in range(3)], -1)
            pixels = (base * 60 + 128 + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.JPEG", quality=90)


def _ffcv_epoch_s(data: Path, pre, name: str = "imagenet") -> float:
    from pipeline.data.loaders import train_loader

    loader, _ = train_loader(beton_path(data, name, "train"), pre, BATCH, 0, WORKERS)
    return _rate(loader)


def _ffcv_stock_epoch_s(data: Path, pre) -> float:
    """FFCV's own random-resized-crop and flip (unseeded): what determinism costs, if anything."""
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, ToTensor, ToTorchImage

    image = [
        RandomResizedCropRGBImageDecoder((pre.resolution, pre.resolution), scale=pre.crop_scale),
        RandomHorizontalFlip(),
        NormalizeImage(np.array(pre.mean), np.array(pre.std), np.float32),
        ToTensor(),
        ToTorchImage(),
    ]
    loader = Loader(
        str(beton_path(data, "imagenet", "train")),
        batch_size=BATCH,
        num_workers=WORKERS,
        order=OrderOption.RANDOM,
        seed=0,
        drop_last=True,
        os_cache=True,
        pipelines={"image": image, "label": [IntDecoder(), ToTensor()]},
    )
    return _rate(loader)


def _rate(loader) -> float:
    with one_epoch(loader) as epoch:
        next(epoch)  # FFCV compiles its pipeline on the first batch: not loading time
        started, rows = time.perf_counter(), 0
        for images, _ in epoch:
            rows += len(images)
    return rows / (time.perf_counter() - started)


def _jpeg_decode_only(data: Path) -> float:
    """Images/s of libjpeg-turbo decoding whole JPEGs (FFCV's call) on WORKERS threads: an all-JPEG ceiling."""
    from concurrent.futures import ThreadPoolExecutor

    from ffcv.libffcv import imdecode  # a ctypes call: it releases the GIL
    from PIL import Image

    files = sorted((data / "imagenet" / "train").glob("*/*.JPEG"))[:500]
    jobs = [(np.fromfile(f, np.uint8), *Image.open(f).size) for f in files]

    def decode(part):
        out = np.empty(501 * 501 * 3, np.uint8)
        for raw, w, h in part:
            imdecode(raw, out, h, w, h, w, 0, 0, 1, 1, False, False)

    parts = [jobs[k::WORKERS] for k in range(WORKERS)]
    with ThreadPoolExecutor(WORKERS) as pool:
        started = time.perf_counter()
        list(pool.map(decode, parts))
    return len(jobs) / (time.perf_counter() - started)


def _torchvision_epoch_s(data: Path, pre) -> float:
    from torchvision import datasets, transforms

    augment = transforms.Compose(
        [
            transforms.RandomResizedCrop(pre.resolution, scale=pre.crop_scale),
            transforms.RandomHorizontalFlip(),
            transforms.PILToTensor(),
            transforms.ConvertImageDtype(torch.float32),
            transforms.Normalize([m / 255 for m in pre.mean], [s / 255 for s in pre.std]),
        ]
    )
    folder = datasets.ImageFolder(str(data / "imagenet" / "train"), augment)
    loader = torch.utils.data.DataLoader(
        folder, batch_size=BATCH, shuffle=True, num_workers=WORKERS, drop_last=True, persistent_workers=False
    )
    epoch = iter(loader)
    next(epoch)  # worker start-up: not loading time
    started, rows = time.perf_counter(), 0
    for images, _ in epoch:
        rows += len(images)
    return rows / (time.perf_counter() - started)


def test_ffcv_loader_against_torchvision_imagefolder(tmp_path):
    data = tmp_path / "data"
    _write_jpegs(data)
    prepare(PrepareConfig("imagenet", data))  # all JPEG, timecat's default: about 1/5 of the disk of mixed
    prepare(PrepareConfig("imagenet", data, name="imagenet-mixed", storage="mixed"))  # FFCV's ImageNet recipe

    pre = make_preprocess(
        PretrainConfig("x", "imagenet", 0, 1, arch="resnet50"), read_manifest(data, "imagenet", "train")
    )
    rates = {"ffcv": [], "ffcv_mixed": [], "ffcv_stock": [], "torchvision": [], "jpeg_decode_only": []}
    for _ in range(REPEATS):
        rates["jpeg_decode_only"].append(_jpeg_decode_only(data))
        rates["ffcv"].append(_ffcv_epoch_s(data, pre))
        rates["ffcv_mixed"].append(_ffcv_epoch_s(data, pre, "imagenet-mixed"))
        rates["ffcv_stock"].append(_ffcv_stock_epoch_s(data, pre))
        rates["torchvision"].append(_torchvision_epoch_s(data, pre))
    best = {k: max(v) for k, v in rates.items()}
    figures = {
        "images": JPEGS,
        "resolution": pre.resolution,
        "workers": WORKERS,
        "batch": BATCH,
        "img_per_s": {k: [round(r) for r in v] for k, v in rates.items()},
        "ratio": round(best["ffcv_mixed"] / best["torchvision"], 2),  # the goal's: FFCV's ImageNet storage
        "jpeg_storage_ratio": round(best["ffcv"] / best["torchvision"], 2),
        "stock_ffcv_jpeg_ratio": round(best["ffcv_stock"] / best["torchvision"], 2),
        "jpeg_decode_only_ratio": round(best["jpeg_decode_only"] / best["torchvision"], 2),
        "beton_mib": {
            n: round(beton_path(data, n, "train").stat().st_size / 2**20) for n in ("imagenet", "imagenet-mixed")
        },
    }
    print(json.dumps(figures, indent=1))
    (Path(__file__).parent / "last_run_loader.json").write_text(json.dumps(figures, indent=1))
    assert figures["ratio"] >= 3, f"FFCV (mixed storage) loads only {figures['ratio']}x as fast as ImageFolder"
    # All-JPEG storage on 2 vCPUs: whole-image decoding alone runs at about 4x (jpeg_decode_only_ratio), and the
    # crop's resize and the normalisation on top (about 0.5 ms an image) leave about 2.4x. A floor for regressions.
    assert figures["jpeg_storage_ratio"] >= 2, f"FFCV (JPEG storage) loads only {figures['jpeg_storage_ratio']}x"
