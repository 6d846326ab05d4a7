"""The results store: append-only and whole under concurrency, torn or malformed lines explained, patterns."""

import json
import multiprocessing

import pytest
from conftest import probe_record

from pipeline.core.errors import TimecatError
from pipeline.probe import results


def _append_many(args):
    root, worker, size = args
    for i in range(60):
        # Records larger than a pipe buffer and than one write block: written in several write() calls.
        big = {**probe_record([f"w{worker}"], "d", float(i), 10), "padding": f"{worker}" * size}
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
    expected = r"run `timecat probe` first, or name another folder \(--results PATH, or --workdir"
    with pytest.raises(TimecatError, match=expected):
        results.load(tmp_path)
    results.append(tmp_path, probe_record(["a"], "d", 1.0, 1))
    with open(results.results_path(tmp_path), "a") as f:
        f.write('{"broken": tr')  # a crash mid-append: a torn last line, no newline
    results.append(tmp_path, probe_record(["b"], "d", 2.0, 1))  # starts on a fresh line
    lines = results.results_path(tmp_path).read_text().splitlines()
    assert lines[1] == '{"broken": tr' and json.loads(lines[2])["members"] == ["b"]
    assert [r["members"] for r in results.load(tmp_path)] == [["a"], ["b"]]  # nothing lost, nothing glued
    assert "skipped 1 line(s) that are not probe records (torn or edited): [2]" in caplog.text


def test_a_failed_append_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    import errno
    import os

    results.append(tmp_path, probe_record(["a"], "d", 1.0, 1))
    before = results.results_path(tmp_path).read_bytes()
    real_write, calls = os.write, []

    def full_disk(fd, data):  # the first block lands, the second finds the disk full
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(TimecatError, match="no space left on the device while writing a record"):
        results.append(tmp_path, {**probe_record(["b"], "d", 2.0, 1), "padding": "x" * 200_000})
    monkeypatch.undo()
    assert results.results_path(tmp_path).read_bytes() == before  # cut back: no torn line
    results.append(tmp_path, probe_record(["c"], "d", 3.0, 1))
    assert [r["members"] for r in results.load(tmp_path)] == [["a"], ["c"]]


def test_patterns_select_by_field_glob_number_and_path(tmp_path):
    rows = [
        {**probe_record(["run0"], "digits", 91.0, 1000), "backend": "torch", "chosen": {"C": 0.1}},
        {**probe_record(["run0", "run3"], "digits", 97.5, 500), "backend": "sklearn", "chosen": {"C": 1.0}},
        {**probe_record(["run1", "run3"], "fashion-mnist", 88.0, 500), "backend": "torch", "chosen": {"C": 0.01}},
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
    # Shell-safe comparisons, and the fields the members' provenance implies.
    assert pick("top1=ge:91", "n_members=lt:2") == [91.0]
    assert pick("chosen.C=gt:0.05", "chosen.C=le:0.1") == [91.0]
    assert pick("total_steps=1000") == [91.0, 97.5, 88.0] and pick("steps_per_member=500") == [97.5, 88.0]
    assert pick("arch=resnet50", "pretrained_on=fmnist", "total_steps=gt:999") == [91.0, 97.5, 88.0]
    with pytest.raises(TimecatError, match=r"field 'datset' \(did you mean 'dataset'\?\)"):
        pick("datset=digits")
    # What an unquoted top1>99 leaves after the shell's redirect: refused, with the fix.
    with pytest.raises(TimecatError, match=r"'top1' is a field name without a condition.*top1=gt:X"):
        pick("top1")
