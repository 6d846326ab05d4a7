"""Stage 4: linear-probe any set of cached members, without touching an image.

Protocol ``logreg``: standardise with train statistics; choose the L2 strength C
on a seeded, stratified held-out part of the train split (a coarse log grid,
then a finer one around the best, ties to the smaller C); refit on the whole
train split; report top-1 and top-5 on the eval split, with top-1's 95%
bootstrap interval over eval rows. The eval split is never used for any choice.
Protocol ``bn-linear`` (formerly ``tc``): the paper's head (pipeline.probe.bn_linear).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import resource
import time
import uuid
from dataclasses import asdict, replace

import numpy as np

import cache
from pipeline import __version__
from pipeline.configs import ProbeConfig
from pipeline.core import distributed, files, stats
from pipeline.core.errors import TimecatError
from pipeline.core.progress import get_logger, plural, progress
from pipeline.data import recipes
from pipeline.probe import batched_lbfgs as bl
from pipeline.probe import bn_linear as bn_head
from pipeline.probe import c_search, knn, logreg_backends, results
from pipeline.probe.heldout import (
    best_trial,
    column_stats,
    describe_split,
    search_split,
    shot_rows,
    tie,
    topk_accuracy,
)

log = get_logger(__name__)

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


def choose_c(X: np.ndarray, y: np.ndarray, model, config: ProbeConfig, n_classes: int | None = None):
    """Pick C by held-out top-1: the coarse grid, then refinements around its best; within one held-out row
    of the best, candidates are tied and the smaller C is chosen (``heldout.best_trial``).

    ``model`` is a backend; it is left holding the last fit (a warm start for
    the refit). Returns the best C, every trial, how the split was drawn and how
    C was chosen (near ties).
    """
    fit_idx, held_idx = search_split(y, config)
    X_fit, y_fit, X_held, y_held = X[fit_idx], y[fit_idx], X[held_idx], y[held_idx]
    trials: list[dict] = []

    def trial(C: float) -> None:
        end = model.fit(X_fit, y_fit, C, config.search_iter)
        top1 = topk_accuracy(model.topk(X_held, 1), y_held, 1)
        trials.append({"C": C, "holdout_top1": top1, "converged": end["status"] == "converged", "fit": end})

    # Ascending C: each fit starts from the more regularised solution before it.
    total = len(config.c_grid) + len(config.refine)
    with progress(total=total, desc=f"choose C ({config.dataset})", unit="fit") as bar:
        for C in sorted(config.c_grid):
            trial(C)
            bar.update(1)
        coarse = best_trial(trials, "C", "smaller", len(held_idx))["C"]
        for factor in sorted(config.refine):
            trial(coarse * factor)
            bar.update(1)
    split = describe_split(y, fit_idx, held_idx, n_classes or int(y.max()) + 1)
    how = tie(trials, "C", "smaller", len(held_idx))
    return best_trial(trials, "C", "smaller", len(held_idx))["C"], trials, split, how


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


def scored(best: np.ndarray, X_train: np.ndarray, y_eval: np.ndarray, config: ProbeConfig) -> dict:
    """The fields every protocol reports from its ranked eval predictions ``best`` (n_eval, <=5)."""
    return {
        "dim": int(X_train.shape[1]),
        "n_train": len(X_train),
        "n_eval": len(y_eval),
        "top1": topk_accuracy(best, y_eval, 1),
        "top5": topk_accuracy(best, y_eval, 5),
        **uncertainty(best, y_eval, config),
        "eval_top5": best,
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

    ``eval_top5`` holds the (n_eval, <=5) ranked predictions, for the results store;
    ``head`` the fitted head (``results.Head`` fields: standardisation, weights, intercept, C).
    """
    n_classes = n_classes or int(max(y_train.max(), y_eval.max())) + 1
    mean, scale = column_stats(X_train)
    for X in (X_train, X_eval):
        c_search.standardised(X, mean, scale, "cpu")
    if uses_batched(config):  # the matrices as one member block
        where = c_search.device()
        train, evals = (c_search.to_blocks({0: X}, where) for X in (X_train, X_eval))
        measured = c_search.probe_subsets(train, y_train, lambda: (evals, y_eval), [(0,)], config, n_classes)[0]
        head = _head(mean, scale, measured.pop("weights"), measured.pop("intercept"), measured["chosen"]["C"])
        return {**measured, "head": head, **uncertainty(measured["eval_top5"], y_eval, config)}
    name, why = logreg_backends.choose(config.backend, len(y_train), n_classes)
    options = logreg_backends.FitOptions(
        n_classes, config.seed, config.tol, config.gap, config.iter_cap, config.precision
    )
    model = logreg_backends.make(name, options)
    log.info("backend %s (%s)", name, why)
    C, trials, split, how = choose_c(X_train, y_train, model, config, n_classes)
    # The refit keeps the chosen C, as CLIP's protocol does. (Keeping C * n_search / n
    # instead, the same per-row strength, over-regularised by 0.5 points here.)
    # Warm start from the last search fit: the same optimum up to sampling, so
    # L-BFGS needs a fraction of the iterations of a cold start.
    with progress(total=1, desc=f"refit at C={C:.3g} ({config.dataset}, {len(y_train):,} rows)", unit="fit") as bar:
        end = model.fit(X_train, y_train, C, config.max_iter)
        bar.update(1)
    best = model.topk(X_eval, 5)
    W, b = model.coefficients()
    chosen = {"C": C, "converged": end["status"] == "converged", "warm_start": model.warm_started, **how, "fit": end}
    return {
        "backend": name,
        "backend_reason": why,
        "search": trials,
        "search_rows": split["fit_rows"],
        "holdout": split,
        "chosen": chosen,
        "head": _head(mean, scale, [W], b, C),
        **scored(best, X_train, y_eval, config),
    }


