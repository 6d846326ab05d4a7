"""Many L2 logistic regressions fit together, in one pass over shared feature blocks, each to its optimum.

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

Preconditioning. Deep features are ill-conditioned (the demo's standardised
Cat4: its condition number, and the evaluations to the same objective with
and without this preconditioner, are in tests/benchmarks/
test_probe_real_features.py), and plain L-BFGS crawls along them. Every problem's initial inverse Hessian is
gamma (S + (mu + e) I)^-1: S the features' second moment on the fit rows, mu =
2 / (C n) the penalty's curvature over the bound 1/2 on the softmax loss's
(Bohning's bound, in its feature-space form), e the mean eigenvalue of S (a
floor: see DAMPING), and gamma L-BFGS's usual scale s.y / y.H0 y in that
metric. It is L-BFGS on whitened features, a change of variables that leaves
the objective and C unchanged, and costs two (D, D) products of the weights
per iteration, not a pass over the rows. S is the subset's whole
concatenation up to FULL_DIMS dimensions, each member's block beyond.

Exactness. A problem stops (``converged``) when its estimated gap to the
optimum is at most ``gap`` times its objective for CONFIRM iterations in a
row: the larger of the quasi-Newton decrement 1/2 g^T H g and the geometric
extrapolation of its last decreases (``_Lbfgs.estimate``). The objective is
summed in float64 from float32 logits taken as margins, so that it resolves
the gaps it is asked about. Precision phases: with ``precision="bf16"``, the
matrix products first take bfloat16 inputs, multiplying differences from an
exact float32 reference point (``Objective``) so that their rounding shrinks
with the distance to it; then every problem continues in float32 from its
weights and curvature pairs, which certifies the gap. Each problem's end
state records both phases.

Tested against float64 optima (trust-region Newton, tests/conftest.py), both
precisions, every fit and every fit of a probe record: tests/test_c_search.py.
Speed on real features against scikit-learn: tests/benchmarks/
test_probe_real_features.py, test_sweep_real_features.py,
test_probe_resnet50_features.py, and on a GPU tests/benchmarks/gpu_check.py.

Shapes: n rows, M members, d_j features of member j, k classes (1 for a
binomial logit), P problems, Q_j problems containing member j.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.core.errors import TimecatError

HISTORY = 10  # L-BFGS pairs kept per problem (scikit-learn/scipy's default)
ARMIJO = 1e-4  # sufficient-decrease constant of the line search
MAX_LINE_SEARCH = 20  # backtracks before a problem's line search gives up
RESOLUTION = 1e-9  # a predicted decrease below this fraction of f is not worth an evaluation (float32 eps: 1.2e-7)
WINDOW = 10  # iterations per half of the geometric gap estimate (5 stopped 5x short of the gap at C = 1, demo)
REBASE = 10  # bf16: iterations between exact float32 evaluations (the products' reference)
CONFIRM = 3  # consecutive iterations within the gap before a problem stops
FULL_DIMS = 1024  # subsets up to this many dimensions are preconditioned whole
# The preconditioner's floor, in units of S's mean eigenvalue: it rescales only the directions of more than
# average variance. Measured evaluations to the same objective, demo Cat4 (10,000 rows) at C = 0.1 / 1 / 10:
# floor 0: 312 / 613 / 1,155; floor 1: 229 / 501 / 955 (plain L-BFGS: 1,110 / over 4,000 / over 4,000). On
# digits' pixels a floor of 0 was slower than no preconditioner at all (525 against 103 at C = 10); 1: 83.
DAMPING = 1.0
BOHNING = 2.0  # mu = BOHNING / (C n): the penalty's curvature over the data term's bound of 1/2


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
        out = (self.b * other.b).sum(1, dtype=torch.float64)  # float32 products, summed in float64
        for j, w in self.W.items():
            out.index_add_(0, self.owners[j], (w * other.W[j]).sum((0, 2), dtype=torch.float64))
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
        W = {j: torch.addcmul(w, a[self.owners[j]][None, :, None], other.W[j]) for j, w in self.W.items()}
        return self.like(W, torch.addcmul(self.b, a[:, None], other.b))

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


def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as float32. bf16 inputs on CUDA keep their float32 accumulator (``out_dtype``); on the CPU,
    torch returns bf16 products in bf16 (torch 2.15 has no float32 output there)."""
    if a.dtype == torch.bfloat16 and a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


