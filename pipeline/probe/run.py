"""Stage 4: linear-probe any set of cached members, without touching an image.

This module is the probe's one reader and recorder: it reads the cache, runs a protocol's path (``PATHS``),
and builds every record (top-1, top-5 and top-1's bootstrap interval from the protocol's ranked eval
predictions, dims, rows, provenance) and saves it with its predictions and head.

Protocol ``logreg``: standardise with train statistics; choose the L2 strength C
on a seeded, stratified held-out part of the train split (``c_search.stages``);
refit on the whole train split; report top-1 and top-5 on the eval split, with
top-1's 95% bootstrap interval over eval rows. The eval split is never used for
any choice. Backend auto or batched fits every C candidate (and every subset of
a sweep) in one batched L-BFGS (``c_search.probe_subsets``); sklearn, torch and
cuml fit one C at a time (``logreg_backends.measure``). Protocol ``knn``: DINO's
weighted k-NN (``knn.measure``). Protocol ``bn-linear`` (formerly ``tc``): the
paper's head (``bn_linear.measure``).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import time
import uuid
from dataclasses import asdict, replace

import numpy as np

import cache
from pipeline import __version__
from pipeline.configs import ProbeConfig
from pipeline.core import distributed, files, preemption, stats
from pipeline.core.errors import TimecatError
from pipeline.core.memory import peak_rss_mib
from pipeline.core.progress import get_logger, plural, progress
from pipeline.probe import batched_lbfgs as bl
from pipeline.probe import bn_linear, c_search, knn, logreg_backends, results
from pipeline.probe.heldout import column_stats, shot_rows, topk_accuracy
from pipeline.probe.protocol import Inputs, Measured

log = get_logger(__name__)

PROVENANCE_KEYS = (
    "checkpoint_sha256",
    "dataset_fingerprint",
    "arch",
    "weights",  # a timm or torchvision model's tag or file (pipeline.members.hub), or the run's checkpoint
    "feature_dim",  # each member's width: a concatenation may mix them
    "params",
    "seed",
    "steps",
    "pretrain_dataset",
    "precision",
)


def check_classes(y_train: np.ndarray, classes: list, config: ProbeConfig) -> None:
    """Every class must have a train example (a class of one row is fit, never held out)."""
    counts = np.bincount(y_train, minlength=len(classes))
    missing = [classes[c] for c in np.flatnonzero(counts == 0)]
    if missing:
        raise TimecatError(
            f"{config.dataset}/{config.train_split} has no examples of class(es) {missing[:10]} "
            f"({len(missing)} in all); a linear probe cannot learn them: prepare a train split that covers every class"
        )


# Every probe path, by exact key (``path_of``). Batched logreg reads each member's block once for many subsets
# (``probe_many``); the others take one concatenation's matrices (``protocol.Inputs``). Each returns what it
# measured (``protocol.Measured``), from which ``_record`` builds the record.
PATHS = {
    "logreg-batched": c_search.probe_subsets,
    "logreg": logreg_backends.measure,
    "knn": knn.measure,
    "bn-linear": bn_linear.measure,
}


def path_of(config: ProbeConfig) -> str:
    """The key in PATHS of the path ``config`` runs: batched logreg for backend auto or batched, else its protocol."""
    return "logreg-batched" if config.batched else config.protocol


def probe_matrices(inputs: Inputs, config: ProbeConfig) -> Measured:
    """A one-process protocol on given matrices (changed in place), as ``probe`` runs it on the cache's.

    Batched logreg reads member blocks instead: ``probe`` and ``probe_many`` run it.
    """
    path = path_of(config)
    if path == "logreg-batched":
        raise TimecatError(
            f"backend {config.backend} fits member blocks read from the cache: call probe(), or pick a one-C "
            "backend (sklearn, torch, cuml)"
        )
    return PATHS[path](inputs, config)


def scores(measured: Measured, y_eval: np.ndarray, config: ProbeConfig) -> dict:
    """Top-1, top-5 and top-1's seeded bootstrap interval over eval rows, from a protocol's ranked predictions."""
    best = measured.eval_top5
    return {
        "top1": topk_accuracy(best, y_eval, 1),
        "top5": topk_accuracy(best, y_eval, 5),
        "top1_ci95": stats.top1_interval(best[:, 0] == y_eval, config.bootstrap, config.seed),
        "bootstrap": {"method": stats.METHOD, "resamples": config.bootstrap, "seed": config.seed},
    }


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
    if config.batched:
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
        inputs = _inputs(store, config, context)
        log.info(
            "probing %s on %s (%s): %d x %d features",
            ",".join(config.members),
            config.dataset,
            config.protocol,
            *inputs.X_train.shape,
        )
        measured = probe_matrices(inputs, config)
    except cache.CacheError as e:
        raise TimecatError(str(e)) from None
    record = _record(config, measured, context, len(inputs.y_train), inputs.y_eval, started, extra)
    _save(results_root, [record], [measured], inputs.y_eval, context)
    log_result(record, counter)
    return record


def _inputs(store: cache.Cache, config: ProbeConfig, context: dict) -> Inputs:
    """The members' train and eval features, concatenated, for a one-process protocol (and bn-linear's views)."""
    # A probe reads each matrix once, so a full NaN scan costs little next to the fit.
    X_train, y_train = store.features(config.dataset, config.train_split, config.members, scan_nan=True)
    X_eval, y_eval = store.features(config.dataset, config.eval_split, config.members, scan_nan=True)
    check_classes(y_train, context["classes"], config)
    views = _bn_linear_views(store, config) if config.protocol == "bn-linear" else []

    def read_view(view: int) -> np.ndarray:
        return store.features(config.dataset, config.train_split, config.members, view=view)[0]

    kind = context["train_attrs"].get("kind")
    return Inputs(X_train, y_train, X_eval, y_eval, len(context["classes"]), kind, tuple(views), read_view)


def _bn_linear_views(store: cache.Cache, config: ProbeConfig) -> list[int]:
    """The cached augmented views bn-linear trains on, or [] (plain features) with a warning that says what that
    means."""
    views = bn_linear.check_views(store.views(config.dataset, config.train_split))
    if not views:
        log.warning(
            "protocol bn-linear on %s/%s trains on the plain features: without cached views this is not the paper's "
            "recipe, which re-augments every epoch (run `timecat extract --views K` first); the record says "
            "augmented: false",
            config.dataset,
            config.train_split,
        )
    return views


def _head_of(measured: Measured, members, context: dict) -> results.Head | None:
    """The probe's head with its members, widths and classes (None for protocols without one)."""
    if measured.head is None:
        return None
    dims = tuple(context["dims"][m] for m in members)
    return results.Head(tuple(members), dims, **measured.head, classes=tuple(map(str, context["classes"])))


