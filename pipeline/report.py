"""Stage 5: the paper's Table 3 layout and a plot of top-1 against N, from probe records.

Rows are CatN methods: N members of S steps each (total N*S). Where several
member sets share a row (different subsets of the same kind), the cell is
mean ± std over them.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from pipeline.errors import TimecatError
from pipeline.results import latest_per_probe

PLOT_FILE = "catn.png"


def _steps(record: dict) -> int | None:
    steps = {p.get("steps") for p in record["member_provenance"].values()}
    return steps.pop() if len(steps) == 1 else None  # None: members of unequal budgets


def table(records: list[dict]) -> dict:
    """Group probe records into CatN rows: ``{"datasets": [...], "rows": [...]}``."""
    records = [r for r in latest_per_probe(records) if r["protocol"] == "logreg"]
    if not records:
        raise TimecatError("no logreg probe records to report: run `timecat probe` first")
    datasets = sorted({r["dataset"] for r in records})
    cells: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        cells[(r["n_members"], _steps(r))][r["dataset"]].append(r["top1"])
    rows = []
    for (n, steps), by_dataset in sorted(cells.items(), key=lambda kv: (kv[0][0], -(kv[0][1] or 0))):
        row = {"method": f"Cat{n}", "n": n, "steps_per_member": steps, "total_steps": steps * n if steps else None}
        for d in datasets:
            values = by_dataset.get(d, [])
            row[d] = {
                "mean": float(np.mean(values)) if values else None,
                "std": float(np.std(values)) if len(values) > 1 else 0.0,
                "count": len(values),
            }
        rows.append(row)
    return {"datasets": datasets, "rows": rows}


def format_table(data: dict) -> str:
    """The table as aligned text, like the paper's Table 3."""
    header = ["method", "steps/member", "total", *data["datasets"]]
    lines = []
    for row in data["rows"]:
        cells = [row["method"], _fmt_int(row["steps_per_member"]), _fmt_int(row["total_steps"])]
        for d in data["datasets"]:
            c = row[d]
            if c["mean"] is None:
                cells.append("-")
            elif c["count"] > 1:
                cells.append(f"{c['mean']:.2f} ± {c['std']:.2f} (n={c['count']})")
            else:
                cells.append(f"{c['mean']:.2f}")
        lines.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in lines]
    return "\n".join(out)


def _fmt_int(value: int | None) -> str:
    return "mixed" if value is None else f"{value:,}"


def plot(data: dict, out: Path) -> Path:
    """Top-1 against N, one panel per dataset (error bars where several subsets); saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    datasets = data["datasets"]
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.4), squeeze=False)
    for ax, d in zip(axes[0], datasets, strict=True):
        rows = [r for r in data["rows"] if r[d]["mean"] is not None]
        ns = [r["n"] for r in rows]
        ax.errorbar(ns, [r[d]["mean"] for r in rows], yerr=[r[d]["std"] for r in rows], marker="o", capsize=3)
        ax.set_xticks(sorted(set(ns)))
        ax.set_xlabel("N (members concatenated)")
        ax.set_ylabel("linear-probe top-1 (%)")
        ax.set_title(d)
        ax.grid(alpha=0.3)
    fig.suptitle("CatN at a fixed total pretraining budget")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
