"""Stage 5: the paper's tables from probe records, paired comparisons of two probes, and the report command.

Table 3 (fixed total compute): rows are CatN methods, N members of S steps each
(total N*S). Table 2 (parameter-matched): rows are architectures and CatN of an
architecture, with their parameter counts. A cell holds one probe's top-1 with
its 95% bootstrap interval over eval rows, or, where several member sets share a
row (different subsets of the same kind), mean ± sample std (ddof=1) with n.
Records with different eval splits, pretraining datasets, architectures or (for
protocol bn-linear) with and without cached views never share a cell.
Rows go by total budget, then method. Plots: top-1 against N per dataset, one
line per total budget, architecture, pretraining dataset and views (a line
joins only what the table keeps apart by N), and in-distribution (the members'
pretraining dataset) against each out-of-distribution dataset. Each plot's
JSON beside it holds what it shows; a plot a report cannot draw is removed,
with the reason, so none outlives its records.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline import configs
from pipeline.core import files, stats
from pipeline.core.errors import TimecatError
from pipeline.core.progress import get_logger, plural
from pipeline.probe.results import augmented, find, latest_per_probe, load, load_predictions, shots_key
from pipeline.report import plots

log = get_logger(__name__)

PLOT_FILE = "catn.png"
ID_OOD_FILE = "id_vs_ood.png"
SHOTS_FILE = "shots.png"
LAYOUTS = configs.REPORT_LAYOUTS
METRICS = {
    "top1": "top-1 on the eval split, C chosen on held-out train rows (the honest figure)",
    "top1_eval_selected": "top-1 of the best epoch and weight decay on the eval split "
    "(the paper's code's selection: OPTIMISTIC, for comparison with its tables only)",
}


def _one(values: set, mixed: str = "mixed"):
    values = set(values)
    return values.pop() if len(values) == 1 else mixed


def _steps(record: dict) -> int | None:
    steps = {p.get("steps") for p in record["member_provenance"].values()}
    return steps.pop() if len(steps) == 1 else None  # None: members of unequal budgets


def _arch(record: dict) -> str:
    """The members' architecture, or for a concatenation of several, each once: ``timm:resnet18 + timm:vit_tiny``."""
    return " + ".join(sorted({str(p.get("arch")) for p in record["member_provenance"].values()}))


def _pretrained_on(record: dict) -> str | None:
    return _one(p.get("pretrain_dataset") for p in record["member_provenance"].values())


def _params(record: dict) -> int | None:
    counts = [p.get("params") for p in record["member_provenance"].values()]
    return sum(counts) if all(c is not None for c in counts) else None


class RowKey(NamedTuple):
    """What makes two records the same method: they share a row only when every field agrees."""

    n: int  # members concatenated
    steps: int | None  # steps per member (table3; None in table2 or for members of unequal budgets)
    arch: str
    pretrained_on: str | None
    augmented: bool | None  # bn-linear: trained on cached views; None for other protocols


class ColumnKey(NamedTuple):
    """What makes two records scored on the same data: they share a column only when every field agrees."""

    dataset: str
    train_split: str
    eval_split: str
    eval_fingerprint: str | None  # a dataset prepared again under the same name has other rows


def _row_key(record: dict, layout: str) -> RowKey:
    # Architecture, pretraining data and views split rows in both layouts: they are different methods.
    steps = _steps(record) if layout == "table3" else None
    return RowKey(record["n_members"], steps, _arch(record), _pretrained_on(record), augmented(record))


def _column_key(record: dict) -> ColumnKey:
    fingerprint = (record.get("eval_rows") or {}).get("fingerprint")
    return ColumnKey(record["dataset"], record["train_split"], record["eval_split"], fingerprint)


def _row_head(key: RowKey, layout: str, records: list[dict]) -> dict:
    if layout == "table3":
        total = key.steps * key.n if key.steps else None
        head = {"method": f"Cat{key.n}", "n": key.n, "steps_per_member": key.steps, "total_steps": total}
    else:
        params = {_params(r) for r in records}
        head = {
            "method": key.arch if key.n == 1 else f"Cat{key.n} " + ("of " if " + " in key.arch else "x ") + key.arch,
            "n": key.n,
            "params": params.pop() if len(params) == 1 else None,
        }
    if key.augmented is False:
        head["method"] += " (no views)"
    return {**head, "arch": key.arch, "pretrained_on": key.pretrained_on, "augmented": key.augmented}