def _save(results_root, records: list[dict], measured: list[Measured], y_eval: np.ndarray, context: dict) -> None:
    """With a results folder, each record's eval predictions and head, then the records in one append.

    A job's records are appended whole or not at all: a requeued job, which probes again, never appends
    again what was appended (the append is one write, in a block its preemption signal does not cut).
    """
    if results_root is None:
        return
    for record, fitted in zip(records, measured, strict=True):
        head = _head_of(fitted, record["members"], context)
        results.write_outputs(results_root, record, fitted.eval_top5, y_eval, head)
    with preemption.uncut():
        results.append(results_root, *records)


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


def _record(
    config: ProbeConfig, measured: Measured, context: dict, n_train: int, y_eval: np.ndarray, started: float, extra
) -> dict:
    """The result record of one probe of ``config.members``: the protocol's fields (``measured``), and what every
    record states alike: dims, rows, top-1, top-5 and top-1's interval (from its ranked eval predictions), the eval
    rows' identity, cost and provenance. ``extra`` fields (a sweep's, a few-shot draw's) join last."""
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
        **measured.fields,
        "dim": int(sum(context["dims"][m] for m in config.members)),
        "n_train": n_train,
        "n_eval": len(y_eval),
        **scores(measured, y_eval, config),
        # The eval rows' identity: compare refuses records made on other rows.
        "eval_rows": {
            "rows": len(y_eval),
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
        blocks[j] = c_search.standardize_block_in_place(X, *stats[j], device)
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
    batches = batch_positions(config, subsets, cache_path, place.world_size, None, rows)
    mine = [i for batch in batches[place.rank :: place.world_size] for i in batch]
    sizes = [len(batch) for batch in batches[place.rank :: place.world_size]]
    records, order = [], order_of(subsets)
    if mine:
        chosen = [subsets[i] for i in mine]
        records = probe_many(config, chosen, cache_path, results_root, extra, rows=rows, sizes=sizes, order=order)
    done = {i: r for part in place.all_gather(list(zip(mine, records, strict=True))) for i, r in part}
    return [done[i] for i in range(len(subsets))]


def order_of(subsets) -> list[str]:
    """The members of ``subsets`` in order of first use: the order one process numbers (and sums) them in."""
    return list(dict.fromkeys(m for subset in subsets for m in subset))


def member_dims(config: ProbeConfig, members, cache_path: str) -> tuple[dict[str, int], int, int]:
    """Each member's width, the train split's rows and the classes' width, from the cache's metadata alone."""
    store = cache.open(cache_path)
    try:
        dims = {m: store.dim(config.dataset, config.train_split, m) for m in members}
        rows = store.shape(config.dataset, config.train_split, next(iter(dims)))[0]
        width = c_search.width_of(len(store.split_attrs(config.dataset, config.train_split)["classes"]))
    except cache.CacheError as e:
        raise TimecatError(str(e)) from None
    return dims, rows, width


def batch_positions(config: ProbeConfig, subsets, cache_path: str, ranks: int, precision: str | None, rows=None):
    """Subset positions in the batches one process would fit (from metadata alone), for the solver's
    ``precision`` (bf16 keeps a per-row reference, which the cut counts; None: as this process resolves
    ``config.precision``) on ``rows`` (default: every train row).

    With fewer such batches than ranks, the subsets are dealt into ``ranks``
    batches instead, so no rank idles; those records then agree with one
    process's to the solver's tolerance rather than bit for bit.
    """
    dims, n_rows, width = member_dims(config, order_of(subsets), cache_path)
    n_rows = n_rows if rows is None else len(rows)
    if precision is None:  # as the fit resolves it: its widest block is one member's
        precision = c_search.solver_precision(config.precision, c_search.device(), max(dims.values()))[0]
    budget, reference = c_search.budget(config), c_search.reference_rows(precision, n_rows)
    cut = c_search.groups(subsets, dims, width, c_search.candidates(config), budget, reference)
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
    """Read each member once, fit every subset on the batched solver: (what was measured on each, context, train
    rows, eval labels).

    A lone subset small enough to be preconditioned whole (``batched_lbfgs.FULL_DIMS``) is read as one
    block: one matrix product per pass instead of one per member (the demo's Cat4 refit: 1.3x faster).
    """
    where = c_search.device()
    try:
        context = _checked(store, config, members)
        # ``sizes``: a share of a larger sweep (a rank's or a job's), fitted as the whole sweep fits it
        whole = sizes is None and len(subsets) == 1 and sum(context["dims"][m] for m in subsets[0]) <= bl.FULL_DIMS
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
        measured = PATHS["logreg-batched"](
            train, y_train, load_evals, chosen, config, len(context["classes"]), share, sizes
        )
    except cache.CacheError as e:
        raise TimecatError(str(e)) from None
    for subset, fitted in zip(chosen, measured, strict=True):  # the standardisation the head's weights apply to
        mean, scale = (np.concatenate([stats[j][i] for j in subset]) for i in (0, 1))
        fitted.head = {"mean": mean, "scale": scale, **fitted.head}
    return measured, context, len(y_train), evals["y"]


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
    store = cache.open(cache_path)
    measured, context, n_train, y_eval = _fit_subsets(store, config, members, subsets, rows, share, sizes)
    records = [
        _record(replace(config, members=tuple(subset)), fitted, context, n_train, y_eval, started, extra)
        for subset, fitted in zip(subsets, measured, strict=True)
    ]
    _save(results_root, records, measured, y_eval, context)
    for i, record in enumerate(records, 1):
        if len(subsets) > 1:  # a single probe logs its line in probe()
            log_result(record, f"{i}/{len(subsets)}")
    return records


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
    if config.batched:  # every subset in one batched fit, each member read once
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
