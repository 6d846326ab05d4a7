"""Stage 4: linear-probe any set of cached members, without touching an image.

Protocol ``logreg``: standardise with train statistics; choose the L2 strength C
on a seeded, stratified held-out part of the train split (a coarse log grid,
then a finer one around the best); refit on the whole train split; report top-1
and top-5 on the eval split. The eval split is never used for any choice.
"""

from __future__ import annotations

import itertools
import resource
import time
import uuid
from dataclasses import asdict, dataclass, replace

import numpy as np

import cache
from pipeline import __version__, backends, tc
from pipeline.errors import TimecatError
from pipeline.progress import get_logger, progress

log = get_logger(__name__)

PROTOCOLS = ("logreg", "tc")
PROVENANCE_KEYS = ("checkpoint_sha256", "dataset_fingerprint", "arch", "params", "seed", "steps", "pretrain_dataset")


@dataclass(frozen=True)
class ProbeConfig:
    """Which members to probe on which dataset, and the model-selection recipe."""

    dataset: str
    members: tuple[str, ...]
    train_split: str = "train"
    eval_split: str = "test"
    holdout: float = 0.2  # fraction of the train split held out to choose C
    seed: int = 0  # held-out split and solver
    search_rows: int = 10_000  # at most this many train rows fit each C candidate (stratified sample)
    c_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # coarse, one per decade
    refine: tuple[float, ...] = (10**-0.5, 10**0.5)  # multipliers tried around the best coarse C
    search_iter: int = 100  # L-BFGS iterations per C candidate (warm-started along the grid)
    max_iter: int = 300  # L-BFGS iterations of the final refit (warm-started from the search)
    tol: float = 1e-4  # L-BFGS stopping tolerance (scikit-learn's default)
    backend: str = "auto"  # auto | sklearn | torch | cuml (see pipeline.backends); logreg only
    protocol: str = "logreg"  # logreg | tc (the paper's BatchNorm + Linear head, SGD, 28 epochs)
    wd_grid: tuple[float, ...] | None = None  # tc: weight decays to try; None: the paper's grid for the dataset

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise TimecatError(f"unknown protocol {self.protocol!r}; choose one of {list(PROTOCOLS)}")
        if self.backend not in backends.CHOICES:
            raise TimecatError(f"unknown backend {self.backend!r}; choose one of {list(backends.CHOICES)}")
        if not 0 < self.holdout < 1:
            raise TimecatError(f"holdout is a fraction in (0, 1), got {self.holdout}")
        if not self.members:
            raise TimecatError("no members given: pass --members run0,run1,...")


def standardize(X_train: np.ndarray, *others: np.ndarray, block_rows: int = 4096) -> None:
    """Centre and scale every matrix in place with the train columns' mean and std.

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
    std[std < 1e-6] = 1.0  # dead features stay 0 instead of becoming inf
    mean = mean.astype(np.float32)
    for X in (X_train, *others):
        for start in range(0, len(X), block_rows):
            X[start : start + block_rows] -= mean
            X[start : start + block_rows] /= std


def topk_accuracy(best: np.ndarray, y: np.ndarray, k: int) -> float:
    """Percentage of rows whose label is among the first k of ``best`` ((n, >=k) classes, best first)."""
    return 100.0 * float((best[:, :k] == y[:, None]).any(axis=1).mean())


def search_split(y: np.ndarray, config: ProbeConfig) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stratified (fit rows, held-out rows) of the train split, fit rows capped at search_rows."""
    from sklearn.model_selection import train_test_split

    fit_idx, held_idx = train_test_split(
        np.arange(len(y)), test_size=config.holdout, random_state=config.seed, stratify=y
    )
    if len(fit_idx) > config.search_rows:
        fit_idx, _ = train_test_split(
            fit_idx, train_size=config.search_rows, random_state=config.seed, stratify=y[fit_idx]
        )
    return np.sort(fit_idx), np.sort(held_idx)


def choose_c(X: np.ndarray, y: np.ndarray, model, config: ProbeConfig):
    """Pick C by held-out top-1: the coarse grid, then refinements around its best.

    ``model`` is a backend; it is left holding the last fit (a warm start for
    the refit). Returns the best C, every trial and the rows each was fit on.
    """
    fit_idx, held_idx = search_split(y, config)
    X_fit, y_fit, X_held, y_held = X[fit_idx], y[fit_idx], X[held_idx], y[held_idx]
    trials: list[dict] = []

    def trial(C: float) -> None:
        converged = model.fit(X_fit, y_fit, C, config.search_iter)
        top1 = topk_accuracy(model.topk(X_held, 1), y_held, 1)
        trials.append({"C": C, "holdout_top1": top1, "converged": converged})

    # Ascending C: each fit starts from the more regularised solution before it.
    for C in progress(sorted(config.c_grid), desc=f"choose C ({config.dataset})", unit="fit"):
        trial(C)
    best = max(trials, key=lambda t: t["holdout_top1"])["C"]
    for factor in sorted(config.refine):
        trial(best * factor)
    return max(trials, key=lambda t: t["holdout_top1"])["C"], trials, len(fit_idx)


