"""The C-search policy of the logreg protocol, and the batched logreg path that runs it for many subsets.

The policy (``stages``, one generator for both searches): C is chosen on a
seeded, stratified held-out part of the train split (``heldout.search_split``):
the coarse grid in ascending C, the most regularised first, then the best
coarse C times each refinement factor; the choice is the most regularised
candidate within one held-out row of the best (``heldout.best_trial``), so that
the rounding of matrix kernels between batch shapes, processes and CPUs cannot
flip it. The refit keeps the chosen C (CLIP's protocol) on every train row,
warm-started from its search solution. ``choose_c`` runs the stages one C at a
time on a one-C backend (``logreg_backends``); ``search`` runs each stage as one
batched fit for every subset.

The batched path (``probe_subsets``): every C candidate of every subset in a
group is one problem of one batched L-BFGS (``batched_lbfgs``), so each
member's block is read once per evaluation for all of them; groups of subsets
are sized to ``--memory-gib`` (``groups``); under torchrun the ranks share a
subset's C candidates (``_trials``). Eval features are read only after every
fit. Precision (``solver_precision``): bf16 products where the hardware
multiplies bf16 natively and, on a CPU, blocks are at least BF16_MIN_WIDTH
columns wide; measured in tests/benchmarks/test_sweep_real_features.py (128-d
pairs: fp32 faster), test_probe_real_features.py (512-d Cat4: bf16 faster)
and test_probe_resnet50_features.py (2,048-d members). Exactness against
float64 optima, both precisions, and the same C in a batch and alone:
tests/test_c_search.py.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.configs import PROBE_PRECISIONS as PRECISIONS
from pipeline.core.errors import TimecatError
from pipeline.core.progress import get_logger, plural, progress
from pipeline.probe import batched_lbfgs as bl
from pipeline.probe.heldout import best_trial, describe_split, fixed_split, search_split, tie, topk_accuracy
from pipeline.probe.protocol import Measured

log = get_logger(__name__)

STATE_COPIES = 2 * bl.HISTORY + 9  # weight-sized tensors L-BFGS keeps per problem (history s, y; x, g, trials, H0 y)
REFERENCE_COPIES = 2  # bf16: row-sized float32 tensors per problem (the reference's logits and dloss/dZ)


@dataclass(frozen=True)
class SolverSettings:
    """The C search and refit settings (ProbeConfig's), and the memory budget of one batch."""

    c_grid: tuple[float, ...]
    refine: tuple[float, ...]
    gap: float  # relative gap to the optimum at which a fit stops
    cap: int  # iterations per precision phase
    precision: str  # bf16 (a bf16 phase, then float32) or fp32
    memory_bytes: int  # budget for one batch's solver state and working logits
    fixed_c: float = 1.0  # C when no class has a row to hold out (1-shot probes)

    @classmethod
    def of(cls, config, precision: str) -> SolverSettings:
        """A ProbeConfig's settings, with the precision resolved for the device."""
        return cls(config.c_grid, config.refine, config.gap, config.iter_cap, precision, budget(config), config.fixed_c)


def device() -> torch.device:
    """This process's GPU when there is one (under torchrun, its local rank's), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# auto on a CPU: bf16 only for blocks at least this wide. Below, a pass is mostly per-row work (softmax,
# casts, the bf16 phase's reference) that bf16 does not speed up, and the bf16 phase and its float32
# confirmation cost more passes. Measured whole probes, bf16 against fp32: 128-d members in
# tests/benchmarks/test_sweep_real_features.py (fp32 faster), a 512-d block in test_probe_real_features.py and
# 2,048-d blocks in test_probe_resnet50_features.py (bf16 faster); their docstrings hold the figures.
BF16_MIN_WIDTH = 512


def solver_precision(name: str, where: torch.device, width: int | None = None) -> tuple[str, str]:
    """``(bf16 | fp32, why)``: ``auto`` is bf16 where the hardware multiplies bf16 matrices natively and (on a
    CPU) the widest block, ``width`` columns, is at least BF16_MIN_WIDTH.

    On the CPU that is AVX512-BF16 or AMX-BF16 (oneDNN's avx512_core_bf16 /
    avx512_core_amx kernels); without them oneDNN emulates bf16 and is slower
    than fp32. On the GPU it is compute capability 8.0 and newer (tensor cores).
    """
    if name not in PRECISIONS:
        raise TimecatError(f"unknown precision {name!r}; choose one of {list(PRECISIONS)}")
    if name != "auto":
        return name, "asked for"
    if where.type == "cuda":
        major, _ = torch.cuda.get_device_capability(where)
        if major >= 8:
            return "bf16", "GPU with bf16 tensor cores"
        return "fp32", "GPU without bf16 tensor cores (compute capability < 8.0)"
    flags = cpu_flags()
    units = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if units and width is not None and width < BF16_MIN_WIDTH:
        return "fp32", f"blocks of {width} columns: bf16 pays from {BF16_MIN_WIDTH} on a CPU (measured)"
    if units:
        return "bf16", f"CPU with bf16 matrix instructions ({', '.join(units)})"
    return "fp32", "CPU without bf16 matrix instructions (no avx512_bf16 or amx_bf16)"


@dataclass(frozen=True)
class Stage:
    """One stage of a C search: the C's to fit next, and which earlier trial (its index) their fits start from."""

    name: str  # first (the most regularised C alone), grid (the rest of the coarse grid), refine
    candidates: tuple[float, ...]
    start: int | None  # None: from zero


def stages(c_grid, refine, held_rows: int):
    """The C-search policy, as a generator of stages: send each stage's trials back (in its order); the
    generator returns the chosen trial.

    The coarse grid in ascending C (the most regularised first: from zero it converges in a few
    iterations, and the other coarse candidates start from its solution), then the best coarse C times
    each refinement factor, started from that best. The choice, coarse and final, is ``heldout.best_trial``:
    within one held-out row (``held_rows`` of them) of the best, candidates are tied and the smaller C is
    chosen. Both searches run it: the batched one (``search``) and the one-C backends' (``choose_c``).
    """
    grid, factors = sorted(c_grid), sorted(refine)
    trials: list[dict] = []
    trials += yield Stage("first", (grid[0],), None)
    if len(grid) > 1:
        trials += yield Stage("grid", tuple(grid[1:]), 0)
    if factors:
        coarse = best_trial(trials, "C", "smaller", held_rows)
        trials += yield Stage("refine", tuple(coarse["C"] * f for f in factors), trials.index(coarse))
    return best_trial(trials, "C", "smaller", held_rows)


def choose_c(X: np.ndarray, y: np.ndarray, model, config, n_classes: int | None = None):
    """The C search (``stages``) one candidate at a time on a one-C backend (``logreg_backends``), in the
    stages' order: every fit starts from the one before it (the backend's warm start).

    ``model`` is left holding the last fit (a warm start for the refit). Returns the best C, every trial,
    how the split was drawn and how C was chosen (near ties).
    """
    fit_idx, held_idx = search_split(y, config)
    X_fit, y_fit, X_held, y_held = X[fit_idx], y[fit_idx], X[held_idx], y[held_idx]
    trials: list[dict] = []
    policy = stages(config.c_grid, config.refine, len(held_idx))
    stage = next(policy)
    with progress(total=candidates(config), desc=f"choose C ({config.dataset})", unit="fit") as bar:
        while True:
            done = []
            for C in stage.candidates:
                end = model.fit(X_fit, y_fit, C, config.search_iter)
                top1 = topk_accuracy(model.topk(X_held, 1), y_held, 1)
                done.append({"C": C, "holdout_top1": top1, "converged": end["status"] == "converged", "fit": end})
                bar.update(1)
            trials += done
            try:
                stage = policy.send(done)
            except StopIteration as chosen:
                best = chosen.value
                break
    split = describe_split(y, fit_idx, held_idx, n_classes or int(y.max()) + 1)
    return best["C"], trials, split, tie(trials, "C", "smaller", len(held_idx))


def to_blocks(arrays: dict[int, np.ndarray], where: torch.device) -> dict[int, torch.Tensor]:
    """Member arrays as float32 tensors on the device (a view on the CPU)."""
    return {j: torch.from_numpy(X).to(where, torch.float32) for j, X in arrays.items()}


def standardize_block_in_place(
    X: np.ndarray, mean: np.ndarray, std: np.ndarray, where, block_rows: int = 4096
) -> torch.Tensor:
    """Overwrite X with (X - mean) / std (float32, block by block), and return it as a tensor on the device.

    On the CPU the tensor is X itself: standardising costs no copy (on a GPU, the tensor is the one copy). The solver
    keeps float32 features: its last phase, which certifies the optimum, needs them.
    """
    for start in range(0, len(X), block_rows):
        X[start : start + block_rows] -= mean
        X[start : start + block_rows] /= std
    return torch.from_numpy(X).to(where)


@dataclass(frozen=True)
class BlockRows:
    """Some rows of the member blocks (``index`` None: all of them) and their labels (numpy)."""

    blocks: dict[int, torch.Tensor]
    index: torch.Tensor | None
    y: np.ndarray

    @classmethod
    def of(cls, blocks: dict[int, torch.Tensor], y: np.ndarray, index: np.ndarray | None = None) -> BlockRows:
        where = next(iter(blocks.values())).device
        picked = None if index is None else torch.from_numpy(index).to(where)
        return cls(blocks, picked, y if index is None else y[index])

    def labels(self) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.y)).to(next(iter(self.blocks.values())).device)


