"""The results store (append-only, safe under concurrency) and the Table 3 report."""

import json
import multiprocessing

import pytest

from pipeline import report, results
from pipeline.errors import TimecatError


def record(members, dataset, top1, steps, protocol="logreg", arch="resnet50", params=23_500_000):
    return {
        "dataset": dataset,
        "members": members,
        "n_members": len(members),
        "protocol": protocol,
        "train_split": "train",
        "eval_split": "test",
        "top1": top1,
        "member_provenance": {
            m: {"steps": steps, "arch": arch, "params": params, "pretrain_dataset": "fmnist"} for m in members
        },
    }


def _append_many(args):
    root, worker, size = args
    for i in range(60):
        # Records larger than a pipe buffer and than one write block: written in several write() calls.
        big = {**record([f"w{worker}"], "d", float(i), 10), "padding": f"{worker}" * size}
        results.append(root, big)


def test_concurrent_appends_of_large_records_never_interleave(tmp_path):
    with multiprocessing.get_context("fork").Pool(6) as pool:
        pool.map(_append_many, [(tmp_path, w, 150_000 + 997 * w) for w in range(6)])
    lines = results.results_path(tmp_path).read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 6 * 60 + 1
    for line in lines[:-1]:
        parsed = json.loads(line)  # a line broken by another writer's block would not parse
        assert parsed["padding"] == parsed["members"][0][1:] * len(parsed["padding"])


def test_missing_torn_and_malformed_results_are_explained(tmp_path, caplog):
    with pytest.raises(TimecatError, match=r"run `timecat probe` first \(--results or TIMECAT_RESULTS"):
        results.load(tmp_path)
    results.append(tmp_path, record(["a"], "d", 1.0, 1))
    with open(results.results_path(tmp_path), "a") as f:
        f.write('{"broken": tr')  # a crash mid-append: a torn last line, no newline
    results.append(tmp_path, record(["b"], "d", 2.0, 1))  # starts on a fresh line
    lines = results.results_path(tmp_path).read_text().splitlines()
    assert lines[1] == '{"broken": tr' and json.loads(lines[2])["members"] == ["b"]
    assert [r["members"] for r in results.load(tmp_path)] == [["a"], ["b"]]  # nothing lost, nothing glued
    assert "skipped 1 line(s) that are not probe records (torn or edited): [2]" in caplog.text


def test_a_failed_append_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    import errno
    import os

    results.append(tmp_path, record(["a"], "d", 1.0, 1))
    before = results.results_path(tmp_path).read_bytes()
    real_write, calls = os.write, []

    def full_disk(fd, data):  # the first block lands, the second finds the disk full
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(TimecatError, match="no space left on the device while writing a record"):
        results.append(tmp_path, {**record(["b"], "d", 2.0, 1), "padding": "x" * 200_000})
    monkeypatch.undo()
    assert results.results_path(tmp_path).read_bytes() == before  # cut back: no torn line
    results.append(tmp_path, record(["c"], "d", 3.0, 1))
    assert [r["members"] for r in results.load(tmp_path)] == [["a"], ["c"]]


def test_table3_layout_with_mean_and_std():
    records = [
        record(["r0"], "fmnist", 90.0, 1000),
        record(["r0"], "digits", 95.0, 1000),
        record(["r1", "r2"], "fmnist", 91.0, 500),
        record(["r3", "r4"], "fmnist", 93.0, 500),  # a second Cat2 subset
        record(["r1", "r2"], "digits", 97.0, 500),
        record(["r0"], "fmnist", 88.0, 1000),  # a rerun replaces the older record
    ]
    data = report.table(records)
    assert data["datasets"] == ["digits", "fmnist"]
    cat1, cat2 = data["rows"]
    assert (cat1["method"], cat1["steps_per_member"], cat1["total_steps"]) == ("Cat1", 1000, 1000)
    assert cat1["fmnist"]["mean"] == 88.0
    assert (cat2["method"], cat2["total_steps"]) == ("Cat2", 1000)
    assert cat2["fmnist"] == {"mean": 92.0, "std": pytest.approx(2**0.5), "count": 2, "ci95": None}  # ddof=1
    text = report.format_table(data)
    assert "92.00 ± 1.41 (n=2)" in text and text.splitlines()[0].split() == [
        "method",
        "steps/member",
        "total",
        "digits",
        "fmnist",
    ]