def _head(mean: np.ndarray, scale: np.ndarray, weights: list[np.ndarray], intercept: np.ndarray, C: float) -> dict:
    """A fitted logreg head: the standardisation and the weights on the standardised columns, in order."""
    return {"mean": mean, "scale": scale, "coef": np.vstack(weights), "intercept": intercept, "C": C}


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


def uses_batched(config: ProbeConfig) -> bool:
    """Whether ``config`` runs on the batched solver (logreg with backend auto or batched)."""
    return config.batched


def probe(
    config: ProbeConfig, cache_path: str, results_root=None, extra: dict | None = None, counter: str = ""
) -> dict:
    """Probe the concatenation of ``config.members`` read from the cache; return the result record.

    With ``results_root``, the record is appended to its probes.jsonl and the eval
    predictions are saved beside it (for ``timecat compare``). ``extra`` fields
    (a sweep's) join the record before it is saved; ``counter`` (``2/3``) leads
    its result line in the log.
    """
    if config.shots is not None:
        raise TimecatError("a few-shot probe makes one record per draw: call few_shot(), not probe()")
    log.info("probe %s on %s (%s)", ",".join(config.members), config.dataset, config.protocol)
    if uses_batched(config):
        record = spread(config, [config.members], cache_path, results_root, extra)[0]
        log_result(record, counter)
        return record
    _one_process(config)
    started = time.perf_counter()
    if results_root is not None:
        files.check_writable(results_root, "the results folder")  # now, not after the fit
    store = cache.open(cache_path)
    try:
        context = _checked(store, config, config.members)
        # A probe reads each matrix once, so a full NaN scan costs little next to the fit.
        X_train, y_train = store.features(config.dataset, config.train_split, config.members, scan_nan=True)
        X_eval, y_eval = store.features(config.dataset, config.eval_split, config.members, scan_nan=True)
        n_classes = len(context["classes"])
        check_classes(y_train, context["classes"], config)
        log.info(
            "probing %s on %s (%s): %d x %d features",
            ",".join(config.members),
            config.dataset,
            config.protocol,
            *X_train.shape,
        )
        if config.protocol == "logreg":
            measured = probe_matrices(X_train, y_train, X_eval, y_eval, config, n_classes=n_classes)
        elif config.protocol == "knn":
            measured = probe_knn(X_train, y_train, X_eval, y_eval, config, n_classes)
        else:
            kind = context["train_attrs"].get("kind")
            measured = probe_tc(store, X_train, y_train, X_eval, y_eval, config, n_classes, kind)
    except cache.CacheError as e:
        raise TimecatError(str(e)) from None
    record = _record(config, measured, context, len(y_eval), started, extra)
    if results_root is not None:
        results.save(results_root, record, measured["eval_top5"], y_eval, _head_of(measured, config.members, context))
    log_result(record, counter)
    return record


