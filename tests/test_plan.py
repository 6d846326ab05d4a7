"""The Time-Cat planner, training from a plan, and the status of a plan's members."""

import json

import pytest
from click.testing import CliRunner
from conftest import make_fashion_root

import cli
from pipeline.core.errors import TimecatError
from pipeline.train import plan as plans


def test_catn_splits_the_budget_with_the_papers_seeds():
    made = plans.make_plan("imagenet", cat=4, total_steps=400_000)
    assert [(m.name, m.seed, m.steps, m.group) for m in made.members] == [
        ("run0", 2, 100_000, "Cat4"),
        ("run1", 550, 100_000, "Cat4"),
        ("run2", 23, 100_000, "Cat4"),
        ("run3", 477, 100_000, "Cat4"),
    ]
    assert [m.seed for m in plans.make_plan("d", cat=7, total_steps=7, arch="resnet50").members] == [
        2,
        550,
        23,
        477,
        8529,
        0,
        1,
    ]
    with pytest.raises(TimecatError, match="does not split into 3 equal members; use 399999 or 400002"):
        plans.make_plan("d", cat=3, total_steps=400_000, arch="resnet50")
    with pytest.raises(TimecatError, match="give --cat N and --total-steps S, or --preset"):
        plans.make_plan("d", cat=3)


def test_presets_are_the_papers_tables():
    table3 = plans.make_plan("imagenet", preset="paper-table3").members
    budget = {}
    for m in table3:
        budget.setdefault(m.group, []).append(m.steps)
    assert budget == {"Cat1": [450_000], "Cat2": [200_000] * 2, "Cat4": [100_000] * 4, "Cat5": [80_000] * 5}
    table2 = plans.make_plan("imagenet", preset="paper-table2").members
    assert [(m.group, m.arch) for m in table2] == [("resnet50", "resnet50"), ("resnet50w2", "resnet50w2")] + [
        ("Cat4", "resnet50")
    ] * 4
    presets = r"\['paper-table2', 'paper-table3'\]"
    with pytest.raises(TimecatError, match=rf"unknown preset 'table9'; choose one of {presets}"):
        plans.make_plan("d", preset="table9")


def test_plan_files_round_trip_and_bad_ones_are_named(tmp_path):
    made = plans.make_plan("imagenet", preset="paper-table3", batch_size=1024)
    assert plans.load(plans.save(made, tmp_path / "p.json")) == made
    (tmp_path / "bad.json").write_text(json.dumps({"dataset": "d", "members": [{"name": "a"}]}))
    with pytest.raises(TimecatError, match="bad.json: not a timecat plan"):
        plans.load(tmp_path / "bad.json")
    with pytest.raises(TimecatError, match=r"no member 'run9' in the plan; its members: \['cat1-run0'"):
        made.member("run9")
    # A hand-edited plan cannot smuggle in a member name that the command line would refuse.
    edited = json.loads((tmp_path / "p.json").read_text())
    edited["members"][0]["name"] = "../escape"
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    with pytest.raises(TimecatError, match=r"edited.json: invalid member name '../escape': use 1 to 128"):
        plans.load(tmp_path / "edited.json")


def test_plan_then_pretrain_one_member_then_status(tmp_path):
    data = make_fashion_root(tmp_path / "data")
    env = {"TIMECAT_DATA": str(data), "TIMECAT_RUNS": str(tmp_path / "runs")}
    runner = CliRunner()
    assert runner.invoke(cli.main, ["prepare", "fashion-mnist"], env=env).exit_code == 0
    args = ["plan", "--dataset", "fashion-mnist", "--cat", "2", "--total-steps", "8", "--arch", "small-resnet"]
    result = runner.invoke(cli.main, [*args, "--batch-size", "32", "--out", str(tmp_path / "p.json")], env=env)
    assert result.exit_code == 0 and "2 members, 8 steps in all" in result.output
    result = runner.invoke(cli.main, ["pretrain", "--plan", str(tmp_path / "p.json"), "--member", "run1"], env=env)
    assert result.exit_code == 0 and "run1: 4 steps" in result.output, result.output
    result = runner.invoke(cli.main, ["status", str(tmp_path / "p.json"), "--json"], env=env)
    rows = {r["member"]: (r["state"], r["step"]) for r in json.loads(result.stdout)}
    assert rows == {"run0": ("missing", 0), "run1": ("done", 4)}
    result = runner.invoke(cli.main, ["pretrain", "--name", "run5"], env=env)
    assert result.exit_code == 2 and "missing --dataset, --seed, --steps (or give --plan FILE)" in result.output


def test_options_the_plan_decides_are_refused_not_silently_overridden(tmp_path):
    made = plans.make_plan("fashion-mnist", cat=2, total_steps=8, arch="small-resnet", batch_size=32)
    path = str(plans.save(made, tmp_path / "p.json"))
    runner = CliRunner()
    env = {"TIMECAT_DATA": str(tmp_path / "nodata"), "TIMECAT_RUNS": str(tmp_path / "runs")}

    def pretrain(*args):
        return runner.invoke(cli.main, ["pretrain", *args], env=env)

    result = pretrain("--plan", path, "--batch-size", "256")
    assert result.exit_code == 2 and "--batch-size 256 conflicts with the plan's batch_size 32" in result.output
    result = pretrain("--plan", path, "--dataset", "cifar10")
    assert (
        result.exit_code == 2 and "--dataset cifar10 conflicts with the plan's dataset fashion-mnist" in result.output
    )
    for extra in (["--seed", "5"], ["--steps", "9"], ["--name", "x"], ["--arch", "resnet50"], ["--width", "2"]):
        result = pretrain("--plan", path, "--member", "run0", *extra)
        assert result.exit_code == 2 and f"{extra[0]} cannot go with --plan" in result.output, extra
        assert "use --member run0" in result.output
    result = pretrain("--member", "run0", "--name", "a", "--dataset", "d", "--seed", "0", "--steps", "1")
    assert result.exit_code == 2 and "--member run0 picks a member of --plan FILE" in result.output
    # Typed values equal to the plan's are no conflict: it goes on (to the missing data, here).
    result = pretrain("--plan", path, "--member", "run0", "--batch-size", "32", "--dataset", "fashion-mnist")
    assert result.exit_code == 1 and "is not prepared" in result.output
    assert not (tmp_path / "runs").exists()  # refused before anything is written
