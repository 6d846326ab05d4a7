"""The batched solver: every C candidate and every subset in one pass, each as if fit alone."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import digits_cache
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from pipeline import batched_logreg as bl
from pipeline import batched_probe
from pipeline.logreg_solvers import objective
from pipeline.probe import ProbeConfig, probe_matrices, standardize


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's digits, standardised, a fixed shuffle, split 1,400 train / 397 eval rows."""
    X, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    X, y = X[order].astype(np.float32), y[order]
    return X[:1400].copy(), y[:1400], X[1400:].copy(), y[1400:]


def blocks_of(X: np.ndarray, parts: int = 2) -> dict[int, torch.Tensor]:
    """X's columns cut into ``parts`` member blocks."""
    return {j: torch.from_numpy(np.ascontiguousarray(b)) for j, b in enumerate(np.array_split(X, parts, axis=1))}


def test_every_c_candidate_reaches_the_solution_it_reaches_alone(digits):
    X, y, _, _ = digits
    X = X.copy()
    standardize(X)
    grid = (1e-3, 1e-2, 1e-1, 1.0)
    problems = [bl.Problem((0, 1), C) for C in grid] + [bl.Problem((0,), 0.1), bl.Problem((1,), 0.1)]
    params, ends = bl.fit(blocks_of(X), torch.from_numpy(y), problems, 10, max_iter=2000, tol=1e-6)
    halves = np.array_split(X, 2, axis=1)
    for p, (problem, end) in enumerate(zip(problems, ends, strict=True)):
        X_p = np.hstack([halves[j] for j in problem.members])
        alone = LogisticRegression(C=problem.C, tol=1e-10, max_iter=10_000).fit(X_p, y)
        weights, intercept = bl.coefficients(params, p)
        W = np.vstack([weights[j] for j in problem.members])
        ours = objective(X_p, y, W, intercept, problem.C)
        theirs = objective(X_p, y, alone.coef_.T, alone.intercept_, problem.C)
        assert end["status"] == "converged", end  # gradient <= tol, or a decrease float32 cannot resolve
        assert abs(ours - theirs) <= 1e-4 * theirs, (problem, ours, theirs)
        assert np.array_equal((X_p @ W + intercept).argmax(1), alone.predict(X_p))


def test_each_problem_stops_on_its_own_and_says_how(digits):
    X, y, _, _ = digits
    X = X.copy()
    standardize(X)
    problems = [bl.Problem((0, 1), 1e-4), bl.Problem((0, 1), 1e4)]  # fast (strongly regularised), slow
    _, ends = bl.fit(blocks_of(X), torch.from_numpy(y), problems, 10, max_iter=11, tol=1e-3)
    fast, slow = ends
    assert fast["status"] == "converged" and fast["by"] == "gradient" and fast["grad_max"] <= 1e-3
    assert fast["iterations"] < 11  # 9 here; the slow one needs 12
    assert slow["status"] == "max_iter" and slow["iterations"] == 11 and slow["grad_max"] > 1e-3
    # Beside a slow problem, the fast one stops where it stops alone: its own iterations and evaluations.
    _, (alone,) = bl.fit(blocks_of(X), torch.from_numpy(y), problems[:1], 10, max_iter=11, tol=1e-3)
    assert (fast["iterations"], fast["evaluations"]) == (alone["iterations"], alone["evaluations"])
    assert fast["objective"] == pytest.approx(alone["objective"], rel=1e-6)


def test_two_classes_are_one_binomial_logit_with_sklearns_c(digits):
    X, y, _, _ = digits
    keep = y < 2
    X, y = X[keep].copy(), y[keep]
    standardize(X)
    params, _ = bl.fit(blocks_of(X), torch.from_numpy(y), [bl.Problem((0, 1), 0.01)], 1, max_iter=500, tol=1e-7)
    alone = LogisticRegression(C=0.01, tol=1e-10, max_iter=10_000).fit(X, y)
    weights, intercept = bl.coefficients(params, 0)
    W = np.vstack([weights[0], weights[1]])
    assert W.shape == (64, 1)
    assert objective(X, y, W, intercept, 0.01) == pytest.approx(objective(X, y, alone.coef_.T, alone.intercept_, 0.01))


