"""Many L2 logistic regressions fit together, in one pass over shared feature blocks.

A *problem* is one logistic regression: a set of members (feature blocks) and
one L2 strength C. Its objective is scikit-learn's: mean cross-entropy +
||W||^2 / (2 C n), intercept not penalised; two classes are one binomial logit.
A problem's logits are the sum of its members' blocks, ``sum_j X_j W_(j,p)``,
so every problem that contains member j shares one matrix product: the
weights of all of them sit side by side as the columns of one (d_j, Q_j x k)
block, and each pass over X_j serves every C candidate and every subset at
once (the way dinov2 trains its linear heads off one forward pass).

The optimiser is L-BFGS with everything kept per problem: its own history,
its own step from a backtracking (Armijo) line search, its own convergence.
The objectives are independent, so evaluating all problems at their own trial
points is one pass, and a problem that converges leaves the batch, so a slow
candidate neither hides behind converged ones nor holds them back. A joint
L-BFGS over the sum (torch.optim.LBFGS over all weights) would mix their
curvature and stop them together; that is why this is written here rather
than taken from a library.

Precision: the matrix products take ``dtype`` inputs (bfloat16 on hardware
with bf16 matrix units, accumulating in float32 inside the kernel); weights,
logits, loss, gradients and the L-BFGS state stay float32 (sums in float64).

Shapes: n rows, M members, d_j features of member j, k classes (1 for a
binomial logit), P problems, Q_j problems containing member j.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.errors import TimecatError

HISTORY = 10  # L-BFGS pairs kept per problem (scikit-learn/scipy's default)
ARMIJO = 1e-4  # sufficient-decrease constant of the line search
MAX_LINE_SEARCH = 20  # backtracks before a problem's line search gives up
# Relative change of the objective that the arithmetic resolves, by the blocks' dtype (measured:
# the objective's scatter under 1e-7 weight perturbations was 6e-8 with float32 products and
# 6e-7 with bfloat16 ones, whose outputs are rounded to 8 bits on the CPU). A full step that
# changes the objective by less than this has reached the arithmetic's floor: converged.
RESOLUTION = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-19, torch.float16: 2.0**-19}
# Relative rounding of the data gradient X^T G, whose matrix product returns the blocks' dtype
# (bfloat16 keeps 8 significant bits; two units of the last place). No gradient test can ask for
# less than this times the data gradient's size: near the optimum that is the penalty's W / (C n),
# and a bf16 fit of C = 1e-3 on 10k rows sat at max|g| = 1.4e-4 > tol 1e-4 for 35 iterations.
GRADIENT_ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


@dataclass(frozen=True)
class Problem:
    """One logistic regression: the members (indices into the blocks) it concatenates, and its C."""

    members: tuple[int, ...]
    C: float

    def __post_init__(self):
        if not self.members or len(set(self.members)) != len(self.members):
            raise TimecatError(f"a problem needs distinct members, got {self.members}")
        if not self.C > 0:
            raise TimecatError(f"C must be positive, got {self.C}")


@dataclass
class Solution:
    """A fitted problem: per-member weights (d_j, k), intercept (k,), and how the fit ended."""

    weights: dict[int, np.ndarray]
    intercept: np.ndarray
    status: str  # converged | max_iter | stalled (the line search found no decrease: noise level)
    iterations: int
    objective: float
    grad_max: float  # largest |gradient| entry at the end (the convergence test is grad_max <= tol)
    evaluations: int = 0  # passes (function + gradient) this problem took part in

    @property
    def converged(self) -> bool:
        return self.status == "converged"


@dataclass
class Params:
    """Weights of P problems laid out per member: W[j] is (d_j, Q_j, k), b is (P, k).

    ``owners[j]`` (Q_j,) says which problem each of W[j]'s column groups belongs to.
    Operations return per-problem (P,) results, so L-BFGS runs per problem.
    """

    W: dict[int, torch.Tensor]
    b: torch.Tensor
    owners: dict[int, torch.Tensor] = field(repr=False)

    @property
    def problems(self) -> int:
        return self.b.shape[0]

    def like(self, W: dict[int, torch.Tensor], b: torch.Tensor) -> Params:
        return Params(W, b, self.owners)

    def zeros_like(self) -> Params:
        return self.like({j: torch.zeros_like(w) for j, w in self.W.items()}, torch.zeros_like(self.b))

    def dot(self, other: Params) -> torch.Tensor:
        """(P,) float64 per-problem inner products."""
        out = (self.b.double() * other.b.double()).sum(1)
        for j, w in self.W.items():
            out.index_add_(0, self.owners[j], (w.double() * other.W[j].double()).sum((0, 2)))
        return out

    def amax(self) -> torch.Tensor:
        """(P,) largest absolute entry per problem."""
        out = self.b.abs().amax(1)
        for j, w in self.W.items():
            if w.shape[1]:
                out = out.scatter_reduce(0, self.owners[j], w.abs().amax((0, 2)), reduce="amax")
        return out

    def axpy(self, a: torch.Tensor, other: Params) -> Params:
        """self + a * other, with one scalar a[p] per problem."""
        a = a.float()
        W = {j: w + a[self.owners[j]][None, :, None] * other.W[j] for j, w in self.W.items()}
        return self.like(W, self.b + a[:, None] * other.b)

    def scale(self, a: torch.Tensor) -> Params:
        a = a.float()
        return self.like({j: a[self.owners[j]][None, :, None] * w for j, w in self.W.items()}, a[:, None] * self.b)

    def sub(self, other: Params) -> Params:
        return self.like({j: w - other.W[j] for j, w in self.W.items()}, self.b - other.b)

    def select(self, keep: torch.Tensor) -> Params:
        """The problems ``keep`` (indices, ascending) only, renumbered 0..len(keep)-1."""
        return take(self, keep)

    def to(self, where: torch.device) -> Params:
        """The same problems on another device."""
        move = {j: o.to(where) for j, o in self.owners.items()}
        return Params({j: w.to(where) for j, w in self.W.items()}, self.b.to(where), move)

    def where(self, mask: torch.Tensor, other: Params) -> Params:
        """Per problem: other where mask[p], else self."""
        W = {j: torch.where(mask[self.owners[j]][None, :, None], other.W[j], w) for j, w in self.W.items()}
        return self.like(W, torch.where(mask[:, None], other.b, self.b))


def take(params: Params, index: torch.Tensor) -> Params:
    """Problems ``index`` of ``params`` (any order, repeats allowed), renumbered 0..len(index)-1."""
    W, owners = {}, {}
    for j, w in params.W.items():
        column = torch.full((params.problems,), -1, dtype=torch.long, device=index.device)
        column[params.owners[j]] = torch.arange(w.shape[1], device=index.device)
        picked = column[index]
        present = torch.nonzero(picked >= 0).flatten()
        if len(present):
            W[j] = w.index_select(1, picked[present])
            owners[j] = present
    return Params(W, params.b.index_select(0, index), owners)


def concat(parts: list[Params]) -> Params:
    """The problems of ``parts`` one after another, renumbered."""
    W, owners, offset = {}, {}, 0
    for part in parts:
        for j, w in part.W.items():
            W.setdefault(j, []).append(w)
            owners.setdefault(j, []).append(part.owners[j] + offset)
        offset += part.problems
    return Params(
        {j: torch.cat(ws, dim=1) for j, ws in W.items()},
        torch.cat([p.b for p in parts]),
        {j: torch.cat(o) for j, o in owners.items()},
    )


def layout(problems: list[Problem], dims: dict[int, int], width: int, device) -> Params:
    """Zero weights for ``problems`` over blocks of ``dims`` (member -> d_j), ``width`` logits each."""
    owners = {
        j: torch.tensor([p for p, problem in enumerate(problems) if j in problem.members], dtype=torch.long)
        for j in sorted({j for problem in problems for j in problem.members})
    }
    W = {j: torch.zeros(dims[j], len(o), width, device=device) for j, o in owners.items()}
    return Params(W, torch.zeros(len(problems), width, device=device), {j: o.to(device) for j, o in owners.items()})


class Objective:
    """Loss and gradient of P problems over shared blocks, computed in row blocks.

    ``blocks[j]`` is member j's (N, d_j) tensor in the compute dtype; ``index``
    (n,) picks the rows the objective is over (None: all N), gathered one row
    block at a time so that no copy of the selected rows is ever made. ``y``
    (n,) are class indices 0..k-1 (or 0/1 with ``width`` 1). ``row_bytes``
    bounds the per-block working memory (logits, probabilities, products).
    """

    def __init__(self, blocks: dict[int, torch.Tensor], y: torch.Tensor, width: int, row_bytes: int, index=None):
        self.blocks, self.y, self.width, self.index = blocks, y, width, index
        self.n = len(y)
        self.row_bytes = row_bytes
        dtype = next(iter(blocks.values())).dtype
        self.resolution, self.rounding = RESOLUTION[dtype], GRADIENT_ROUNDING[dtype]

    def _rows(self, params: Params) -> int:
        # float32 per row: logits Z, probabilities G and their copies (4 x P x k); one member's
        # products and its share of G (2 x P x k at most); gathered rows (2 bytes x d at most).
        # Sized from the members these problems use, not every block held: the same batch is
        # cut into the same row blocks (and so sums the same way) whatever else is in memory.
        widest = max(self.blocks[j].shape[1] for j in params.W)
        per_row = 4 * 6 * params.problems * self.width + 4 * widest
        return int(max(256, min(self.n, self.row_bytes // per_row)))

    def rows(self, j: int, start: int, stop: int) -> torch.Tensor:
        """Member j's rows start..stop of the objective: a view, or a gathered block."""
        if self.index is None:
            return self.blocks[j][start:stop]
        return self.blocks[j].index_select(0, self.index[start:stop])

    def logits(self, params: Params, start: int, stop: int, cast: dict[int, torch.Tensor]) -> torch.Tensor:
        """(R, P, k) float32 logits of rows start..stop, every problem at once."""
        Z = params.b.unsqueeze(0).expand(stop - start, -1, -1).clone()
        for j, w in cast.items():
            Z.index_add_(
                1, params.owners[j], (self.rows(j, start, stop) @ w).float().view(stop - start, -1, self.width)
            )
        return Z

    def casts(self, params: Params) -> dict[int, torch.Tensor]:
        """Each member's weights as one (d_j, Q_j x k) matrix in the blocks' dtype (once per pass)."""
        return {j: w.reshape(w.shape[0], -1).to(self.blocks[j].dtype) for j, w in params.W.items() if w.shape[1]}

    def _pointwise(self, Z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P,) float64 summed losses of the rows and dloss/dZ (R, P, k), unnormalised."""
        P = Z.shape[1]
        if self.width == 1:
            z, target = Z[..., 0], y[:, None].float()
            loss = (torch.nn.functional.softplus(z) - target * z).sum(0, dtype=torch.float64)
            return loss, (torch.sigmoid(z) - target).unsqueeze(-1)
        lse = torch.logsumexp(Z, dim=2)  # (R, P)
        at = y.view(-1, 1, 1).expand(-1, P, 1)
        loss = (lse - Z.gather(2, at).squeeze(2)).sum(0, dtype=torch.float64)
        G = Z.sub_(lse.unsqueeze(2)).exp_()  # softmax, in Z's memory
        G.scatter_add_(2, at, torch.full((len(y), P, 1), -1.0, device=G.device))
        return loss, G

    def __call__(self, params: Params, C: torch.Tensor) -> tuple[torch.Tensor, Params, torch.Tensor]:
        """(P,) float64 objectives, their gradient, and (P,) the gradient's rounding floor.

        For problems with strengths C (P,). The floor is the largest entry the
        matrix product's rounding can leave in the gradient (0 for float32).
        """
        P, n = params.problems, self.n
        loss = torch.zeros(P, dtype=torch.float64, device=params.b.device)
        grad = params.zeros_like()
        cast = self.casts(params)
        step = self._rows(params)
        for start in range(0, n, step):
            stop = min(n, start + step)
            part, G = self._pointwise(self.logits(params, start, stop, cast), self.y[start:stop])
            loss += part
            G /= n
            grad.b += G.sum(0)
            G_all = G.reshape(stop - start, -1).to(next(iter(self.blocks.values())).dtype)  # (R, P x k)
            for j in cast:
                X = self.rows(j, start, stop)
                Gj = G_all if _every(params, j) else G.index_select(1, params.owners[j]).reshape(stop - start, -1)
                grad.W[j] += (X.T @ Gj.to(X.dtype)).view_as(grad.W[j])
        inv = 1.0 / (C.double() * n)  # (P,): the penalty ||W||^2 / (2 C n) and its gradient W / (C n)
        weights = params.like(params.W, torch.zeros_like(params.b))
        floor = self.rounding * grad.amax()  # before the penalty: the rounding is the data gradient's
        return loss / n + 0.5 * inv * params.dot(weights), grad.axpy(inv.float(), weights), floor


def _every(params: Params, j: int) -> bool:
    """Whether member j's columns are exactly problems 0..P-1 in order (every problem contains it)."""
    owners = params.owners[j]
    return len(owners) == params.problems and bool((owners == torch.arange(len(owners), device=owners.device)).all())


