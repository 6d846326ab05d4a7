"""One workspace (--workdir / TIMECAT_WORKDIR), errors that point at the real mistake, status by recipe."""

import json
import shlex
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import parses, zombie_children

import cli
from pipeline.train import plan as plans


def run(*args, env=None):
    return CliRunner().invoke(cli.main, [str(a) for a in args], env={"TIMECAT_WORKDIR": None, **(env or {})})


@pytest.fixture()
def workdir(pipeline_run, tmp_path):
    """A workspace over the shared run: its data, runs and cache linked in (read only), results of its own."""
    work = tmp_path / "work"
    work.mkdir()
    for name, target in (("data", pipeline_run["data"]), ("runs", pipeline_run["runs"])):
        (work / name).symlink_to(target)
    (work / "features.zarr").symlink_to(pipeline_run["cache"])
    return work


def test_every_location_follows_the_workdir_and_a_specific_flag_still_wins(workdir, tmp_path):
    probed = run("probe", "--workdir", workdir, "--members", "run0,run1", "--dataset", "digits", "--json")
    assert probed.exit_code == 0, probed.output
    assert (workdir / "results/probes.jsonl").is_file()
    record_id = json.loads(probed.stdout)["id"]
    listed = run("results", "--json", env={"TIMECAT_WORKDIR": str(workdir)})  # the variable, as the flag
    assert [r["id"] for r in json.loads(listed.stdout)] == [record_id]
    assert "run0" in run("cache", "ls", "--workdir", workdir).output
    reported = run("report", "--workdir", workdir)
    assert reported.exit_code == 0 and (workdir / "results/catn.png").is_file(), reported.output
    # A location's own flag beats the workspace: these results are elsewhere, and empty.
    other = tmp_path / "other"
    result = run("results", "--workdir", workdir, "--results", other)
    assert result.exit_code == 1 and str(other / "probes.jsonl") in result.output
    result = run("results", "--workdir", workdir, env={"TIMECAT_RESULTS": str(other)})
    assert result.exit_code == 1 and str(other / "probes.jsonl") in result.output


def test_not_found_errors_name_the_absolute_path_and_the_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    empty = Path("empty")
    where = tmp_path / "empty"
    cases = {
        ("results", "--workdir", empty): (f"{where}/results/probes.jsonl", "--results PATH, or --workdir DIR"),
        ("probe", "--workdir", empty, "--members", "a", "--dataset", "digits"): (
            f"{where}/features.zarr",
            "--cache PATH, or --workdir DIR",
        ),
        ("extract", "--workdir", empty, "--members", "a", "--dataset", "digits"): (
            f"{where}/data",
            "--data-root PATH, or --workdir DIR",
        ),
        ("cache", "verify", "--workdir", empty): (f"{where}/features.zarr", "TIMECAT_WORKDIR"),
    }
    for args, expected in cases.items():
        result = run(*args)
        assert result.exit_code == 1, (args, result.output)
        for text in expected:
            assert text in result.output, (args, result.output)
    assert not where.exists()  # nothing made while looking


