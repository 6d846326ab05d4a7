"""Held-out model selection shared by every probe path: standardisation, the search split, the tie rule.

The search split is drawn from the train split alone (seeded, per class), so
the eval split is never used for any choice.
"""

from __future__ import annotations

import numpy as np

from pipeline.core.errors import TimecatError


def column_stats(X_train: np.ndarray, block_rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The train columns' float32 mean and std (dead columns get std 1, so they stay 0, never inf).

    Statistics accumulate in float64 over blocks of rows: ``np.std`` would build
    a float64 temporary of the whole matrix (twice its size).
    """
    n = len(X_train)
    total = np.zeros(X_train.shape[1])
    for start in range(0, n, block_rows):
        total += X_train[start : start + block_rows].sum(axis=0, dtype=np.float64)
    mean = total / n
    squares = np.zeros(X_train.shape[1])
    for start in range(0, n, block_rows):
        squares += ((X_train[start : start + block_rows] - mean) ** 2).sum(axis=0)
    std = np.sqrt(squares / n).astype(np.float32)
    std[std < 1e-6] = 1.0
    return mean.astype(np.float32), std


def standardize_in_place(X_train: np.ndarray, *others: np.ndarray, block_rows: int = 4096) -> None:
    """Centre and scale every matrix in place with the train columns' mean and std."""
    mean, std = column_stats(X_train, block_rows)
    for X in (X_train, *others):
        for start in range(0, len(X), block_rows):
            X[start : start + block_rows] -= mean
            X[start : start + block_rows] /= std


def topk_accuracy(best: np.ndarray, y: np.ndarray, k: int) -> float:
    """Percentage of rows whose label is among the first k of ``best`` ((n, >=k) classes, best first)."""
    return 100.0 * float((best[:, :k] == y[:, None]).any(axis=1).mean())


def _rounded_share(counts: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """fraction x counts per class, rounded up or down at random (seeded), so that totals stay unbiased."""
    want = counts * fraction
    base = np.floor(want)
    return (base + (rng.random(len(counts)) < want - base)).astype(np.int64)


def _take_per_class(y: np.ndarray, take: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Bool mask over y: ``take[c]`` rows of each class c, drawn at random (seeded)."""
    order = rng.permutation(len(y))
    order = order[np.argsort(y[order], kind="stable")]  # grouped by class, shuffled within each class
    grouped = y[order]
    rank = np.arange(len(y)) - np.searchsorted(grouped, grouped, side="left")  # position within its class
    mask = np.zeros(len(y), dtype=bool)
    mask[order[rank < take[grouped]]] = True
    return mask


def search_split(y: np.ndarray, config) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stratified (fit rows, held-out rows) of the train split for choosing C.

    Per class, ``holdout`` of its rows are held out (rounded at random, so that
    classes of 2-4 rows are held out in proportion over the split, not never or
    always), but never its last row: every class keeps at least one row in the
    fitting part, so a class of one row is fit, not lost. The fitting part is
    then capped at max(search_rows, search_per_class x classes) rows, again per
    class with at least one row each, so the search fits the same classes as the
    refit (and warm starts stay valid), and a problem of 8,142 classes is not
    searched on about one row per class.
    """
    rng = np.random.default_rng(config.seed)
    counts = np.bincount(y)
    spare = np.maximum(counts - 1, 0)  # rows a class can give without losing its last
    if not spare.any():
        raise TimecatError(
            f"every class of {config.dataset}/{config.train_split} has a single train row: no row is left to hold "
            "out for choosing C; a held-out search needs at least one class with 2 or more rows"
        )
    held_take = np.minimum(_rounded_share(counts, config.holdout, rng), spare)
    if not held_take.any():  # small data can round every class down: hold out one row of the largest
        held_take[np.argmax(spare)] = 1
    held = _take_per_class(y, held_take, rng)
    fit_idx, held_idx = np.flatnonzero(~held), np.flatnonzero(held)
    budget = max(config.search_rows, config.search_per_class * int(np.count_nonzero(counts)))
    if len(fit_idx) > budget:
        fit_counts = np.bincount(y[fit_idx], minlength=len(counts))
        keep = np.where(fit_counts > 0, np.maximum(_rounded_share(fit_counts, budget / len(fit_idx), rng), 1), 0)
        fit_idx = fit_idx[_take_per_class(y[fit_idx], keep, rng)]
    return fit_idx, held_idx


def shot_rows(y: np.ndarray, shots: int, seed: int, draw: int) -> np.ndarray:
    """Draw ``draw`` of a few-shot train set: ``shots`` rows of each class (all of a smaller class), sorted.

    Seeded by (seed, draw). Within a draw the classes are shuffled once, so the
    1-shot rows are among the 5-shot rows of the same draw: a shots curve adds
    rows, it does not swap them.
    """
    if shots < 1:
        raise TimecatError(f"shots must be at least 1 per class, got {shots}")
    rng = np.random.default_rng([seed, draw])
    take = np.minimum(np.bincount(y), shots)
    return np.flatnonzero(_take_per_class(y, take, rng))


def fixed_split(y: np.ndarray, n_classes: int, C: float) -> dict:
    """The record of a probe that could not search C: every class has one train row, so none can be held out."""
    return {
        "train_rows": len(y),
        "classes": n_classes,
        "held_out_rows": 0,
        "held_out_classes": 0,
        "fit_rows": len(y),
        "fit_classes": len(np.unique(y)),
        "rule": f"one train row per class leaves none to hold out: no search, C fixed at {C:g} "
        "(the --fixed-c rule; scikit-learn's default C)",
    }


def describe_split(y: np.ndarray, fit_idx: np.ndarray, held_idx: np.ndarray, n_classes: int) -> dict:
    """How the held-out part was drawn, for the record: rows and classes on each side."""
    return {
        "train_rows": len(y),
        "classes": n_classes,
        "held_out_rows": len(held_idx),
        "held_out_classes": len(np.unique(y[held_idx])),  # classes the choice of C is scored on
        "fit_rows": len(fit_idx),
        "fit_classes": len(np.unique(y[fit_idx])),
        "rule": "per class: holdout x rows (seeded rounding), never its last row; fit rows capped at "
        "max(search_rows, search_per_class x classes), at least one per class",
    }


TIE_ROWS = 1  # held-out rows within which candidates are tied (kernel rounding moves about one)


def _tied(trials: list[dict], rows: int) -> list[dict]:
    """The trials whose held-out top-1 is within TIE_ROWS rows of the highest (``rows`` held-out rows)."""
    top = max(t["holdout_top1"] for t in trials)
    slack = 100.0 * TIE_ROWS / max(rows, 1) + 1e-9  # percentage points, with room for the division's rounding
    return [t for t in trials if t["holdout_top1"] >= top - slack]


def best_trial(trials: list[dict], key: str, regularised: str, rows: int) -> dict:
    """The trial chosen: the most regularised of those within one held-out row of the highest held-out top-1.

    A one-row difference is what the rounding of matrix kernels can move between
    batch shapes, processes and CPUs (measured: one row of 280 flipped C from 1
    to 3.16 between a batch of four subsets and the same subset alone), so it
    must not decide; the more regularised candidate is the safer of a tie.
    ``regularised`` says which end of ``key`` is more regularised: ``"smaller"``
    (C) or ``"larger"`` (weight decay, k). ``rows``: the held-out rows. Every
    trial counts, refined ones included.
    """
    tied = _tied(trials, rows)
    if regularised == "smaller":
        return min(tied, key=lambda t: t[key])
    if regularised == "larger":
        return max(tied, key=lambda t: t[key])
    raise TimecatError(f"unknown regularised end {regularised!r}; choose 'smaller' or 'larger'")


def tie(trials: list[dict], key: str, regularised: str, rows: int) -> dict:
    """How the choice was made, for the record: ``near_tie`` and the ``tied`` values within one held-out row."""
    tied = sorted(t[key] for t in _tied(trials, rows))
    best_trial(trials, key, regularised, rows)  # checks ``regularised``
    return {"near_tie": len(tied) > 1, "tied": tied, "tie_rows": TIE_ROWS}
