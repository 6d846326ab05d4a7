"""The report: Table 3 and Table 2 layouts, cells with intervals or mean ± std, plots, columns kept apart."""

import functools
from pathlib import Path

import numpy as np
import pytest
from conftest import probe_record

from pipeline.core.errors import TimecatError
from pipeline.probe import results
from pipeline.report import plots, tables


def test_table3_layout_with_mean_and_std():
    records = [
        probe_record(["r0"], "fmnist", 90.0, 1000),
        probe_record(["r0"], "digits", 95.0, 1000),
        probe_record(["r1", "r2"], "fmnist", 91.0, 500),
        probe_record(["r3", "r4"], "fmnist", 93.0, 500),  # a second Cat2 subset
        probe_record(["r1", "r2"], "digits", 97.0, 500),
        probe_record(["r0"], "fmnist", 88.0, 1000),  # a rerun replaces the older record
    ]
    data = tables.table(records)
    assert data["datasets"] == ["digits", "fmnist"]
    cat1, cat2 = data["rows"]
    assert (cat1["method"], cat1["steps_per_member"], cat1["total_steps"]) == ("Cat1", 1000, 1000)
    assert cat1["fmnist"]["mean"] == 88.0
    assert (cat2["method"], cat2["total_steps"]) == ("Cat2", 1000)
    assert cat2["fmnist"] == {"mean": 92.0, "std": pytest.approx(2**0.5), "count": 2, "ci95": None}  # ddof=1
    text = tables.format_table(data)
    assert "92.00 ± 1.41 (n=2)" in text and text.splitlines()[0].split() == [
        "method",
        "steps/member",
        "total",
        "digits",
        "fmnist",
    ]


