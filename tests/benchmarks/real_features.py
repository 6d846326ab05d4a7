"""Real deep features for the probe benchmarks: the demo's members, and ResNet-50 members trained briefly.

Isotropic generated features are well conditioned and flatter every solver, so
the probe's figures are measured on features that trained networks produce on
real images. The demo's workspace (`make demo`: seven `small-resnet` members,
128-d, on Fashion-MNIST) is used where it is; otherwise it is made here
(about 5 minutes on two cores). ``TIMECAT_BENCH_WORKDIR`` names another one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import cache

REPO = Path(__file__).resolve().parents[2]
DEMO_MEMBERS = tuple(f"run{i}" for i in range(7))  # run0: Cat1, run1-2: Cat2, run3-6: Cat4


def cpu_flags() -> list[str]:
    """The bf16 and AVX-512 flags of this CPU, for the figures' provenance."""
    from pipeline.probe.c_search import cpu_flags as flags

    wanted = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx2")
    return sorted(f for f in flags() if f in wanted)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def demo_workspace() -> Path:
    """A workspace whose cache holds the demo's members for fashion-mnist (made with `timecat demo` if missing)."""
    workdir = Path(os.environ.get("TIMECAT_BENCH_WORKDIR", REPO / "demo"))
    if not _has(workdir / "features.zarr", "fashion-mnist", DEMO_MEMBERS):
        subprocess.run([sys.executable, "-m", "cli", "demo", "--workdir", str(workdir)], cwd=REPO, check=True)
    return workdir


def _has(path: Path, dataset: str, members) -> bool:
    if not path.exists():
        return False
    try:
        store = cache.open(str(path))
        return all(set(members) <= set(store.members(dataset, split)) for split in ("train", "test"))
    except cache.CacheError:
        return False


def timecat(*args, env: dict | None = None) -> tuple[dict, float]:
    """One `timecat ... --json` command in a fresh process: its JSON output and its wall seconds."""
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "cli", *map(str, args), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1", **(env or {})},
    )
    wall = time.perf_counter() - started
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout), wall


def features(workdir: Path, dataset: str, split: str, members) -> tuple[np.ndarray, np.ndarray]:
    return cache.open(str(workdir / "features.zarr")).features(dataset, split, list(members))


WAYS = (("auto", []), ("fp32", ["--precision", "fp32"]), ("sklearn", ["--backend", "sklearn"]))  # one after another


def probe_ways(*args) -> dict:
    """The same `timecat probe ARGS` as a user runs it (auto), in fp32 and with --backend sklearn, each in a fresh
    process: {way: {"record", "wall_s"}}."""
    runs = {}
    for name, extra in WAYS:
        record, wall = timecat(*args, *extra)
        runs[name] = {"record": record, "wall_s": round(wall, 1)}
    return runs


def probe_summary(run: dict) -> dict:
    """One whole-process probe's figures: ``run`` holds its record, wall seconds and refit gap."""
    record = run["record"]
    return {
        "wall_s": run["wall_s"],
        "precision": record.get("precision"),
        "preconditioner": record.get("solver", {}).get("preconditioner"),
        "top1": round(record["top1"], 2),
        "C": record["chosen"]["C"],
        "refit_gap": float(f"{run['refit_gap']:.2e}"),
        "fits_converged": all(t["fit"]["status"] == "converged" for t in [*record["search"], record["chosen"]]),
    }


def save(name: str, figures: dict) -> None:
    """Print the figures and keep them beside the benchmarks (tests/benchmarks/last_run_<name>.json)."""
    text = json.dumps(figures, indent=1, default=float)
    print(text)
    (Path(__file__).parent / f"last_run_{name}.json").write_text(text)
