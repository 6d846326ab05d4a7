"""Stage 4: linear-probe any set of cached members, without touching an image.

Protocol ``logreg``: standardise with train statistics; choose the L2 strength C
on a seeded, stratified held-out part of the train split (a coarse log grid,
then a finer one around the best, ties to the smaller C); refit on the whole
train split; report top-1 and top-5 on the eval split, with top-1's 95%
bootstrap interval over eval rows. The eval split is never used for any choice.
Protocol ``tc``: the paper's head (pipeline.tc).
"""

from __future__ import annotations

import functools
import itertools
import resource
import time
import uuid
from dataclasses import asdict, dataclass, replace

import numpy as np

import cache
from cache.layout import check_name
from pipeline import __version__, backends, files, recipes, results, stats, tc
from pipeline.errors import TimecatError, check_seed
from pipeline.progress import get_logger, progress

log = get_logger(__name__)

PROTOCOLS = ("logreg", "tc")
PROVENANCE_KEYS = (
    "checkpoint_sha256",
    "dataset_fingerprint",
    "arch",
    "params",
    "seed",
    "steps",
    "pretrain_dataset",
    "precision",
)


@dataclass(frozen=True)
class ProbeConfig:
    """Which members to probe on which dataset, and the model-selection recipe."""

    dataset: str
    members: tuple[str, ...]
    train_split: str = "train"
    eval_split: str = "test"
    holdout: float = 0.2  # fraction of the train split held out to choose C
    seed: int = 0  # held-out split and solver
    search_rows: int = 10_000  # train rows that fit each C candidate (stratified sample), at least...
    search_per_class: int = 10  # ...this many per class: 81,420 rows for iNat18's 8,142 classes
    c_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # coarse, one per decade
    refine: tuple[float, ...] = (10**-0.5, 10**0.5)  # multipliers tried around the best coarse C
    search_iter: int = 100  # L-BFGS iterations per C candidate (warm-started along the grid)
    max_iter: int = 300  # L-BFGS iterations of the final refit (warm-started from the search)
    tol: float = 1e-4  # L-BFGS stopping tolerance (scikit-learn's default)
    backend: str = "auto"  # auto | sklearn | torch | cuml (see pipeline.backends); logreg only
    protocol: str = "logreg"  # logreg | tc (the paper's BatchNorm + Linear head, SGD, 28 epochs)
    wd_grid: tuple[float, ...] | None = None  # tc: weight decays to try; None: the paper's grid for the dataset kind
    bootstrap: int = stats.RESAMPLES  # resamples of the eval rows for top-1's 95% interval (at least 1,000)
    allow_same_split: bool = False  # fit and score on one split (memorisation, not transfer); report leaves it out

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise TimecatError(f"unknown protocol {self.protocol!r}; choose one of {list(PROTOCOLS)}")
        if self.backend not in backends.CHOICES:
            raise TimecatError(f"unknown backend {self.backend!r}; choose one of {list(backends.CHOICES)}")
        if not 0 < self.holdout < 1:
            raise TimecatError(f"holdout is a fraction in (0, 1), got {self.holdout}")
        if not self.members:
            raise TimecatError("no members given: pass --members run0,run1,...")
        check_name("dataset", self.dataset)
        check_seed(self.seed)
        for split in (self.train_split, self.eval_split):
            check_name("split", split)
        if self.train_split == self.eval_split and not self.allow_same_split:
            raise TimecatError(
                f"train and eval split are both {self.train_split!r}: a probe fit and scored on the same rows measures "
                "memorisation, not transfer; pass --allow-same-split to run it anyway (report leaves such records out)"
            )
        for member in self.members:
            check_name("member", member)
        if self.search_rows < 1 or self.search_per_class < 1:
            raise TimecatError(
                f"search_rows and search_per_class must be at least 1, got {self.search_rows}, {self.search_per_class}"
            )
        if self.bootstrap < stats.RESAMPLES:
            raise TimecatError(f"bootstrap resamples must be at least {stats.RESAMPLES}, got {self.bootstrap}")


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


def search_split(y: np.ndarray, config: ProbeConfig) -> tuple[np.ndarray, np.ndarray]:
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


