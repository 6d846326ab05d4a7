"""Benchmark: a Cat2 sweep of all 15 pairs of 6 real members, batched against one scikit-learn probe per pair.

The pool is the demo's run1..run6 (128-d `small-resnet` members of 500 and 250
steps on Fashion-MNIST; 60,000 train and 10,000 test rows, 10 classes). Ours
is one `timecat probe --cat 2 --from ...` (every C candidate of every pair in
the same passes, each member read once), as a user runs it (`--precision
auto`) and in fp32; the peer is the same command with `--backend sklearn`,
which probes the pairs one after another. Whole processes, one after another,
on one machine. Every one of our fits must converge (within 1e-4 of its
optimum, tests/test_c_search.py), and each pair's top-1 must be within
0.3 points of scikit-learn's.

Figures, 2026-12-07, Xeon-AMX (2 vCPUs; avx512f, avx512_bf16, amx_bf16), the
README's Performance section quotes them: bf16 products 109.9 s (before
`auto` picked fp32 for blocks under 512 columns), fp32 94.2 s, scikit-learn
353.0 s; 3.21x and 3.75x, so both goals asserted below (10x with bf16 units,
5x in fp32) fail. Largest top-1 difference 0.21 points; 9 of 15 pairs chose
scikit-learn's C; every fit of ours converged.
"""

import sys

import pytest
import torch
from real_features import cpu_flags, cpu_name, demo_workspace, save, timecat

POOL = ("run1", "run2", "run3", "run4", "run5", "run6")


def test_a_cat2_sweep_of_six_real_members(tmp_path):
    workdir = demo_workspace()
    args = ["probe", "--workdir", workdir, "--cat", 2, "--from", ",".join(POOL), "--dataset", "fashion-mnist"]
    runs = {}
    for name, extra in (("auto", []), ("fp32", ["--precision", "fp32"]), ("sklearn", ["--backend", "sklearn"])):
        printed, wall = timecat(*args, *extra, "--results", tmp_path / name)
        runs[name] = {"records": printed["records"], "wall_s": round(wall, 1)}
    by_pair = {name: {tuple(r["members"]): r for r in run["records"]} for name, run in runs.items()}
    figures = {
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "threads": torch.get_num_threads(),
        "pool": POOL,
        "pairs": len(by_pair["sklearn"]),
        "wall_s": {name: run["wall_s"] for name, run in runs.items()},
        "speedup": {name: round(runs["sklearn"]["wall_s"] / runs[name]["wall_s"], 2) for name in ("auto", "fp32")},
        "largest_top1_difference": {
            name: round(max(abs(by_pair[name][p]["top1"] - by_pair["sklearn"][p]["top1"]) for p in by_pair[name]), 2)
            for name in ("auto", "fp32")
        },
        "same_C": {
            name: sum(by_pair[name][p]["chosen"]["C"] == by_pair["sklearn"][p]["chosen"]["C"] for p in by_pair[name])
            for name in ("auto", "fp32")
        },
        "converged": {
            name: all(
                t["fit"]["status"] == "converged" for r in runs[name]["records"] for t in [*r["search"], r["chosen"]]
            )
            for name in ("auto", "fp32")
        },
    }
    save("real_sweep", figures)
    assert figures["pairs"] == 15 and all(figures["converged"].values()), figures
    assert max(figures["largest_top1_difference"].values()) <= 0.3, figures
    # The goals: at least 10x 15 scikit-learn probes with bf16 units, at least 5x in fp32.
    assert figures["speedup"]["fp32"] >= 5.0, figures["speedup"]
    if {"avx512_bf16", "amx_bf16"} & set(figures["cpu_flags"]):
        assert figures["speedup"]["auto"] >= 10.0, figures["speedup"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-s", "-q", "-p", "no:cacheprovider", "--override-ini", "addopts="]))