def candidates(config) -> int:
    """C candidates fit per subset in the search (coarse grid and refinements)."""
    return len(config.c_grid) + len(config.refine)


def width_of(n_classes: int) -> int:
    """Logit columns: one binomial logit for two classes, else one per class."""
    return 1 if n_classes == 2 else n_classes


def groups(subsets: list[tuple], dims: dict, width: int, candidates: int, budget: int, rows: int = 0) -> list:
    """Consecutive runs of subsets whose C candidates' solver state fits ``budget`` bytes (at least one each).

    Members are any keys of ``dims`` (member indices or names). ``rows``: the
    most rows a fit runs over, for the bf16 phase's per-row reference.
    """
    out, current, used = [], [], 0
    for subset in subsets:
        need = candidates * 4 * width * (STATE_COPIES * (sum(dims[j] for j in subset) + 1) + REFERENCE_COPIES * rows)
        if current and used + need > budget:
            out.append(current)
            current, used = [], 0
        current.append(subset)
        used += need
    return [*out, current] if current else out


class _Bar:
    """One progress bar over a batched fit's iterations (all precision phases), with how many fits still run; at
    the end, one line that says where the fits ended, not the bar's last count and ETA."""

    def __init__(self, total: int, fits: int, desc: str):
        self.desc, self.total, self.fits, self.last = desc, total, fits, 0
        self.bar = progress(total=total, desc=desc, unit="iter")

    def __call__(self, iteration: int, running: int) -> None:
        self.last += 1
        self.bar.update(1)
        self.bar.set_postfix_str(f"{running:,} of {plural(self.fits, 'fit')} still running", refresh=False)

    def close(self, ends: list[dict] | None = None) -> None:
        self.bar.close()
        if ends:
            log.info("%s: %s", self.desc, ended(ends, self.last, self.total))


