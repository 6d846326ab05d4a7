"""Benchmark: extraction images/s against the bare forward pass of the same members.

Extraction is the whole `timecat extract` of a split: FFCV decoding, the
forward of every member, the NaN checks, compression and Zarr writes, and the
final completeness scan. The baseline runs the same members' forward on the
same batches already decoded in memory. The goal is a ratio of at least 0.9:
loading and writing hide behind the model.

Two ratios are reported. ``whole_command`` includes the fixed start-up (FFCV
compiles its pipeline, about 2 s, and the labels are read). ``marginal`` is the
rate at scale, where that start-up vanishes: the time of the full split minus
the time of a 2,048-row split of the same data, per extra image. Timings on the
2-core development machine vary by +-15% from run to run, so each side is
measured more than once, interleaved, and the best of each is compared. Run with
`make bench`.

Figures, 2026-11-22, dev-11-22 (a cloud machine of 2 vCPUs and 24 GiB, no
GPU; its CPU and flags were not recorded); absolute times drift by 1.5x
between runs, so compare the ratios. The README's Performance section quotes
them. A Cat4 of `small-resnet`, 60,000 Fashion-MNIST images at 28 px, batch
512, zstd; best of two interleaved runs each. The bare forward of the 4
members: 1,888 images/s. `timecat extract` at scale (marginal rate, start-up
excluded): 1,781 images/s, 0.94 of the forward (the goal, at least 0.9, is
met); the whole command (2.0 s start-up: FFCV compiling its pipeline, labels):
1,680 images/s, 0.89; the same with `--compression none`: 1,666 images/s,
0.88. On two cores the background writer and the FFCV threads share the CPUs
with the forward, which a GPU run does not.
"""

import json
import time
from pathlib import Path

import torch
from conftest import make_fashion_root

from pipeline.configs import ExtractConfig, PrepareConfig, PretrainConfig
from pipeline.data.loaders import eval_loader, to_model_input
from pipeline.data.prepare import prepare
from pipeline.data.splits import Preprocess, beton_path
from pipeline.features.extract import extract, extract_batch, frozen_member
from pipeline.train.pretrain import pretrain

ROWS, SMALL, BATCH = 60_000, 2048, 512  # the whole Fashion-MNIST train split; the default batch
MEMBERS = ("run0", "run1", "run2", "run3")  # a Cat4: one decode feeds four forwards
REPEATS = 2


def decoded_batches(data: Path, runs: Path) -> tuple[list, list[torch.Tensor]]:
    """The members and every batch of the split, decoded once and held in memory."""
    members = [frozen_member(runs, name, torch.device("cpu")) for name in MEMBERS]
    pre = Preprocess.from_dict(members[0].payload["preprocess"])
    loader = eval_loader(beton_path(data, "fashion-mnist", "train"), pre, BATCH, 2)
    return [m.model for m in members], [to_model_input(x, y, torch.device("cpu"))[0] for x, y in loader]


def forward_s(models: list, batches: list[torch.Tensor]) -> float:
    """Seconds for the members' bare forward over the in-memory batches."""
    started = time.perf_counter()
    for images in batches:
        extract_batch(models, images)
    return time.perf_counter() - started


def extract_s(data: Path, runs: Path, path: Path, compression: str) -> float:
    """Seconds for a whole `timecat extract` of the train split into a new cache."""
    config = ExtractConfig("fashion-mnist", MEMBERS, splits=("train",), batch_size=BATCH, compression=compression)
    started = time.perf_counter()
    extract(config, data, runs, str(path))
    return time.perf_counter() - started


def test_extraction_keeps_up_with_the_forward_pass(tmp_path):
    data = make_fashion_root(tmp_path / "data", n_train=ROWS, n_test=1000)
    small = make_fashion_root(tmp_path / "small", n_train=SMALL, n_test=1000)
    prepare(PrepareConfig("fashion-mnist", data))
    prepare(PrepareConfig("fashion-mnist", small))
    runs = tmp_path / "runs"
    for seed, name in enumerate(MEMBERS):
        pretrain(PretrainConfig(name, "fashion-mnist", seed, steps=2, batch_size=64), data, runs)
    models, batches = decoded_batches(data, runs)
    extract_batch(models, batches[0])  # warm-up: first-call allocations
    times = {"forward": [], "zstd": [], "none": [], "small_zstd": []}
    for r in range(REPEATS):
        times["forward"].append(forward_s(models, batches))
        times["zstd"].append(extract_s(data, runs, tmp_path / f"zstd{r}.zarr", "zstd"))
        times["small_zstd"].append(extract_s(small, runs, tmp_path / f"small{r}.zarr", "zstd"))
    times["none"].append(extract_s(data, runs, tmp_path / "none.zarr", "none"))
    best = {k: min(v) for k, v in times.items()}
    forward_rate = ROWS / best["forward"]
    marginal_rate = (ROWS - SMALL) / (best["zstd"] - best["small_zstd"])
    figures = {
        "rows": ROWS,
        "members": len(MEMBERS),
        "batch": BATCH,
        "seconds": {k: [round(t, 2) for t in v] for k, v in times.items()},
        "forward_img_per_s": round(forward_rate),
        "extract_img_per_s": {"zstd": round(ROWS / best["zstd"]), "none": round(ROWS / best["none"])},
        "whole_command_ratio": {c: round(best["forward"] / best[c], 3) for c in ("zstd", "none")},
        "startup_s": round(best["small_zstd"] - SMALL / marginal_rate, 2),
        "marginal_img_per_s": round(marginal_rate),
        "marginal_ratio": round(marginal_rate / forward_rate, 3),
    }
    print(json.dumps(figures, indent=1))
    (Path(__file__).parent / "last_run_extract.json").write_text(json.dumps(figures, indent=1))
    assert figures["marginal_ratio"] >= 0.9, f"extraction at scale is {figures['marginal_ratio']}x the forward"