def _order(key: RowKey, layout: str) -> tuple:
    # table3: by total budget (members of unequal budgets last), then N, then longer members first;
    # table2: by architecture, then N; heads trained without views after those trained with them.
    tail = (str(key.pretrained_on), key.augmented is False)
    if layout == "table3":
        total = key.steps * key.n if key.steps else float("inf")
        return (total, key.n, -(key.steps or 0), str(key.arch), *tail)
    return (str(key.arch), key.n, *tail)


def _columns(records: list[dict]) -> dict[ColumnKey, str]:
    """Column key -> name: the dataset alone, with the eval split, the train split and the rows' fingerprint
    added only as far as needed to tell a dataset's columns apart."""
    keys = sorted({_column_key(r) for r in records}, key=str)
    names = {}
    for key in keys:
        siblings = [k for k in keys if k.dataset == key.dataset]
        name = key.dataset
        if len({k.eval_split for k in siblings}) > 1:
            name += f"/{key.eval_split}"
        if len({k.train_split for k in siblings}) > 1:
            name += f" (fit on {key.train_split})"
        names[key] = name
    counts = defaultdict(int)
    for name in names.values():
        counts[name] += 1
    return {k: n if counts[n] == 1 else f"{n} [rows {str(k.eval_fingerprint)[:8]}]" for k, n in names.items()}


def _cell(records: list[dict], metric: str) -> dict:
    """Mean, sample std (None below 2 member sets: one probe has no spread to show), count and one probe's CI."""
    if not records:
        return {"mean": None, "std": None, "count": 0, "ci95": None}
    cell = stats.mean_std([r[metric] for r in records])
    if cell["count"] < 2:
        cell["std"] = None
    ci = records[0].get("top1_ci95") if len(records) == 1 and metric == "top1" else None
    return {**cell, "ci95": ci}


def table(records: list[dict], layout: str = "table3", protocol: str = "logreg", metric: str = "top1") -> dict:
    """Group probe records into rows: ``{"layout", "protocol", "metric", "datasets": [...], "rows": [...]}``."""
    if layout not in LAYOUTS:
        raise TimecatError(f"unknown layout {layout!r}; choose one of {list(LAYOUTS)}")
    if metric not in METRICS:
        raise TimecatError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
    protocol = configs.protocol_name(protocol)
    if metric == "top1_eval_selected" and protocol != "bn-linear":
        raise TimecatError("top1_eval_selected exists for protocol bn-linear only (the paper's code's selection)")
    # A probe fit and scored on one split measures memorisation: it never enters a table.
    # Few-shot records have their own plot (shots_table): a table cell holds whole-train-split probes only.
    records = [
        r
        for r in latest_per_probe(records)
        if r["protocol"] == protocol and r["train_split"] != r["eval_split"] and shots_key(r) is None
    ]
    if not records:
        raise TimecatError(f"no {protocol} probe records to report: run `timecat probe --protocol {protocol}` first")
    if metric != "top1":
        records = [r for r in records if metric in r]
        if not records:
            raise TimecatError(f"no {protocol} record carries {metric} (made before timecat stored it): rerun them")
    columns = _columns(records)
    groups: dict[RowKey, list[dict]] = defaultdict(list)
    for r in records:
        groups[_row_key(r, layout)].append(r)
    rows = []
    for key in sorted(groups, key=lambda k: _order(k, layout)):
        row = _row_head(key, layout, groups[key])
        for column, name in columns.items():
            row[name] = _cell([r for r in groups[key] if _column_key(r) == column], metric)
        rows.append(row)
    pretrained_on = sorted(
        {p.get("pretrain_dataset") for r in records for p in r["member_provenance"].values()} - {None}
    )
    return {
        "layout": layout,
        "protocol": protocol,
        "metric": metric,
        "metric_meaning": METRICS[metric],
        "datasets": list(columns.values()),
        "columns": [{"name": n, **k._asdict()} for k, n in columns.items()],
        "rows": rows,
        "pretrained_on": pretrained_on,
    }