def test_report_refuses_no_records_and_plots_png(tmp_path):
    with pytest.raises(TimecatError, match="no logreg probe records"):
        tables.table([probe_record(["a"], "d", 1.0, 1, protocol="other")])
    data = tables.table([probe_record(["a"], "d", 80.0, 4), probe_record(["b", "c"], "d", 85.0, 2)])
    out = plots.plot(data, tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table2_is_parameter_matched_and_id_vs_ood_is_plotted(tmp_path):
    records = [
        probe_record(["r0"], "fmnist", 75.6, 1000),
        probe_record(["w0"], "fmnist", 77.6, 1000, arch="resnet50w2", params=93_900_000),
        probe_record(["r1", "r2", "r3", "r4"], "fmnist", 78.2, 250),
        probe_record(["r0"], "digits", 37.9, 1000),
        probe_record(["w0"], "digits", 37.3, 1000, arch="resnet50w2", params=93_900_000),
        probe_record(["r1", "r2", "r3", "r4"], "digits", 46.6, 250),
    ]
    data = tables.table(records, layout="table2")
    assert [(r["method"], r["params"]) for r in data["rows"]] == [
        ("resnet50", 23_500_000),
        ("Cat4 x resnet50", 94_000_000),
        ("resnet50w2", 93_900_000),
    ]
    text = tables.format_table(data)
    assert text.splitlines()[0].split() == ["method", "params", "digits", "fmnist"] and "94.0M" in text
    out = plots.plot_id_vs_ood(data, tmp_path / "id.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(TimecatError, match=r"unknown layout 'table9'; choose one of \['table3', 'table2'\]"):
        tables.table(records, layout="table9")


def test_cells_show_one_probes_interval_or_mean_and_sample_std():
    one = {**probe_record(["r0"], "fmnist", 89.76, 1000), "top1_ci95": [89.1, 90.4]}
    data = tables.table(
        [one, probe_record(["r1", "r2"], "fmnist", 91.0, 500), probe_record(["r3", "r4"], "fmnist", 93.0, 500)]
    )
    text = tables.format_table(data)
    assert "89.76 [89.10, 90.40]" in text and "92.00 ± 1.41 (n=2)" in text
    assert "95% bootstrap interval over eval rows" in text and "sample std" in text
    assert plots._error(data["rows"][0]["fmnist"]) == pytest.approx((0.66, 0.64))  # the plot's bars: the interval
    assert plots._error(data["rows"][1]["fmnist"]) == pytest.approx((2**0.5, 2**0.5))


def test_different_eval_splits_pretraining_data_or_architectures_never_share_a_cell():
    records = [
        probe_record(["r0"], "digits", 90.0, 1000),
        {**probe_record(["r1"], "digits", 70.0, 1000), "eval_split": "val"},  # another eval split: another column
        probe_record(["r2"], "digits", 60.0, 1000, arch="small-resnet"),  # another architecture: another row
        {
            **probe_record(["r3"], "digits", 50.0, 1000),
            "member_provenance": {"r3": {"steps": 1000, "arch": "resnet50", "pretrain_dataset": "cifar10"}},
        },
    ]
    data = tables.table(records)
    assert data["datasets"] == ["digits/test", "digits/val"]
    cells = {(r["arch"], r["pretrained_on"]): {d: r[d]["mean"] for d in data["datasets"]} for r in data["rows"]}
    assert cells == {
        ("resnet50", "fmnist"): {"digits/test": 90.0, "digits/val": 70.0},
        ("resnet50", "cifar10"): {"digits/test": 50.0, "digits/val": None},
        ("small-resnet", "fmnist"): {"digits/test": 60.0, "digits/val": None},
    }
    header = tables.format_table(data).splitlines()[0].split()
    assert header[:5] == ["method", "steps/member", "total", "arch", "pretrained"]


def test_bn_linear_cells_keep_views_apart_and_the_papers_selection_is_labelled_optimistic(tmp_path):
    record = functools.partial(probe_record, ["r0"], "c10", protocol="bn-linear")
    views = {**record(80.0, 10), "augmented": True, "top1_eval_selected": 82.0}
    plain = {**record(75.0, 10), "augmented": False, "top1_eval_selected": 77.0}
    data = tables.table([views, plain], protocol="bn-linear")
    assert [(r["method"], r["c10"]["mean"]) for r in data["rows"]] == [("Cat1", 80.0), ("Cat1 (no views)", 75.0)]
    selected = tables.table([views, plain], protocol="bn-linear", metric="top1_eval_selected")
    assert [r["c10"]["mean"] for r in selected["rows"]] == [82.0, 77.0]
    assert "OPTIMISTIC" in tables.format_table(selected) and "OPTIMISTIC" not in tables.format_table(data)
    with pytest.raises(TimecatError, match="top1_eval_selected exists for protocol bn-linear only"):
        tables.table([views], metric="top1_eval_selected")
    results.append(tmp_path, views)
    from click.testing import CliRunner

    import cli

    out = CliRunner().invoke(
        cli.main, ["report", "--results", str(tmp_path), "--protocol", "bn-linear", "--metric", "top1_eval_selected"]
    )
    assert out.exit_code == 0 and "82.00" in out.output and "OPTIMISTIC" in out.output


def test_records_of_the_former_protocol_name_tc_are_read_as_bn_linear(tmp_path):
    from click.testing import CliRunner

    import cli

    old = {**probe_record(["r0"], "c10", 80.0, 10, protocol="tc"), "augmented": True, "top1_eval_selected": 82.0}
    results.append(tmp_path, {**old, "config": {"protocol": "tc", "dataset": "c10"}})  # as written before the rename
    (loaded,) = results.load(tmp_path)
    assert loaded["protocol"] == "bn-linear" and loaded["config"]["protocol"] == "bn-linear"
    assert results.augmented(loaded) is True
    for pattern in ("protocol=tc", "protocol=bn-linear", "config.protocol=tc", "protocol=bn-*"):
        assert results.select([loaded], [pattern]) == [loaded], pattern  # patterns find it by either name
    for name in ("bn-linear", "tc"):  # the report finds it by either name
        out = CliRunner().invoke(
            cli.main, ["report", "--results", str(tmp_path), "--protocol", name, "--metric", "top1_eval_selected"]
        )
        assert out.exit_code == 0 and "82.00" in out.output, out.output


def test_other_train_splits_or_eval_rows_get_their_own_columns():
    base = probe_record(["r0"], "digits", 90.0, 1000)
    records = [
        {**base, "eval_rows": {"fingerprint": "aaaa1111"}},
        {
            **probe_record(["r1"], "digits", 80.0, 1000),
            "eval_rows": {"fingerprint": "bbbb2222"},
        },  # digits prepared again
        {**probe_record(["r2"], "digits", 70.0, 1000), "train_split": "val", "eval_rows": {"fingerprint": "aaaa1111"}},
    ]
    data = tables.table(records)
    assert len(data["datasets"]) == 3 and len(data["rows"]) == 1
    cells = {name: data["rows"][0][name]["mean"] for name in data["datasets"]}
    assert sorted(cells.values()) == [70.0, 80.0, 90.0]  # three cells, never a mean of two
    assert any("fit on val" in name for name in cells) and any("rows bbbb2222" in name for name in cells)
    old = [{k: v for k, v in r.items() if k != "top1_eval_selected"} for r in records]
    with pytest.raises(TimecatError, match="no bn-linear record carries top1_eval_selected"):
        tables.table([{**r, "protocol": "bn-linear"} for r in old], protocol="bn-linear", metric="top1_eval_selected")


def _table2_records():
    records = []
    for dataset, tops in (("fashion-mnist", (75.6, 77.6, 78.2)), ("digits", (37.9, 37.3, 46.6))):
        records += [
            probe_record(["r0"], dataset, tops[0], 1000),
            probe_record(["w0"], dataset, tops[1], 1000, arch="resnet50w2", params=93_900_000),
            probe_record(["r1", "r2", "r3", "r4"], dataset, tops[2], 250),
        ]
    for r in records:
        for m in r["member_provenance"].values():
            m["pretrain_dataset"] = "fashion-mnist"
    return records


def test_plots_keep_every_text_inside_the_figure_and_layouts_do_not_overwrite_each_other(tmp_path, caplog):
    folder = tmp_path / "results"
    for record in _table2_records():
        results.append(folder, {**record, "id": f"{len(record['members'])}{record['dataset']}"})
    with caplog.at_level("WARNING", logger="timecat"):
        table3 = tables.write(folder)["plots"]
        table2 = tables.write(folder, layout="table2")["plots"]
    assert [Path(p).name for p in table3] == ["catn.png", "id_vs_ood.png"]
    assert [Path(p).name for p in table2] == ["catn_table2.png", "id_vs_ood_table2.png"]
    assert all(Path(p).is_file() for p in table3 + table2)
    assert [r.getMessage() for r in caplog.records if "past the figure" in r.getMessage()] == []


def test_the_overflow_check_finds_a_label_cut_off_at_the_edge(tmp_path, caplog):
    fig, ax = plots.pyplot().subplots(figsize=(3, 2))
    ax.plot([0, 1], [0, 1])
    ax.annotate("a label far too long to fit in this little figure", (1, 1), xytext=(5, 0), textcoords="offset points")
    assert plots.overflowing_text(fig) == ["panel ''"]
    fig.suptitle("a title " * 20)
    assert "a title" in plots.overflowing_text(fig)[-1]
    with caplog.at_level("WARNING", logger="timecat"):
        plots.save_figure(fig, tmp_path / "cut.png")
    assert "text runs past the figure's edge" in caplog.text


def test_toy_and_diversity_figures_explain_themselves(tmp_path, caplog, monkeypatch):
    from pipeline.configs import ToyConfig
    from pipeline.experiments import diversity, toy

    figures = []
    keep = plots.save_figure

    def saving(fig, out, summary=None):
        figures.append(fig)
        return keep(fig, out, summary)

    monkeypatch.setattr(plots, "save_figure", saving)
    with caplog.at_level("WARNING", logger="timecat"):
        toy.plot(toy.run(ToyConfig(mixtures=6, steps=200)), tmp_path / "toy.png")
        cka = [[1, 0.95, 0.96], [0.95, 1, 0.97], [0.96, 0.97, 1]]
        summary = {
            "members": ["a", "b", "c"],
            "cka": cka,
            "top1": {},
            "rows": 9,
            "config": {"dataset": "d", "split": "t"},
        }
        diversity.plot(summary, tmp_path / "div.png")
    assert "past the figure" not in caplog.text
    toy_fig, div_fig = figures
    (legend,) = toy_fig.legends  # colours, shaded regions and marks, named once for every panel
    assert {t.get_text() for t in legend.get_texts()} >= {
        "the rule says positive",
        "misclassified by the mixture's rule",
    }
    image = div_fig.axes[0].images[0]
    assert (image.norm.vmin, image.norm.vmax) == pytest.approx((0.95, 0.97))  # the pairs' range, not 0-1
    assert "not 0-1" in div_fig.axes[1].get_ylabel()
    assert np.ma.getmaskarray(image.get_array()).diagonal().all()  # each member with itself: outside the scale


def _budgets_records() -> list[dict]:
    """Budgets, architectures and pretraining datasets mixed in one results folder."""
    digits_member = probe_record(["d0"], "fmnist", 70.0, 1000)
    digits_member["member_provenance"]["d0"]["pretrain_dataset"] = "digits"
    return [
        probe_record(["r0"], "fmnist", 89.73, 1000),
        probe_record(["q0"], "fmnist", 86.92, 250),
        probe_record(["q1", "q2"], "fmnist", 88.0, 250),  # 500 steps in all
        probe_record(["r1", "r2"], "fmnist", 90.05, 500),  # 1,000 steps in all
        probe_record(["s0"], "fmnist", 80.0, 1000, arch="small-resnet", params=1_000_000),
        probe_record(["r0"], "digits", 95.0, 1000),
        probe_record(["r1", "r2"], "digits", 96.0, 500),
        digits_member,
    ]


def test_a_plot_line_never_joins_budgets_architectures_or_pretraining_data(tmp_path):
    data = tables.table(_budgets_records())
    # Rows by total budget, then method.
    assert [(r["total_steps"], r["method"], r["arch"]) for r in data["rows"]] == [
        (250, "Cat1", "resnet50"),
        (500, "Cat2", "resnet50"),
        (1000, "Cat1", "resnet50"),
        (1000, "Cat1", "resnet50"),
        (1000, "Cat1", "small-resnet"),
        (1000, "Cat2", "resnet50"),
    ]
    drawn = plots.lines(data)
    row_of = {(r["method"], r["fmnist"]["mean"]): r for r in data["rows"]}
    for line in (line for line in drawn if line["dataset"] == "fmnist"):
        rows = [row_of[(p["method"], p["mean"])] for p in line["points"]]
        assert len({(r["total_steps"], r["arch"], r["pretrained_on"]) for r in rows}) == 1, line
        assert f"{rows[0]['total_steps']:,} steps in all" in line["label"]
    labels = [line["label"] for line in drawn if line["dataset"] == "fmnist"]
    assert len(labels) == len(set(labels)) == 5  # 250, 500, 1,000 x (resnet50/fmnist, resnet50/digits, small-resnet)
    joined = next(
        line
        for line in drawn
        if line["dataset"] == "fmnist" and line["label"].startswith("1,000 steps in all, resnet50, fmnist")
    )
    assert [(p["n"], p["mean"]) for p in joined["points"]] == [(1, 89.73), (2, 90.05)]
    # What the PNG shows is written beside it, label for label.
    out = plots.plot(data, tmp_path / "catn.png")
    import json

    assert json.loads(out.with_suffix(".json").read_text())["lines"] == drawn


def test_report_filters_with_results_patterns(tmp_path):
    for record in _budgets_records():
        results.append(tmp_path, record)
    written = tables.write(tmp_path, patterns=("total_steps=1000", "dataset=fmnist", "arch=resnet50"))
    assert [(r["method"], r["total_steps"]) for r in written["table"]["rows"]] == [("Cat1", 1000)] * 2 + [
        ("Cat2", 1000)
    ]
    assert written["table"]["datasets"] == ["fmnist"]
    with pytest.raises(TimecatError, match="no record matches total_steps=7"):
        tables.write(tmp_path, patterns=("total_steps=7",))


def test_a_plot_report_cannot_redraw_is_removed_with_the_reason(tmp_path):
    records = _budgets_records()
    for record in records[:-1]:  # every member pretrained on fmnist: id_vs_ood can be drawn
        results.append(tmp_path, record)
    first = tables.write(tmp_path)
    assert (tmp_path / "id_vs_ood.png").exists() and (tmp_path / "id_vs_ood.json").exists()
    assert str(tmp_path / "shots.png") in first["not_drawn"]
    results.append(tmp_path, records[-1])  # a member pretrained on digits joins
    second = tables.write(tmp_path)
    assert not (tmp_path / "id_vs_ood.png").exists() and not (tmp_path / "id_vs_ood.json").exists()
    why = second["not_drawn"][str(tmp_path / "id_vs_ood.png")]
    assert "pretrained on digits, fmnist" in why and "removed" in why
    text = "\n".join(tables.format_written(second))
    assert "not drawn: id_vs_ood.png (the members were pretrained on digits, fmnist" in text
    # A --plot path elsewhere: a file there that is not timecat's is never removed.
    elsewhere = tmp_path / "mine"
    elsewhere.mkdir()
    (elsewhere / "id_vs_ood.png").write_bytes(b"the user's own")
    tables.write(tmp_path, plot_path=elsewhere / "catn.png")
    assert (elsewhere / "id_vs_ood.png").read_bytes() == b"the user's own"


def test_one_probe_has_no_sample_std_and_the_footnote_says_c_is_chosen():
    data = tables.table([probe_record(["r0"], "fmnist", 89.0, 1000)])
    assert data["rows"][0]["fmnist"]["std"] is None and data["rows"][0]["fmnist"]["count"] == 1
    assert "C chosen on held-out train rows" in tables.format_table(data)
