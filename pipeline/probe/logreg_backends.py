"""The logreg protocol one C at a time (``measure``), on the backends sklearn, torch and cuml.

``measure`` standardises with the train columns' statistics, runs the C search
one candidate at a time (``c_search.choose_c``: the same policy and choices as
the batched path), refits at the chosen C warm-started from the last search
fit, and ranks the eval rows' classes. The backends: sklearn, scikit-learn's
L-BFGS on the CPU (the reference; it holds all n x classes logits at once);
torch, timecat's own solver (``batched_lbfgs``) one C at a time, so it reaches
each optimum to the gap, streaming logits when they would not fit; cuml,
cuML's L-BFGS on a GPU (the gpu extra). ``choose`` picks one for ``auto`` and
says why. Measured against the batched default: tests/benchmarks/
test_probe_backends.py (a Cat4-shaped generated problem, per backend),
test_probe_real_features.py and test_sweep_real_features.py (scikit-learn
against batched on real features); agreement of torch and scikit-learn at one
C: tests/test_logreg_backends.py.

Every backend minimises the same objective as scikit-learn's
``LogisticRegression``: mean cross-entropy + ||W||^2 / (2 C n), intercept not
penalised, so one C means the same everywhere (``objective`` computes it). Two
classes are one binomial logit in every backend, as in scikit-learn: a
two-column softmax with both columns penalised would halve the penalty of the
logit difference, so its C would mean 2 C. Each takes float32 (n, d) matrices
and makes no float64 copy (scikit-learn 1.9 keeps float32 through L-BFGS; older
releases upcast). Each warm-starts from its previous fit when the fit sees the
same classes, and starts cold when the class set changes. This module imports
no loader, dataset or model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from pipeline.core.errors import TimecatError
from pipeline.core.progress import get_logger, progress
from pipeline.probe.heldout import column_stats
from pipeline.probe.protocol import Inputs, Measured

log = get_logger(__name__)

INT32_LIMIT = 2**31  # cuML's softmax kernel indexes n_classes x n_rows with 32-bit ints
# (its qn solver's n_classes x n_samples buffer; full iNat18 is 3.56e9 > 2^31)
LOGITS_BYTES = 2**30  # auto on CPU: above 1 GiB of float32 logits, stream them with torch
BLOCK_BYTES = 512 * 2**20  # rows per streamed block: features + logits of a block within about 512 MiB


@dataclass(frozen=True)
class FitOptions:
    """Shared solver settings."""

    n_classes: int
    seed: int = 0
    tol: float = 1e-4  # sklearn, cuml: L-BFGS stopping tolerance on the gradient (scikit-learn's default)
    gap: float = 1e-5  # torch: the relative gap to the optimum at which a fit stops (pipeline.probe.batched_lbfgs)
    cap: int = 5000  # torch: iterations per precision phase
    precision: str = "fp32"  # torch: auto, bf16 or fp32 (pipeline.probe.c_search.solver_precision)


def objective(X: np.ndarray, y: np.ndarray, W: np.ndarray, b: np.ndarray, C: float) -> float:
    """scikit-learn's objective at weights W (d, m) and intercept b (m,), in float64.

    Mean log-loss + ||W||^2 / (2 C n). m = 1: the binomial logit of class 1
    (labels 0/1); otherwise one column per class, labels indexing the columns.
    """
    Z = X.astype(np.float64) @ W + b  # (n, m)
    n = len(y)
    if W.shape[1] == 1:
        z = Z[:, 0]
        losses = np.logaddexp(0.0, z) - np.asarray(y, dtype=np.float64) * z
    else:
        top = Z.max(axis=1)
        losses = top + np.log(np.exp(Z - top[:, None]).sum(axis=1)) - Z[np.arange(n), y]
    return float(losses.mean() + (W**2).sum() / (2 * C * n))


def _same_classes(previous: np.ndarray | None, y: np.ndarray) -> tuple[bool, np.ndarray]:
    present = np.unique(y)
    return previous is not None and np.array_equal(previous, present), present


class SklearnBackend:
    """scikit-learn's L-BFGS: the CPU reference, warm-started along the C path."""

    name = "sklearn"

    def __init__(self, options: FitOptions):
        self.options = options
        self.model = None
        self.classes = None  # the classes of the last fit
        self.warm_started = False  # whether the last fit started from the previous one

    def fit(self, X: np.ndarray, y: np.ndarray, C: float, max_iter: int) -> dict:
        """Fit with L2 strength 1/C; return how it ended (status converged or max_iter, iterations)."""
        from sklearn.linear_model import LogisticRegression

        # scikit-learn warm-starts from coef_ whatever the classes: a changed class set
        # would fail on the coefficients' shape, or start from another problem's weights.
        self.warm_started, self.classes = _same_classes(self.classes, y)
        if not self.warm_started:
            self.model = LogisticRegression(tol=self.options.tol, random_state=self.options.seed, warm_start=True)
        self.model.C, self.model.max_iter = C, max_iter
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.model.fit(X, y)
        capped = any("converge" in str(w.message).lower() for w in caught)
        return {"status": "max_iter" if capped else "converged", "by": "tol", "iterations": int(self.model.n_iter_[0])}

    def topk(self, X: np.ndarray, k: int) -> np.ndarray:
        """(n, k) most probable classes, best first."""
        return _topk_rows(self.model.decision_function(X), k, self.model.classes_)

    def coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        """Weights (d, m) and intercept (m,), float64: m = 1 for two classes, else one column per class."""
        return self.model.coef_.T.astype(np.float64), self.model.intercept_.astype(np.float64)


