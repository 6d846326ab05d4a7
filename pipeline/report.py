"""Stage 5: the paper's tables and plots, from probe records.

Table 3 (fixed total compute): rows are CatN methods, N members of S steps each
(total N*S). Table 2 (parameter-matched): rows are architectures and CatN of an
architecture, with their parameter counts. Where several member sets share a
row (different subsets of the same kind), the cell is mean ± std over them.
Plots: top-1 against N per dataset, and in-distribution (the members'
pretraining dataset) against each out-of-distribution dataset.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from pipeline.errors import TimecatError
from pipeline.results import latest_per_probe

PLOT_FILE = "catn.png"
ID_OOD_FILE = "id_vs_ood.png"
LAYOUTS = ("table3", "table2")


def _steps(record: dict) -> int | None:
    steps = {p.get("steps") for p in record["member_provenance"].values()}
    return steps.pop() if len(steps) == 1 else None  # None: members of unequal budgets


def _arch(record: dict) -> str | None:
    archs = {p.get("arch") for p in record["member_provenance"].values()}
    return archs.pop() if len(archs) == 1 else None  # None: mixed architectures


def _params(record: dict) -> int | None:
    counts = [p.get("params") for p in record["member_provenance"].values()]
    return sum(counts) if all(c is not None for c in counts) else None


def _row_key(record: dict, layout: str) -> tuple:
    if layout == "table3":
        return (record["n_members"], _steps(record))
    return (_arch(record) or "mixed", record["n_members"])


def _row_head(key: tuple, layout: str, records: list[dict]) -> dict:
    if layout == "table3":
        n, steps = key
        return {"method": f"Cat{n}", "n": n, "steps_per_member": steps, "total_steps": steps * n if steps else None}
    arch, n = key
    params = {_params(r) for r in records}
    return {
        "method": arch if n == 1 else f"Cat{n} x {arch}",
        "n": n,
        "arch": arch,
        "params": params.pop() if len(params) == 1 else None,
    }


def table(records: list[dict], layout: str = "table3", protocol: str = "logreg") -> dict:
    """Group probe records into rows: ``{"layout", "protocol", "datasets": [...], "rows": [...]}``."""
    if layout not in LAYOUTS:
        raise TimecatError(f"unknown layout {layout!r}; choose one of {list(LAYOUTS)}")
    records = [r for r in latest_per_probe(records) if r["protocol"] == protocol]
    if not records:
        raise TimecatError(f"no {protocol} probe records to report: run `timecat probe --protocol {protocol}` first")
    datasets = sorted({r["dataset"] for r in records})
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[_row_key(r, layout)].append(r)
    rows = []
    order = (lambda k: (k[0], -(k[1] or 0))) if layout == "table3" else (lambda k: (k[0], k[1]))
    for key in sorted(groups, key=order):
        row = _row_head(key, layout, groups[key])
        for d in datasets:
            values = [r["top1"] for r in groups[key] if r["dataset"] == d]
            row[d] = {
                "mean": float(np.mean(values)) if values else None,
                "std": float(np.std(values)) if len(values) > 1 else 0.0,
                "count": len(values),
            }
        rows.append(row)
    pretrained_on = sorted(
        {p.get("pretrain_dataset") for r in records for p in r["member_provenance"].values()} - {None}
    )
    return {"layout": layout, "protocol": protocol, "datasets": datasets, "rows": rows, "pretrained_on": pretrained_on}


def format_table(data: dict) -> str:
    """The table as aligned text, like the paper's Table 3 (or Table 2)."""
    table3 = data.get("layout", "table3") == "table3"
    header = ["method", *(["steps/member", "total"] if table3 else ["params"]), *data["datasets"]]
    lines = []
    for row in data["rows"]:
        if table3:
            cells = [row["method"], _fmt_int(row["steps_per_member"]), _fmt_int(row["total_steps"])]
        else:
            cells = [row["method"], f"{row['params'] / 1e6:.1f}M" if row["params"] else "-"]
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
    plt = _pyplot()

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
    return _save(fig, out)


def plot_id_vs_ood(data: dict, out: Path) -> Path | None:
    """In-distribution top-1 (x) against each other dataset's (y), one point per row; None if no ID dataset."""
    plt = _pyplot()

    ids = [d for d in data["pretrained_on"] if d in data["datasets"]]
    oods = [d for d in data["datasets"] if d not in ids]
    if len(ids) != 1 or not oods:
        return None  # needs exactly one probed pretraining dataset and at least one other
    fig, axes = plt.subplots(1, len(oods), figsize=(4.2 * len(oods), 3.6), squeeze=False)
    for ax, ood in zip(axes[0], oods, strict=True):
        for row in data["rows"]:
            x, y = row[ids[0]], row[ood]
            if x["mean"] is None or y["mean"] is None:
                continue
            ax.errorbar(x["mean"], y["mean"], xerr=x["std"], yerr=y["std"], marker="o", capsize=3)
            ax.annotate(row["method"], (x["mean"], y["mean"]), textcoords="offset points", xytext=(5, 4))
        ax.set_xlabel(f"{ids[0]} top-1 (%), in distribution")
        ax.set_ylabel(f"{ood} top-1 (%), transfer")
        ax.grid(alpha=0.3)
    fig.suptitle("In distribution vs transfer (linear probe)", fontsize=10)
    return _save(fig, out)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    _pyplot().close(fig)
    return out