def _head_of(measured: dict, members, context: dict) -> results.Head | None:
    """The probe's head with its members, widths and classes (None for protocols without one)."""
    if "head" not in measured:
        return None
    dims = tuple(context["dims"][m] for m in members)
    return results.Head(tuple(members), dims, **measured["head"], classes=tuple(map(str, context["classes"])))


def _checked(store: cache.Cache, config: ProbeConfig, members) -> dict:
    """Metadata checks before any expensive read; the splits' attributes and every member's provenance."""
    for split in (config.train_split, config.eval_split):
        store.check_members(config.dataset, split, members)
    used = [(config.train_split, None), (config.eval_split, None)]
    if config.protocol == "bn-linear":
        used += [(config.train_split, v) for v in store.views(config.dataset, config.train_split)]
    train_attrs = store.split_attrs(config.dataset, config.train_split)
    return {
        "checkpoints": store.check_same_checkpoint(config.dataset, used, members),
        "train_attrs": train_attrs,
        "eval_attrs": store.split_attrs(config.dataset, config.eval_split),
        "classes": train_attrs["classes"],
        "provenance": {m: store.provenance(config.dataset, config.train_split, m) for m in members},
        "dims": {m: store.dim(config.dataset, config.train_split, m) for m in members},
    }


def _record(config: ProbeConfig, measured: dict, context: dict, n_eval: int, started: float, extra) -> dict:
    """The result record of one probe (``measured`` from a protocol; ``eval_top5`` stays out)."""
    provenance = {m: context["provenance"][m] for m in config.members}
    _warn_duplicates(provenance)
    eval_attrs = context["eval_attrs"]
    record = {
        "id": uuid.uuid4().hex[:12],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dataset": config.dataset,
        "kind": context["train_attrs"].get("kind"),
        "members": list(config.members),
        "n_members": len(config.members),
        "train_split": config.train_split,
        "eval_split": config.eval_split,
        "protocol": config.protocol,
        "config": asdict(config),
        **{k: v for k, v in measured.items() if k not in ("eval_top5", "head")},
        # The eval rows' identity: compare refuses records made on other rows.
        "eval_rows": {
            "rows": n_eval,
            "fingerprint": eval_attrs.get("fingerprint"),
            "labels_sha256": eval_attrs.get("labels_sha256"),
        },
        "wall_s": round(time.perf_counter() - started, 3),
        "peak_rss_mib": peak_rss_mib(),
        "member_provenance": {
            m: {**{k: p.get(k) for k in PROVENANCE_KEYS}, "checkpoint_sha256_by_array": context["checkpoints"][m]}
            for m, p in provenance.items()
        },
        "timecat_version": __version__,
        **(extra or {}),
    }
    head = _head_of(measured, config.members, context)
    if head is not None:  # which member's block carries the weight (standardised columns)
        record["head_norms"] = head.norms()
    return record


def reusable(config: ProbeConfig, cache_path: str, results_root) -> dict | None:
    """The newest record in ``results_root`` of this very probe, if it still holds: the same config (members,
    dataset, splits, grid, seed, backend...), made on the members' features now in the cache (same checkpoint
    per array) and the same eval rows. None when there is none, so the caller probes."""
    if results_root is None or not results.results_path(results_root).is_file():
        return None
    wanted = json.loads(json.dumps(asdict(config), default=str))  # as the record stores it (tuples as lists)
    found = [r for r in results.load(results_root) if r.get("config") == wanted and "sweep" not in r]
    if not found:
        return None
    store = cache.open(cache_path)
    try:
        context = _checked(store, config, config.members)
    except cache.CacheError:
        return None
    fingerprint = context["eval_attrs"].get("fingerprint")
    for record in reversed(found):
        same = all(
            record["member_provenance"].get(m, {}).get("checkpoint_sha256_by_array") == context["checkpoints"][m]
            for m in config.members
        )
        if same and record.get("eval_rows", {}).get("fingerprint") == fingerprint:
            return record
    return None


def log_result(record: dict, counter: str = "") -> None:
    """One INFO line per finished probe (``3/15`` first in a sweep): the command prints the whole record at the
    end; the log shows each as it comes."""
    chosen = results.chosen_text(record)
    log.info(
        "%sprobe %s on %s: top-1 %.2f%% [95%% CI %.2f, %.2f]%s, %.1f s",
        f"{counter} " if counter else "",
        ",".join(record["members"]),
        record["dataset"],
        record["top1"],
        *record["top1_ci95"],
        f" ({chosen})" if chosen else "",
        record["wall_s"],
    )
    trials = [
        f"{key}={trial[key]:.3g}: {trial['holdout_top1']:.2f}%"
        for trial in record.get("search", [])
        for key in ("C", "k", "weight_decay")
        if key in trial and "holdout_top1" in trial
    ]
    if trials:
        log.debug("held-out top-1 of %s: %s", ",".join(record["members"]), ", ".join(trials))