def check_classes(y_train: np.ndarray, classes: list, config: ProbeConfig) -> None:
    """Every class must have train examples (at least 2, to be stratified into the held-out part)."""
    counts = np.bincount(y_train, minlength=len(classes))
    missing = [classes[c] for c in np.flatnonzero(counts == 0)]
    if missing:
        raise TimecatError(
            f"{config.dataset}/{config.train_split} has no examples of class(es) {missing[:10]}; "
            "a linear probe cannot learn them: prepare a train split that covers every class"
        )
    rare = [classes[c] for c in np.flatnonzero(counts == 1)]
    if rare:
        raise TimecatError(f"{config.dataset}/{config.train_split}: class(es) {rare[:10]} have a single example")


def probe_matrices(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_eval: np.ndarray,
    y_eval: np.ndarray,
    config: ProbeConfig,
    n_classes: int | None = None,
) -> dict:
    """The logreg protocol on given matrices (standardised in place); returns the measured fields."""
    n_classes = n_classes or int(max(y_train.max(), y_eval.max())) + 1
    name, why = backends.choose(config.backend, len(y_train), n_classes)
    model = backends.make(name, backends.FitOptions(n_classes, config.seed, config.tol))
    log.info("backend %s (%s)", name, why)
    standardize(X_train, X_eval)
    C, trials, search_rows = choose_c(X_train, y_train, model, config)
    # The refit keeps the chosen C, as CLIP's protocol does. (Keeping C * n_search / n
    # instead, the same per-row strength, over-regularised by 0.5 points here.)
    # Warm start from the last search fit: the same optimum up to sampling, so
    # L-BFGS needs a fraction of the iterations of a cold start.
    converged = model.fit(X_train, y_train, C, config.max_iter)
    best = model.topk(X_eval, 5)
    return {
        "backend": name,
        "backend_reason": why,
        "search": trials,
        "search_rows": search_rows,
        "chosen": {"C": C, "converged": converged},
        "dim": int(X_train.shape[1]),
        "n_train": len(y_train),
        "n_eval": len(y_eval),
        "top1": topk_accuracy(best, y_eval, 1),
        "top5": topk_accuracy(best, y_eval, 5),
    }


