"""Issue 24's results-side cases: k-NN at small temperatures, name checks, damaged or foreign results files,
misplaced workspace folders, results filters, report and compare errors.

Each case asserts the message a user sees (one ``Error:`` line, no traceback) and, where something was written
before, that nothing already written is lost.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import digits_cache, one_error, run, tree

from pipeline.configs import ProbeConfig
from pipeline.core.errors import TimecatError
from pipeline.probe import results
from pipeline.probe import run as probe_stage

# -- item 2: k-NN votes at small temperatures ----------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    path = tmp_path_factory.mktemp("digits") / "c.zarr"
    return path, digits_cache(path)


def test_knn_at_a_small_temperature_scores_like_the_default_and_names_its_k(digits, tmp_path):
    store, names = digits
    top1 = {}
    for temperature in ("0.07", "0.001"):
        args = ["probe", "--members", ",".join(names), "--dataset", "digits", "--protocol", "knn"]
        args += ["--temperature", temperature, "--k-grid", "10,200", "--cache", store, "--results", tmp_path / "r"]
        result = run(*args)
        assert result.exit_code == 0, result.output
        record = results.load(tmp_path / "r")[-1]
        k = record["chosen"]["k"]
        assert f"(knn, k={k}, temperature={temperature}, 64 dims" in result.output
        assert all(t["holdout_top1"] > 90 for t in record["search"]), record["search"]  # k = 200 is not chance
        top1[temperature] = record["top1"]
    # exp(s / 0.001) overflowed to inf and tied every class: k = 200 scored chance, the probe 91% (98.5% at 0.07).
    assert math.isfinite(top1["0.001"]) and abs(top1["0.001"] - top1["0.07"]) < 2.0, top1


# -- item 7: --view-splits is checked like every other name ----------------------------------


def test_a_view_split_typo_is_refused_before_anything_is_written(tmp_path):
    store = tmp_path / "features.zarr"  # the check comes first: no data, runs or cache needed
    args = ["extract", "--members", "run0", "--dataset", "digits", "--views", 2, "--cache", store]
    args += ["--data-root", tmp_path / "data", "--runs", tmp_path / "runs"]
    one_error(run(*args, "--view-splits", "trian"), "unknown view split 'trian'", "did you mean 'train'", "test")
    one_error(run(*args, "--splits", "test"), "--views 2", "--view-splits train", "--splits test")
    assert not list(tmp_path.iterdir())


# -- item 17: foreign or unreadable probes.jsonl, misplaced workspace folders ---------------------


@pytest.fixture(scope="module")
def two_records(digits, tmp_path_factory):
    """A results folder with a logreg and a knn record of digits (predictions, a head): what compare needs."""
    store, names = digits
    folder = tmp_path_factory.mktemp("results")
    quick = (["--c-grid", 1, "--refine", 1], ["--protocol", "knn"])  # one C: the search is not under test here
    for members, protocol in zip((names[:2], names[2:]), quick, strict=True):
        args = ["probe", "--members", ",".join(members), "--dataset", "digits", "--cache", store, *protocol]
        assert run(*args, "--results", folder).exit_code == 0
    return folder, [r["id"] for r in results.load(folder)]


def _edited(record: dict, **fields) -> str:
    return json.dumps({**record, **fields})


def _without(record: dict, field: str) -> str:
    return json.dumps({k: v for k, v in record.items() if k != field})


FOREIGN = {  # name: (line from the first record, what the warning says is wrong)
    "no protocol": (lambda r: _without(r, "protocol"), "no 'protocol'"),
    "no top1": (lambda r: _without(r, "top1"), "no 'top1'"),
    "string top1": (lambda r: _edited(r, top1="97.1"), "top1 is '97.1', not a finite number"),
    "1e400": (lambda r: _edited(r, top1=1.5).replace('"top1": 1.5', '"top1": 1e400'), "top1 is inf, not a finite"),
    "list top1": (lambda r: _edited(r, top1=[97.1]), "top1 is [97.1], not a finite number"),
    "members a string": (lambda r: _edited(r, members="m0"), "members is 'm0', not a list of member names"),
    "an array": (lambda r: "[1, 2]", "not a JSON object"),
    "null": (lambda r: "null", "not a JSON object"),
    "provenance not a dict": (lambda r: _edited(r, member_provenance={"m0": "x"}), "member_provenance is {'m0': 'x'}"),
    "nested wrong type": (
        lambda r: _edited(r, member_provenance={"m0": {"steps": "many"}}),
        "member_provenance is {'m0': {'steps': 'many'}}",
    ),
    "interval a string": (lambda r: _edited(r, top1_ci95="a"), "top1_ci95 is 'a', not [low, high]"),
}


@pytest.mark.parametrize("variant", FOREIGN)
def test_a_foreign_line_in_probes_jsonl_is_skipped_with_its_number_and_fault(two_records, tmp_path, caplog, variant):
    source, ids = two_records
    folder = shutil.copytree(source, tmp_path / "results")
    path = folder / "probes.jsonl"
    make, fault = FOREIGN[variant]
    with open(path, "a") as f:
        f.write(make(json.loads(path.read_text().splitlines()[0])) + "\n")
    before = path.read_bytes()
    listed = run("results", "--results", folder)
    assert listed.exit_code == 0, listed.output
    assert all(i in listed.output for i in ids)  # one bad line hides nothing else
    for command in (["report"], ["compare", *ids]):
        result = run(*command, "--results", folder)
        assert result.exit_code == 0, result.output
    assert f"skipped 1 line(s) that are not probe records (torn or edited): [3] (line 3: {fault}" in caplog.text
    assert path.read_bytes() == before  # skipped, never rewritten


def test_a_record_without_time_is_listed_with_a_question_mark(two_records, tmp_path):
    # id, time, top5 and wall_s are only shown: a hand-made record without them is still a record.
    folder = shutil.copytree(two_records[0], tmp_path / "results")
    path = folder / "probes.jsonl"
    record = json.loads(path.read_text().splitlines()[0])
    with open(path, "a") as f:
        f.write(json.dumps({k: v for k, v in record.items() if k not in ("id", "time", "top5", "wall_s")}) + "\n")
    listed = run("results", "--results", folder)
    assert listed.exit_code == 0, listed.output
    assert "?  ?  digits  logreg/batched" in listed.output and "top-5 ?  ? s" in listed.output


def test_an_unreadable_probes_jsonl_is_one_error_naming_the_file_and_the_fix(two_records, monkeypatch):
    folder = two_records[0]

    def denied(path):  # tests run as root, which chmod cannot lock out
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(results.files, "read_jsonl", denied)
    for command in (["results"], ["report"], ["compare", *two_records[1]]):
        one_error(run(*command, "--results", folder), "probes.jsonl", "Permission denied", "chmod u+r", "--results")


@pytest.mark.parametrize("protocol", ["logreg", "knn"])  # the batched solver's path and the single-process one
def test_a_results_path_that_is_a_file_is_refused_before_the_fit(digits, tmp_path, monkeypatch, protocol):
    store, names = digits
    taken = tmp_path / "results"
    taken.write_text("someone's notes\n")

    def fit_started(*args, **kwargs):
        raise AssertionError("the fit started before the results folder was checked")

    monkeypatch.setattr(probe_stage, "_fit_subsets", fit_started)
    monkeypatch.setitem(probe_stage.PATHS, "knn", fit_started)
    config = ProbeConfig("digits", names[:2], protocol=protocol)
    for root in (taken, taken / "sub"):
        with pytest.raises(TimecatError, match=r"results folder .* is not a folder \(.*results is a file\)"):
            probe_stage.probe(config, str(store), root)
    assert taken.read_text() == "someone's notes\n"


@pytest.mark.parametrize(
    ("command", "variable"),
    [
        (["prepare", "digits"], "TIMECAT_DATA"),
        (["pretrain", "--name", "run0", "--dataset", "digits", "--seed", 0, "--steps", 1], "TIMECAT_RUNS"),
        (["extract", "--members", "run0", "--dataset", "digits"], "TIMECAT_CACHE"),
        (["probe", "--members", "run0", "--dataset", "digits"], "TIMECAT_RESULTS"),
        (["results"], "TIMECAT_WORKDIR"),
    ],
)
def test_a_location_that_is_a_file_is_one_error_naming_where_it_came_from(tmp_path, monkeypatch, command, variable):
    monkeypatch.chdir(tmp_path)  # the other locations default to folders here, which stay unmade
    taken = tmp_path / "notes.txt"
    taken.write_text("someone's notes\n")
    one_error(run(*command, env={variable: str(taken)}), f"{taken} (from the environment variable {variable})")
    flag = {"TIMECAT_WORKDIR": "--workdir"}.get(variable)
    if flag:  # the same from the command line, and a path under the file
        one_error(run(*command, flag, taken / "sub"), f"(from {flag}) lies under the file {taken}")
    assert tree(tmp_path) == {"notes.txt": b"someone's notes\n"}


# -- item 18: messages that name the real cause -----------------------------------------------


def test_a_filter_blames_a_bound_that_is_not_a_number_and_refuses_an_unknown_nested_field(two_records):
    folder = two_records[0]
    one_error(run("results", "top1>=abc", "--results", folder), "the bound 'abc' is not a number", "top1=ge:90")
    one_error(run("report", "top1=ge:abc", "--results", folder), "the bound 'abc' is not a number")
    error = one_error(run("results", "chosen.nosuch>1", "--results", folder), "no record has a field 'chosen.nosuch'")
    assert "fields of chosen: chosen.C, chosen.converged" in error
    one_error(run("results", "chosen.CX>1", "--results", folder), "(did you mean 'chosen.C'?)")
    one_error(run("results", "chosen.C.x=1", "--results", folder), "fields of chosen.C: none (it is not a dict)")
    stepz = one_error(run("results", "member_provenance.m0.stepz=1", "--results", folder))
    assert "did you mean 'member_provenance.m0.steps'" in stepz
    # What still works: a known nested field, a derived one, a record's own value that is not a number.
    assert run("results", "chosen.C>0", "--results", folder).exit_code == 0
    assert run("results", "total_steps>1", "--results", folder).exit_code == 0
    one_error(run("results", "dataset>1", "--results", folder), "dataset is 'digits', not a number")


def test_report_into_a_read_only_results_folder_names_plot_before_any_work(two_records, tmp_path, monkeypatch):
    folder = shutil.copytree(two_records[0], tmp_path / "results")
    before = tree(folder)
    real_access = os.access

    def read_only(path, mode):  # as a read-only mount answers (root ignores a folder's mode bits)
        return False if Path(path) == folder and mode & os.W_OK else real_access(path, mode)

    monkeypatch.setattr(os, "access", read_only)
    one_error(run("report", "--results", folder), f"the plots' folder {folder} is not writable", "--plot PATH")
    assert tree(folder) == before
    elsewhere = tmp_path / "plots/catn.png"
    result = run("report", "--results", folder, "--plot", elsewhere)
    assert result.exit_code == 0, result.output
    assert "Cat2" in result.output and elsewhere.is_file() and tree(folder) == before


def _pickled(path: Path) -> None:
    np.savez(path, top5=np.array([{"a": 1}], dtype=object), labels=np.arange(3))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)  # a path would get .npy appended
    return buffer.getvalue()


FOREIGN_NPZ = {  # how the file is replaced: what the error says
    "object arrays": (_pickled, "not an .npz of plain arrays"),
    "a pickle": (lambda p: p.write_bytes(pickle.dumps({"top5": 1})), "not an .npz of plain arrays"),
    "an .npy": (lambda p: p.write_bytes(_npy(np.arange(4))), "a single .npy array, not an .npz"),
    "other keys": (lambda p: np.savez(p, x=np.arange(3)), "lacks ['top5', 'labels'] (it holds ['x'])"),
    "wrong shapes": (lambda p: np.savez(p, top5=np.arange(397), labels=np.arange(397)), "top5 int64 (397,)"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:100]), "is damaged"),
}


@pytest.mark.parametrize("variant", FOREIGN_NPZ)
def test_a_foreign_predictions_or_head_file_is_one_clean_error(two_records, tmp_path, variant):
    folder = shutil.copytree(two_records[0], tmp_path / "results")
    (a, b), (make, words) = two_records[1], FOREIGN_NPZ[variant]
    target = folder / f"predictions/{a}.npz"
    make(target)
    error = one_error(run("compare", a, b, "--results", folder), f"record {a}: its predictions file {target}", words)
    assert "allow_pickle" not in error and "unsafely" not in error  # numpy's advice is not for a results file
    assert "run the probe again" in error


def test_a_pickled_head_file_is_one_clean_error(two_records, tmp_path):
    folder = shutil.copytree(two_records[0], tmp_path / "results")
    record_id = two_records[1][0]
    (folder / f"heads/{record_id}.npz").write_bytes(pickle.dumps({"coef": 1}))
    with pytest.raises(TimecatError) as caught:
        results.head(folder, record_id)
    assert "its head file" in str(caught.value) and "not an .npz of plain arrays" in str(caught.value)
    assert "allow_pickle" not in str(caught.value)


# -- item 4, the probe's side: labels in the cache are checked against the classes -----------


@pytest.mark.parametrize(("split", "bad"), [("train", -1), ("test", 10)])
def test_a_cached_label_outside_the_classes_is_refused_by_the_probe(tmp_path, monkeypatch, split, bad):
    """A store written by hand or by an older timecat: a negative label was a traceback in the fit, and an eval
    label past the classes was silently scored as wrong."""
    import sklearn.datasets

    X, y = sklearn.datasets.load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))  # as digits_cache shuffles: rows 1400+ are test
    y[order[5 if split == "train" else 1405]] = bad
    monkeypatch.setattr(sklearn.datasets, "load_digits", lambda return_X_y: (X, y))
    path = tmp_path / "c.zarr"
    names = digits_cache(path, members=2)
    before = tree(path)
    result = run("probe", "--members", ",".join(names), "--dataset", "digits", "--cache", path, "--results", tmp_path)
    one_error(result, f"labels of digits/{split} hold {bad}", "outside its 10 classes", "timecat prepare")
    assert tree(path) == before and not (tmp_path / "probes.jsonl").exists()


# -- item 3, the probe's side: records are strict JSON ----------------------------------------


def test_a_non_finite_number_in_a_record_is_written_as_null(tmp_path):
    record = {"top1": 97.0, "chosen": {"objective": float("nan"), "path": [1.0, float("inf")]}, "members": ["a"]}
    results.append(tmp_path, record)

    def refuse(token):
        raise ValueError(f"bare {token} in probes.jsonl")

    line = (tmp_path / "probes.jsonl").read_text().splitlines()[-1]
    written = json.loads(line, parse_constant=refuse)  # a strict JSON reader
    assert written["chosen"] == {"objective": None, "path": [1.0, None]} and written["top1"] == 97.0