class TorchBackend:
    """One C at a time on timecat's own solver (pipeline.probe.batched_lbfgs: preconditioned, to the gap), on the GPU
    or the CPU.

    The data is one device tensor when it fits the device (a zero-copy view on
    CPU); otherwise it stays in host memory and every evaluation streams it to
    the device block by block, so full iNat18 (437k x 10240, 8142 classes)
    needs memory for one block of features and logits, not for n x classes.
    """

    name = "torch"

    def __init__(self, options: FitOptions, device: str | None = None):
        import torch

        self.torch = torch
        self.options = options
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.params = None  # the last fit's weights (pipeline.probe.batched_lbfgs.Params), kept as a warm start
        self.classes = None  # the classes of the last fit
        self.warm_started = False  # whether the last fit started from the previous one
        # Two classes: one binomial logit, as scikit-learn, so that C means the same.
        self.width = 1 if options.n_classes == 2 else options.n_classes
        self._basis = (None, None)  # (the matrix, its preconditioner): the C search refits the same rows

    def _source(self, X: np.ndarray):
        """X as a float32 tensor: on the device when it fits there, else in host memory (streamed)."""
        source = self.torch.from_numpy(X)  # shares X's memory
        if self.device.type == "cuda" and _fits_on_gpu(X.nbytes, self.device, self.torch):
            source = source.to(self.device)
        return source

    def fit(self, X: np.ndarray, y: np.ndarray, C: float, max_iter: int) -> dict:
        """Fit with L2 strength 1/C to the options' gap, warm-started from the previous fit; return its end state.

        ``max_iter`` is the one-C backends' cap; this solver stops at its gap (``FitOptions.cap`` per phase)."""
        from pipeline.probe import batched_lbfgs as bl
        from pipeline.probe.c_search import solver_precision

        torch = self.torch
        same, self.classes = _same_classes(self.classes, y)
        self.warm_started = same and self.params is not None and self.params.W[0].shape[0] == X.shape[1]
        labels = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)).to(self.device)
        blocks = {0: self._source(X)}
        problem = bl.Problem((0,), C)
        if self._basis[0] is not X:
            self._basis = (X, bl.Preconditioner.of(blocks, [problem], device=self.device))
        precision, _ = solver_precision(self.options.precision, self.device)
        self.params, (end,) = bl.fit(
            blocks,
            labels,
            [problem],
            self.width,
            max_iter=self.options.cap,
            gap=self.options.gap,
            precision=precision,
            init=self.params if self.warm_started else None,
            precond=self._basis[1],
        )
        return end

    def topk(self, X: np.ndarray, k: int) -> np.ndarray:
        """(n, k) highest-scoring classes, best first, computed block by block."""
        from pipeline.probe import batched_lbfgs as bl

        return bl.topk({0: self._source(X)}, self.params, k, device=self.device)[0]

    def coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        """Weights (d, m) and intercept (m,), float64: m = 1 for two classes, else one column per class."""
        from pipeline.probe import batched_lbfgs as bl

        weights, intercept = bl.coefficients(self.params, 0)
        return weights[0], intercept


class CumlBackend:
    """cuML's quasi-Newton solver on one GPU (the ``gpu`` extra).

    ``penalty_normalized=True`` makes its C scikit-learn's. Its softmax kernel
    indexes n_classes x n_rows with 32-bit ints, so larger problems are refused
    (full iNat18 is 3.56e9): use the torch backend for them.
    """

    name = "cuml"

    def __init__(self, options: FitOptions):
        try:
            import cupy
            from cuml.linear_model import LogisticRegression
        except ImportError as e:
            raise TimecatError(f"the cuml backend needs the gpu extra (pip install 'timecat[gpu]'): {e}") from None
        self.cupy, self.LogisticRegression, self.options = cupy, LogisticRegression, options
        self.model = None
        self.warm_started = False  # cuML refits from scratch every time

    def fit(self, X: np.ndarray, y: np.ndarray, C: float, max_iter: int) -> dict:
        """Fit with L2 strength 1/C on the GPU; return how it ended (status, iterations)."""
        if X.shape[0] * self.options.n_classes >= INT32_LIMIT:
            raise TimecatError(
                f"cuml cannot fit {X.shape[0]:,} rows x {self.options.n_classes:,} classes: its softmax indexes "
                "with 32-bit ints (limit 2^31); use --backend torch"
            )
        self.model = self.LogisticRegression(
            penalty="l2", C=C, max_iter=max_iter, tol=self.options.tol, solver="qn", penalty_normalized=True
        )
        self.model.fit(self.cupy.asarray(X), self.cupy.asarray(y.astype(np.int32)))  # one device copy
        iterations = int(np.max(self.model.solver_model.num_iters))
        return {"status": "converged" if iterations < max_iter else "max_iter", "by": "tol", "iterations": iterations}

    def topk(self, X: np.ndarray, k: int) -> np.ndarray:
        """(n, k) most probable classes, best first."""
        proba = self.cupy.asnumpy(self.model.predict_proba(self.cupy.asarray(X)))  # (n, classes seen in the fit)
        # Columns follow the classes the fit saw, which need not be 0..k-1.
        return _topk_rows(proba, k, np.asarray(self.cupy.asnumpy(self.model.classes_)))

    def coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        """Weights (d, m) and intercept (m,), float64: m = 1 for two classes, else one column per class."""
        # coef_ is (classes or 1, d), as scikit-learn's.
        coef = np.asarray(self.cupy.asnumpy(self.model.coef_), dtype=np.float64).T
        return coef, np.asarray(self.cupy.asnumpy(self.model.intercept_), dtype=np.float64).ravel()