def peak_rss_mib() -> float:
    """This process's peak resident memory, MiB.

    Linux's VmHWM, because getrusage's ru_maxrss survives exec: a probe started
    from a large process (a notebook, a benchmark) would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # macOS and others


def probe(config: ProbeConfig, cache_path: str) -> dict:
    """Probe the concatenation of ``config.members`` read from the cache; return the result record."""
    started = time.perf_counter()
    store = cache.open(cache_path)
    try:
        # A probe reads each matrix once, so a full NaN scan costs little next to the fit.
        X_train, y_train = store.features(config.dataset, config.train_split, config.members, scan_nan=True)
        X_eval, y_eval = store.features(config.dataset, config.eval_split, config.members, scan_nan=True)
        classes = store.split_attrs(config.dataset, config.train_split)["classes"]
        check_classes(y_train, classes, config)
        provenance = {m: store.provenance(config.dataset, config.train_split, m) for m in config.members}
        _warn_duplicates(provenance)
        log.info(
            "probing %s on %s (%s): %d x %d features",
            ",".join(config.members),
            config.dataset,
            config.protocol,
            *X_train.shape,
        )
        if config.protocol == "logreg":
            measured = probe_matrices(X_train, y_train, X_eval, y_eval, config, n_classes=len(classes))
        else:
            measured = probe_tc(store, X_train, y_train, X_eval, y_eval, config, n_classes=len(classes))
    except cache.CacheError as e:
        raise TimecatError(str(e)) from None
    record = {
        "id": uuid.uuid4().hex[:12],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dataset": config.dataset,
        "members": list(config.members),
        "n_members": len(config.members),
        "train_split": config.train_split,
        "eval_split": config.eval_split,
        "protocol": config.protocol,
        "config": asdict(config),
        **measured,
        "wall_s": round(time.perf_counter() - started, 3),
        "peak_rss_mib": peak_rss_mib(),
        "member_provenance": {m: {k: p.get(k) for k in PROVENANCE_KEYS} for m, p in provenance.items()},
        "timecat_version": __version__,
    }
    log.info(
        "%s on %s: top-1 %.2f%%, top-5 %.2f%%", ",".join(config.members), config.dataset, record["top1"], record["top5"]
    )
    return record


def probe_tc(
    store: cache.Cache,
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_eval: np.ndarray,
    y_eval: np.ndarray,
    config: ProbeConfig,
    n_classes: int,
    recipe: tc.TcRecipe = tc.TcRecipe(),  # noqa: B008 (frozen, so a shared default is safe)
) -> dict:
    """The paper's recipe: weight decay chosen on the held-out split at the last epoch, refit, eval."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    views = tc.check_views(store.views(config.dataset, config.train_split))

    def epoch_rows(rows: np.ndarray | None):
        # Epoch e trains on view e mod K when views are cached, else on the plain features.
        if not views:
            fixed = X_train if rows is None else X_train[rows]  # one copy, not one per epoch
            return lambda epoch: fixed

        def features(epoch: int) -> np.ndarray:
            X, _ = store.features(config.dataset, config.train_split, config.members, view=views[epoch % len(views)])
            return X if rows is None else X[rows]

        return features

    fit_idx, held_idx = search_split(y_train, replace(config, search_rows=len(y_train)))
    trials = []
    for wd in progress(tc.wd_grid(config.dataset, config.wd_grid), desc=f"choose wd ({config.dataset})", unit="fit"):
        head = tc.train_head(epoch_rows(fit_idx), y_train[fit_idx], n_classes, wd, recipe, config.seed, device)
        top1 = topk_accuracy(tc.head_topk(head, X_train[held_idx], 1, device), y_train[held_idx], 1)
        trials.append({"weight_decay": wd, "holdout_top1": top1})
    wd = max(trials, key=lambda t: t["holdout_top1"])["weight_decay"]
    head = tc.train_head(epoch_rows(None), y_train, n_classes, wd, recipe, config.seed, device)
    best = tc.head_topk(head, X_eval, 5, device)
    return {
        "backend": "torch",
        "backend_reason": "the tc protocol trains a torch head",
        "search": trials,
        "chosen": {"weight_decay": wd},
        "trained_on": f"views {views[0]}..{views[-1]}" if views else "features",
        "recipe": asdict(recipe),
        "dim": int(X_train.shape[1]),
        "n_train": len(y_train),
        "n_eval": len(y_eval),
        "top1": topk_accuracy(best, y_eval, 1),
        "top5": topk_accuracy(best, y_eval, 5),
    }


def _warn_duplicates(provenance: dict[str, dict]) -> None:
    seen: dict[str, str] = {}
    for name, p in provenance.items():
        sha = p.get("checkpoint_sha256")
        if sha in seen:
            log.warning("members %s and %s are the same checkpoint: their concatenation adds nothing", seen[sha], name)
        seen[sha] = name


def subsets(pool: tuple[str, ...], n: int, max_subsets: int | None, seed: int) -> list[tuple[str, ...]]:
    """Every n-member subset of ``pool`` in order, or a seeded sample of ``max_subsets`` of them."""
    if not 1 <= n <= len(pool):
        raise TimecatError(f"--cat {n} needs between 1 and {len(pool)} members (the --from pool has {len(pool)})")
    if len(set(pool)) != len(pool):
        raise TimecatError(f"a member is named twice in --from {','.join(pool)}")
    every = list(itertools.combinations(pool, n))
    if max_subsets is None or max_subsets >= len(every):
        return every
    if max_subsets < 1:
        raise TimecatError(f"--max-subsets must be at least 1, not {max_subsets}")
    picked = np.random.default_rng(seed).choice(len(every), size=max_subsets, replace=False)
    return [every[i] for i in sorted(picked)]


def sweep(config: ProbeConfig, pool: tuple[str, ...], n: int, max_subsets: int | None, cache_path: str, on_record):
    """Probe every chosen n-subset of ``pool``; ``on_record`` receives each record as it finishes.

    Returns the records and their summary: top-1 and top-5 mean and std over subsets.
    """
    chosen = subsets(pool, n, max_subsets, config.seed)
    records = []
    for members in progress(chosen, desc=f"Cat{n} subsets of {len(pool)}", unit="probe"):
        record = probe(replace(config, members=members), cache_path)
        record["sweep"] = {"cat": n, "pool": list(pool), "subsets": len(chosen)}
        on_record(record)
        records.append(record)
    return records, summarize(records)


def summarize(records: list[dict]) -> dict:
    """Mean and sample std of top-1 and top-5 over records (std 0 for one record)."""
    summary = {"count": len(records)}
    for key in ("top1", "top5"):
        values = np.array([r[key] for r in records], dtype=np.float64)
        summary[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    return summary