def format_cell(cell: dict) -> str:
    """``89.76 [89.10, 90.40]`` (one probe, 95% CI), ``92.00 ± 1.00 (n=2)`` (mean ± sample std) or ``-``."""
    if cell["mean"] is None:
        return "-"
    if cell["count"] > 1:
        return f"{cell['mean']:.2f} ± {cell['std']:.2f} (n={cell['count']})"
    if cell.get("ci95"):
        return f"{cell['mean']:.2f} [{cell['ci95'][0]:.2f}, {cell['ci95'][1]:.2f}]"
    return f"{cell['mean']:.2f}"


def format_table(data: dict) -> str:
    """The table as aligned text, like the paper's Table 3 (or Table 2), with a line saying what cells hold."""
    table3 = data.get("layout", "table3") == "table3"
    shown = ("arch", "pretrained_on") if table3 else ("pretrained_on",)  # table2's method names the arch
    varies = [k for k in shown if len({str(r.get(k)) for r in data["rows"]}) > 1]
    extra = {"arch": "arch", "pretrained_on": "pretrained on"}
    header = [
        "method",
        *(["steps/member", "total"] if table3 else ["params"]),
        *(extra[k] for k in varies),
        *data["datasets"],
    ]
    lines = []
    for row in data["rows"]:
        if table3:
            cells = [row["method"], _fmt_int(row["steps_per_member"]), _fmt_int(row["total_steps"])]
        else:
            cells = [row["method"], f"{row['params'] / 1e6:.1f}M" if row["params"] else "-"]
        cells += [str(row.get(k)) for k in varies]
        cells += [format_cell(row[d]) for d in data["datasets"]]
        lines.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in lines]
    out.append(
        f"({data.get('protocol', 'logreg')} probe, {data.get('metric_meaning', METRICS['top1'])}, %; "
        "one probe: [95% bootstrap interval over eval rows] where recorded; several member sets: mean ± sample std (n))"
    )
    return "\n".join(out)


def format_shots(data: dict) -> str:
    """Few-shot top-1 as text: one line per dataset and CatN row, mean ± sample std (n) per shots."""
    out = []
    for line in data["lines"]:
        cells = ", ".join(
            f"{p['shots']}-shot {p['mean']:.2f}"
            + (f" ± {p['std']:.2f}" if p["count"] > 1 else "")
            + f" (n={p['count']})"
            for p in line["points"]
        )
        out.append(f"{line['dataset']}  {line['method']}: {cells}")
    out.append("(few-shot logreg probes, top-1 %; mean ± sample std over draws and member subsets, n records)")
    return "\n".join(out)


def _fmt_int(value: int | None) -> str:
    return "mixed" if value is None else f"{value:,}"


def shots_table(records: list[dict]) -> dict | None:
    """Few-shot top-1 per dataset, CatN row and shots: mean ± sample std over draws and member subsets.

    Rows are told apart as in table3 (N, steps per member, architecture,
    pretraining data). None when no record is a few-shot probe.
    """
    few = [r for r in records if shots_key(r) is not None and r["train_split"] != r["eval_split"]]
    few = latest_per_probe(_latest_runs(few))  # the newest run's draws, in file order, then one per draw
    if not few:
        return None
    columns = _columns(few)
    cells: dict[tuple, list[float]] = defaultdict(list)
    for r in few:
        cells[(columns[_column_key(r)], _row_key(r, "table3"), r["shots"]["per_class"])].append(r["top1"])
    series = defaultdict(list)
    for (dataset, key, shots), values in sorted(
        cells.items(), key=lambda c: (c[0][0], _order(c[0][1], "table3"), c[0][2])
    ):
        series[(dataset, key)].append({"shots": shots, **stats.mean_std(values)})
    lines = [{"dataset": d, **_row_head(key, "table3", []), "points": points} for (d, key), points in series.items()]
    return {"datasets": sorted({line["dataset"] for line in lines}), "lines": lines}


