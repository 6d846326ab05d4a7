"""Benchmark: the logreg probe per backend on CPU, Cat4 of 50,000 x 8,192 with 100 classes (generated).

Kept for its shape (the width of a Cat4 of ResNet-50s, 100 classes), not for
its conditioning: generated features are nearly isotropic and flatter every
solver, so the issue's speed goals are measured on real features
(test_probe_real_features.py, test_sweep_real_features.py,
test_probe_resnet50_features.py). Each backend runs the whole `timecat probe`
(C search on held-out rows, refit, eval) in a fresh process, so its peak
resident memory is its own. Features: four 2,048-d members whose ReLU-like
rows carry a class signal in a few hundred directions each, learnable but not
separable. Figures go to tests/benchmarks/last_run_probe.json.

Peak memory: the solver keeps the float32 features (its last phase certifies
the optimum on them) and, on the CPU, a bf16 copy for the first phase, about
1.5x the train matrix plus the search rows; the 1.3x of the release before
exact fits (a bf16 copy alone) no longer holds, by design.

Figures, 2026-12-07, Xeon-AMX (2 vCPUs; avx512f, avx512_bf16, amx_bf16):
batched (auto: bf16) 72.3 s, peak 4,125 MiB (2.64x the 1,562 MiB matrix: the
2.0x asserted below fails); scikit-learn 22.9 s, 3,469 MiB; top-1 33.21 and
33.19, both at C = 0.001. Before the fp32 phase's line-search fix: 278.5 s.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

import cache

TRAIN, EVAL, DIM, MEMBERS, CLASSES = 50_000, 10_000, 2048, 4, 100
BACKENDS = ("auto", "sklearn")  # auto = the batched solver (bf16 where the CPU has bf16 units); cuml needs a GPU


def member_rows(m: int, y: np.ndarray, seed: int) -> np.ndarray:
    """(len(y), DIM) float32 features of member m: a class mean on 256 directions plus noise, ReLU'd."""
    directions = np.random.default_rng(100 + m).normal(size=(CLASSES, DIM)).astype(np.float32)
    directions[:, 256:] = 0  # each member sees the classes in its own 256 dims
    directions = np.roll(directions, 256 * m, axis=1)
    noise = np.random.default_rng(seed * 10 + m).normal(size=(len(y), DIM)).astype(np.float32)
    return np.maximum(0.12 * directions[y] + noise, 0)


def build(path: Path) -> list[str]:
    store = cache.open(str(path), mode="a")
    names = [f"run{m}" for m in range(MEMBERS)]
    for split, n, seed in (("train", TRAIN, 0), ("test", EVAL, 1)):
        y = np.random.default_rng(seed).permutation(np.arange(n) % CLASSES)
        store.write_labels("bench", split, y, "fp", [str(c) for c in range(CLASSES)])
        for m, name in enumerate(names):
            writer = store.create_features(
                "bench", split, name, DIM, {"dataset_fingerprint": "fp"}, compression=cache.Compression.NONE
            )
            for start in range(0, n, 5000):
                writer.append(member_rows(m, y[start : start + 5000], seed * 1000 + start))
            writer.close()
            store.finish_features("bench", split, name)
    store.consolidate()
    return names


def run_probe(path: Path, members: list[str], backend: str) -> dict:
    code = (
        "import json, sys; from pipeline.configs import ProbeConfig; from pipeline.probe.run import probe; "
        f"r = probe(ProbeConfig('bench', {tuple(members)!r}, backend={backend!r}), {str(path)!r}); "
        "keys = ('backend', 'precision', 'top1', 'top5', 'wall_s', 'peak_rss_mib', 'chosen', 'search'); "
        "print(json.dumps({k: r.get(k) for k in keys}))"
    )
    repo = Path(cache.__path__[0]).parent
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_probe_backends_on_cpu(tmp_path):
    members = build(tmp_path / "bench.zarr")
    figures = {"shape": [TRAIN, DIM * MEMBERS], "classes": CLASSES, "matrix_mib": TRAIN * DIM * MEMBERS * 4 // 2**20}
    for backend in BACKENDS:
        figures[backend] = run_probe(tmp_path / "bench.zarr", members, backend)
    ours, reference = figures["auto"], figures["sklearn"]
    figures["speedup"] = round(reference["wall_s"] / ours["wall_s"], 2)
    figures["peak_over_matrix"] = round(ours["peak_rss_mib"] / figures["matrix_mib"], 2)
    fits = [*ours.pop("search"), ours["chosen"]]
    figures["auto_fits"] = [
        {"C": t["C"], **{k: t["fit"][k] for k in ("status", "iterations", "gap_estimate")}} for t in fits
    ]
    reference.pop("search")
    print(json.dumps(figures, indent=1))
    (Path(__file__).parent / "last_run_probe.json").write_text(json.dumps(figures, indent=1))
    assert abs(ours["top1"] - reference["top1"]) <= 0.3  # the agreement goal
    assert all(t["status"] == "converged" for t in figures["auto_fits"]), figures["auto_fits"]
    assert figures["peak_over_matrix"] <= 2.0, figures  # float32 features and a bf16 copy: see the docstring