def read_blocks(store: cache.Cache, config: ProbeConfig, split: str, groups, device, stats=None, rows=None):
    """Each group of members' features of ``split`` (concatenated, in order) standardised, as float32 tensors on
    the device.

    One group at a time, standardised in its own memory (no second copy on the
    CPU). ``stats`` ({index: (mean, std)}): the train statistics to apply; None
    computes them from this split. ``rows``: only these rows of the split.
    Returns ({index: (n, d)}, labels, stats).
    """
    blocks, stats, labels = {}, dict(stats or {}), None
    for j, group in enumerate(progress(groups, desc=f"read {config.dataset}/{split}", unit="block")):
        X, labels = store.features(config.dataset, split, list(group), scan_nan=True)
        if rows is not None:
            X, labels = X[rows], labels[rows]
        if j not in stats:
            stats[j] = column_stats(X)
        blocks[j] = c_search.standardised(X, *stats[j], device)
        del X
    return blocks, labels, stats


def spread(config: ProbeConfig, subsets: list[tuple[str, ...]], cache_path: str, results_root=None, extra=None):
    """``probe_many`` in this process, or across the processes of a torchrun job; every rank returns every record.

    With ``config.shots``, each of ``config.draws`` seeded draws of that many
    train rows per class is probed in turn (records in draw order, subsets within).
    With at least as many subsets as ranks, rank r probes subsets r, r + world, ...
    and appends its own records (each once, under the results file's lock);
    with fewer, every rank takes its share of each subset's C candidates, all
    ranks refit, and rank 0 appends. Records say how the work was split.
    """
    place = distributed.init()
    try:
        if place.world_size > 1:
            distributed.use_threads(None)  # the node's CPUs shared between its ranks
        if config.shots is None:
            return _spread(place, config, subsets, cache_path, results_root, extra)
        y = _train_labels(config, cache_path)
        run = place.broadcast(uuid.uuid4().hex[:12])  # one id for this run's draws, the same on every rank
        records = []
        for draw in progress(range(config.draws), desc=f"{config.shots}-shot draws", unit="draw"):
            rows = shot_rows(y, config.shots, config.seed, draw)
            shots = {"per_class": config.shots, "draw": draw, "draws": config.draws, "rows": len(rows), "run": run}
            fields = {**(extra or {}), "shots": shots}
            records += _spread(place, config, subsets, cache_path, results_root, fields, rows)
        return records
    finally:
        distributed.shutdown(place)


def _train_labels(config: ProbeConfig, cache_path: str) -> np.ndarray:
    try:
        return cache.open(cache_path).labels(config.dataset, config.train_split)
    except cache.CacheError as e:
        raise TimecatError(str(e)) from None


def _spread(place, config: ProbeConfig, subsets, cache_path: str, results_root, extra, rows=None) -> list[dict]:
    if place.world_size == 1:
        return probe_many(config, subsets, cache_path, results_root, extra, rows=rows)
    by = "subsets" if len(subsets) >= place.world_size else "C candidates"
    extra = {**(extra or {}), "ranks": {"world_size": place.world_size, "split": by}}
    if by == "C candidates":
        saved = results_root if place.is_main else None
        return probe_many(config, subsets, cache_path, saved, extra, place, rows)
    # Ranks take whole batches, cut as one process cuts them: each batch is the same computation
    # on any number of ranks, so the records are those of one process, bit for bit.
    batches = _batches(config, subsets, cache_path, place.world_size)
    mine = [i for batch in batches[place.rank :: place.world_size] for i in batch]
    sizes = [len(batch) for batch in batches[place.rank :: place.world_size]]
    records, order = [], list(dict.fromkeys(m for s in subsets for m in s))
    if mine:
        chosen = [subsets[i] for i in mine]
        records = probe_many(config, chosen, cache_path, results_root, extra, rows=rows, sizes=sizes, order=order)
    done = {i: r for part in place.all_gather(list(zip(mine, records, strict=True))) for i, r in part}
    return [done[i] for i in range(len(subsets))]