def _direction(g: Params, history: list[tuple[Params, Params, torch.Tensor]]) -> Params:
    """L-BFGS two-loop recursion, every scalar per problem: the step -H g."""
    q, alphas = g, []
    for s, y, rho in reversed(history):
        alpha = rho * s.dot(q)
        q = q.axpy(-alpha, y)
        alphas.append(alpha)
    if history:
        s, y, _ = history[-1]
        q = q.scale(s.dot(y) / y.dot(y))  # initial Hessian scale, per problem
    for (s, y, rho), alpha in zip(history, reversed(alphas), strict=True):
        beta = rho * y.dot(q)
        q = q.axpy(alpha - beta, s)
    return q.scale(-torch.ones(g.problems, device=g.b.device))


class _Lbfgs:
    """Per-problem L-BFGS state for the problems still running (``active``: their original indices)."""

    def __init__(self, objective: Objective, x: Params, C: torch.Tensor, max_iter: int, tol: float):
        self.objective, self.C, self.max_iter, self.tol = objective, C, max_iter, tol
        device = x.b.device
        self.final = x  # every problem's weights; finished ones are written here
        self.active = torch.arange(x.problems, device=device)
        self.x = x
        self.f, self.g, self.floor = objective(x, C)
        self.history: list[tuple[Params, Params, torch.Tensor]] = []
        self.ends: list[dict | None] = [None] * x.problems
        self.evaluations = torch.ones(x.problems, dtype=torch.long, device=device)
        self.iteration = 0

    def retire(self, done: torch.Tensor, status: str, by: str | None = None) -> None:
        """Record the problems ``done`` (local mask) as finished with ``status`` (and ``by`` which test) and
        drop them from the batch."""
        if not done.any():
            return
        grad_max = self.g.amax()
        for local in torch.nonzero(done).flatten().tolist():
            p = int(self.active[local])
            self.ends[p] = {
                "status": status,
                "by": by,  # converged: "gradient" (max |g| <= tol) or "resolution" (a decrease below it)
                "iterations": self.iteration,
                "objective": float(self.f[local]),
                "grad_max": float(grad_max[local]),
                "grad_floor": float(self.floor[local]),  # the gradient's rounding floor (0 in float32)
                "evaluations": int(self.evaluations[p]),
            }
        self.final = _store(self.final, self.x, self.active, done)
        keep = torch.nonzero(~done).flatten()
        self.active, self.x, self.g = self.active[keep], self.x.select(keep), self.g.select(keep)
        self.f, self.floor, self.C = self.f[keep], self.floor[keep], self.C[keep]
        self.history = [(s.select(keep), y.select(keep), rho[keep]) for s, y, rho in self.history]

    def line_search(self, d: Params, slope: torch.Tensor):
        """Backtracking (Armijo) per problem; returns new x, g, f, which problems found a decrease, and
        which took a full step (accepted at once, or rejected for a change below the resolution)."""
        if self.history:
            t = torch.ones_like(slope)
        else:  # first step: scipy's 1/||g|| scaling
            t = torch.clamp(1.0 / self.g.dot(self.g).sqrt().clamp_min(1e-12), max=1.0)
        x_new, g_new, f_new, floor_new = self.x, self.g, self.f.clone(), self.floor.clone()
        accepted = torch.zeros_like(slope, dtype=torch.bool)
        pending = torch.nonzero(slope < 0).flatten()  # not a descent direction: nothing to search
        first, flat = torch.zeros_like(accepted), torch.zeros_like(accepted)
        for attempt in range(MAX_LINE_SEARCH):
            if not len(pending):
                break
            trial = self.x.select(pending).axpy(t[pending], d.select(pending))
            f_try, g_try, floor_try = self.objective(trial, self.C[pending])
            self.evaluations[self.active[pending]] += 1
            ok = f_try <= self.f[pending] + ARMIJO * t[pending] * slope[pending]
            if attempt == 0:  # a full step that moves the objective by less than the arithmetic resolves
                flat[pending] = (f_try - self.f[pending]).abs() <= self.objective.resolution * self.f[pending].abs()
            if ok.any():
                mask = torch.zeros_like(accepted)
                mask[pending[ok]] = True
                x_new = x_new.where(mask, _expand(trial, pending, self.x))
                g_new = g_new.where(mask, _expand(g_try, pending, self.g))
                f_new[pending[ok]] = f_try[ok]
                floor_new[pending[ok]] = floor_try[ok]
                accepted[pending[ok]] = True
                first[pending[ok]] = attempt == 0
            # The rest backtrack to the quadratic model's minimiser, kept within [0.1, 0.5] x the step.
            tp, fp, sp, f0 = t[pending][~ok], f_try[~ok], slope[pending][~ok], self.f[pending][~ok]
            quad = -sp * tp**2 / (2 * (fp - f0 - sp * tp))
            quad = torch.where(torch.isfinite(quad), quad, 0.5 * tp)
            pending = pending[~ok]
            t[pending] = torch.minimum(torch.maximum(quad, 0.1 * tp), 0.5 * tp)
        return x_new, g_new, f_new, floor_new, accepted, first | flat

    def step(self) -> None:
        """One L-BFGS iteration of every running problem, then retire the ones that stopped."""
        d = _direction(self.g, self.history)
        x_new, g_new, f_new, floor_new, accepted, full = self.line_search(d, self.g.dot(d))
        s, y = x_new.sub(self.x), g_new.sub(self.g)
        sy = s.dot(y)  # > 0 for an accepted step of a strongly convex objective
        # A full quasi-Newton step whose decrease float32 can no longer resolve (per-row losses carry
        # float32's relative error). A backtracked step says nothing about the distance to the optimum.
        # scipy's ftol test at the arithmetic's resolution: a step (full, or backtracked by the
        # noise of bf16 products) that lowers the objective by less than it can resolve.
        tiny = (accepted | full) & (
            (self.f - f_new) <= self.objective.resolution * torch.maximum(self.f.abs(), f_new.abs())
        )
        self.x, self.g, self.f, self.floor = x_new, g_new, f_new, floor_new
        self.iteration += 1
        rho = torch.where(sy > 0, 1.0 / sy.clamp_min(1e-300), torch.zeros_like(sy))
        self.history = [*self.history, (s, y, rho)][-HISTORY:]
        self.retire(tiny, "converged", "resolution")
        self.retire(~accepted[~tiny], "stalled")

    def run(self, on_iteration=None) -> tuple[Params, list[dict]]:
        while len(self.active):
            small = self.g.amax() <= torch.clamp(self.floor, min=self.tol)  # tol, or the rounding floor above it
            self.retire(small, "converged", "gradient")
            if self.iteration >= self.max_iter:
                self.retire(torch.ones_like(self.f, dtype=torch.bool), "max_iter")
            if not len(self.active):
                break
            self.step()
            if on_iteration is not None:
                on_iteration(self.iteration, len(self.active))
        return self.final, self.ends