def best_trial(trials: list[dict], key: str, regularised: str) -> dict:
    """The trial with the highest held-out top-1; ties go to the most regularised one.

    ``regularised`` says which end of ``key`` is more regularised: ``"smaller"``
    (C) or ``"larger"`` (weight decay). Every trial counts, refined ones included.
    """
    top = max(t["holdout_top1"] for t in trials)
    tied = [t for t in trials if t["holdout_top1"] == top]
    if regularised == "smaller":
        return min(tied, key=lambda t: t[key])
    if regularised == "larger":
        return max(tied, key=lambda t: t[key])
    raise TimecatError(f"unknown regularised end {regularised!r}; choose 'smaller' or 'larger'")


def choose_c(X: np.ndarray, y: np.ndarray, model, config: ProbeConfig, n_classes: int | None = None):
    """Pick C by held-out top-1: the coarse grid, then refinements around its best; ties go to the smaller C.

    ``model`` is a backend; it is left holding the last fit (a warm start for
    the refit). Returns the best C, every trial and how the split was drawn.
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
    coarse = best_trial(trials, "C", "smaller")["C"]
    for factor in sorted(config.refine):
        trial(coarse * factor)
    split = describe_split(y, fit_idx, held_idx, n_classes or int(y.max()) + 1)
    return best_trial(trials, "C", "smaller")["C"], trials, split


def check_classes(y_train: np.ndarray, classes: list, config: ProbeConfig) -> None:
    """Every class must have a train example (a class of one row is fit, never held out)."""
    counts = np.bincount(y_train, minlength=len(classes))
    missing = [classes[c] for c in np.flatnonzero(counts == 0)]
    if missing:
        raise TimecatError(
            f"{config.dataset}/{config.train_split} has no examples of class(es) {missing[:10]} "
            f"({len(missing)} in all); a linear probe cannot learn them: prepare a train split that covers every class"
        )


def uncertainty(best: np.ndarray, y_eval: np.ndarray, config: ProbeConfig) -> dict:
    """Top-1's seeded bootstrap interval over eval rows, as record fields."""
    correct = best[:, 0] == y_eval
    return {
        "top1_ci95": stats.top1_interval(correct, config.bootstrap, config.seed),
        "bootstrap": {"method": stats.METHOD, "resamples": config.bootstrap, "seed": config.seed},
    }


def probe_matrices(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_eval: np.ndarray,
    y_eval: np.ndarray,
    config: ProbeConfig,
    n_classes: int | None = None,
) -> dict:
    """The logreg protocol on given matrices (standardised in place); returns the measured fields.

    ``eval_top5`` holds the (n_eval, <=5) ranked predictions, for the results store.
    """
    n_classes = n_classes or int(max(y_train.max(), y_eval.max())) + 1
    name, why = backends.choose(config.backend, len(y_train), n_classes)
    model = backends.make(name, backends.FitOptions(n_classes, config.seed, config.tol))
    log.info("backend %s (%s)", name, why)
    standardize(X_train, X_eval)
    C, trials, split = choose_c(X_train, y_train, model, config, n_classes)
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
        "search_rows": split["fit_rows"],
        "holdout": split,
        "chosen": {"C": C, "converged": converged, "warm_start": model.warm_started},
        "dim": int(X_train.shape[1]),
        "n_train": len(y_train),
        "n_eval": len(y_eval),
        "top1": topk_accuracy(best, y_eval, 1),
        "top5": topk_accuracy(best, y_eval, 5),
        **uncertainty(best, y_eval, config),
        "eval_top5": best,
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