def _latest_runs(records: list[dict]) -> list[dict]:
    """Per probe and shots, the draws of its newest few-shot run only: a rerun with fewer draws or another
    seed replaces the older run's draws instead of mixing with them."""

    def key(r: dict) -> tuple:
        return (r["dataset"], tuple(r["members"]), r["eval_split"], r["shots"]["per_class"])

    newest = {key(r): r["shots"].get("run") for r in records}  # file order: later records are newer
    return [r for r in records if r["shots"].get("run") == newest[key(r)]]


def write(
    results_root: Path,
    layout: str = "table3",
    protocol: str = "logreg",
    metric: str = "top1",
    plot_path=None,
    patterns: tuple[str, ...] = (),
) -> dict:
    """The report of a results folder: its table, few-shot table and plots, written beside the records.

    ``patterns`` (``timecat results``'s, e.g. ``total_steps=1000``) keep the
    matching records only. Returns ``{"table", "shots", "plots", "not_drawn"}``;
    the table is None when the folder holds few-shot records only. Plots:
    ``plot_path`` (default RESULTS/catn.png), id_vs_ood.png beside it when one
    ID dataset and another were probed, shots.png for few-shot records
    (logreg); a layout other than table3 adds its name (catn_table2.png). A plot
    this report does not draw is removed (with its JSON), so none goes stale:
    ``not_drawn`` maps its path to the reason.
    """
    from pipeline.probe.results import select

    first = Path(plot_path) if plot_path else Path(results_root) / plot_name(PLOT_FILE, layout)
    _check_plot_folder(first.parent, plot_path is not None)
    id_ood, shots_path = first.with_name(plot_name(ID_OOD_FILE, layout)), first.with_name(SHOTS_FILE)
    for path in (first, id_ood, shots_path):  # before the work: a rename would replace a device or FIFO there
        files.check_destination(path)
        files.check_destination(path.with_suffix(".json"))
    records = load(results_root)
    if patterns:
        records = select(records, list(patterns))
        if not records:
            raise TimecatError(f"no record matches {' '.join(patterns)}: `timecat results` lists the records")
    protocol = configs.protocol_name(protocol)
    log.info("report of %s in %s (%s, %s)", plural(len(records), "record"), results_root, layout, protocol)
    shots = shots_table(records) if protocol == "logreg" else None
    whole = [r for r in records if shots_key(r) is None]
    # Few-shot records only: their plot alone. Any other refusal of the table is the user's to see.
    data = None if shots is not None and not whole else table(records, layout=layout, protocol=protocol, metric=metric)
    saved, not_drawn = [], {}
    if data is None:
        not_drawn[first] = "no whole-train-split probe records (few-shot only)"
        not_drawn[id_ood] = not_drawn[first]
    else:
        saved.append(plots.plot(data, first))
        reason = plots.why_no_id_vs_ood(data)
        if reason is None:
            saved.append(plots.plot_id_vs_ood(data, id_ood))
        else:
            not_drawn[id_ood] = reason
    if shots is not None:
        saved.append(plots.plot_shots(shots, shots_path))
    elif protocol == "logreg":
        not_drawn[shots_path] = "no few-shot probe records"
    for path in not_drawn:
        if _remove_stale(path, Path(results_root)):
            not_drawn[path] += "; the older file was removed"
    return {
        "table": data,
        "shots": shots,
        "plots": [str(p) for p in saved],
        "not_drawn": {str(p): why for p, why in not_drawn.items()},
    }


def _check_plot_folder(folder: Path, chosen: bool) -> None:
    """Refuse, before any work, a plot folder that cannot be written (a read-only results folder failed on
    catn.png after the work, without the table): the fix is another folder, through --plot."""
    try:
        files.check_writable(folder, "the plots' folder")
    except TimecatError as e:
        where = "another --plot PATH" if chosen else "--plot PATH"
        raise TimecatError(f"{e}: {where} writes the plots elsewhere (id_vs_ood.png and shots.png beside it)") from None


