"""Benchmark: a Cat2 sweep over 6 members, batched against one scikit-learn probe per subset.

All 15 two-member subsets of a pool of 6 generated members (20,000 train and
5,000 eval rows, 1,024-d each, 100 classes): `probe_many` fits every C
candidate of every subset together, reading each member once; the baseline
runs `timecat probe --backend sklearn` on each subset in turn. Same process,
same machine. Figures go to tests/benchmarks/last_run_sweep.json.
"""

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import cache
from pipeline.probe import ProbeConfig, probe, subsets, sweep

TRAIN, EVAL, DIM, POOL, CLASSES = 20_000, 5_000, 1024, 6, 100


def member_rows(m: int, y: np.ndarray, seed: int) -> np.ndarray:
    """(len(y), DIM) float32 features: a class mean on 128 directions of member m's own, plus noise, ReLU'd."""
    directions = np.random.default_rng(100 + m).normal(size=(CLASSES, DIM)).astype(np.float32)
    directions[:, 128:] = 0
    directions = np.roll(directions, 128 * m, axis=1)
    noise = np.random.default_rng(seed * 10 + m).normal(size=(len(y), DIM)).astype(np.float32)
    return np.maximum(0.15 * directions[y] + noise, 0)


def build(path: Path) -> tuple[str, ...]:
    store = cache.open(str(path), mode="a")
    names = tuple(f"run{m}" for m in range(POOL))
    for split, n, seed in (("train", TRAIN, 0), ("test", EVAL, 1)):
        y = np.random.default_rng(seed).permutation(np.arange(n) % CLASSES)
        store.write_labels("bench", split, y, "fp", [str(c) for c in range(CLASSES)])
        for m, name in enumerate(names):
            prov = {"dataset_fingerprint": "fp", "checkpoint_sha256": name}
            writer = store.create_features("bench", split, name, DIM, prov, compression=cache.Compression.NONE)
            writer.append(member_rows(m, y, seed))
            writer.close()
            store.finish_features("bench", split, name)
    store.consolidate()
    return names


@pytest.mark.filterwarnings("ignore")
def test_a_batched_cat2_sweep_against_one_sklearn_probe_per_subset(tmp_path):
    names = build(tmp_path / "bench.zarr")
    path = str(tmp_path / "bench.zarr")
    config = ProbeConfig("bench", names)
    started = time.perf_counter()
    records, summary = sweep(config, names, 2, None, path)
    batched_s = time.perf_counter() - started
    started = time.perf_counter()
    alone = [probe(replace(config, members=s, backend="sklearn"), path) for s in subsets(names, 2, None, 0)]
    sklearn_s = time.perf_counter() - started
    gaps = [abs(r["top1"] - a["top1"]) for r, a in zip(records, alone, strict=True)]
    figures = {
        "subsets": len(records),
        "shape": {"train": TRAIN, "eval": EVAL, "member_dim": DIM, "classes": CLASSES},
        "precision": records[0]["precision"],
        "batched_s": round(batched_s, 1),
        "sklearn_s": round(sklearn_s, 1),
        "speedup": round(sklearn_s / batched_s, 2),
        "max_top1_gap": round(max(gaps), 3),
        "batched_top1": summary["top1"],
        "sklearn_top1_mean": round(float(np.mean([a["top1"] for a in alone])), 3),
    }
    print(json.dumps(figures, indent=1))
    (Path(__file__).parent / "last_run_sweep.json").write_text(json.dumps(figures, indent=1))
    assert max(gaps) <= 0.5, figures  # the agreement goal for each subset
    assert figures["speedup"] >= 10.0, figures
