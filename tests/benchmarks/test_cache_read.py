"""Benchmark: reading a Cat4 matrix (100,000 x 8,192 float32) from the cache.

Against two baselines on the same data, machine and run: the floor,
np.load(mmap_mode="r") of per-member .npy files into a preallocated array
(goal: the cache within 1.5x of it with compression off), and the naive
per-member read + np.hstack. Run with `make bench`; figures are printed and
written to tests/benchmarks/last_run.json (not committed).

Figures, 2026-11-22, dev-11-22 (a cloud machine of 2 vCPUs and 24 GiB, no
GPU; its CPU and flags were not recorded); absolute times drift by 1.5x
between runs, so compare the ratios, measured within one run. The README's
Performance section quotes them. Four 2,048-d members of ReLU-like random
features, 3.3 GB; the floor 0.94 s. No compression: 1.16 s (2.8 GB/s),
3,205 MiB peak, 1.23x the floor (the goal, at most 1.5x, is met); per-member
read + np.hstack 1.91 s, 6,250 MiB peak, so the cache is 1.64x faster with
1.9x less memory. zstd level 1: 3.27 s (1.0 GB/s), 3,251 MiB peak, 3.5x the
floor; np.hstack 4.15 s, 6,250 MiB peak, the cache 1.27x faster. On two cores
zstd decoding dominates: use `--compression none` where disk allows, since
reading is what probes repeat. Reads check status and chunk presence but do
not scan values: a full NaN scan (scan_nan=True) adds about a third (recorded
with these figures, not timed by this test).
"""

import json
import time
import tracemalloc
from pathlib import Path

import numpy as np

import cache

ROWS, DIM, MEMBERS = 100_000, 2048, 4  # one member ~= 0.8 GB of float32; Cat4 ~= 3.3 GB


def member_block(m: int, start: int, rows: int) -> np.ndarray:
    """Deterministic ReLU-like features: non-negative with many zeros, like an avgpool output."""
    rng = np.random.default_rng(1000 * m + start)
    return np.maximum(rng.normal(size=(rows, DIM)), 0).astype(np.float32)


def build(path: Path, compression: cache.Compression) -> list[str]:
    store = cache.open(str(path), mode="a")
    store.write_labels("bench", "train", np.arange(ROWS) % 10, "fp", [str(i) for i in range(10)])
    names = []
    for m in range(MEMBERS):
        name = f"run{m}"
        writer = store.create_features(
            "bench", "train", name, DIM, {"dataset_fingerprint": "fp"}, compression=compression
        )
        for start in range(0, ROWS, 4096):
            writer.append(member_block(m, start, min(4096, ROWS - start)))
        writer.close()
        store.finish_features("bench", "train", name)
        names.append(name)
    store.consolidate()
    return names


def build_npy(folder: Path) -> list[Path]:
    folder.mkdir()
    paths = []
    for m in range(MEMBERS):
        data = np.concatenate([member_block(m, s, min(4096, ROWS - s)) for s in range(0, ROWS, 4096)])
        np.save(folder / f"run{m}.npy", data)
        paths.append(folder / f"run{m}.npy")
    return paths


def npy_baseline(paths: list[Path]) -> np.ndarray:
    """The floor: memory-mapped .npy files copied into column blocks of one preallocated array."""
    X = np.empty((ROWS, DIM * MEMBERS), dtype=np.float32)
    for m, path in enumerate(paths):
        X[:, m * DIM : (m + 1) * DIM] = np.load(path, mmap_mode="r")
    return X


def hstack_baseline(store: cache.Cache, names: list[str]) -> np.ndarray:
    """What a notebook user would write first: read each member, then np.hstack."""
    return np.hstack([store.group[f"bench/train/features/{n}"][:] for n in names])


def best_of(fn, repeats=3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def peak_mib(fn) -> float:
    """Peak memory numpy allocates while ``fn`` runs (numpy reports to tracemalloc)."""
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return round(peak / 2**20)


def test_cache_read_against_np_load_and_hstack(tmp_path):
    npy = build_npy(tmp_path / "npy")
    floor = best_of(lambda: npy_baseline(npy))
    figures = {"np_load_mmap_s": round(floor, 3)}
    for compression in (cache.Compression.NONE, cache.Compression.ZSTD):
        names = build(tmp_path / f"{compression.value}.zarr", compression)
        store = cache.open(str(tmp_path / f"{compression.value}.zarr"))
        X, _ = store.features("bench", "train", names)
        np.testing.assert_array_equal(X, npy_baseline(npy))
        del X
        ours = best_of(lambda store=store, names=names: store.features("bench", "train", names))
        base = best_of(lambda store=store, names=names: hstack_baseline(store, names))
        figures[compression.value] = {
            "in_place_s": round(ours, 3),
            "vs_np_load": round(ours / floor, 2),
            "hstack_s": round(base, 3),
            "speedup_vs_hstack": round(base / ours, 2),
            "GB_per_s": round(ROWS * DIM * MEMBERS * 4 / ours / 1e9, 2),
            "in_place_peak_mib": peak_mib(lambda store=store, names=names: store.features("bench", "train", names)),
            "hstack_peak_mib": peak_mib(lambda store=store, names=names: hstack_baseline(store, names)),
        }
    figures["shape"] = [ROWS, DIM * MEMBERS]
    print(json.dumps(figures, indent=1))
    (Path(__file__).parent / "last_run.json").write_text(json.dumps(figures, indent=1))
    assert figures["none"]["in_place_peak_mib"] < 0.75 * figures["none"]["hstack_peak_mib"]
    # The goal: within 1.5x of the floor with compression off (measured: the docstring's figures).
    assert figures["none"]["vs_np_load"] <= 1.5, f"cache read is {figures['none']['vs_np_load']}x np.load(mmap)"