def test_the_batched_probe_chooses_the_c_and_top1_of_one_at_a_time_fits(digits):
    X, y, X_eval, y_eval = digits
    config = ProbeConfig("digits", ("a",), search_iter=500, max_iter=1000)
    ours = probe_matrices(X.copy(), y, X_eval.copy(), y_eval, replace(config, backend="batched", precision="fp32"))
    alone = probe_matrices(X.copy(), y, X_eval.copy(), y_eval, replace(config, backend="sklearn"))
    assert ours["backend"] == "batched" and ours["precision"] == "fp32"
    assert ours["chosen"]["C"] == alone["chosen"]["C"]
    assert abs(ours["top1"] - alone["top1"]) <= 0.1
    for a, b in zip(ours["search"], alone["search"], strict=True):
        assert a["C"] == b["C"] and abs(a["holdout_top1"] - b["holdout_top1"]) <= 1.0
    assert all("status" in t["fit"] for t in ours["search"]) and "fit" in ours["chosen"]


def test_bf16_agrees_with_fp32_and_the_record_says_which(digits):
    X, y, X_eval, y_eval = digits
    config = ProbeConfig("digits", ("a",), backend="batched")
    fp32 = probe_matrices(X.copy(), y, X_eval.copy(), y_eval, replace(config, precision="fp32"))
    bf16 = probe_matrices(X.copy(), y, X_eval.copy(), y_eval, replace(config, precision="bf16"))
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert abs(fp32["top1"] - bf16["top1"]) <= 0.2 + 100 / len(y_eval)  # 0.2 points, or one row of 397
    auto, why = batched_probe.resolve_precision("auto", torch.device("cpu"))
    has_units = bool(batched_probe.cpu_flags() & {"avx512_bf16", "amx_bf16"})
    assert auto == ("bf16" if has_units else "fp32") and why


def test_subsets_in_one_batch_equal_subsets_fit_one_by_one(digits):
    X, y, X_eval, y_eval = digits
    X, X_eval = X.copy(), X_eval.copy()
    standardize(X, X_eval)
    train, evals = blocks_of(X, 4), blocks_of(X_eval, 4)
    subsets = [(0, 1), (0, 2), (1, 3), (2, 3)]
    config = ProbeConfig("digits", ("a",), precision="fp32", search_iter=2000, max_iter=2000, tol=1e-6)
    together = batched_probe.probe_subsets(train, y, lambda: (evals, y_eval), subsets, config, 10)
    tiny = replace(config, memory_gib=1e-9)  # a budget of one subset per batch
    alone = batched_probe.probe_subsets(train, y, lambda: (evals, y_eval), subsets, tiny, 10)
    assert together[0]["batch"]["batches"] == 1 and alone[0]["batch"]["batches"] == 4
    for a, b in zip(together, alone, strict=True):
        assert a["chosen"]["C"] == b["chosen"]["C"] and abs(a["top1"] - b["top1"]) <= 0.1
        assert a["dim"] == 32


def test_unknown_precision_names_the_choices():
    with pytest.raises(Exception, match=r"unknown precision 'fp8'; choose one of \['auto', 'bf16', 'fp32'\]"):
        ProbeConfig("d", ("a",), precision="fp8")


def test_a_batched_sweep_gives_the_records_of_one_probe_per_subset(tmp_path):
    from pipeline import results
    from pipeline.probe import probe, sweep

    names = digits_cache(tmp_path / "c.zarr")
    path = str(tmp_path / "c.zarr")
    config = ProbeConfig("digits", names, precision="fp32")
    records, summary = sweep(config, names, 2, None, path, tmp_path / "r")
    assert len(records) == 6 and {r["backend"] for r in records} == {"batched"}
    assert [r["id"] for r in results.load(tmp_path / "r")] == [r["id"] for r in records]
    for record in records:
        alone = probe(replace(config, members=tuple(record["members"]), backend="sklearn"), path)
        # Both stop at the default tol 1e-4, a little apart: 4 rows of 397 (the benchmark holds the
        # issue's 0.5 points on 10,000 eval rows).
        assert abs(record["top1"] - alone["top1"]) <= 400 / 397, (record["members"], record["top1"], alone["top1"])
        assert record["sweep"] == {"cat": 2, "pool": list(names), "subsets": 6}
        assert set(alone) <= set(record)  # the same fields, and more
        assert record["batch"]["subsets"] == 6 and record["dim"] == 32
    top1 = np.array([r["top1"] for r in records])
    assert summary["top1"]["mean"] == pytest.approx(top1.mean()) and summary["count"] == 6