def test_report_refuses_no_records_and_plots_png(tmp_path):
    with pytest.raises(TimecatError, match="no logreg probe records"):
        report.table([record(["a"], "d", 1.0, 1, protocol="other")])
    data = report.table([record(["a"], "d", 80.0, 4), record(["b", "c"], "d", 85.0, 2)])
    out = report.plot(data, tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_patterns_select_by_field_glob_number_and_path(tmp_path):
    rows = [
        {**record(["run0"], "digits", 91.0, 1000), "backend": "torch", "chosen": {"C": 0.1}},
        {**record(["run0", "run3"], "digits", 97.5, 500), "backend": "sklearn", "chosen": {"C": 1.0}},
        {**record(["run1", "run3"], "fashion-mnist", 88.0, 500), "backend": "torch", "chosen": {"C": 0.01}},
    ]
    pick = lambda *patterns: [r["top1"] for r in results.select(rows, list(patterns))]  # noqa: E731
    assert pick() == [91.0, 97.5, 88.0]
    assert pick("dataset=digits") == [91.0, 97.5]
    assert pick("members=*run3*", "backend=torch") == [88.0]
    assert pick("top1>=91", "n_members<2") == [91.0]
    assert pick("chosen.C>0.05") == [91.0, 97.5]
    assert pick("fashion*run1") == [88.0]  # a bare glob over dataset/protocol/backend/members
    assert pick("dataset=cifar*") == []
    with pytest.raises(TimecatError, match=r"no record has a field 'acc'; fields: \[.*'top1'"):
        pick("acc>1")
    with pytest.raises(TimecatError, match="dataset is 'digits', not a number"):
        pick("dataset>1")


def test_table2_is_parameter_matched_and_id_vs_ood_is_plotted(tmp_path):
    records = [
        record(["r0"], "fmnist", 75.6, 1000),
        record(["w0"], "fmnist", 77.6, 1000, arch="resnet50w2", params=93_900_000),
        record(["r1", "r2", "r3", "r4"], "fmnist", 78.2, 250),
        record(["r0"], "digits", 37.9, 1000),
        record(["w0"], "digits", 37.3, 1000, arch="resnet50w2", params=93_900_000),
        record(["r1", "r2", "r3", "r4"], "digits", 46.6, 250),
    ]
    data = report.table(records, layout="table2")
    assert [(r["method"], r["params"]) for r in data["rows"]] == [
        ("resnet50", 23_500_000),
        ("Cat4 x resnet50", 94_000_000),
        ("resnet50w2", 93_900_000),
    ]
    text = report.format_table(data)
    assert text.splitlines()[0].split() == ["method", "params", "digits", "fmnist"] and "94.0M" in text
    out = report.plot_id_vs_ood(data, tmp_path / "id.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(TimecatError, match=r"unknown layout 'table9'; choose one of \['table3', 'table2'\]"):
        report.table(records, layout="table9")


def test_cells_show_one_probes_interval_or_mean_and_sample_std():
    one = {**record(["r0"], "fmnist", 89.76, 1000), "top1_ci95": [89.1, 90.4]}
    data = report.table([one, record(["r1", "r2"], "fmnist", 91.0, 500), record(["r3", "r4"], "fmnist", 93.0, 500)])
    text = report.format_table(data)
    assert "89.76 [89.10, 90.40]" in text and "92.00 ± 1.41 (n=2)" in text
    assert "95% bootstrap interval over eval rows" in text and "sample std" in text
    assert report._error(data["rows"][0]["fmnist"]) == pytest.approx((0.66, 0.64))  # the plot's bars: the interval
    assert report._error(data["rows"][1]["fmnist"]) == pytest.approx((2**0.5, 2**0.5))


def test_different_eval_splits_pretraining_data_or_architectures_never_share_a_cell():
    records = [
        record(["r0"], "digits", 90.0, 1000),
        {**record(["r1"], "digits", 70.0, 1000), "eval_split": "val"},  # another eval split: another column
        record(["r2"], "digits", 60.0, 1000, arch="small-resnet"),  # another architecture: another row
        {
            **record(["r3"], "digits", 50.0, 1000),
            "member_provenance": {"r3": {"steps": 1000, "arch": "resnet50", "pretrain_dataset": "cifar10"}},
        },
    ]
    data = report.table(records)
    assert data["datasets"] == ["digits/test", "digits/val"]
    cells = {(r["arch"], r["pretrained_on"]): {d: r[d]["mean"] for d in data["datasets"]} for r in data["rows"]}
    assert cells == {
        ("resnet50", "fmnist"): {"digits/test": 90.0, "digits/val": 70.0},
        ("resnet50", "cifar10"): {"digits/test": 50.0, "digits/val": None},
        ("small-resnet", "fmnist"): {"digits/test": 60.0, "digits/val": None},
    }
    header = report.format_table(data).splitlines()[0].split()
    assert header[:5] == ["method", "steps/member", "total", "arch", "pretrained"]


def test_tc_cells_keep_views_apart_and_the_papers_selection_is_labelled_optimistic(tmp_path):
    views = {**record(["r0"], "c10", 80.0, 10, protocol="tc"), "augmented": True, "top1_eval_selected": 82.0}
    plain = {**record(["r0"], "c10", 75.0, 10, protocol="tc"), "augmented": False, "top1_eval_selected": 77.0}
    data = report.table([views, plain], protocol="tc")
    assert [(r["method"], r["c10"]["mean"]) for r in data["rows"]] == [("Cat1", 80.0), ("Cat1 (no views)", 75.0)]
    selected = report.table([views, plain], protocol="tc", metric="top1_eval_selected")
    assert [r["c10"]["mean"] for r in selected["rows"]] == [82.0, 77.0]
    assert "OPTIMISTIC" in report.format_table(selected) and "OPTIMISTIC" not in report.format_table(data)
    with pytest.raises(TimecatError, match="top1_eval_selected exists for protocol tc only"):
        report.table([views], metric="top1_eval_selected")
    results.append(tmp_path, views)
    from click.testing import CliRunner

    import cli

    out = CliRunner().invoke(
        cli.main, ["report", "--results", str(tmp_path), "--protocol", "tc", "--metric", "top1_eval_selected"]
    )
    assert out.exit_code == 0 and "82.00" in out.output and "OPTIMISTIC" in out.output


def test_other_train_splits_or_eval_rows_get_their_own_columns():
    base = record(["r0"], "digits", 90.0, 1000)
    records = [
        {**base, "eval_rows": {"fingerprint": "aaaa1111"}},
        {**record(["r1"], "digits", 80.0, 1000), "eval_rows": {"fingerprint": "bbbb2222"}},  # digits prepared again
        {**record(["r2"], "digits", 70.0, 1000), "train_split": "val", "eval_rows": {"fingerprint": "aaaa1111"}},
    ]
    data = report.table(records)
    assert len(data["datasets"]) == 3 and len(data["rows"]) == 1
    cells = {name: data["rows"][0][name]["mean"] for name in data["datasets"]}
    assert sorted(cells.values()) == [70.0, 80.0, 90.0]  # three cells, never a mean of two
    assert any("fit on val" in name for name in cells) and any("rows bbbb2222" in name for name in cells)
    old = [{k: v for k, v in r.items() if k != "top1_eval_selected"} for r in records]
    with pytest.raises(TimecatError, match="no tc record carries top1_eval_selected"):
        report.table([{**r, "protocol": "tc"} for r in old], protocol="tc", metric="top1_eval_selected")
