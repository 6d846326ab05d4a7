"""Benchmark: one logreg probe on real deep features, against scikit-learn and Cyanure, and its solver's evaluations.

The demo's Cat4 (run3..run6: four 128-d `small-resnet` members trained 250 steps
each on Fashion-MNIST; 60,000 train and 10,000 test rows, 10 classes; the
standardised features' covariance has condition number about 1.4e5). Each
probe is a whole `timecat probe` (C search on held-out rows, refit, eval) in a
fresh process:

- ours, as a user runs it (`--precision auto`: bf16 products where the CPU has
  bf16 units), and `--precision fp32`;
- `--backend sklearn` (scikit-learn's lbfgs, tol 1e-4, 100/300 iterations);
- Cyanure (the CPU solver DINO and iBOT probe with), one fit at our chosen C.

Every objective is scored in float64 from the saved head against the float64
optimum at that C: Cyanure's fit to a relative duality gap of 1e-9, a
certificate (it agreed with trust-region Newton, tests/conftest.logreg_optimum,
to 1e-12 at C = 0.1, in 44 s against 327 s). The
solver's evaluations to that objective, with and without its
preconditioner, are counted on the same train rows.

Figures, 2026-12-07, Xeon-AMX (2 vCPUs; avx512f, avx512_bf16, amx_bf16), torch
2.15.0, scikit-learn 1.9.1, cyanure 1.2.2 (tests/benchmarks/last_run_real_probe.json;
the README's Performance section quotes them): auto (bf16) 13.6 s, refit gap
2.9e-5; fp32 14.7 s, gap 2.3e-5; scikit-learn 43.9 s, gap 8.7e-4, its fits at
their caps; all three chose C = 0.1, top-1 89.46/89.46/89.45. Speed-ups 3.23x
and 2.99x: both goals asserted below (5x with bf16 units, 3x in fp32) fail.
One Cyanure fit (float64, tol 1e-4) at C = 0.1: 25.3 s, gap 2.7e-8.
Evaluations to our objective on the 60,000 rows: 329 preconditioned against
1,525 plain at C = 0.1; 633 against more than 5,000 at C = 1.
"""

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from real_features import cpu_flags, cpu_name, demo_workspace, features, probe_summary, probe_ways, save

from pipeline.probe import batched_lbfgs as bl
from pipeline.probe import results
from pipeline.probe.heldout import standardize_in_place
from pipeline.probe.logreg_backends import objective

MEMBERS = ("run3", "run4", "run5", "run6")


def scored(root: Path, record: dict, X: np.ndarray, y: np.ndarray) -> float:
    """The float64 objective of a record's refit, from its saved head, on the standardised train rows."""
    head = results.head(root, record["id"])
    return objective(X, y, head.coef, head.intercept, head.C)


def cyanure_fit(X: np.ndarray, y: np.ndarray, C: float, tol: float) -> tuple[float, float]:
    """Cyanure's multinomial logistic regression at scikit-learn's C, in float64 (in float32 it warns of
    instability and stopped 5e-4 above the optimum), to relative duality gap ``tol``: (seconds, objective)."""
    from cyanure.estimators import Classifier

    lam = 1.0 / (len(y) * C)  # its (lambda / 2) ||W||^2 is scikit-learn's ||W||^2 / (2 C n)
    model = Classifier(loss="multiclass-logistic", penalty="l2", lambda_1=lam, tol=tol, max_iter=5000, verbose=False)
    X64 = X.astype(np.float64)
    started = time.perf_counter()
    model.fit(X64, y)
    seconds = time.perf_counter() - started
    W, b = np.asarray(model.coef_, dtype=np.float64), np.asarray(model.intercept_, dtype=np.float64).ravel()
    if W.shape[0] != X.shape[1]:
        W = W.T
    return seconds, objective(X64, y, W, b, C)


def evaluations(X: np.ndarray, y: np.ndarray, C: float) -> dict:
    """Float32 evaluations of the solver to its gap, and of plain L-BFGS (no preconditioner) to the same objective."""
    blocks, labels = {0: torch.from_numpy(X)}, torch.from_numpy(y.astype(np.int64))
    _, (ours,) = bl.fit(blocks, labels, [bl.Problem((0,), C)], 10, max_iter=20_000, gap=1e-5)
    trace = []
    bl.fit(blocks, labels, [bl.Problem((0,), C)], 10, max_iter=5000, gap=1e-9, precond=bl.Identity(), trace=trace)
    plain = next((e for _, e, f in trace if f <= ours["objective"]), None)
    return {"C": C, "preconditioned": ours["evaluations"], "plain": plain, "plain_cap": 5000}


def test_one_probe_on_the_demos_cat4(tmp_path):
    workdir = demo_workspace()
    args = ["probe", "--workdir", workdir, "--members", ",".join(MEMBERS), "--dataset", "fashion-mnist"]
    args += ["--results", tmp_path]
    runs = probe_ways(*args)
    X, y = features(workdir, "fashion-mnist", "train", MEMBERS)
    standardize_in_place(X)
    # Evaluations first: after Cyanure has run in this process, the same fit took 469 evaluations instead of
    # 217 (10,000 of these rows, C = 0.1, measured 2026-12-07), so nothing of ours is measured after it.
    C = runs["auto"]["record"]["chosen"]["C"]
    counted = {"evaluations_at_chosen_C": evaluations(X, y, C), "evaluations_at_C_1": evaluations(X, y, 1.0)}
    optimum = {}
    for run in runs.values():
        C = run["record"]["chosen"]["C"]
        if C not in optimum:
            optimum[C] = cyanure_fit(X, y, C, 1e-9)[1]
        f = scored(tmp_path, run["record"], X, y)
        run["refit_gap"] = (f - optimum[C]) / optimum[C]
    seconds, f = cyanure_fit(X, y, C, 1e-4)
    figures = {
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "threads": torch.get_num_threads(),
        "data": {"members": MEMBERS, "train": X.shape, "classes": 10},
        "probes": {name: probe_summary(run) for name, run in runs.items()},
        "cyanure_one_fit": {"C": C, "wall_s": round(seconds, 1), "gap": float(f"{(f - optimum[C]) / optimum[C]:.2e}")},
        **counted,
    }
    sklearn = runs["sklearn"]["wall_s"]
    figures["speedup"] = {name: round(sklearn / runs[name]["wall_s"], 2) for name in ("auto", "fp32")}
    save("real_probe", figures)
    has_units = bool({"avx512_bf16", "amx_bf16"} & set(figures["cpu_flags"]))
    for name in ("auto", "fp32"):
        probe = figures["probes"][name]
        assert probe["fits_converged"] and probe["refit_gap"] <= 1e-4, probe
        assert abs(probe["top1"] - figures["probes"]["sklearn"]["top1"]) <= 0.3, probe
    for found in (figures["evaluations_at_chosen_C"], figures["evaluations_at_C_1"]):
        assert (found["plain"] or np.inf) >= 2 * found["preconditioned"], found
    # The goals: at least 5x scikit-learn with bf16 units, at least 3x in fp32 on any CPU.
    assert figures["speedup"]["fp32"] >= 3.0, figures["speedup"]
    if has_units:
        assert figures["speedup"]["auto"] >= 5.0, figures["speedup"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-s", "-q", "-p", "no:cacheprovider", "--override-ini", "addopts="]))
