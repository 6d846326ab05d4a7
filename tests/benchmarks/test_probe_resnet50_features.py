"""Benchmark: one logreg probe on 2,048-d ResNet-50 features (Cat2: 4,096-d), against scikit-learn.

Two ResNet-50 members trained briefly by timecat (300 SGD steps of 64
Fashion-MNIST images at 28 px, seeds 0 and 1), their penultimate features
cached for Fashion-MNIST (60,000 train and 10,000 test rows, 10 classes): the
width of the paper's members, on images this CPU can train on in minutes
(about 10 minutes for both, made once under WORKDIR/resnet50, WORKDIR being
the demo's). Ours (`--precision auto`, and fp32) and `--backend sklearn` are
whole `timecat probe` processes; the refit's objective is scored in float64
from each saved head against Cyanure's float64 fit to a relative duality gap
of 1e-6 (a certificate).

Figures, 2026-12-07, a 2-vCPU Xeon with AMX (avx512_bf16, amx_bf16):
tests/benchmarks/last_run_resnet50_probe.json; the README's Performance section quotes them.
"""

import sys
from pathlib import Path

import pytest
import torch
from real_features import cpu_flags, cpu_name, demo_workspace, features, save, timecat
from test_probe_real_features import cyanure_fit, scored

import cache
from pipeline.heldout import standardize

MEMBERS = ("r50a", "r50b")
STEPS, BATCH = 300, 64


def resnet50_workspace() -> Path:
    """WORKDIR/resnet50 with two briefly trained ResNet-50 members cached for fashion-mnist (made if missing)."""
    demo = demo_workspace()
    workdir = demo / "resnet50"
    store = workdir / "features.zarr"
    try:
        done = all(set(MEMBERS) <= set(cache.open(str(store)).members("fashion-mnist", s)) for s in ("train", "test"))
    except (cache.CacheError, FileNotFoundError, KeyError):
        done = False
    if not done:
        where = ["--data-root", demo / "data", "--runs", workdir / "runs"]
        for seed, name in enumerate(MEMBERS):
            timecat("pretrain", "--name", name, "--dataset", "fashion-mnist", "--arch", "resnet50", "--seed", seed,
                    "--steps", STEPS, "--batch-size", BATCH, *where)  # fmt: skip
        timecat("extract", "--members", ",".join(MEMBERS), "--dataset", "fashion-mnist", *where, "--cache", store)
    return workdir


def test_one_probe_on_two_resnet50_members(tmp_path):
    workdir = resnet50_workspace()
    args = ["probe", "--cache", workdir / "features.zarr", "--members", ",".join(MEMBERS), "--dataset", "fashion-mnist"]
    args += ["--results", tmp_path]
    runs = {}
    for name, extra in (("auto", []), ("fp32", ["--precision", "fp32"]), ("sklearn", ["--backend", "sklearn"])):
        record, wall = timecat(*args, *extra)
        runs[name] = {"record": record, "wall_s": round(wall, 1)}
    X, y = features(workdir, "fashion-mnist", "train", MEMBERS)
    standardize(X)
    optimum = {}
    for run in runs.values():
        C = run["record"]["chosen"]["C"]
        if C not in optimum:
            optimum[C] = cyanure_fit(X, y, C, 1e-6)[1]
        run["refit_gap"] = (scored(tmp_path, run["record"], X, y) - optimum[C]) / optimum[C]
    figures = {
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "threads": torch.get_num_threads(),
        "data": {"members": MEMBERS, "steps": STEPS, "train": X.shape, "classes": 10},
        "probes": {
            name: {
                "wall_s": run["wall_s"],
                "precision": run["record"].get("precision"),
                "preconditioner": run["record"].get("solver", {}).get("preconditioner"),
                "top1": round(run["record"]["top1"], 2),
                "C": run["record"]["chosen"]["C"],
                "refit_gap": float(f"{run['refit_gap']:.2e}"),
                "fits_converged": all(
                    t["fit"]["status"] == "converged" for t in [*run["record"]["search"], run["record"]["chosen"]]
                ),
            }
            for name, run in runs.items()
        },
    }
    figures["speedup"] = {name: round(runs["sklearn"]["wall_s"] / runs[name]["wall_s"], 2) for name in ("auto", "fp32")}
    save("resnet50_probe", figures)
    for name in ("auto", "fp32"):
        probe = figures["probes"][name]
        assert probe["fits_converged"] and probe["refit_gap"] <= 1e-4, probe
        assert abs(probe["top1"] - figures["probes"]["sklearn"]["top1"]) <= 0.3, probe
    assert figures["speedup"]["fp32"] >= 3.0, figures["speedup"]
    if {"avx512_bf16", "amx_bf16"} & set(figures["cpu_flags"]):
        assert figures["speedup"]["auto"] >= 5.0, figures["speedup"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-s", "-q", "-p", "no:cacheprovider", "--override-ini", "addopts="]))
