"""Weighted k-NN on L2-normalised features: the DINO recipe, read from the cache.

A query's k nearest train rows by cosine similarity s vote for their class with
weight exp(s / T), T = 0.07 (Caron et al. 2021, DINO's eval_knn.py), computed
relative to the nearest neighbour so that no T overflows (``votes``). Both
sides are L2-normalised after concatenating the members. The similarity
matrix is never built whole: queries go in blocks, and each block walks the
train rows in blocks, keeping a running top-k, so memory is
O(query block x (train block + k)) whatever the train split's size.

The protocol (``measure``): k is chosen from ``--k-grid`` (DINO's 10, 20, 100,
200: pipeline.configs.K_GRID) on the same held-out train rows as logreg, the
rest of the train split their bank, ties to the larger k; then every train row
is the bank for the eval split. Speed and memory against scikit-learn's
brute-force search: tests/benchmarks/test_knn_speed.py.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import torch

from pipeline.core.errors import TimecatError
from pipeline.probe.heldout import best_trial, describe_split, search_split, tie, topk_accuracy
from pipeline.probe.protocol import Inputs, Measured


def normalise(X: np.ndarray, block_rows: int = 8192) -> torch.Tensor:
    """X's rows scaled to unit L2 norm in place (float32; an all-zero row stays zero), as a tensor view."""
    X = torch.from_numpy(X)
    for start in range(0, len(X), block_rows):
        block = X[start : start + block_rows]
        block /= block.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return X


def take(X: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    """Rows ``index`` of X (a copy)."""
    return X.index_select(0, torch.from_numpy(index))


def neighbours(bank: torch.Tensor, queries: torch.Tensor, k: int, rows=None, query_rows=1024, bank_rows=16384):
    """(similarities, indices into ``rows``), each (n_queries, k), nearest first, block by block.

    ``rows``: the bank is these rows of ``bank`` (gathered a block at a time), else all of it.
    """
    size = len(bank) if rows is None else len(rows)
    if not 1 <= k <= size:
        raise TimecatError(f"k-NN needs 1 <= k <= the {size:,} train rows, got k = {k}")
    sims, index = [], []
    for q in range(0, len(queries), query_rows):
        Q = queries[q : q + query_rows]
        best_s = torch.full((len(Q), 0), -2.0)
        best_i = torch.zeros((len(Q), 0), dtype=torch.long)
        for b in range(0, size, bank_rows):
            part = bank[b : b + bank_rows] if rows is None else bank.index_select(0, rows[b : b + bank_rows])
            s = Q @ part.T  # (q, b)
            top = torch.topk(s, min(k, s.shape[1]), dim=1)
            merged_s = torch.cat([best_s, top.values], dim=1)
            merged_i = torch.cat([best_i, top.indices + b], dim=1)
            keep = torch.topk(merged_s, min(k, merged_s.shape[1]), dim=1)
            best_s, best_i = keep.values, merged_i.gather(1, keep.indices)
        sims.append(best_s)
        index.append(best_i)
    return torch.cat(sims), torch.cat(index)


def votes(sims, index, labels: np.ndarray, k: int, n_classes: int, temperature: float) -> torch.Tensor:
    """(n, classes) float64: the summed exp((s - s_1) / T) of each class among the first k neighbours.

    Each row is DINO's exp(s / T) vote scaled by exp(-s_1 / T), s_1 the nearest neighbour's similarity: the same
    ranking of classes, but the largest weight is 1, so a small T cannot overflow to inf (exp(1 / 0.001) does, and
    inf - inf ties every class); far neighbours underflow to 0, the limit of the vote.
    """
    out = torch.zeros(len(sims), n_classes, dtype=torch.float64)
    s = sims[:, :k].double()  # (n, k), nearest first
    weights = torch.exp((s - s[:, :1]) / temperature)
    return out.scatter_add_(1, torch.from_numpy(labels)[index[:, :k]], weights)


def ranked_classes(sims, index, labels: np.ndarray, k: int, n_classes: int, temperature: float, top: int = 5):
    """(n, top) classes ranked by their votes (``votes``), best first."""
    ballot = votes(sims, index, labels, k, n_classes, temperature)
    return torch.topk(ballot, min(top, n_classes), dim=1).indices.numpy()


def knn_topk(bank, bank_y: np.ndarray, queries, ks, n_classes: int, temperature: float, rows=None) -> dict:
    """{k: (n_queries, <=5) ranked classes} for every k of ``ks`` from one neighbour search.

    ``bank`` and ``queries`` are normalised tensors; ``rows`` (numpy) picks the
    bank's rows, and ``bank_y`` holds those rows' labels. A k beyond the bank's
    size uses the whole bank.
    """
    picked = None if rows is None else torch.from_numpy(rows)
    kmax = min(max(ks), len(bank_y))
    sims, index = neighbours(bank, queries, kmax, picked)
    return {k: ranked_classes(sims, index, bank_y, min(k, kmax), n_classes, temperature) for k in ks}


def measure(inputs: Inputs, config) -> Measured:
    """The knn protocol: k chosen on held-out train rows, then every train row is the bank.

    The held-out rows are drawn as for logreg (per class, never a class's last
    row); the rest of the train split is their bank. Ties go to the larger k
    (the smoother vote). The matrices are normalised in place. ``config`` is a
    ProbeConfig (``k_grid``, ``temperature``: DINO's by default).
    """
    y_train, n_classes = inputs.y_train, inputs.n_classes
    fit_idx, held_idx = search_split(y_train, replace(config, search_rows=len(y_train)))
    bank, queries = normalise(inputs.X_train), normalise(inputs.X_eval)
    vote = functools.partial(knn_topk, n_classes=n_classes, temperature=config.temperature)
    ranked = vote(bank, y_train[fit_idx], take(bank, held_idx), config.k_grid, rows=fit_idx)
    trials = [{"k": k, "holdout_top1": topk_accuracy(ranked[k], y_train[held_idx], 1)} for k in config.k_grid]
    k = best_trial(trials, "k", "larger", len(held_idx))["k"]
    fields = {
        "backend": "torch",
        "backend_reason": "exact k-NN, blocked over train rows",
        "search": trials,
        "holdout": describe_split(y_train, fit_idx, held_idx, n_classes),
        "chosen": {"k": k, "temperature": config.temperature, **tie(trials, "k", "larger", len(held_idx))},
    }
    return Measured(fields, vote(bank, y_train, queries, [k])[k])
