"""How different members' features are, read from the cache only.

The paper's remedy rests on members trained with different seeds keeping
different features. This measures it: linear CKA (Kornblith et al., 2019)
between every pair of members on one split, beside the probe accuracy of each
member alone and of their concatenation. CKA is 1 for representations that
differ only by a rotation and an isotropic scale, and near 0 for unrelated ones.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

import cache
from pipeline.configs import DiversityConfig
from pipeline.core.errors import TimecatError
from pipeline.core.progress import get_logger, plural

log = get_logger(__name__)


def centered_gram_norms(X: np.ndarray) -> tuple[np.ndarray, float]:
    """Column-centred float64 copy of X (n, d) and ||Xc^T Xc||_F."""
    Xc = X.astype(np.float64)
    Xc -= Xc.mean(axis=0)
    return Xc, float(np.linalg.norm(Xc.T @ Xc))


def linear_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Linear CKA of two representations of the same rows: ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""
    return float(cka_matrix([X, Y])[0, 1])


def cka_matrix(features: list[np.ndarray]) -> np.ndarray:
    """(k, k) linear CKA between every pair of (n, d_i) matrices; each is centred once."""
    centred = [centered_gram_norms(X) for X in features]
    k = len(features)
    out = np.eye(k)
    for i in range(k):
        for j in range(i + 1, k):
            (Xi, ni), (Xj, nj) = centred[i], centred[j]
            out[i, j] = out[j, i] = np.linalg.norm(Xi.T @ Xj) ** 2 / (ni * nj)
    return out


def run(config: DiversityConfig, cache_path: str, results_root=None) -> tuple[dict, list[dict]]:
    """CKA between every pair of members, and (if asked) probe records of each member and of all of them.

    Returns the summary and the probe records (saved to ``results_root`` when given).
    """
    from pipeline.configs import ProbeConfig
    from pipeline.probe.run import probe, reusable

    store = cache.open(cache_path)
    try:
        n = len(store.labels(config.dataset, config.split))
        rows = np.sort(np.random.default_rng(config.seed).choice(n, size=min(n, config.rows), replace=False))
        features = []
        for m in config.members:
            X, _ = store.features(config.dataset, config.split, [m], scan_nan=True)
            features.append(X if len(rows) == n else X[rows])  # no copy when every row is used
    except cache.CacheError as e:
        raise TimecatError(str(e)) from None
    log.info(
        "CKA of %s on %s/%s: %s",
        plural(len(config.members), "member"),
        config.dataset,
        config.split,
        plural(len(rows), "row"),
    )
    cka = cka_matrix(features)
    records, reused = [], []
    if config.probe:
        for members in [(m,) for m in config.members] + [config.members]:
            probe_config = ProbeConfig(config.dataset, members)
            # The same probe already in the results (the demo's Cat4, say): its record, not minutes of refitting.
            record = reusable(probe_config, cache_path, results_root)
            if record is None:
                record = probe(probe_config, cache_path, results_root)
            else:
                log.info("probe %s on %s: reusing record %s", ",".join(members), config.dataset, record["id"])
                reused.append(record["id"])
            records.append(record)
    off_diagonal = cka[~np.eye(len(cka), dtype=bool)]
    summary = {
        "config": asdict(config),
        "rows": len(rows),
        "members": list(config.members),
        "cka": cka.round(4).tolist(),
        "mean_pairwise_cka": round(float(off_diagonal.mean()), 4),
        "top1": {"+".join(r["members"]): r["top1"] for r in records},
        "top1_ci95": {"+".join(r["members"]): r["top1_ci95"] for r in records},
        "probe_ids": {"+".join(r["members"]): r["id"] for r in records},
        "reused": reused,
    }
    return summary, records


def plot(summary: dict, out: Path) -> Path:
    """Heatmap of pairwise CKA, annotated, with each member's probe top-1 in its label when probed."""
    from pipeline.report.plots import pyplot, save_figure

    plt = pyplot()
    members, cka = summary["members"], np.array(summary["cka"])
    labels = [f"{m}\n{summary['top1'][m]:.1f}%" if m in summary["top1"] else m for m in members]
    fig, ax = plt.subplots(figsize=(1.2 * len(members) + 2.8, 1.2 * len(members) + 1.6), layout="constrained")
    # Colours span the pairs' own range: on a 0-1 scale, CKAs of 0.94-0.97 all looked the same. The
    # diagonal (each member with itself, always 1) is grey, outside that scale.
    pairs = ~np.eye(len(members), dtype=bool)
    low, high = float(cka[pairs].min()), float(cka[pairs].max())
    high = max(high, low + 1e-3)
    shown = np.ma.masked_array(cka, mask=~pairs)
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    image = ax.imshow(shown, vmin=low, vmax=high, cmap=cmap)
    for i in range(len(members)):
        for j in range(len(members)):
            dark = pairs[i, j] and (cka[i, j] - low) / (high - low) < 0.6
            ax.text(j, i, f"{cka[i, j]:.3f}", ha="center", va="center", color="w" if dark else "k", fontsize=8)
    ax.set_xticks(range(len(members)), labels, fontsize=8)
    ax.set_yticks(range(len(members)), labels, fontsize=8)
    title = f"linear CKA, {summary['config']['dataset']}/{summary['config']['split']} ({summary['rows']} rows)"
    cat = "+".join(members)
    if cat in summary["top1"]:
        title += f"\nconcatenation: {summary['top1'][cat]:.1f}% top-1"
    ax.set_title(title, fontsize=9)
    bar = fig.colorbar(image, ax=ax, fraction=0.046)
    bar.set_label(f"CKA; colours span the pairs' range {low:.3f}-{high:.3f}, not 0-1", fontsize=8)
    return save_figure(fig, out, {"experiment": "diversity", "config": summary["config"], "summary": summary})


def format_summary(summary: dict) -> list[str]:
    """``timecat diversity``'s report: the CKA matrix, its mean off the diagonal, and each probe's top-1."""
    names = summary["members"]
    width = max(len(n) for n in names) + 2
    where = f"{summary['config']['dataset']}/{summary['config']['split']}"
    lines = [f"linear CKA on {where} ({summary['rows']} rows):"]
    lines.append(" " * width + "".join(f"{n:>{width}}" for n in names))
    for name, row in zip(names, summary["cka"], strict=True):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{width}.3f}" for v in row))
    lines.append(f"mean pairwise CKA: {summary['mean_pairwise_cka']:.3f}")
    for subset, top1 in summary["top1"].items():
        lo, hi = summary["top1_ci95"][subset]
        again = " (reused)" if summary["probe_ids"][subset] in summary["reused"] else ""
        lines.append(
            f"probe top-1 {subset}: {top1:.2f}% [95% CI {lo:.2f}, {hi:.2f}], record {summary['probe_ids'][subset]}"
            + again
        )
    return [*lines, f"plot: {summary['plot']}"]
