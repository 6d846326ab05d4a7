"""Weighted k-NN (DINO's recipe) from the cache, against a plain numpy implementation."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import digits_cache

import cli
from pipeline.probe import knn


def numpy_knn(bank, bank_y, queries, k, n_classes, temperature):
    """The textbook version: the whole similarity matrix, a full sort, summed exp(s / T) votes."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = queries @ bank.T  # (q, n)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(queries), n_classes))
    for i in range(len(queries)):
        np.add.at(votes[i], bank_y[order[i]], np.exp(sims[i, order[i]] / temperature))
    return votes


@pytest.mark.parametrize("k", [1, 10, 20, 100])
def test_blocked_knn_equals_the_numpy_textbook_version(k):
    rng = np.random.default_rng(0)
    bank, queries = rng.normal(size=(700, 12)).astype(np.float32), rng.normal(size=(90, 12)).astype(np.float32)
    bank_y = rng.integers(0, 7, 700)
    expected = numpy_knn(bank, bank_y, queries, k, 7, 0.07)
    ours = knn.knn_topk(knn.normalise(bank.copy()), bank_y, knn.normalise(queries.copy()), [k], 7, 0.07)[k]
    assert np.array_equal(ours[:, 0], expected.argmax(1))
    # Blocks of 64 queries and 100 bank rows: the running top-k crosses many block borders.
    b, q = knn.normalise(bank.copy()), knn.normalise(queries.copy())
    sims, index = knn.neighbours(b, q, k, query_rows=64, bank_rows=100)
    # votes are exp(s / T) scaled per row by exp(-s_1 / T) (no overflow at small T): compare the shares.
    ours = knn.votes(sims, index, bank_y, k, 7, 0.07).numpy()
    assert np.allclose(ours / ours.sum(1, keepdims=True), expected / expected.sum(1, keepdims=True), rtol=1e-4)


def test_a_bank_subset_is_gathered_not_copied_and_k_beyond_it_is_refused():
    rng = np.random.default_rng(1)
    X = knn.normalise(rng.normal(size=(50, 4)).astype(np.float32))
    rows = np.arange(0, 50, 2)
    sims, index = knn.neighbours(X, X[:5], 3, rows=torch.from_numpy(rows), bank_rows=7)
    neighbour = X[torch.from_numpy(rows)[index]]  # (5, 3, 4): indices point into the bank's rows
    assert torch.allclose(sims, (neighbour * X[:5, None]).sum(-1))
    full = X[rows] @ X[:5].T
    assert torch.allclose(sims, torch.topk(full.T, 3, dim=1).values)
    with pytest.raises(Exception, match="k-NN needs 1 <= k <= the 25 train rows, got k = 26"):
        knn.neighbours(X, X[:5], 26, rows=torch.from_numpy(rows))


def test_knn_probe_through_the_cli_chooses_k_on_held_out_rows(tmp_path):
    names = digits_cache(tmp_path / "c.zarr")
    args = ["probe", "--members", ",".join(names), "--dataset", "digits", "--protocol", "knn"]
    args += ["--cache", str(tmp_path / "c.zarr"), "--results", str(tmp_path / "r"), "--json"]
    result = CliRunner().invoke(cli.main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["protocol"] == "knn" and [t["k"] for t in record["search"]] == [10, 20, 100, 200]
    best = max(t["holdout_top1"] for t in record["search"])
    assert record["chosen"]["k"] == max(t["k"] for t in record["search"] if t["holdout_top1"] == best)
    assert record["chosen"]["temperature"] == 0.07 and record["top1"] > 90  # digits: k-NN is strong
    lo, hi = record["top1_ci95"]
    assert lo <= record["top1"] <= hi