def probe(config: ProbeConfig, cache_path: str, results_root=None, extra: dict | None = None) -> dict:
    """Probe the concatenation of ``config.members`` read from the cache; return the result record.

    With ``results_root``, the record is appended to its probes.jsonl and the eval
    predictions are saved beside it (for ``timecat compare``). ``extra`` fields
    (a sweep's) join the record before it is saved.
    """
    started = time.perf_counter()
    if results_root is not None:
        files.check_writable(results_root, "the results folder")  # now, not after the fit
    store = cache.open(cache_path)
    try:
        # Metadata first, so a refusal comes before the expensive reads.
        for split in (config.train_split, config.eval_split):
            store.check_members(config.dataset, split, config.members)
        used = [(config.train_split, None), (config.eval_split, None)]
        if config.protocol == "tc":
            used += [(config.train_split, v) for v in store.views(config.dataset, config.train_split)]
        checkpoints_used = store.check_same_checkpoint(config.dataset, used, config.members)
        # A probe reads each matrix once, so a full NaN scan costs little next to the fit.
        X_train, y_train = store.features(config.dataset, config.train_split, config.members, scan_nan=True)
        X_eval, y_eval = store.features(config.dataset, config.eval_split, config.members, scan_nan=True)
        train_attrs = store.split_attrs(config.dataset, config.train_split)
        eval_attrs = store.split_attrs(config.dataset, config.eval_split)
        classes = train_attrs["classes"]
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
            kind = train_attrs.get("kind")
            measured = probe_tc(store, X_train, y_train, X_eval, y_eval, config, len(classes), kind)
    except cache.CacheError as e:
        raise TimecatError(str(e)) from None
    eval_top5 = measured.pop("eval_top5")
    record = {
        "id": uuid.uuid4().hex[:12],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dataset": config.dataset,
        "kind": train_attrs.get("kind"),
        "members": list(config.members),
        "n_members": len(config.members),
        "train_split": config.train_split,
        "eval_split": config.eval_split,
        "protocol": config.protocol,
        "config": asdict(config),
        **measured,
        # The eval rows' identity: compare refuses records made on other rows.
        "eval_rows": {
            "rows": len(y_eval),
            "fingerprint": eval_attrs.get("fingerprint"),
            "labels_sha256": eval_attrs.get("labels_sha256"),
        },
        "wall_s": round(time.perf_counter() - started, 3),
        "peak_rss_mib": peak_rss_mib(),
        "member_provenance": {
            m: {**{k: p.get(k) for k in PROVENANCE_KEYS}, "checkpoint_sha256_by_array": checkpoints_used[m]}
            for m, p in provenance.items()
        },
        "timecat_version": __version__,
        **(extra or {}),
    }
    log.info(
        "%s on %s: top-1 %.2f%% (95%% CI %.2f-%.2f), top-5 %.2f%%",
        ",".join(config.members),
        config.dataset,
        record["top1"],
        *record["top1_ci95"],
        record["top5"],
    )
    if results_root is not None:
        results.save(results_root, record, eval_top5, y_eval)
    return record


def tc_epoch_features(store: cache.Cache, X_train: np.ndarray, config: ProbeConfig, views: list[int]):
    """``rows -> (epoch -> features)``: epoch e trains on cached view e mod K, else on the plain features."""

    def epoch_rows(rows: np.ndarray | None):
        if not views:
            fixed = X_train if rows is None else X_train[rows]  # one copy, not one per epoch
            return lambda epoch: fixed

        def features(epoch: int) -> np.ndarray:
            X, _ = store.features(config.dataset, config.train_split, config.members, view=views[epoch % len(views)])
            return X if rows is None else X[rows]

        return features

    return epoch_rows


