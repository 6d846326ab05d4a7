"""What a user sees when something is missing or mistyped, and the lines that say how a job went: each names the
next command or the fix."""

import json
import re

import pytest
from click.testing import CliRunner

import cli
from pipeline.core.errors import TimecatError
from pipeline.probe import results


def run(*args, env=None):
    return CliRunner().invoke(cli.main, [str(a) for a in args], env=env, catch_exceptions=False)


@pytest.fixture
def workspace(pipeline_run, tmp_path):
    """The shared run's cache, and a runs folder that also holds `tiny`: trained, never extracted."""
    runs = tmp_path / "runs"
    runs.mkdir()
    for m in pipeline_run["members"]:
        (runs / m).symlink_to(pipeline_run["runs"] / m)
    (runs / "tiny").mkdir()
    (runs / "tiny/checkpoint.pt").write_bytes(b"")
    where = ["--cache", pipeline_run["cache"], "--runs", runs, "--results", tmp_path / "results"]
    return {"where": where, "runs": runs, "results": tmp_path / "results", "cache": pipeline_run["cache"]}


def test_missing_members_and_datasets_name_the_extract_command(workspace):
    where = workspace["where"]
    result = run("probe", "--members", "run0,tiny", "--dataset", "fashion-mnist", *where)
    assert result.exit_code == 1
    assert "member(s) ['tiny'] are trained" in result.output and "but not cached for fashion-mnist" in result.output
    assert re.search(
        r"`\S*timecat extract --members tiny --dataset fashion-mnist --runs \S+ --cache \S+`", result.output
    )
    result = run("probe", "--members", "run0,rnu1", "--dataset", "fashion-mnist", *where)
    assert result.exit_code == 1 and "unknown member 'rnu1' (did you mean 'run1'?)" in result.output
    result = run("probe", "--members", "run0", "--dataset", "digit", *where)
    assert result.exit_code == 1 and "dataset 'digit' is not in the cache" in result.output
    assert "(did you mean 'digits'?)" in result.output
    result = run("probe", "--members", "run0", "--dataset", "cifar10", *where)
    assert result.exit_code == 1 and "timecat extract --members run0 --dataset cifar10" in result.output
    assert not workspace["results"].exists()  # refused before anything was written
    # A member list typed with spaces reaches timecat as two arguments.
    result = run("probe", "--members", "run0,", "run1", "--dataset", "digits", *where)
    assert result.exit_code == 2 and "'run0,' ends with a comma" in result.output and "quote it" in result.output


def test_id_prefixes_are_accepted_unless_ambiguous(tmp_path):
    records = [
        {"id": "abcd1111", "members": ["a"], "dataset": "d"},
        {"id": "abcd2222", "members": ["b"], "dataset": "d"},
    ]
    assert results.find(records, "abcd2", tmp_path)["id"] == "abcd2222"
    assert results.find(records, "abcd1111", tmp_path)["id"] == "abcd1111"
    with pytest.raises(TimecatError, match=r"id prefix 'abcd' is ambiguous: 2 records \(abcd1111, abcd2222\)"):
        results.find(records, "abcd", tmp_path)
    with pytest.raises(TimecatError, match="a prefix needs at least 4 characters"):
        results.find(records, "abc", tmp_path)


def test_progress_lines_say_where_fits_ended_and_each_probe_reports_once(workspace):
    where = workspace["where"]
    result = run("probe", "--cat", 2, "--from", "run0,run1,run2", "--dataset", "digits", *where)
    assert result.exit_code == 0, result.output
    log = result.stderr
    assert "running=" not in log
    assert re.search(r"choose C \(15 together\): all 15 fits converged at iteration [\d,]+ of [\d,]+", log), log
    assert re.search(r"refit \(3\): all 3 fits converged at iteration [\d,]+ of [\d,]+", log), log
    for i, pair in enumerate(("run0,run1", "run0,run2", "run1,run2"), 1):
        assert re.search(rf"INFO {i}/3 probe {pair} on digits: top-1 [\d.]+% \[95% CI [\d.]+, [\d.]+\] \(C=", log)
    assert "probe 3 Cat2 subsets of run0,run1,run2 on digits" in log and "Cat2 over 3 subsets" in result.stdout
    result = run("probe", "--members", "run0", "--dataset", "digits", *where, "-v")  # -v after the command
    assert result.exit_code == 0 and "DEBUG held-out top-1 of run0: C=0.0001: " in result.stderr
    assert re.search(r"INFO probe run0 on digits: top-1", result.stderr)


def test_small_things_read_right(workspace):
    result = run("cache", "ls", "--cache", workspace["cache"])
    assert "digits/train run0: 1,347 x 128 float32" in result.output
    text = " ".join(run("probe", "--help").output.split())
    assert "stratified sample), or --search-per-class x classes if more." in text


def test_diversity_reuses_the_same_probe_and_prints_every_interval(workspace):
    args = ["diversity", "--members", "run0,run1", "--dataset", "digits", "--cache", workspace["cache"]]
    args += ["--results", workspace["results"]]
    first = run(*args)
    assert first.exit_code == 0, first.output
    count = len(results.load(workspace["results"]))
    assert count == 3 and "(reused)" not in first.output
    second = run(*args, "--json")
    assert second.exit_code == 0, second.output
    summary = json.loads(second.stdout)
    assert len(results.load(workspace["results"])) == count  # nothing refitted
    assert sorted(summary["reused"]) == sorted(summary["probe_ids"].values())
    text = run(*args).output
    assert text.count("(reused)") == 3
    assert re.search(r"probe top-1 run0\+run1: [\d.]+% \[95% CI [\d.]+, [\d.]+\], record \w{12} \(reused\)", text)
    # Another CKA row sample: the probes are the same ones, still reused.
    other = run(*args, "--seed", 1)
    assert other.exit_code == 0 and len(results.load(workspace["results"])) == count
