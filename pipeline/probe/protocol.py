"""What a probe protocol takes and what it gives back, so that one module (``pipeline.probe.run``) can read the
cache, call any protocol, and build and save every record the same way.

A protocol sees features, never the cache: ``Inputs`` holds one concatenation's train and eval matrices (and,
for bn-linear, a reader of its cached augmented views). It returns a ``Measured``: its own record fields (which
backend, what it searched and chose, on which held-out rows), its ranked eval predictions and, for logreg, its
fitted head. Top-1, top-5, the interval, dims and row counts are the record builder's, from those predictions,
so every protocol states them alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Inputs:
    """One concatenation's features for a one-process protocol (members concatenated, in order, float32).

    Protocols may overwrite the matrices (standardise or normalise them in place): the reader made them for
    this probe alone.
    """

    X_train: np.ndarray  # (n_train, d)
    y_train: np.ndarray  # (n_train,) class indices
    X_eval: np.ndarray  # (n_eval, d)
    y_eval: np.ndarray  # (n_eval,); scored only, never used for a choice
    n_classes: int
    kind: str | None = None  # the dataset's registered kind (bn-linear's weight-decay grid), if known
    views: tuple[int, ...] = ()  # bn-linear: the cached augmented views of the train split, 0..K-1
    read_view: Callable[[int], np.ndarray] | None = None  # bn-linear: view v's train features (n_train, d)


@dataclass
class Measured:
    """What a protocol measured on one concatenation.

    ``fields`` are the protocol's own record fields (``backend``, ``search``, ``holdout``, ``chosen``, ...);
    ``eval_top5`` its (n_eval, <=5) ranked eval classes, best first; ``head`` a logreg head's
    ``results.Head`` fields (``mean``, ``scale``, ``coef``, ``intercept``, ``C``), None for other protocols.
    """

    fields: dict
    eval_top5: np.ndarray
    head: dict | None = None