def test_an_unknown_member_names_the_runs_folder_and_the_flag(pipeline_run, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    (work / "data").symlink_to(pipeline_run["data"])
    result = run("extract", "--workdir", work, "--members", "nope", "--dataset", "digits")
    assert result.exit_code == 1 and f"no {work}/runs/nope/checkpoint.pt" in result.output
    assert "--runs PATH, or --workdir DIR for DIR/runs" in result.output


def test_cache_ls_and_verify_take_the_cache_either_way(pipeline_run):
    store = pipeline_run["cache"]
    for sub in ("ls", "verify"):
        as_argument, as_flag = run("cache", sub, store), run("cache", sub, "--cache", store)
        assert as_argument.exit_code == 0 and as_argument.output == as_flag.output, (sub, as_argument.output)
        clash = run("cache", sub, store, "--cache", store + ".other")
        assert clash.exit_code == 2 and "name different caches" in clash.output


def test_a_typo_in_the_dataset_or_split_is_named_before_the_members(workdir):
    result = run("probe", "--workdir", workdir, "--members", "run0", "--dataset", "digitz")
    assert (
        result.exit_code == 1
        and "dataset 'digitz' is not in the cache (did you mean 'digits'?); cached: ['digits'" in result.output
    )
    result = run("probe", "--workdir", workdir, "--members", "run0", "--dataset", "digits", "--eval-split", "tset")
    assert result.exit_code == 1 and "split 'tset' of digits is not cached; cached: ['test', 'train']" in result.output


def test_duplicate_members_and_mistyped_kinds_get_the_real_reason(workdir, tmp_path):
    result = run("extract", "--workdir", workdir, "--members", "run0,run0", "--dataset", "digits")
    assert result.exit_code == 2 and "an item is named twice in 'run0,run0'" in result.output
    result = run("prepare", "fashionmnist", "--workdir", tmp_path / "p")
    assert result.exit_code == 1 and "did you mean 'fashion-mnist'? `timecat prepare fashion-mnist`" in result.output
    result = run(
        "pretrain", "--workdir", workdir, "--name", "x", "--dataset", "fashionmnist", "--seed", "0", "--steps", "1"
    )
    assert result.exit_code == 1 and "`timecat prepare fashion-mnist` (did you mean --dataset fashion-mnist?)" in (
        result.output
    )


def test_pretrain_on_an_unprepared_dataset_leaves_no_run_folder(tmp_path):
    work = tmp_path / "w"
    result = run("pretrain", "--workdir", work, "--name", "a", "--dataset", "digits", "--seed", "0", "--steps", "1")
    assert result.exit_code == 1 and "is not prepared under" in result.output
    assert not (work / "runs").exists()


def test_status_compares_recipes_not_names(pipeline_run, tmp_path):
    """The shared run's run0 is a 12-step small-resnet of seed 0: a plan's resnet50 run0 of seed 2 is not it."""
    paper = plans.save(plans.make_plan("fashion-mnist", cat=2, total_steps=8, arch="resnet50"), tmp_path / "p.json")
    rows = json.loads(run("status", paper, "--runs", pipeline_run["runs"], "--json").stdout)
    run0 = next(r for r in rows if r["member"] == "run0")
    assert run0["state"] == "other" and run0["differs"]["arch"] == ["small-resnet", "resnet50"]
    assert run0["differs"]["seed"] == [0, 2] and run0["differs"]["steps"] == [12, 4]
    text = run("status", paper, "--runs", pipeline_run["runs"]).output
    assert "another recipe under this name: seed 0 (plan 2)" in text
    same = plans.make_plan("fashion-mnist", cat=1, total_steps=12, arch="small-resnet", seeds=(0,), batch_size=64)
    rows = json.loads(
        run("status", plans.save(same, tmp_path / "same.json"), "--runs", pipeline_run["runs"], "--json").stdout
    )
    assert [(r["member"], r["state"], r["differs"]) for r in rows] == [("run0", "done", {})]


def test_plan_picks_the_architecture_by_dataset_or_asks_for_it(tmp_path):
    assert {m.arch for m in plans.make_plan("fashion-mnist", cat=2, total_steps=8).members} == {"small-resnet"}
    assert {m.arch for m in plans.make_plan("imagenet", cat=2, total_steps=8).members} == {"resnet50"}
    result = run("plan", "--dataset", "pets", "--cat", "2", "--total-steps", "8", "--out", tmp_path / "p.json")
    assert result.exit_code == 1 and "--arch is needed for dataset 'pets'" in result.output
    assert not (tmp_path / "p.json").exists()


def test_the_demo_ends_with_the_next_commands_for_its_workspace(monkeypatch, tmp_path):
    import sys

    from pipeline.configs import DemoConfig
    from pipeline.experiments.demo import next_commands, plan

    config = DemoConfig(workdir=Path("my demo"))
    # After `make demo` timecat is in the venv, not on PATH: the commands name the script as it is reached here.
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "timecat").write_text("#!/bin/sh\n")
    (venv / "timecat").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(venv / "python"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    commands = next_commands(config, plan(config))
    assert commands[0] == "venv/bin/timecat results --workdir 'my demo'"
    # On PATH (an activated venv): plain timecat.
    monkeypatch.setenv("PATH", f"{venv}:/usr/bin:/bin")
    commands = next_commands(config, plan(config))
    assert commands[0] == "timecat results --workdir 'my demo'"
    assert "timecat diversity --workdir 'my demo' --members run3,run4,run5,run6 --dataset fashion-mnist" in commands
    assert config.data == Path("my demo/data") and replace(config, workdir=Path("w")).data == Path("w/data")
    for command in commands:  # each one parses as the command line it claims to be
        parses(shlex.split(command)[1:])


def test_no_zombie_writer_processes_after_prepare(tmp_path):
    from conftest import make_fashion_root

    from pipeline.configs import PrepareConfig
    from pipeline.data.prepare import prepare

    prepare(PrepareConfig("fashion-mnist", make_fashion_root(tmp_path / "data"), num_workers=2))
    assert zombie_children() == []