def probe_tc(
    store: cache.Cache,
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_eval: np.ndarray,
    y_eval: np.ndarray,
    config: ProbeConfig,
    n_classes: int,
    kind: str | None,
    recipe: tc.TcRecipe = tc.TcRecipe(),  # noqa: B008 (frozen, so a shared default is safe)
) -> dict:
    """The paper's recipe: weight decay chosen on the held-out split at the last epoch, refit, eval.

    Ties go to the larger weight decay (the more regularised head, as ties go to
    the smaller C in logreg). Every weight decay is also trained on the whole train
    split with its eval top-1 measured after each epoch: the best of those is the
    figure the paper's code reports (``top1_eval_selected``), chosen on the eval
    split and so optimistic; it is stored for comparison, never as ``top1``.
    """
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = f"{config.dataset}/{config.train_split}"
    grid = tc.wd_grid(kind, config.wd_grid, where)
    views = tc.check_views(store.views(config.dataset, config.train_split))
    if not views:
        log.warning(
            "protocol tc on %s trains on the plain features: without cached views this is not the paper's recipe, "
            "which re-augments every epoch (run `timecat extract --views K` first); the record says augmented: false",
            where,
        )
    epoch_rows = tc_epoch_features(store, X_train, config, views)
    fit_idx, held_idx = search_split(y_train, replace(config, search_rows=len(y_train)))
    log.info("tc on %s: %d weight decays side by side, %d epochs, twice", where, len(grid), recipe.epochs)
    train = functools.partial(tc.train_heads, n_classes=n_classes, weight_decays=grid, recipe=recipe, seed=config.seed)
    heads = train(epoch_rows(fit_idx), y_train[fit_idx], device=device, desc=f"choose wd ({config.dataset})")
    held = [topk_accuracy(tc.head_topk(h, X_train[held_idx], 1, device), y_train[held_idx], 1) for h in heads]
    trials = [{"weight_decay": w, "holdout_top1": top1} for w, top1 in zip(grid, held, strict=True)]
    wd = best_trial(trials, "weight_decay", "larger")["weight_decay"]
    # Every weight decay on the whole train split, its eval top-1 after each epoch: the last
    # epoch of the chosen one is the result; the best over all is the paper's code's figure.
    curves = [[] for _ in grid]

    def score(i: int, epoch: int, head) -> None:
        curves[i].append(topk_accuracy(tc.head_topk(head, X_eval, 1, device), y_eval, 1))

    heads = train(epoch_rows(None), y_train, device=device, on_epoch=score, desc=f"train tc ({config.dataset})")
    best = tc.head_topk(heads[grid.index(wd)], X_eval, 5, device)
    selected, epoch = max(
        ((i, e) for i in range(len(grid)) for e in range(recipe.epochs)), key=lambda p: curves[p[0]][p[1]]
    )
    return {
        "backend": "torch",
        "backend_reason": "the tc protocol trains a torch head",
        "search": trials,
        "holdout": describe_split(y_train, fit_idx, held_idx, n_classes),
        "chosen": {"weight_decay": wd},
        "augmented": bool(views),
        "trained_on": f"views {views[0]}..{views[-1]}" if views else "features",
        "recipe": asdict(recipe),
        "dataset_recipe": recipes.for_kind(kind, where).describe() if kind is not None else None,
        "dim": int(X_train.shape[1]),
        "n_train": len(y_train),
        "n_eval": len(y_eval),
        "top1": topk_accuracy(best, y_eval, 1),
        "top5": topk_accuracy(best, y_eval, 5),
        **uncertainty(best, y_eval, config),
        # The paper's code's figure: the best eval top-1 over epochs and weight decays. Optimistic.
        "top1_eval_selected": curves[selected][epoch],
        "eval_selected": {"weight_decay": grid[selected], "epoch": epoch + 1, "optimistic": True},
        "eval_top1_by_epoch": {str(w): [round(v, 4) for v in c] for w, c in zip(grid, curves, strict=True)},
        "eval_top5": best,
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


def sweep(
    config: ProbeConfig, pool: tuple[str, ...], n: int, max_subsets: int | None, cache_path: str, results_root=None
) -> tuple[list[dict], dict]:
    """Probe every chosen n-subset of ``pool``; each record is saved to ``results_root`` as it finishes.

    Returns the records and their summary: top-1 and top-5 mean and sample std over subsets.
    """
    chosen = subsets(pool, n, max_subsets, config.seed)
    records = []
    for members in progress(chosen, desc=f"Cat{n} subsets of {len(pool)}", unit="probe"):
        sweep_fields = {"cat": n, "pool": list(pool), "subsets": len(chosen)}
        record = probe(replace(config, members=members), cache_path, results_root, extra={"sweep": sweep_fields})
        records.append(record)
    return records, summarize(records)


def summarize(records: list[dict]) -> dict:
    """Mean and sample std (ddof=1; 0 for one record) of top-1 and top-5 over records, with the count."""
    summary = {"count": len(records)}
    for key in ("top1", "top5"):
        summary[key] = {k: v for k, v in stats.mean_std([r[key] for r in records]).items() if k != "count"}
    return summary