def _batches(config: ProbeConfig, subsets, cache_path: str, ranks: int) -> list[list[int]]:
    """Subset positions in the batches one process would fit (from metadata alone).

    With fewer such batches than ranks, the subsets are dealt into ``ranks``
    batches instead, so no rank idles; those records then agree with one
    process's to the solver's tolerance rather than bit for bit.
    """
    store = cache.open(cache_path)
    try:
        members = dict.fromkeys(m for s in subsets for m in s)
        dims = {m: store.dim(config.dataset, config.train_split, m) for m in members}
        width = c_search.width_of(len(store.split_attrs(config.dataset, config.train_split)["classes"]))
    except cache.CacheError as e:
        raise TimecatError(str(e)) from None
    cut = c_search.groups(subsets, dims, width, c_search.candidates(config), c_search.budget(config))
    if len(cut) < ranks:
        return [list(range(r, len(subsets), ranks)) for r in range(ranks)]
    ends = np.cumsum([0, *map(len, cut)])
    return [list(range(a, b)) for a, b in itertools.pairwise(ends)]


def _one_process(config: ProbeConfig) -> None:
    """Refuse a torchrun job for the one-process paths: each rank would fit and append the same records."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TimecatError(
            f"protocol {config.protocol} with backend {config.backend} runs in one process; under torchrun use "
            "--protocol logreg with --backend auto or batched, or run it without torchrun"
        )


def _fit_subsets(store, config: ProbeConfig, members: list[str], subsets, rows, share, sizes):
    """Read each member once, fit every subset on the batched solver: (measured fields, context, eval labels).

    A lone subset small enough to be preconditioned whole (``batched_logreg.FULL_DIMS``) is read as one
    block: one matrix product per pass instead of one per member (the demo's Cat4 refit: 1.3x faster).
    """
    where = c_search.device()
    try:
        context = _checked(store, config, members)
        whole = len(subsets) == 1 and sum(context["dims"][m] for m in subsets[0]) <= bl.FULL_DIMS
        groups = [list(subsets[0])] if whole else [[m] for m in members]
        read = functools.partial(read_blocks, store, config, groups=groups, device=where)
        train, y_train, stats = read(config.train_split, rows=rows)
        check_classes(y_train, context["classes"], config)
        index = {m: j for j, m in enumerate(members)}
        evals = {}

        def load_evals():  # after the fits: eval features never share memory with one
            evals["blocks"], evals["y"], _ = read(config.eval_split, stats=stats)
            return evals["blocks"], evals["y"]

        chosen = [(0,)] if whole else [tuple(index[m] for m in s) for s in subsets]
        measured = c_search.probe_subsets(
            train, y_train, load_evals, chosen, config, len(context["classes"]), share, sizes
        )
    except cache.CacheError as e:
        raise TimecatError(str(e)) from None
    for subset, fields in zip(chosen, measured, strict=True):
        mean, scale = (np.concatenate([stats[j][i] for j in subset]) for i in (0, 1))
        fields["head"] = _head(mean, scale, fields.pop("weights"), fields.pop("intercept"), fields["chosen"]["C"])
    return measured, context, evals["y"]


def probe_many(
    config: ProbeConfig,
    subsets: list[tuple[str, ...]],
    cache_path: str,
    results_root=None,
    extra=None,
    share=None,
    rows: np.ndarray | None = None,
    sizes: list[int] | None = None,
    order: list[str] | None = None,
) -> list[dict]:
    """The logreg protocol for every subset of members on the batched solver; one record per subset.

    Each member is read from the cache once, whatever the number of subsets
    that contain it. ``extra`` fields join every record. ``share`` (a
    pipeline.core.distributed.Dist): the ranks split every subset's C candidates.
    ``rows``: the train rows to use (a few-shot draw); None, all of them.
    Standardisation statistics come from those rows alone. ``sizes``: fit the
    subsets in consecutive batches of these sizes (default: cut to the budget).
    ``order``: the whole job's member order (a torchrun rank's share keeps it).
    """
    started = time.perf_counter()
    if results_root is not None:
        files.check_writable(results_root, "the results folder")  # now, not after the fit
    used = {m for subset in subsets for m in subset}
    # Members numbered in the job's order (``order``; default: first use here): a rank that holds
    # some of them sums a problem's member blocks in the same order as one process does.
    members = [m for m in (order or dict.fromkeys(m for subset in subsets for m in subset)) if m in used]
    measured, context, y_eval = _fit_subsets(cache.open(cache_path), config, members, subsets, rows, share, sizes)
    records = []
    for i, (subset, fields) in enumerate(zip(subsets, measured, strict=True), 1):
        fields.update(uncertainty(fields["eval_top5"][:, :1], y_eval, config))
        record = _record(replace(config, members=tuple(subset)), fields, context, len(y_eval), started, extra)
        if results_root is not None:
            results.save(results_root, record, fields["eval_top5"], y_eval, _head_of(fields, subset, context))
        if len(subsets) > 1:  # a single probe logs its line in probe()
            log_result(record, f"{i}/{len(subsets)}")
        records.append(record)
    return records


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
    recipe: bn_head.TcRecipe = bn_head.TcRecipe(),  # noqa: B008 (frozen, so a shared default is safe)
) -> dict:
    """The paper's recipe: weight decay chosen on the held-out split at the last epoch, refit, eval.

    Ties go to the larger weight decay (the more regularised head, as ties go to the
    smaller C in logreg). The paper's code's own figure (``top1_eval_selected``), the
    best eval top-1 of any epoch and weight decay, is optimistic: stored, never ``top1``.
    """
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = f"{config.dataset}/{config.train_split}"
    grid = bn_head.wd_grid(kind, config.wd_grid, where)
    views = _tc_views(store, config, where)
    epoch_rows = tc_epoch_features(store, X_train, config, views)
    fit_idx, held_idx = search_split(y_train, replace(config, search_rows=len(y_train)))
    log.info("tc on %s: %d weight decays side by side, %d epochs, twice", where, len(grid), recipe.epochs)
    train = functools.partial(
        bn_head.train_heads, n_classes=n_classes, weight_decays=grid, recipe=recipe, seed=config.seed
    )
    heads = train(epoch_rows(fit_idx), y_train[fit_idx], device=device, desc=f"choose wd ({config.dataset})")
    held = [topk_accuracy(bn_head.head_topk(h, X_train[held_idx], 1, device), y_train[held_idx], 1) for h in heads]
    trials = [{"weight_decay": w, "holdout_top1": top1} for w, top1 in zip(grid, held, strict=True)]
    wd = best_trial(trials, "weight_decay", "larger", len(held_idx))["weight_decay"]
    heads, curves = _train_scored(train, epoch_rows(None), y_train, X_eval, y_eval, len(grid), device, config.dataset)
    best = bn_head.head_topk(heads[grid.index(wd)], X_eval, 5, device)
    return {
        **{"backend": "torch", "backend_reason": "the bn-linear protocol trains a torch head"},
        "search": trials,
        "holdout": describe_split(y_train, fit_idx, held_idx, n_classes),
        "chosen": {"weight_decay": wd, **tie(trials, "weight_decay", "larger", len(held_idx))},
        "augmented": bool(views),
        "trained_on": f"views {views[0]}..{views[-1]}" if views else "features",
        "recipe": asdict(recipe),
        "dataset_recipe": recipes.for_kind(kind, where).describe() if kind is not None else None,
        **{"dim": int(X_train.shape[1]), "n_train": len(y_train), "n_eval": len(y_eval)},
        **{"top1": topk_accuracy(best, y_eval, 1), "top5": topk_accuracy(best, y_eval, 5)},
        **uncertainty(best, y_eval, config),
        **_eval_selected(grid, curves),
        "eval_top5": best,
    }


def _train_scored(train, rows, y_train, X_eval, y_eval, n_heads: int, device, dataset: str):
    """Every weight decay's head on the whole train split, and its eval top-1 after each epoch.

    The last epoch of the chosen head is the result; the best over all heads and
    epochs is the paper's code's figure (``_eval_selected``).
    """
    curves = [[] for _ in range(n_heads)]

    def score(i: int, epoch: int, head) -> None:
        curves[i].append(topk_accuracy(bn_head.head_topk(head, X_eval, 1, device), y_eval, 1))

    return train(rows, y_train, device=device, on_epoch=score, desc=f"train tc ({dataset})"), curves


def _tc_views(store: cache.Cache, config: ProbeConfig, where: str) -> list[int]:
    """The cached augmented views tc trains on, or [] (plain features) with a warning that says what that means."""
    views = bn_head.check_views(store.views(config.dataset, config.train_split))
    if not views:
        log.warning(
            "protocol bn-linear on %s trains on the plain features: without cached views this is not the paper's "
            "recipe, "
            "which re-augments every epoch (run `timecat extract --views K` first); the record says augmented: false",
            where,
        )
    return views


def _eval_selected(grid: list[float], curves: list[list[float]]) -> dict:
    """The paper's code's figure: the best eval top-1 over epochs and weight decays. Optimistic, stored apart."""
    selected, epoch = max(
        ((i, e) for i, curve in enumerate(curves) for e in range(len(curve))), key=lambda p: curves[p[0]][p[1]]
    )
    return {
        "top1_eval_selected": curves[selected][epoch],
        "eval_selected": {"weight_decay": grid[selected], "epoch": epoch + 1, "optimistic": True},
        "eval_top1_by_epoch": {str(w): [round(v, 4) for v in c] for w, c in zip(grid, curves, strict=True)},
    }


def probe_knn(X_train, y_train, X_eval, y_eval, config: ProbeConfig, n_classes: int) -> dict:
    """Weighted k-NN (pipeline.probe.knn): k chosen on held-out train rows, then every train row is the bank.

    The held-out rows are drawn as for logreg (per class, never a class's last
    row); the rest of the train split is their bank. Ties go to the larger k
    (the smoother vote). The matrices are normalised in place.
    """
    fit_idx, held_idx = search_split(y_train, replace(config, search_rows=len(y_train)))
    bank, queries = knn.normalise(X_train), knn.normalise(X_eval)
    vote = functools.partial(knn.knn_topk, n_classes=n_classes, temperature=config.temperature)
    ranked = vote(bank, y_train[fit_idx], knn.take(bank, held_idx), config.k_grid, rows=fit_idx)
    trials = [{"k": k, "holdout_top1": topk_accuracy(ranked[k], y_train[held_idx], 1)} for k in config.k_grid]
    k = best_trial(trials, "k", "larger", len(held_idx))["k"]
    best = vote(bank, y_train, queries, [k])[k]
    return {
        "backend": "torch",
        "backend_reason": "exact k-NN, blocked over train rows",
        "search": trials,
        "holdout": describe_split(y_train, fit_idx, held_idx, n_classes),
        "chosen": {"k": k, "temperature": config.temperature, **tie(trials, "k", "larger", len(held_idx))},
        **scored(best, X_train, y_eval, config),
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
    log.info(
        "probe %s of %s on %s (%s)",
        plural(len(chosen), f"Cat{n} subset"),
        ",".join(pool),
        config.dataset,
        config.protocol,
    )
    if uses_batched(config):  # every subset in one batched fit, each member read once
        sweep_fields = {"cat": n, "pool": list(pool), "subsets": len(chosen)}
        records = spread(config, chosen, cache_path, results_root, extra={"sweep": sweep_fields})
        return records, summarize(records)
    _one_process(config)
    records = []
    for i, members in enumerate(progress(chosen, desc=f"Cat{n} subsets of {len(pool)}", unit="probe"), 1):
        sweep_fields = {"cat": n, "pool": list(pool), "subsets": len(chosen)}
        extra = {"sweep": sweep_fields}
        record = probe(replace(config, members=members), cache_path, results_root, extra, f"{i}/{len(chosen)}")
        records.append(record)
    return records, summarize(records)


def few_shot(config: ProbeConfig, cache_path: str, results_root=None) -> tuple[list[dict], dict]:
    """``config.draws`` seeded draws of ``config.shots`` train rows per class, each probed: records and summary.

    The summary is mean and sample std over the draws. The eval split is whole
    every time; standardisation and the C search use the drawn rows only, and
    with one row per class C is ``config.fixed_c`` (no row is left to hold out).
    """
    if config.shots is None:
        raise TimecatError("few_shot needs config.shots (train rows per class)")
    log.info(
        "probe %s on %s: %s of %s",
        ",".join(config.members),
        config.dataset,
        plural(config.draws, "draw"),
        plural(config.shots, "shot"),
    )
    records = spread(config, [config.members], cache_path, results_root)
    return records, summarize(records)


def summarize(records: list[dict]) -> dict:
    """Mean and sample std (ddof=1; 0 for one record) of top-1 and top-5 over records, with the count."""
    summary = {"count": len(records)}
    for key in ("top1", "top5"):
        summary[key] = {k: v for k, v in stats.mean_std([r[key] for r in records]).items() if k != "count"}
    return summary