def gradient_product(X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """X^T G (d, m) as float32, computed as (G^T X)^T: 2.4x faster than X^T G for (60,000 x 512) by
    (60,000 x 10) on two cores (a transposed left operand takes a slower kernel)."""
    return product(G.T, X).T


class Objective:
    """Loss and gradient of P problems over shared blocks, computed in row blocks.

    ``blocks[j]`` is member j's (N, d_j) float32 tensor; ``index`` (n,) picks the
    rows the objective is over (None: all N), gathered one row block at a time so
    that no copy of the selected rows is ever made. ``y`` (n,) are class indices
    0..k-1 (or 0/1 with ``width`` 1). ``row_bytes`` bounds the per-block working
    memory (logits, probabilities, products).

    ``half`` (member -> bf16 (N, d_j), or None): the bf16 objective. Its
    products are of differences from a reference point that an exact float32
    pass (``rebase``) evaluated: logits Z = Z_ref + X (W - W_ref) and gradient
    X^T G_ref + X^T (G - G_ref). bf16 rounds each product to 8 significant bits
    of what it multiplies, so the error shrinks with the distance to the
    reference instead of sitting at 2^-9 of the logits, where a plain bf16
    objective stops L-BFGS far from the optimum.
    """

    def __init__(
        self, blocks: dict[int, torch.Tensor], y: torch.Tensor, width: int, row_bytes: int, index=None, half=None
    ):
        self.blocks, self.y, self.width, self.index, self.half = blocks, y, width, index, half
        self.n = len(y)
        self.row_bytes = row_bytes
        self.delta = half is not None
        self.reference = (
            None  # bf16: (x_ref, Z_ref and G_ref (n, P, k) float32 logits and dloss/dZ / n, its data gradient)
        )

    def _rows(self, params: Params) -> int:
        # float32 per row: logits Z, probabilities G and their copies (4 x P x k); one member's
        # products and its share of G (2 x P x k at most); the row block's gathered or cast copies.
        # Sized from the members these problems use, not every block held: the same batch is
        # cut into the same row blocks (and so sums the same way) whatever else is in memory.
        copies = sum(self.blocks[j].shape[1] for j in params.W) * 4
        per_row = 4 * 8 * params.problems * self.width + copies
        return int(max(256, min(self.n, self.row_bytes // per_row)))

    def rows(self, j: int, start: int, stop: int, half: bool = False) -> torch.Tensor:
        """Member j's rows start..stop of the objective (bf16 with ``half``) on the labels' device: a view, a
        gathered block, or a block streamed from host memory."""
        source = self.blocks[j] if not half or self.half[j] is None else self.half[j]
        if self.index is None:
            X = source[start:stop]
        else:
            X = source.index_select(0, self.index[start:stop].to(source.device))
        X = X.to(self.y.device, non_blocking=True)
        return X.to(torch.bfloat16) if half else X

    def logits(self, params: Params, X: dict[int, torch.Tensor], cast: dict[int, torch.Tensor]) -> torch.Tensor:
        """(R, P, k) float32 logits of the row block ``X`` (member -> (R, d_j)), every problem at once."""
        R = len(next(iter(X.values())))
        Z = params.b.unsqueeze(0).expand(R, -1, -1).clone()
        for j, w in cast.items():
            Z.index_add_(1, params.owners[j], product(X[j], w).view(R, -1, self.width))
        return Z

    @staticmethod
    def casts(params: Params, dtype=torch.float32) -> dict[int, torch.Tensor]:
        """Each member's weights as one (d_j, Q_j x k) matrix in ``dtype`` (once per pass)."""
        return {j: w.reshape(w.shape[0], -1).to(dtype) for j, w in params.W.items() if w.shape[1]}

    def _pointwise(self, Z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P,) float64 summed losses of the rows and dloss/dZ (R, P, k), unnormalised; Z is overwritten.

        Computed on the margins Z - Z_y, so that a confidently right row's small
        loss, log(1 + sum_{c != y} e^(Z_c - Z_y)), and its gradient keep float32's
        relative precision: lse(Z) - Z_y cancels to the absolute error of the
        largest logit (2.5e-6 of the objective on digits at C = 10, the size of
        the gap the solver must see).
        """
        P = Z.shape[1]
        if self.width == 1:
            z, right = Z[..., 0], y[:, None].bool()
            margin = torch.where(right, -z, z)  # the loss is softplus(margin) either way
            loss = torch.nn.functional.softplus(margin).sum(0, dtype=torch.float64)
            return loss, torch.where(right, -torch.sigmoid(-z), torch.sigmoid(z)).unsqueeze(-1)
        at = y.view(-1, 1, 1).expand(-1, P, 1)
        D = Z.sub_(Z.gather(2, at))  # (R, P, k) margins, 0 at y
        top = D.amax(2, keepdim=True)  # >= 0; 0 when y scores highest
        E = D.sub_(top).exp_()  # exp(margin - top), in Z's memory
        own = E.gather(2, at)  # exp(-top): the true class's term
        rest = E.scatter(2, at, 0.0).sum(2, keepdim=True)  # the other classes' terms, summed without it
        total = own + rest
        inner = torch.where(top == 0, torch.log1p(rest), torch.log(total))
        loss = (top + inner).squeeze(2).sum(0, dtype=torch.float64)
        G = E.div_(total)  # softmax
        G.scatter_(2, at, -rest / total)  # p_y - 1 = -(the other classes' probabilities)
        return loss, G

    def _columns(self, params: Params, G: torch.Tensor, j: int) -> torch.Tensor:
        """Member j's problems' columns of G (R, P, k) as one (R, Q_j x k) matrix."""
        R = G.shape[0]
        return G.reshape(R, -1) if _every(params, j) else G.index_select(1, params.owners[j]).reshape(R, -1)

    def __call__(self, params: Params, C: torch.Tensor, which: torch.Tensor | None = None):
        """(P,) float64 objectives and their gradient, for problems with strengths C (P,).

        ``which`` (bf16 only): the reference's problems these are (None: all of them, in order).
        """
        if self.delta:
            return self._delta(params, C, which)
        f, g, _ = self._exact(params, C, keep=False)
        return f, g

    def _exact(self, params: Params, C: torch.Tensor, keep: bool):
        """Float32 products; with ``keep``, also every row's logits and dloss/dZ / n, (n, P, k) each."""
        P, n = params.problems, self.n
        loss = torch.zeros(P, dtype=torch.float64, device=params.b.device)
        grad = params.zeros_like()
        cast, step = self.casts(params), self._rows(params)
        if keep:
            kept = tuple(torch.empty(n, P, self.width, device=params.b.device) for _ in range(2))
        for start in range(0, n, step):
            stop = min(n, start + step)
            X = {j: self.rows(j, start, stop) for j in cast}
            Z = self.logits(params, X, cast)
            if keep:
                kept[0][start:stop] = Z
            part, G = self._pointwise(Z, self.y[start:stop])
            loss += part
            G /= n
            if keep:
                kept[1][start:stop] = G
            grad.b += G.sum(0)
            for j in cast:
                grad.W[j] += gradient_product(X[j], self._columns(params, G, j)).view_as(grad.W[j])
        return *_penalised(params, C, n, loss, grad), (kept if keep else None)

    def rebase(self, x: Params, C: torch.Tensor):
        """An exact float32 evaluation at ``x``, which becomes the reference of the bf16 products."""
        f, g, (Z, G) = self._exact(x, C, keep=True)
        data = x.like({j: g.W[j] - x.W[j] / (C.float()[x.owners[j]][None, :, None] * self.n) for j in x.W}, g.b)
        self.reference = (x, Z, G, data)
        return f, g

    def keep(self, index: torch.Tensor) -> None:
        """Keep the reference of problems ``index`` only (the others left the batch)."""
        if self.reference is not None:
            x, Z, G, data = self.reference
            self.reference = (x.select(index), Z.index_select(1, index), G.index_select(1, index), data.select(index))

    def _delta(self, params: Params, C: torch.Tensor, which):
        x_ref, Z_ref, G_ref, data = self.reference
        if which is not None:
            x_ref, data = x_ref.select(which), data.select(which)
        n = self.n
        loss = torch.zeros(params.problems, dtype=torch.float64, device=params.b.device)
        grad = params.like({j: w.clone() for j, w in data.W.items()}, torch.zeros_like(params.b))
        moved = self.casts(params.sub(x_ref), torch.bfloat16)  # W - W_ref, (d_j, Q_j x k) each
        shift = params.b - x_ref.b
        step = self._rows(params)
        for start in range(0, n, step):
            stop = min(n, start + step)
            Z0, G0 = Z_ref[start:stop], G_ref[start:stop]
            if which is not None:
                Z0, G0 = Z0.index_select(1, which), G0.index_select(1, which)
            X = {j: self.rows(j, start, stop, half=True) for j in moved}
            Z = self.logits(params.like(params.W, shift), X, moved).add_(Z0)
            part, G = self._pointwise(Z, self.y[start:stop])
            loss += part
            G /= n
            grad.b += G.sum(0)
            change = (G - G0).to(torch.bfloat16)
            for j in moved:
                grad.W[j] += gradient_product(X[j], self._columns(params, change, j)).view_as(grad.W[j])
        return _penalised(params, C, n, loss, grad)


def _penalised(params: Params, C: torch.Tensor, n: int, loss: torch.Tensor, grad: Params):
    """The mean loss plus ||W||^2 / (2 C n), and the data gradient plus W / (C n); (P,) and Params."""
    inv = 1.0 / (C.double() * n)
    weights = params.like(params.W, torch.zeros_like(params.b))
    return loss / n + 0.5 * inv * params.dot(weights), grad.axpy(inv.float(), weights)


def _every(params: Params, j: int) -> bool:
    """Whether member j's columns are exactly problems 0..P-1 in order (every problem contains it)."""
    owners = params.owners[j]
    return len(owners) == params.problems and bool((owners == torch.arange(len(owners), device=owners.device)).all())


class Preconditioner:
    """The features' second moments on the fit rows, eigendecomposed once: S = U diag(e) U^T.

    ``apply(q, mu)`` is q's image under (S + (mu_p + DAMPING x mean(e)) I)^-1
    for every problem p, and 1 on the intercept (the constant feature's second
    moment; the features are centred). A subset of at most ``FULL_DIMS``
    dimensions uses its own concatenation's S (``full``); a larger one uses each
    member block's S_j alone (``blocks``): one (d_j, d_j) eigendecomposition per
    member then serves every subset and C, where a subset's own costs
    (sum d_j)^3 (on two cores: 0.35 s for 2,048 dimensions, about 25 s for
    8,192). Measured on the demo's Cat4 at C = 1 (10,000 rows, float32): 495
    iterations whole, 671 by member blocks.
    """

    def __init__(self, blocks: dict, full: dict):
        self.blocks = blocks  # member j -> (U_j (d_j, d_j), e_j (d_j,))
        self.full = full  # subset (members, ascending) -> (U (D, D), e (D,))
        self._grouping = (None, None)  # (owners it was made for, problems by subset)

    @classmethod
    def of(cls, blocks: dict[int, torch.Tensor], problems, index=None, full_dims=None, device=None):
        """From the rows ``index`` of ``blocks`` (None: all rows): float32 products summed in float64, on
        ``device`` (default: the blocks')."""
        full_dims = FULL_DIMS if full_dims is None else full_dims
        subsets = {tuple(sorted(p.members)) for p in problems}
        whole = {s for s in subsets if len(s) > 1 and sum(blocks[j].shape[1] for j in s) <= full_dims}
        apart = sorted({j for s in subsets - whole for j in s})
        return cls(
            {j: _eigen(blocks, (j,), index, device) for j in apart},
            {s: _eigen(blocks, s, index, device) for s in sorted(whole)},
        )

    def describe(self) -> str:
        """How the problems are preconditioned, for the record."""
        if self.full and self.blocks:
            return f"Bohning, per subset up to {FULL_DIMS} dims, per member above"
        return "Bohning, per subset (its concatenation)" if self.full else "Bohning, per member block"

    def _groups(self, q: Params) -> dict[tuple[int, ...], torch.Tensor]:
        """Problems of q by subset (sorted members), for the subsets preconditioned whole."""
        owners, groups = self._grouping
        if owners is q.owners:
            return groups
        members = [[] for _ in range(q.problems)]
        for j in sorted(q.owners):
            for p in q.owners[j].tolist():
                members[p].append(j)
        groups: dict[tuple[int, ...], list[int]] = {}
        for p, subset in enumerate(members):
            if tuple(subset) in self.full:
                groups.setdefault(tuple(subset), []).append(p)
        device = q.b.device
        groups = {s: torch.tensor(ps, dtype=torch.long, device=device) for s, ps in groups.items()}
        self._grouping = (q.owners, groups)
        return groups

    def apply(self, q: Params, mu: torch.Tensor) -> Params:
        mu = mu.float()
        out = {j: w.clone() for j, w in q.W.items()}
        position = {}
        for j, owners in q.owners.items():
            position[j] = torch.full((q.problems,), -1, dtype=torch.long, device=owners.device)
            position[j][owners] = torch.arange(len(owners), device=owners.device)
        whole = torch.zeros(q.problems, dtype=torch.bool, device=q.b.device)
        for subset, problems in self._groups(q).items():
            whole[problems] = True
            columns = [position[j][problems] for j in subset]
            V = torch.cat([q.W[j][:, c] for j, c in zip(subset, columns, strict=True)])  # (D, Q_s, k)
            V = _solve(*self.full[subset], V, mu[problems])
            for j, c, part in zip(subset, columns, V.split([q.W[j].shape[0] for j in subset]), strict=True):
                out[j][:, c] = part
        for j, w in q.W.items():
            apart = torch.nonzero(~whole[q.owners[j]]).flatten()
            if len(apart):
                out[j][:, apart] = _solve(*self.blocks[j], w[:, apart], mu[q.owners[j][apart]])
        return q.like(out, q.b.clone())


def _eigen(blocks: dict[int, torch.Tensor], members: tuple[int, ...], index, device, block_rows: int = 8192):
    """(U, e) of the second moment of ``members``' concatenated rows (``index``; None: all)."""
    first = blocks[members[0]]
    device = device or first.device
    n = len(first) if index is None else len(index)
    D = sum(blocks[j].shape[1] for j in members)
    S = torch.zeros(D, D, dtype=torch.float64, device=device)
    for start in range(0, n, block_rows):
        rows = slice(start, start + block_rows) if index is None else index[start : start + block_rows].to(first.device)
        part = torch.cat([blocks[j][rows].to(device).float() for j in members], dim=1)  # (R, D)
        S += (part.T @ part).double()
    values, vectors = torch.linalg.eigh(S / max(n, 1))
    return vectors.float(), values.clamp_min(0).float()


def _solve(U: torch.Tensor, e: torch.Tensor, V: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """(U diag(e) U^T + mu_q I)^-1 V for V (D, Q, k), one mu per column group q."""
    D, Q, k = V.shape
    r = (U.T @ V.reshape(D, -1)).view(D, Q, k)  # in the eigenbasis
    r = r / (e[:, None, None] + (mu[None, :, None] + DAMPING * e.mean()))
    return (U @ r.reshape(D, -1)).view(D, Q, k)


class Identity:
    """No preconditioning: plain L-BFGS (for comparisons; the probe always preconditions)."""

    def apply(self, q: Params, mu: torch.Tensor) -> Params:
        return q


def _blocks_per_problem(params: Params) -> torch.Tensor:
    """(P,) member blocks in each problem."""
    count = torch.zeros(params.problems, device=params.b.device)
    for owners in params.owners.values():
        count.index_add_(0, owners, torch.ones(len(owners), device=count.device))
    return count


class _Lbfgs:
    """Per-problem L-BFGS state for the problems still running (``active``: their original indices).

    ``carried``: (history pairs, scales, objective traces) from an earlier phase, aligned with ``x``'s
    problems: the next phase goes on from the same curvature and record of progress (its gap estimate needs no
    2 x WINDOW iterations of its own), and confirms the gap with CONFIRM exact iterations of its own.
    """

    def __init__(
        self, objective: Objective, x: Params, C: torch.Tensor, max_iter: int, gap: float, precond, carried=None
    ):
        self.objective, self.C, self.max_iter, self.gap, self.precond = objective, C, max_iter, gap, precond
        self.trace_to: list | None = None  # (problem, evaluations, objective) after every iteration, when a list
        device = x.b.device
        self.mu = BOHNING / (C * objective.n)  # (P,) Bohning's penalty shift of each problem's preconditioner
        # A step of 2 (S + mu)^-1 g per block minimises Bohning's quadratic bound of one block; summed
        # over m blocks the bound holds divided by m (S is at most m times its block diagonal).
        self.first = 2.0 / _blocks_per_problem(x).clamp_min(1)
        self.final = x  # every problem's weights; finished ones are written here
        self.active = torch.arange(x.problems, device=device)
        self.x = x
        self.f, self.g = objective.rebase(x, C) if objective.delta else objective(x, C)
        self.fresh = True  # whether f and g are an exact (float32) evaluation
        self.trace = self.f[None].clone()  # (T, P) objectives of the last 2 x WINDOW + 1 iterations
        self.hits = torch.zeros(x.problems, dtype=torch.long, device=device)  # consecutive iterations within gap
        self.restarted = torch.zeros(x.problems, dtype=torch.bool, device=device)  # history dropped after a failure
        self.history: list[tuple[Params, Params, torch.Tensor]] = []  # s, y, 1 / s.y
        # gamma: each problem's scale of H0 = gamma (S + mu)^-1, s.y / y.H0 y of its last curved pair
        # (the preconditioned form of L-BFGS's usual scaling), or Bohning's step before it has one.
        self.gamma = self.first.double()
        if carried is not None:
            self.history, self.gamma, trace = carried
            self.trace = torch.cat([trace, self.f[None]])[-(2 * WINDOW + 1) :]
        # bf16: (problems, pairs, gamma, trace) of the problems that left, for the next phase
        self.stash: list[tuple[torch.Tensor, list, torch.Tensor, torch.Tensor]] = []
        self.ends: list[dict | None] = [None] * x.problems
        self.evaluations = torch.ones(x.problems, dtype=torch.long, device=device)
        self.iteration = 0

    def retire(self, done: torch.Tensor, status: str, by: str, estimate: torch.Tensor) -> None:
        """Record the problems ``done`` (local mask) as finished with ``status`` (``by`` which test) and
        drop them from the batch."""
        if not done.any():
            return
        grad_max = self.g.amax()
        for local in torch.nonzero(done).flatten().tolist():
            p = int(self.active[local])
            self.ends[p] = {
                "status": status,
                "by": by,
                "iterations": self.iteration,
                "evaluations": int(self.evaluations[p]),
                "objective": float(self.f[local]),
                "grad_max": float(grad_max[local]),
                "gap_estimate": float(estimate[local] / max(abs(float(self.f[local])), 1e-300)),
            }
        leaving = torch.nonzero(done).flatten()
        if self.objective.delta:  # the next phase starts from their curvature pairs
            pairs = [_pick(pair, leaving) for pair in self.history]
            trace = torch.full(
                (2 * WINDOW + 1, len(leaving)), float("nan"), dtype=self.trace.dtype, device=self.f.device
            )
            trace[-len(self.trace) :] = self.trace[:, leaving]  # NaN before the first: no estimate from it
            self.stash.append((self.active[leaving], pairs, self.gamma[leaving], trace))
        self.final = _store(self.final, self.x, self.active, done)
        keep = torch.nonzero(~done).flatten()
        self.objective.keep(keep)
        self.active, self.x, self.g = self.active[keep], self.x.select(keep), self.g.select(keep)
        self.f, self.C, self.mu, self.first = self.f[keep], self.C[keep], self.mu[keep], self.first[keep]
        self.trace, self.hits, self.gamma = self.trace[:, keep], self.hits[keep], self.gamma[keep]
        self.restarted = self.restarted[keep]
        self.history = [_pick(pair, keep) for pair in self.history]

    def direction(self) -> Params:
        """The two-loop recursion, every scalar per problem: the step -H g, H0 = gamma (S + mu)^-1."""
        q, alphas = self.g, []
        for s, y, rho in reversed(self.history):
            alpha = rho * s.dot(q)
            q = q.axpy(-alpha, y)
            alphas.append(alpha)
        r = self.precond.apply(q, self.mu).scale(self.gamma)
        for (s, y, rho), alpha in zip(self.history, reversed(alphas), strict=True):
            beta = rho * y.dot(r)
            r = r.axpy(alpha - beta, s)
        return r.scale(-torch.ones(self.g.problems, device=self.g.b.device))

    def estimate(self, slope: torch.Tensor) -> torch.Tensor:
        """(P,) estimated distance to the optimum: the larger of the quasi-Newton decrement -g^T d / 2 and
        the geometric extrapolation of the last 2 x WINDOW decreases (L-BFGS converges linearly: if the
        last WINDOW iterations lowered f by S1 and the WINDOW before by S0, the rest is S1 r / (1 - r)
        with r = S1 / S0). Infinite until 2 x WINDOW iterations have run, or while f is not shrinking
        geometrically; once f has not moved for WINDOW iterations (its arithmetic's resolution), the
        quasi-Newton decrement alone."""
        quasi_newton = -0.5 * slope
        tail = torch.full_like(quasi_newton, float("inf"))
        if len(self.trace) >= 2 * WINDOW + 1:
            recent = self.trace[-WINDOW - 1] - self.trace[-1]
            before = self.trace[-2 * WINDOW - 1] - self.trace[-WINDOW - 1]
            ratio = recent / before.clamp_min(1e-300)
            tail = torch.where((before > 0) & (ratio < 1), recent * ratio / (1 - ratio), tail)
        tail = torch.where(self.flat(), 0.0, tail)
        return torch.maximum(quasi_newton, tail)

    def flat(self) -> torch.Tensor:
        """(P,) whether the objective has not decreased in WINDOW iterations (the arithmetic's resolution)."""
        if len(self.trace) < WINDOW + 1:
            return torch.zeros(len(self.active), dtype=torch.bool, device=self.f.device)
        return self.trace[-WINDOW - 1] - self.trace[-1] <= 0

    def line_search(self, d: Params, slope: torch.Tensor):
        """Backtracking (Armijo) per problem; returns new x, g, f and which problems found a decrease."""
        t = torch.ones_like(slope)
        x_new, g_new, f_new = self.x, self.g, self.f.clone()
        accepted = torch.zeros_like(slope, dtype=torch.bool)
        pending = torch.nonzero(slope < 0).flatten()  # not a descent direction: nothing to search
        for _ in range(MAX_LINE_SEARCH):
            if not len(pending):
                break
            trial = self.x.select(pending).axpy(t[pending], d.select(pending))
            f_try, g_try = self.objective(trial, self.C[pending], pending)
            self.evaluations[self.active[pending]] += 1
            # Armijo's sufficient decrease, and a decrease at all: a step too short to change f in float64
            # says nothing of the curvature, and its (s, y) pair would be rounding noise.
            ok = (f_try <= self.f[pending] + ARMIJO * t[pending] * slope[pending]) & (f_try < self.f[pending])
            if ok.any():
                mask = torch.zeros_like(accepted)
                mask[pending[ok]] = True
                x_new = x_new.where(mask, _expand(trial, pending, self.x))
                g_new = g_new.where(mask, _expand(g_try, pending, self.g))
                f_new[pending[ok]] = f_try[ok]
                accepted[pending[ok]] = True
            # The rest backtrack to the quadratic model's minimiser, kept within [0.1, 0.5] x the step.
            tp, fp, sp, f0 = t[pending][~ok], f_try[~ok], slope[pending][~ok], self.f[pending][~ok]
            quad = -sp * tp**2 / (2 * (fp - f0 - sp * tp))
            quad = torch.where(torch.isfinite(quad), quad, 0.5 * tp)
            pending = pending[~ok]
            t[pending] = torch.minimum(torch.maximum(quad, 0.1 * tp), 0.5 * tp)
            # A shorter step whose predicted decrease is far below float32's resolution of f cannot show one:
            # give up now rather than after MAX_LINE_SEARCH evaluations (the step() rules take it from there).
            pending = pending[-slope[pending] * t[pending] >= RESOLUTION * self.f[pending].abs()]
        return x_new, g_new, f_new, accepted

    def step(self, d: Params, slope: torch.Tensor, estimate: torch.Tensor) -> None:
        """One L-BFGS iteration of every running problem along ``d``. A problem whose line search finds no
        decrease from an exact evaluation has reached the noise of its arithmetic and stops: ``converged``
        if its quasi-Newton decrement is within the gap, else ``stalled``. In bf16, a failed search first
        moves the reference to the current point and tries again."""
        x_new, g_new, f_new, accepted = self.line_search(d, slope)
        s, y = x_new.sub(self.x), g_new.sub(self.g)
        sy = s.dot(y)  # > 0 for an accepted step of a strongly convex objective
        self.x, self.g, self.f = x_new, g_new, f_new
        self.iteration += 1
        # A pair enters the recursion only with curvature (s.y > 0) well above the rounding of s.y itself.
        curved = sy > 1e-10 * (s.dot(s) * y.dot(y)).sqrt()
        rho = torch.where(curved, 1.0 / sy.clamp_min(1e-300), torch.zeros_like(sy))
        self.history = [*self.history, (s, y, rho)][-HISTORY:]
        if curved.any():
            scale = sy / y.dot(self.precond.apply(y, self.mu)).clamp_min(1e-300)
            self.gamma = torch.where(curved & (scale > 0), scale, self.gamma)
        failed = ~accepted & self.fresh if self.objective.delta else ~accepted
        # A failed search first drops the problem's curvature pairs (a stale pair can point L-BFGS uphill
        # in all but name) and tries again from the preconditioned gradient; a second failure in a row stops it.
        retry = failed & ~self.restarted
        self.restarted = torch.where(accepted, False, self.restarted | retry)
        if retry.any():
            self.history = [(s_, y_, torch.where(retry, 0.0, rho_)) for s_, y_, rho_ in self.history]
        stalled = failed & ~retry
        self.fresh = False
        if self.objective.delta and (self.iteration % REBASE == 0 or not accepted.all()):
            self.f, self.g = self.objective.rebase(self.x, self.C)
            self.fresh = True
        self.trace = torch.cat([self.trace, self.f[None]])[-(2 * WINDOW + 1) :]
        resolved = stalled & (-0.5 * slope <= self.gap * self.f.abs())  # at the floor, and the model agrees
        self.retire(resolved, "converged", "resolution", -0.5 * slope)
        keep = ~resolved
        self.retire(stalled[keep], "stalled", "line search", estimate[keep])

    def run(self, on_iteration=None) -> tuple[Params, list[dict]]:
        while len(self.active):
            d = self.direction()
            slope = self.g.dot(d)  # g^T d = -g^T H g < 0
            estimate = self.estimate(slope)
            within = estimate <= self.gap * self.f.abs()
            self.hits = torch.where(within, self.hits + 1, 0)
            capped = torch.full_like(within, self.iteration >= self.max_iter)
            ends = [
                (self.hits >= CONFIRM, "converged", "gap"),
                (self.flat() & ~within, "stalled", "no decrease"),  # flat for WINDOW iterations, yet a gap remains
                (capped, "max_iter", "cap"),
            ]
            running = torch.ones_like(within)
            for mask, status, by in ends:
                mask = mask & running
                self.retire(mask[running], status, by, estimate[running])
                running &= ~mask
            if not len(self.active):
                break
            keep = torch.nonzero(running).flatten()
            self.step(d.select(keep), slope[keep], estimate[keep])
            if on_iteration is not None:
                on_iteration(self.iteration, len(self.active))
            if self.trace_to is not None:
                for p, f in zip(self.active.tolist(), self.f.tolist(), strict=True):
                    self.trace_to.append((p, int(self.evaluations[p]), f))
        return self.final, self.ends


def _pick(pair: tuple, index: torch.Tensor) -> tuple:
    """One history pair (s, y, rho) of the problems ``index`` only."""
    s, y, rho = pair
    return s.select(index), y.select(index), rho[index]


def _carried(stash: list[tuple], x: Params):
    """The history pairs, scales and objective traces of every problem of ``x``, in problem order, from the
    groups that left a phase.

    Groups that ran fewer iterations have fewer pairs: theirs are padded at the
    oldest end with zero pairs (rho = 0), which the two-loop recursion skips.
    """
    length = max(len(pairs) for _, pairs, *_ in stash)
    padded = []
    for ids, pairs, *_ in stash:
        zero = take(x, ids).zeros_like()
        rho = torch.zeros(len(ids), dtype=torch.float64, device=ids.device)
        padded.append([(zero, zero, rho)] * (length - len(pairs)) + pairs)
    back = torch.argsort(torch.cat([ids for ids, *_ in stash]))  # stash order -> problem order
    history = []
    for position in range(length):
        s, y = (take(concat([pairs[position][i] for pairs in padded]), back) for i in (0, 1))
        history.append((s, y, torch.cat([pairs[position][2] for pairs in padded])[back]))
    gamma, trace = (torch.cat([group[i] for group in stash], dim=-1)[..., back] for i in (2, 3))
    return history, gamma, trace


def minimise(
    objective: Objective,
    x: Params,
    C: torch.Tensor,
    max_iter: int,
    gap: float,
    precond,
    on_iteration=None,
    history=None,
    trace=None,
):
    """Per-problem L-BFGS from ``x``; returns the weights, each problem's end state, and (bf16) the history
    pairs the problems left with, in problem order.

    A problem stops as ``converged`` when its estimated gap (``_Lbfgs.estimate``)
    is at most ``gap`` times its objective for CONFIRM iterations in a row,
    ``stalled`` when its line search finds no decrease from an exact evaluation,
    or ``max_iter``. Finished problems leave the batch.
    """
    run = _Lbfgs(objective, x, C, max_iter, gap, precond, history)
    run.trace_to = trace
    final, ends = run.run(on_iteration)
    carried = _carried(run.stash, x) if objective.delta else None
    return final, ends, carried


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


PHASES = {"bf16": ("bf16", "fp32"), "fp32": ("fp32",)}  # the products' precision, phase by phase


def half_blocks(blocks: dict[int, torch.Tensor]) -> dict[int, torch.Tensor | None]:
    """bf16 copies of the blocks for the bf16 phase: kept on the CPU, where casting a row block costs as much
    as multiplying it (60,000 x 512: 46 ms against 35 ms for both products); None (cast per row block) on a GPU."""
    return {j: None if X.is_cuda else X.to(torch.bfloat16) for j, X in blocks.items()}


def fit(
    blocks: dict[int, torch.Tensor],
    y: torch.Tensor,
    problems: list[Problem],
    width: int,
    *,
    max_iter: int,
    gap: float,
    precision: str = "fp32",
    init: Params | None = None,
    row_bytes: int = 256 * 2**20,
    index: torch.Tensor | None = None,
    precond=None,
    half=None,
    on_iteration=None,
    trace: list | None = None,
) -> tuple[Params, list[dict]]:
    """Fit ``problems`` over ``blocks`` (member -> (N, d_j) float32) against labels ``y``; from ``init`` or zeros.

    ``index`` (n,): fit on these rows of the blocks only (``y`` holds their labels).
    ``precond``: a Preconditioner (default: made from these rows), or Identity.
    ``precision``: bf16 runs a bf16 phase (``half``: its blocks, default
    ``half_blocks(blocks)``), then a float32 one that starts from its weights and
    curvature pairs; fp32 runs the second only. ``max_iter`` caps each phase.
    ``trace``: a list that receives (problem, evaluations in its phase,
    objective) after every iteration.

    Returns every problem's weights and its end state: status, how it ended,
    iterations, evaluations, objective, largest gradient entry, estimated gap,
    and the same per phase.
    """
    if precision not in PHASES:
        raise TimecatError(f"unknown precision {precision!r}; choose one of {list(PHASES)}")
    device = y.device
    x = init if init is not None else layout(problems, {j: b.shape[1] for j, b in blocks.items()}, width, device)
    C = torch.tensor([p.C for p in problems], dtype=torch.float64, device=device)
    used = {j: blocks[j] for j in sorted({j for p in problems for j in p.members})}
    precond = precond if precond is not None else Preconditioner.of(used, problems, index)
    phases: list[list[dict]] = [[] for _ in problems]
    history = None
    for name in PHASES[precision]:
        bf16 = name == "bf16"
        halves = (half if half is not None else half_blocks(used)) if bf16 else None
        objective = Objective(blocks, y, width, row_bytes, index, halves)
        x, ends, history = minimise(objective, x, C, max_iter, gap, precond, on_iteration, history, trace)
        for p, end in enumerate(ends):
            phases[p].append({"precision": name, **end})
    return x, [_summary(p) for p in phases]


def _summary(phases: list[dict]) -> dict:
    """A problem's end state: the last phase's, with totals and every phase's own."""
    last = phases[-1]
    return {
        **last,
        "iterations": sum(p["iterations"] for p in phases),
        "evaluations": sum(p["evaluations"] for p in phases),
        "phases": phases,
    }


def topk(
    blocks: dict[int, torch.Tensor], params: Params, k: int, row_bytes: int = 256 * 2**20, index=None, device=None
):
    """(P, n, min(k, classes)) highest-scoring class indices of every problem, best first (numpy), in float32.

    ``index``: score only these rows of the blocks (gathered block by block).
    ``device``: where to compute (default: the weights'); blocks elsewhere are streamed.
    """
    n = len(next(iter(blocks.values())))
    width = params.b.shape[1]
    if index is not None:
        n = len(index)
    device = device or params.b.device
    scorer = Objective(blocks, torch.zeros(n, dtype=torch.long, device=device), width, row_bytes, index)
    cast, step, out = scorer.casts(params), scorer._rows(params), []
    with torch.no_grad():
        for start in range(0, n, step):
            stop = min(n, start + step)
            Z = scorer.logits(params, {j: scorer.rows(j, start, stop) for j in cast}, cast)  # (R, P, k)
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