def ended(ends: list[dict], iterations: int, cap: int) -> str:
    """Where a batched fit ended: ``converged at iteration 212 of 10,000`` (with how many fits, when several)."""
    converged = sum(e["status"] == "converged" for e in ends)
    where = f"at iteration {iterations:,} of {cap:,}"
    other = next((e["status"] for e in ends if e["status"] != "converged"), "")
    if converged == len(ends):
        return f"converged {where}" if len(ends) == 1 else f"all {len(ends):,} fits converged {where}"
    return f"{converged:,} of {plural(len(ends), 'fit')} converged, the others stopped ({other}) {where}"


def solve(rows: BlockRows, problems, width: int, solver: SolverSettings, precond, desc: str, init=None):
    """One batched fit over ``rows`` with a progress bar; returns (params, end states)."""
    bar, ends = _Bar(solver.cap * len(bl.PHASES[solver.precision]), len(problems), desc), None
    try:
        params, ends = bl.fit(
            rows.blocks,
            rows.labels(),
            problems,
            width,
            max_iter=solver.cap,
            gap=solver.gap,
            precision=solver.precision,
            init=init,
            row_bytes=max(solver.memory_bytes // 4, 2**20),
            index=rows.index,
            precond=precond,
            on_iteration=bar,
        )
        return params, ends
    finally:
        bar.close(ends)


def _trials(
    fit: BlockRows,
    held: BlockRows,
    problems,
    width: int,
    solver: SolverSettings,
    precond,
    desc: str,
    init=None,
    share=None,
):
    """Fit ``problems`` on ``fit``; returns their weights and one trial (C, held-out top-1, fit) each.

    ``share`` (a pipeline.core.distributed.Dist of several processes): this rank fits
    problems rank, rank + world, ..., and every rank gets every problem's
    weights and trial back, in order. Each problem's fit does not depend on the
    others in its batch (per-problem line search and stopping), so the split
    changes the work, not the answer.
    """
    ranks = 1 if share is None else share.world_size
    mine = list(range(0 if share is None else share.rank, len(problems), ranks))
    params, trials = None, []
    if mine:
        parts, ends = [], []
        for chunk in _chunks([problems[i] for i in mine], fit, width, solver):  # positions in ``mine``
            start = None if init is None else bl.take(init, _index([mine[c] for c in chunk], init))
            part, part_ends = solve(fit, [problems[mine[c]] for c in chunk], width, solver, precond, desc, start)
            parts.append(part)
            ends += part_ends
        params = bl.concat(parts)
        best = bl.topk(held.blocks, params, 1, index=held.index)  # (P, n_held, 1)
        trials = [
            {
                "C": problems[i].C,
                "holdout_top1": topk_accuracy(best[r], held.y, 1),
                "converged": e["status"] == "converged",
                "fit": e,
            }
            for r, (i, e) in enumerate(zip(mine, ends, strict=True))
        ]
    if ranks == 1:
        return params, trials
    return _gathered(share, mine, params, trials, len(problems), held.labels().device)


def _chunks(problems, fit: BlockRows, width: int, solver: SolverSettings) -> list[list[int]]:
    """Consecutive runs of ``problems`` whose solver state fits the memory budget (at least one problem each):
    a subset's C candidates are fit together unless they do not fit (iNat18's Cat4: about 12 GB each)."""
    dims = {j: X.shape[1] for j, X in fit.blocks.items()}
    rows = reference_rows(solver.precision, len(fit.y))
    cut = groups([p.members for p in problems], dims, width, 1, solver.memory_bytes, rows)
    ends = np.cumsum([0, *map(len, cut)])
    return [list(range(a, b)) for a, b in itertools.pairwise(ends)]


def _gathered(share, mine: list[int], params, trials: list[dict], count: int, where: torch.device):
    """Every rank's problems (weights and trials) on every rank, in problem order."""
    parts = share.all_gather((mine, None if params is None else params.to(torch.device("cpu")), trials))
    order = [i for indices, _, _ in parts for i in indices]  # problem index at each gathered position
    every = bl.concat([p for _, p, _ in parts if p is not None])
    position = {i: n for n, i in enumerate(order)}
    merged = bl.take(every, torch.tensor([position[i] for i in range(count)], dtype=torch.long))
    by_index = {i: t for indices, _, ts in parts for i, t in zip(indices, ts, strict=True)}
    return merged.to(where), [by_index[i] for i in range(count)]


def _repeat(params, counts: list[int]):
    """Problem i of ``params`` repeated counts[i] times, in order (warm starts for the next stage)."""
    index = [i for i, c in enumerate(counts) for _ in range(c)]
    return bl.take(params, torch.tensor(index, dtype=torch.long, device=params.b.device))


def search(fit: BlockRows, held: BlockRows, subsets, width: int, solver: SolverSettings, precond, share=None):
    """Every subset's C search (``stages``), each stage one batched fit for all subsets.

    The policy's warm starts: the coarse candidates start from the most regularised one's solution, all of
    them together (scikit-learn walks the grid from the same end, one fit after another); refinements from
    their subset's best coarse solution. Returns per subset its trials and chosen trial, and the chosen
    trials' search weights as one Params (problem i: subset i), the refit's warm start.
    """
    policies = [stages(solver.c_grid, solver.refine, len(held.y)) for _ in subsets]
    asked = [next(policy) for policy in policies]
    per: list[list[dict]] = [[] for _ in subsets]
    where: list[list[tuple]] = [[] for _ in subsets]  # each trial's weights: (Params, problem index)
    chosen: list[int] = []
    while not chosen:  # the subsets' policies go stage by stage together: their stages have the same sizes
        problems = [bl.Problem(s, C) for s, stage in zip(subsets, asked, strict=True) for C in stage.candidates]
        init = None
        if asked[0].start is not None:
            starts = bl.concat([_weights(where[i], stage.start) for i, stage in enumerate(asked)])
            init = _repeat(starts, [len(stage.candidates) for stage in asked])
        desc = STAGE_TEXT[asked[0].name].format(subsets=len(subsets), problems=len(problems))
        params, trials = _trials(fit, held, problems, width, solver, precond, desc, init, share)
        each = len(asked[0].candidates)
        for i, policy in enumerate(policies):
            new = trials[i * each : (i + 1) * each]
            per[i] += new
            where[i] += [(params, i * each + r) for r in range(each)]
            try:
                asked[i] = policy.send(new)
            except StopIteration as end:
                chosen.append(per[i].index(end.value))
    init = bl.concat([_weights(where[i], c) for i, c in enumerate(chosen)])
    return list(zip(per, chosen, strict=True)), init


STAGE_TEXT = {"first": "choose C ({subsets})", "grid": "choose C ({problems} together)", "refine": "refine C"}


def _weights(where: list[tuple], trial: int):
    """The search weights of a subset's trial ``trial`` (a one-problem Params)."""
    params, index = where[trial]
    return bl.take(params, _index([index], params))


def _index(values: list[int], like) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=like.b.device)


