"""Protocol ``tc``: the paper's probe recipe, run on cached features instead of images.

Head: BatchNorm1d over the concatenated features, then Linear (weights
N(0, 0.01), zero bias). SGD with Nesterov momentum 0.9, lr 0.01, 28 epochs, lr
x0.1 at epochs 8, 16 and 24, batch 256, weight decay on the Linear layer only,
from the paper's grid for the dataset's kind (pipeline.data.recipes).
The paper's code re-augments and re-runs every image through every backbone at
each step; here an epoch trains on one cached augmented view (epoch e uses view
e mod K) when ``timecat extract --views K`` made them, else on the plain
features (which is not the paper's recipe, and the record says so). The paper's
code reports the best epoch on the eval set; here the weight decay is chosen on
a held-out part of the train split and the last epoch is reported. The paper's
figure is kept beside it, labelled optimistic, for comparison with its tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.core.errors import TimecatError
from pipeline.core.progress import progress
from pipeline.data import recipes


@dataclass(frozen=True)
class TcRecipe:
    """The paper's head-training schedule."""

    epochs: int = 28
    milestones: tuple[int, ...] = (8, 16, 24)  # epochs where lr is multiplied by 0.1
    lr: float = 0.01
    momentum: float = 0.9  # Nesterov
    batch_size: int = 256
    init_std: float = 0.01  # Linear weights ~ N(0, init_std)


def wd_grid(kind: str | None, override: tuple[float, ...] | None = None, where: str = "the dataset") -> tuple:
    """The weight decays to try: the override, else the paper's grid for the dataset's kind (or the default)."""
    return tuple(override) if override else recipes.for_kind(kind, where).wd_grid


def batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's shuffled row batches; a last batch of a single row joins the one before it.

    BatchNorm1d cannot normalise a batch of one row in training mode (it raises), and
    dropping the row would skip it for the whole epoch.
    """
    parts = list(torch.randperm(n, generator=generator).split(batch_size))
    if len(parts) > 1 and len(parts[-1]) == 1:
        parts[-2:] = [torch.cat(parts[-2:])]
    return parts


def _new_head(dim: int, n_classes: int, weight_decay: float, recipe: TcRecipe, seed: int, device: torch.device):
    """A fresh BatchNorm1d + Linear head, its SGD optimizer and lr schedule; the same weights for one seed."""
    torch.manual_seed(seed)
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(dim), torch.nn.Linear(dim, n_classes)).to(device)
    torch.nn.init.normal_(head[1].weight, std=recipe.init_std)
    torch.nn.init.zeros_(head[1].bias)
    optimizer = torch.optim.SGD(
        [
            {"params": head[0].parameters(), "weight_decay": 0.0},
            {"params": head[1].parameters(), "weight_decay": weight_decay},  # Linear only, as the paper
        ],
        lr=recipe.lr,
        momentum=recipe.momentum,
        nesterov=True,
    )
    return head, optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, list(recipe.milestones), gamma=0.1)


def train_heads(
    epoch_features: Callable[[int], np.ndarray],
    y: np.ndarray,
    n_classes: int,
    weight_decays: tuple[float, ...],
    recipe: TcRecipe,
    seed: int,
    device: torch.device,
    on_epoch: Callable[[int, int, torch.nn.Module], None] | None = None,
    desc: str = "train tc heads",
) -> list[torch.nn.Module]:
    """Train one BatchNorm1d + Linear head per weight decay, side by side; ``epoch_features(e)`` gives epoch e's rows.

    Every head starts from the same weights and sees the same batches, so each is
    exactly the head it would be trained alone; side by side, each epoch's
    features ((n, D) float32, a cached view when there are views) are read once
    for every weight decay instead of once each. ``on_epoch(i, e, head)`` is called
    after each epoch for head i in eval mode (the caller may score it).
    """
    if len(y) < 2:
        raise TimecatError(f"protocol tc needs at least 2 train rows to train BatchNorm, got {len(y)}")
    first = epoch_features(0)  # read once: with views, every call reads the cache
    trained = [_new_head(first.shape[1], n_classes, wd, recipe, seed, device) for wd in weight_decays]
    labels = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)).to(device)
    generator = torch.Generator().manual_seed(seed)
    for epoch in progress(range(recipe.epochs), desc=desc, unit="epoch"):
        X = torch.from_numpy(first if epoch == 0 else epoch_features(epoch)).to(device)
        for head, _, _ in trained:
            head.train()
        for rows in batches(len(y), recipe.batch_size, generator):
            rows = rows.to(device)
            X_batch, y_batch = X[rows], labels[rows]
            for head, optimizer, _ in trained:
                loss = torch.nn.functional.cross_entropy(head(X_batch), y_batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        for i, (head, _, schedule) in enumerate(trained):
            schedule.step()
            if on_epoch is not None:
                on_epoch(i, epoch, head.eval())
    return [head.eval() for head, _, _ in trained]


def train_head(
    epoch_features: Callable[[int], np.ndarray],
    y: np.ndarray,
    n_classes: int,
    weight_decay: float,
    recipe: TcRecipe,
    seed: int,
    device: torch.device,
) -> torch.nn.Module:
    """One head for one weight decay (``train_heads`` with a grid of one)."""
    return train_heads(epoch_features, y, n_classes, (weight_decay,), recipe, seed, device)[0]


@torch.no_grad()
def head_topk(head: torch.nn.Module, X: np.ndarray, k: int, device: torch.device) -> np.ndarray:
    """(n, k) highest-scoring classes, best first."""
    out = []
    for start in range(0, len(X), 65536):
        logits = head(torch.from_numpy(X[start : start + 65536]).to(device))
        out.append(torch.topk(logits, min(k, logits.shape[1]), dim=1).indices.cpu().numpy())
    return np.concatenate(out)


def check_views(views: list[int]) -> list[int]:
    """Views usable for training must be 0..K-1 with none missing."""
    if views and views != list(range(len(views))):
        raise TimecatError(f"cached views {views} are not 0..{len(views) - 1}: re-run `timecat extract --views K`")
    return views