def minimise(
    objective: Objective, x: Params, C: torch.Tensor, max_iter: int, tol: float, on_iteration=None
) -> tuple[Params, list[dict]]:
    """Per-problem L-BFGS from ``x``; returns the final weights and each problem's end state.

    A problem stops when its largest gradient entry is at most ``tol`` (scipy's
    pgtol, as scikit-learn's lbfgs), when an iteration lowers its objective by
    less than float32 resolves (also converged, as scipy's ftol), when its line
    search finds no decrease (``stalled``: the noise floor of the arithmetic), or
    at ``max_iter`` iterations. Finished problems leave the batch.
    """
    return _Lbfgs(objective, x, C, max_iter, tol).run(on_iteration)


def _expand(part: Params, where: torch.Tensor, like: Params) -> Params:
    """Params of ``like``'s problems with ``part`` (problems ``where``) placed in, zeros elsewhere."""
    out = like.zeros_like()
    position = torch.full((like.problems,), -1, dtype=torch.long, device=where.device)
    position[where] = torch.arange(len(where), device=where.device)
    for j in like.W:
        cols = torch.nonzero(position[like.owners[j]] >= 0).flatten()
        if len(cols):
            out.W[j][:, cols] = part.W[j]
    out.b[where] = part.b
    return out


def _store(final: Params, x: Params, active: torch.Tensor, done: torch.Tensor) -> Params:
    """Write the finished problems' weights (local ``done`` of ``x``) into ``final`` (all problems)."""
    mask = torch.zeros(final.problems, dtype=torch.bool, device=final.b.device)
    mask[active[done]] = True
    return final.where(mask, _expand(x, active, final))