def preconditioner(rows: BlockRows, subsets) -> bl.Preconditioner:
    """The second moments of ``rows`` for ``subsets``, eigendecomposed once for the search and the refit."""
    return bl.Preconditioner.of(
        {j: rows.blocks[j] for s in subsets for j in s}, [bl.Problem(s, 1.0) for s in subsets], rows.index
    )


def fit_group(train: BlockRows, subsets, split, solver: SolverSettings, width: int, share=None):
    """Search and refit one group of subsets: (per subset its trials and chosen trial, refit problems,
    refit weights, refit end states, preconditioner). ``split`` None: no search, every subset fit at the
    fixed C."""
    if split is None:
        problems = [bl.Problem(s, solver.fixed_c) for s in subsets]
        precond = preconditioner(train, subsets)
        params, ends = solve(train, problems, width, solver, precond, f"fit at fixed C ({len(problems)})")
        return [([], None) for _ in subsets], problems, params, ends, precond
    fit_idx, held_idx = split
    # The search rows are copied once: every evaluation reads them, and gathering them per
    # evaluation took a fifth of the search's time. The copy (search_rows of the train rows)
    # is freed before the refit; the peak stays the read's. Held-out rows are gathered when scored.
    rows = torch.from_numpy(fit_idx).to(next(iter(train.blocks.values())).device)
    fit = BlockRows({j: X.index_select(0, rows) for j, X in train.blocks.items()}, None, train.y[fit_idx])
    held = BlockRows.of(train.blocks, train.y, held_idx)
    # One preconditioner for the search and the refit: the search rows are a stratified sample of
    # the train rows, so their second moments are the train rows' up to sampling.
    precond = preconditioner(fit, subsets)
    found, init = search(fit, held, subsets, width, solver, precond, share)
    del fit
    # The refit keeps the chosen C (CLIP's protocol), warm-started from its search solution. With
    # ``share``, every rank refits (the same problems from the same start, so the same weights):
    # a rank waiting on another's long refit could outlast the collective timeout.
    problems = [bl.Problem(s, trials[c]["C"]) for s, (trials, c) in zip(subsets, found, strict=True)]
    params, ends = solve(train, problems, width, solver, precond, f"refit ({len(problems)})", init)
    return found, problems, params, ends, precond