def _remove_stale(path: Path, results_root: Path) -> bool:
    """Remove a plot this report did not redraw, and its JSON, if it is timecat's: in the results folder, or
    beside a JSON that names it as a timecat figure (a --plot path elsewhere may hold the user's own file)."""
    if not path.exists():
        return False
    ours = path.parent.resolve() == results_root.resolve()
    with contextlib.suppress(OSError, ValueError, AttributeError):  # no JSON, or not one of ours
        ours = ours or json.loads(path.with_suffix(".json").read_text()).get("figure") == path.name
    if ours:
        path.unlink()
        path.with_suffix(".json").unlink(missing_ok=True)
    return ours


def plot_name(name: str, layout: str) -> str:
    """A plot's file name for a layout: table3's plain (catn.png), another's with its name (catn_table2.png), so
    a table2 report never overwrites table3's plots."""
    return name if layout == LAYOUTS[0] else f"{Path(name).stem}_{layout}{Path(name).suffix}"


def compare(results_root: Path, id_a: str, id_b: str, resamples: int = stats.RESAMPLES, seed: int = 0) -> dict:
    """Top-1 of record A minus record B on the same eval rows, with its 95% paired bootstrap interval.

    Refuses records made on different eval rows (dataset, split, fingerprint, labels).
    """
    records = load(results_root)
    a, b = find(records, id_a, results_root), find(records, id_b, results_root)
    rows_a, rows_b = _eval_rows(a), _eval_rows(b)
    if rows_a != rows_b:
        raise TimecatError(
            f"records {id_a} and {id_b} were scored on different eval rows ({rows_a} vs {rows_b}); "
            "a paired comparison needs the same rows: compare probes of one dataset's eval split"
        )
    pa, pb = load_predictions(results_root, a), load_predictions(results_root, b)
    if not np.array_equal(pa["labels"], pb["labels"]):
        raise TimecatError(f"the saved predictions of {id_a} and {id_b} are for different eval labels")
    labels = pa["labels"]
    paired = stats.paired_difference(pa["top5"][:, 0] == labels, pb["top5"][:, 0] == labels, resamples, seed)

    def side(r: dict) -> dict:
        return {"id": r["id"], "members": r["members"], "protocol": r["protocol"], "top1": r["top1"]}

    return {"a": side(a), "b": side(b), "dataset": a["dataset"], "eval_split": a["eval_split"], **paired}


def _eval_rows(record: dict) -> tuple:
    rows = record.get("eval_rows")
    if not rows:
        raise TimecatError(f"record {record.get('id')} does not identify its eval rows (made before timecat did)")
    identity = (rows.get("rows"), rows.get("fingerprint"), rows.get("labels_sha256"))
    return (record["dataset"], record["eval_split"], *identity)


def format_compare(out: dict) -> list[str]:
    """``timecat compare``'s two lines: the paired difference with its interval, and what the interval supports."""
    lo, hi = out["ci95"]
    a, b = out["a"], out["b"]
    verdict = "the interval excludes 0" if out["excludes_zero"] else "the interval includes 0: no difference shown"
    return [
        f"{','.join(a['members'])} ({a['top1']:.2f}%) - {','.join(b['members'])} ({b['top1']:.2f}%) on "
        f"{out['dataset']}/{out['eval_split']}: {out['difference']:+.2f} points [95% CI {lo:+.2f}, {hi:+.2f}] over "
        f"{out['rows']:,} rows ({out['only_a_correct']} right only for A, {out['only_b_correct']} only for B)",
        verdict,
    ]


def format_written(written: dict) -> list[str]:
    """``timecat report``'s text: the table, the few-shot table, and the plots written."""
    lines = [] if written["table"] is None else [format_table(written["table"])]
    lines += [] if written["shots"] is None else [format_shots(written["shots"])]
    lines.append("plots: " + ", ".join(written["plots"]))
    return lines + [f"not drawn: {Path(p).name} ({why})" for p, why in written.get("not_drawn", {}).items()]
