"""Protocol ``tc``: the paper's probe recipe, run on cached features instead of images.

Head: BatchNorm1d over the concatenated features, then Linear (weights
N(0, 0.01), zero bias). SGD with Nesterov momentum 0.9, lr 0.01, 28 epochs, lr
x0.1 at epochs 8, 16 and 24, batch 256, weight decay on the Linear layer only.
The paper's code re-augments and re-runs every image through every backbone at
each step; here an epoch trains on one cached augmented view (epoch e uses view
e mod K) when ``timecat extract --views K`` made them, else on the plain
features. Unlike the paper's code, which reports the best epoch on the eval
set, the weight decay is chosen on a held-out part of the train split and the
last epoch is reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import TimecatError

# The paper's per-dataset weight-decay grids (REFERENCE.md), by dataset kind;
# other datasets use the CIFAR grid, the widest.
WD_GRIDS = {
    "cifar10": (1e-2, 5e-2, 1e-4, 5e-4, 1e-3, 5e-3),
    "cifar100": (1e-2, 5e-2, 1e-4, 5e-4, 1e-3, 5e-3),
    "imagenet": (1e-4, 5e-4),
    "inat2018": (1e-6, 1e-5, 1e-4),
}
DEFAULT_GRID = WD_GRIDS["cifar10"]


@dataclass(frozen=True)
class TcRecipe:
    """The paper's head-training schedule."""

    epochs: int = 28
    milestones: tuple[int, ...] = (8, 16, 24)  # epochs where lr is multiplied by 0.1
    lr: float = 0.01
    momentum: float = 0.9  # Nesterov
    batch_size: int = 256
    init_std: float = 0.01  # Linear weights ~ N(0, init_std)


def wd_grid(dataset: str, override: tuple[float, ...] | None = None) -> tuple[float, ...]:
    """The weight decays to try for ``dataset``: the override, the paper's grid, or the default."""
    return tuple(override) if override else WD_GRIDS.get(dataset, DEFAULT_GRID)


def train_head(
    epoch_features: Callable[[int], np.ndarray],
    y: np.ndarray,
    n_classes: int,
    weight_decay: float,
    recipe: TcRecipe,
    seed: int,
    device: torch.device,
) -> torch.nn.Module:
    """Train BatchNorm1d + Linear; ``epoch_features(e)`` gives the (n, D) float32 rows of epoch e."""
    torch.manual_seed(seed)
    first = epoch_features(0)  # read once: with views, every call reads the cache
    dim = first.shape[1]
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
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(recipe.milestones), gamma=0.1)
    labels = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)).to(device)
    generator = torch.Generator().manual_seed(seed)
    head.train()
    for epoch in range(recipe.epochs):
        X = torch.from_numpy(first if epoch == 0 else epoch_features(epoch)).to(device)
        for rows in torch.randperm(len(y), generator=generator).split(recipe.batch_size):
            rows = rows.to(device)
            loss = torch.nn.functional.cross_entropy(head(X[rows]), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
    return head.eval()


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