def fit(
    blocks: dict[int, torch.Tensor],
    y: torch.Tensor,
    problems: list[Problem],
    width: int,
    *,
    max_iter: int,
    tol: float,
    init: Params | None = None,
    row_bytes: int = 256 * 2**20,
    index: torch.Tensor | None = None,
    on_iteration=None,
) -> tuple[Params, list[dict]]:
    """Fit ``problems`` over ``blocks`` (member -> (N, d_j)) against labels ``y``; from ``init`` or zeros.

    ``index`` (n,): fit on these rows of the blocks only (``y`` holds their labels).

    Returns every problem's weights and its end state (status, iterations,
    objective, grad_max, evaluations).
    """
    device = y.device
    x = init if init is not None else layout(problems, {j: b.shape[1] for j, b in blocks.items()}, width, device)
    C = torch.tensor([p.C for p in problems], dtype=torch.float64, device=device)
    return minimise(Objective(blocks, y, width, row_bytes, index), x, C, max_iter, tol, on_iteration)


def topk(blocks: dict[int, torch.Tensor], params: Params, k: int, row_bytes: int = 256 * 2**20, index=None):
    """(P, n, min(k, classes)) highest-scoring class indices of every problem, best first (numpy).

    ``index``: score only these rows of the blocks (gathered block by block).
    """
    n = len(next(iter(blocks.values())))
    width = params.b.shape[1]
    if index is not None:
        n = len(index)
    scorer = Objective(blocks, torch.zeros(n, dtype=torch.long, device=params.b.device), width, row_bytes, index)
    cast, step, out = scorer.casts(params), scorer._rows(params), []
    with torch.no_grad():
        for start in range(0, n, step):
            Z = scorer.logits(params, start, min(n, start + step), cast)  # (R, P, k)
            if width == 1:  # the logit of class 1 against class 0
                Z = torch.cat([-Z, Z], dim=2)
            out.append(torch.topk(Z, min(k, Z.shape[2]), dim=2).indices.permute(1, 0, 2).cpu().numpy())
    return np.concatenate(out, axis=1)


def coefficients(params: Params, problem: int) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """One problem's per-member weights {j: (d_j, k)} and intercept (k,), float64."""
    weights = {}
    for j, w in params.W.items():
        column = torch.nonzero(params.owners[j] == problem).flatten()
        if len(column):
            weights[j] = w[:, int(column[0])].detach().cpu().double().numpy()
    return weights, params.b[problem].detach().cpu().double().numpy()