def _measured(found, problems, params, ends, best: np.ndarray, held_rows: int, fields: dict) -> list[Measured]:
    """Per subset: its search trials, the chosen C (and how it was chosen), its refit's end state, the
    batch's ``fields``, its eval predictions, and its head's weights (``coef``: the subset's members' rows,
    in its order, (d, k) float64; ``intercept`` (k,); the caller adds the standardisation)."""
    out = []
    for i, (trials, chosen) in enumerate(found):
        weights, intercept = bl.coefficients(params, i)
        how = {"rule": "fixed"} if chosen is None else tie(trials, "C", "smaller", held_rows)
        record = {
            "search": trials,
            "chosen": {
                "C": problems[i].C,
                "converged": ends[i]["status"] == "converged",
                "warm_start": chosen is not None,
                **how,
                "fit": ends[i],
            },
            **fields,
        }
        coef = np.vstack([weights[j] for j in problems[i].members])
        out.append(Measured(record, best[i], {"coef": coef, "intercept": intercept, "C": problems[i].C}))
    return out


def _subset_batches(subsets, dims: dict, width: int, config, solver: SolverSettings, sizes, rows: int) -> list:
    """Subsets in consecutive batches: cut to the memory budget, or (a torchrun rank's share) as ``sizes`` say."""
    if sizes is None:
        return groups(
            subsets, dims, width, candidates(config), solver.memory_bytes, reference_rows(solver.precision, rows)
        )
    ends = np.cumsum([0, *sizes])
    return [subsets[a:b] for a, b in itertools.pairwise(ends)]


