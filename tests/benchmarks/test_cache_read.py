"""Benchmark: reading a CatN matrix from the cache, in place vs the naive np.hstack.

Both read the same Zarr arrays on the same machine in one run; the figure that
matters is the ratio. Run with `make bench`; results are printed and written to
tests/benchmarks/last_run.json (not committed).
"""

import json
import time
import tracemalloc
from pathlib import Path

import numpy as np

import cache

ROWS, DIM, MEMBERS = 40_000, 2048, 4  # one member ~= 328 MB of float32; Cat4 ~= 1.3 GB


def build(path: Path, compression: cache.Compression) -> list[str]:
    store = cache.open(str(path), mode="a")
    store.write_labels("bench", "train", np.arange(ROWS) % 10, "fp", [str(i) for i in range(10)])
    rng = np.random.default_rng(0)
    names = []
    for m in range(MEMBERS):
        name = f"run{m}"
        writer = store.create_features(
            "bench", "train", name, DIM, {"dataset_fingerprint": "fp"}, compression=compression
        )
        for start in range(0, ROWS, 4096):
            # ReLU-like features: non-negative, many zeros, like a real avgpool output.
            block = np.maximum(rng.normal(size=(min(4096, ROWS - start), DIM)), 0).astype(np.float32)
            writer.append(block)
        writer.close()
        store.finish_features("bench", "train", name)
        names.append(name)
    store.consolidate()
    return names


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


def test_in_place_concatenation_beats_hstack(tmp_path):
    figures = {}
    for compression in (cache.Compression.NONE, cache.Compression.ZSTD):
        names = build(tmp_path / f"{compression.value}.zarr", compression)
        store = cache.open(str(tmp_path / f"{compression.value}.zarr"))
        X, _ = store.features("bench", "train", names)
        np.testing.assert_array_equal(X, hstack_baseline(store, names))
        del X
        ours = best_of(lambda store=store, names=names: store.features("bench", "train", names))
        base = best_of(lambda store=store, names=names: hstack_baseline(store, names))
        figures[compression.value] = {
            "in_place_s": round(ours, 3),
            "hstack_s": round(base, 3),
            "speedup": round(base / ours, 2),
            "GB_per_s": round(ROWS * DIM * MEMBERS * 4 / ours / 1e9, 2),
            "in_place_peak_mib": peak_mib(lambda store=store, names=names: store.features("bench", "train", names)),
            "hstack_peak_mib": peak_mib(lambda store=store, names=names: hstack_baseline(store, names)),
        }
    figures["shape"] = [ROWS, DIM * MEMBERS]
    print(json.dumps(figures, indent=1))
    (Path(__file__).parent / "last_run.json").write_text(json.dumps(figures, indent=1))
    assert figures["none"]["speedup"] > 1.0
    assert figures["none"]["in_place_peak_mib"] < 0.75 * figures["none"]["hstack_peak_mib"]