BACKENDS = {"sklearn": SklearnBackend, "torch": TorchBackend, "cuml": CumlBackend}
CHOICES = ("auto", *BACKENDS)


def choose(name: str, n_rows: int, n_classes: int) -> tuple[str, str]:
    """Resolve ``auto`` among these one-fit-at-a-time backends for this shape and hardware: ``(name, why)``.

    (The probe's own ``auto`` is the batched solver, pipeline.probe.c_search.)
    """
    if name != "auto":
        if name not in BACKENDS:
            raise TimecatError(f"unknown backend {name!r}; choose one of {list(CHOICES)}")
        return name, "asked for"
    import torch

    if torch.cuda.is_available():
        if n_rows * n_classes >= INT32_LIMIT:
            return "torch", "GPU, but n_classes x n_rows exceeds cuML's 32-bit indexing"
        try:
            import cuml  # noqa: F401
        except ImportError:
            return "torch", "GPU without the gpu extra (cuML)"
        return "cuml", "GPU with cuML"
    # On 2 CPU cores the two took the same time for Cat4 50k x 8192 x 100 classes
    # (README, Performance); scikit-learn holds all n x classes logits at once,
    # torch streams them in blocks, so torch takes over where those get large.
    if n_rows * n_classes * 4 > LOGITS_BYTES:
        return "torch", "CPU, n x classes logits too large to hold at once: streamed in blocks"
    return "sklearn", "CPU: the reference solver, as fast as torch at this size"


def make(name: str, options: FitOptions):
    """A fresh backend instance of a resolved name."""
    return BACKENDS[name](options)


def _topk_rows(scores: np.ndarray, k: int, classes: np.ndarray) -> np.ndarray:
    if scores.ndim == 1:  # two classes: scikit-learn returns one score, positive for classes[1]
        scores = np.stack([-scores, scores], axis=1)
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(scores, part, axis=1).argsort(axis=1)[:, ::-1]
    return np.asarray(classes)[np.take_along_axis(part, order, axis=1)]


def _fits_on_gpu(nbytes: int, device, torch) -> bool:
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < 0.6 * free  # leave room for logits, gradients and L-BFGS history


def measure(inputs: Inputs, config) -> Measured:
    """The logreg protocol on one C at a time (backend sklearn, torch or cuml): standardise with the train
    columns' statistics (in place), choose C (``c_search.choose_c``), refit on every train row at that C, rank
    the eval rows' classes. ``config`` is a ProbeConfig."""
    from pipeline.probe.c_search import choose_c, standardize_block_in_place

    X_train, y_train, n_classes = inputs.X_train, inputs.y_train, inputs.n_classes
    mean, scale = column_stats(X_train)
    for X in (X_train, inputs.X_eval):
        standardize_block_in_place(X, mean, scale, "cpu")
    name, why = choose(config.backend, len(y_train), n_classes)
    options = FitOptions(n_classes, config.seed, config.tol, config.gap, config.iter_cap, config.precision)
    model = make(name, options)
    log.info("backend %s (%s)", name, why)
    C, trials, split, how = choose_c(X_train, y_train, model, config, n_classes)
    # The refit keeps the chosen C, as CLIP's protocol does. (Keeping C * n_search / n
    # instead, the same per-row strength, over-regularised by 0.5 points here.)
    # Warm start from the last search fit: the same optimum up to sampling, so
    # L-BFGS needs a fraction of the iterations of a cold start.
    with progress(total=1, desc=f"refit at C={C:.3g} ({config.dataset}, {len(y_train):,} rows)", unit="fit") as bar:
        end = model.fit(X_train, y_train, C, config.max_iter)
        bar.update(1)
    W, b = model.coefficients()
    chosen = {"C": C, "converged": end["status"] == "converged", "warm_start": model.warm_started, **how, "fit": end}
    fields = {
        "backend": name,
        "backend_reason": why,
        "search": trials,
        "search_rows": split["fit_rows"],
        "holdout": split,
        "chosen": chosen,
    }
    head = {"mean": mean, "scale": scale, "coef": W, "intercept": b, "C": C}
    return Measured(fields, model.topk(inputs.X_eval, 5), head)
