"""Plots of the report's tables: top-1 against N, in- against out-of-distribution, and few-shot curves.

Each plot's JSON beside it holds what it shows, so a figure can be read back and checked without its pixels.
"""

from __future__ import annotations

import json
import textwrap
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.core import files
from pipeline.core.progress import get_logger

log = get_logger(__name__)


def _error(cell: dict) -> tuple[float, float]:
    """Error bar below and above a cell's mean: its 95% interval for one probe, else ± the sample std (0 for one
    probe that recorded no interval)."""
    if cell["count"] == 1 and cell.get("ci95"):
        return cell["mean"] - cell["ci95"][0], cell["ci95"][1] - cell["mean"]
    return cell["std"] or 0.0, cell["std"] or 0.0


def _series(data: dict) -> dict[str, list[dict]]:
    """Rows drawn as one line each: a line joins only rows the table keeps apart by N alone, so one total budget
    (table3), architecture, pretraining dataset and views per line, each named in its label."""
    series = defaultdict(list)
    for row in data["rows"]:
        parts = []
        if data.get("layout", "table3") == "table3":
            total = row.get("total_steps")
            parts.append(f"{total:,} steps in all" if total else "members of unequal budgets")
        parts += [str(row[k]) for k in ("arch", "pretrained_on") if row.get(k) is not None]
        label = ", ".join(parts) + (" (no views)" if row.get("augmented") is False else "")
        series[label].append(row)
    return series


def lines(data: dict) -> list[dict]:
    """What ``plot`` draws, per dataset and line: its label and points (N, mean, error below and above).

    Written beside the PNG as JSON, so a figure can be read back (and checked) without its pixels.
    """
    drawn = []
    for d in data["datasets"]:
        for label, rows in _series(data).items():
            rows = sorted((r for r in rows if r[d]["mean"] is not None), key=lambda r: r["n"])
            if rows:
                points = [{"n": r["n"], "method": r["method"], "mean": r[d]["mean"]} for r in rows]
                for point, row in zip(points, rows, strict=True):
                    point["below"], point["above"] = _error(row[d])
                drawn.append({"dataset": d, "label": label, "points": points})
    return drawn


def _panels(count: int, height: float = 3.4):
    """A figure of ``count`` side-by-side panels, one per dataset: (figure, list of axes).

    Constrained layout makes room for titles, labels and a figure legend instead of
    squeezing text past the edges (tight_layout ignores figure legends).
    """
    fig, axes = pyplot().subplots(
        1, count, figsize=(max(4.2 * count, 5.0), height), squeeze=False, layout="constrained"
    )
    return fig, list(axes[0])


def _title(fig, text: str, size: float = 10) -> None:
    """A figure title wrapped to the figure's width (a long title on one panel ran off both edges)."""
    chars = max(30, int(fig.get_figwidth() * 72 / (0.6 * size)))  # ~0.6 em per character
    fig.suptitle(textwrap.fill(text, chars), fontsize=size)