def probe_subsets(
    train, y_train: np.ndarray, load_evals, subsets, config, n_classes: int, share=None, sizes=None
) -> list[Measured]:
    """The logreg protocol for every subset (tuples of member indices) on the batched solver.

    ``train`` maps member index -> standardised (n, d_j) tensors in the
    compute dtype on the compute device (see ``standardize_block_in_place``);
    ``load_evals()`` returns the eval split's (blocks, labels) likewise, and is
    called once every fit is done, so eval features never share memory with a
    fit. ``config`` is a ProbeConfig. ``share`` (a pipeline.core.distributed.Dist):
    the ranks split the C candidates (see ``_trials``). ``sizes``: the
    subsets come as consecutive batches of these sizes (default: cut to the
    memory budget here). Returns what was measured on each subset, in order
    (``protocol.Measured``; its head without the standardisation, which the caller holds).
    """
    where = next(iter(train.values())).device
    resolved, why = solver_precision(config.precision, where, max(X.shape[1] for X in train.values()))
    solver = SolverSettings.of(config, resolved)
    # A 1-shot probe has one row per class, none to hold out: the documented fixed C instead. Any
    # other probe searches (search_split refuses a train split that leaves nothing to hold out).
    one_shot = config.shots is not None and np.bincount(y_train).max() < 2
    split = None if one_shot else search_split(y_train, config)
    width = width_of(n_classes)
    dims = {j: X.shape[1] for j, X in train.items()}
    batches = _subset_batches(subsets, dims, width, config, solver, sizes, len(y_train))
    log.info(
        "batched logreg: %s in %s, %s (%s)",
        plural(len(subsets), "subset"),
        plural(len(batches), "batch", "batches"),
        resolved,
        why,
    )
    rows = BlockRows.of(train, y_train)
    fitted = [fit_group(rows, batch, split, solver, width, share) for batch in batches]
    evals, _ = load_evals()
    held = (
        fixed_split(y_train, n_classes, solver.fixed_c) if split is None else describe_split(y_train, *split, n_classes)
    )
    common = {
        "backend": "batched",
        "backend_reason": f"one batched L-BFGS for every C candidate and subset, on {where.type}",
        "precision": resolved,
        "precision_reason": why,
        "search_rows": 0 if split is None else len(split[0]),
        "holdout": held,
        "batch": {"subsets": len(subsets), "batches": len(batches), "memory_budget_gib": config.memory_gib},
    }
    measured, held_rows = [], 0 if split is None else len(split[1])
    for found, problems, params, ends, precond in fitted:
        best = bl.topk(evals, params, 5)  # (subsets, n_eval, <=5)
        solved = {"preconditioner": precond.describe(), "gap": solver.gap, "cap": solver.cap}
        measured += _measured(found, problems, params, ends, best, held_rows, {"solver": solved, **common})
    return measured


def reference_rows(precision: str, rows: int) -> int:
    """Rows whose per-row reference a fit keeps (the bf16 phase's); 0 in fp32."""
    return rows if precision == "bf16" else 0


def budget(config) -> int:
    """The memory budget of one batch, bytes."""
    return int(config.memory_gib * 2**30)