def _legend(fig, axes, least: int = 2) -> None:
    """One legend for the figure, below the panels: inside a panel it covered points, beside it squeezed them."""
    handles, labels = {}, {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    labels = list(handles)
    if len(labels) >= least:
        fig.legend(
            [handles[k] for k in labels], labels, loc="outside lower center", ncols=min(3, len(labels)), fontsize=8
        )


def plot(data: dict, out: Path) -> Path:
    """Top-1 against N, one panel per dataset, one labelled line per total budget (and architecture, pretraining
    data, views), with 95% intervals (one probe) or ± std (several); saved as PNG, what it shows as JSON beside."""
    datasets = data["datasets"]
    drawn = lines(data)
    fig, axes = _panels(len(datasets))
    for ax, d in zip(axes, datasets, strict=True):
        ns = set()
        for line in (line for line in drawn if line["dataset"] == d):
            points = line["points"]
            ns.update(p["n"] for p in points)
            errors = np.array([[p["below"], p["above"]] for p in points]).T  # (2, points)
            ax.errorbar(
                [p["n"] for p in points],
                [p["mean"] for p in points],
                yerr=errors,
                marker="o",
                capsize=3,
                label=line["label"],
            )
        ax.set_xticks(sorted(ns))
        ax.set_xlabel("N (members concatenated)")
        ax.set_ylabel("linear-probe top-1 (%)")
        ax.set_title(d)
        ax.grid(alpha=0.3)
    _legend(fig, axes, least=1)  # the budget of each line, even for one
    what = (
        "Parameter-matched architectures and CatN" if data.get("layout") == "table2" else "CatN at a fixed total budget"
    )
    _title(fig, f"{what} (bars: 95% interval for one probe, or ± sample std over member sets)")
    summary = {"layout": data.get("layout"), "protocol": data.get("protocol"), "metric": data.get("metric")}
    return save_figure(fig, out, {**summary, "lines": drawn})


def _id_and_ood(data: dict) -> tuple[list[str], list[str]]:
    columns = data.get("columns") or [{"name": d, "dataset": d} for d in data["datasets"]]
    ids = [c["name"] for c in columns if c["dataset"] in data["pretrained_on"]]
    return ids, [c["name"] for c in columns if c["name"] not in ids]


def why_no_id_vs_ood(data: dict) -> str | None:
    """Why the in-distribution against transfer plot cannot be drawn from ``data``, or None when it can."""
    ids, oods = _id_and_ood(data)
    pretrained = ", ".join(data["pretrained_on"]) or "unrecorded datasets"
    if len(data["pretrained_on"]) > 1:
        return f"the members were pretrained on {pretrained}: filter to one, e.g. `timecat report pretrained_on=NAME`"
    if not ids:
        return f"the members' pretraining dataset ({pretrained}) was not probed"
    if len(ids) > 1:
        return f"the pretraining dataset has {len(ids)} columns ({', '.join(ids)}): filter to one eval split"
    if not oods:
        return "no dataset other than the members' pretraining dataset was probed"
    return None


def plot_id_vs_ood(data: dict, out: Path) -> Path | None:
    """In-distribution top-1 (x) against each other dataset's (y), one point per row; None (see why_no_id_vs_ood)
    when there is not exactly one in-distribution column and at least one other."""
    if why_no_id_vs_ood(data) is not None:
        return None
    ids, oods = _id_and_ood(data)
    fig, axes = _panels(len(oods), height=3.8)
    for ax, ood in zip(axes, oods, strict=True):
        points = [(row["method"], row[ids[0]], row[ood]) for row in data["rows"]]
        points = [(m, x, y) for m, x, y in points if x["mean"] is not None and y["mean"] is not None]
        for _, x, y in points:
            xerr, yerr = np.array([_error(x)]).T, np.array([_error(y)]).T
            ax.errorbar(x["mean"], y["mean"], xerr=xerr, yerr=yerr, marker="o", capsize=3)
        ax.margins(x=0.3, y=0.15)  # room inside the axes for the labels
        middle = np.mean(ax.get_xlim())
        for method, x, y in points:  # labels point inward, so none runs past the axes
            right = x["mean"] > middle
            ax.annotate(
                method,
                (x["mean"], y["mean"]),
                textcoords="offset points",
                xytext=(-6 if right else 6, 4),
                ha="right" if right else "left",
                fontsize=8,
            )
        ax.set_xlabel(f"{ids[0]} top-1 (%), in distribution")
        ax.set_ylabel(f"{ood} top-1 (%), transfer")
        ax.grid(alpha=0.3)
    _title(fig, "In distribution vs transfer (linear probe; bars: 95% intervals, or ± sample std)")
    shown = [
        {
            "method": row["method"],
            "in_distribution": ids[0],
            "transfer": ood,
            "x": row[ids[0]]["mean"],
            "y": row[ood]["mean"],
        }
        for ood in oods
        for row in data["rows"]
        if row[ids[0]]["mean"] is not None and row[ood]["mean"] is not None
    ]
    return save_figure(fig, out, {"layout": data.get("layout"), "points": shown})


def plot_shots(data: dict, out: Path) -> Path:
    """Few-shot top-1 against shots per class (log axis), one panel per dataset, one line per CatN row."""
    datasets = data["datasets"]
    fig, axes = _panels(len(datasets))
    for ax, d in zip(axes, datasets, strict=True):
        shots = set()
        for line in (line for line in data["lines"] if line["dataset"] == d):
            xs = [p["shots"] for p in line["points"]]
            shots.update(xs)
            label = line["method"] + (f" ({line['arch']})" if line["arch"] not in ("mixed", None) else "")
            ax.errorbar(
                xs,
                [p["mean"] for p in line["points"]],
                yerr=[p["std"] for p in line["points"]],
                marker="o",
                capsize=3,
                label=label,
            )
        ax.set_xscale("log")
        ax.set_xticks(sorted(shots), [str(s) for s in sorted(shots)])
        ax.minorticks_off()
        ax.set_xlabel("train rows per class (shots)")
        ax.set_ylabel("linear-probe top-1 (%)")
        ax.set_title(d)
        ax.grid(alpha=0.3)
    _legend(fig, axes, least=1)  # which CatN each line is, even for one
    _title(fig, "Few-shot linear probes (bars: ± sample std over draws and member subsets)")
    return save_figure(fig, out, {"lines": data["lines"]})


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (servers and CI have no display)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path, summary: dict | None = None) -> Path:
    """Save ``fig`` as PNG at ``out``, atomically, and close it; with ``summary``, write it as JSON beside it.

    The JSON (``out`` with .json) holds what the figure shows, so its numbers can be
    read back without the picture: timecat's version and the caller's fields
    (config and summary, for the experiments).
    """
    files.check_destination(Path(out))  # the PNG's, before its JSON is written beside it
    if summary is not None:
        record = {"timecat_version": __version__, "figure": Path(out).name, **summary}
        text = json.dumps(record, indent=1, default=str)
        files.replace(Path(out).with_suffix(".json"), lambda tmp: Path(tmp).write_text(text))
    if not fig.get_layout_engine():  # figures made with constrained layout keep it
        with warnings.catch_warnings():  # a layout that cannot fit is reported below, by what overflows
            warnings.filterwarnings("ignore", "Tight layout not applied", UserWarning)
            fig.tight_layout()
    outside = overflowing_text(fig)
    if outside:
        log.warning("%s: text runs past the figure's edge: %s", out, outside)
    try:
        # A temporary name, then a rename: a symlink planted at ``out`` is replaced, not written through.
        return files.replace(Path(out), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        pyplot().close(fig)


def overflowing_text(fig) -> list[str]:
    """What of ``fig`` crosses its edges as drawn: a title or text by its words, a panel by its title, a legend.

    Each top-level piece is measured by its tight box (what matplotlib draws of it: a
    panel's tick labels, axis labels and annotations included), so a label cut off at
    the edge of the PNG is found here.
    """
    from matplotlib.axes import Axes
    from matplotlib.legend import Legend

    fig.draw_without_rendering()  # lay out first: constrained layout runs at draw time
    renderer, bounds = fig.canvas.get_renderer(), fig.bbox
    outside = []
    for artist in fig.get_children():
        box = artist.get_tightbbox(renderer) if artist.get_visible() else None
        if box is None or box.width == 0:
            continue
        if box.x0 < bounds.x0 - 0.5 or box.y0 < bounds.y0 - 0.5 or box.x1 > bounds.x1 + 0.5 or box.y1 > bounds.y1 + 0.5:
            if isinstance(artist, Axes):
                outside.append(f"panel {artist.get_title() or artist.get_xlabel()!r}")
            elif isinstance(artist, Legend):
                outside.append("legend")
            else:
                outside.append(artist.get_text() if hasattr(artist, "get_text") else type(artist).__name__)
    return outside
