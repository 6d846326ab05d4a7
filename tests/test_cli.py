"""Every command through click's CliRunner, as a user types it."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_fashion_root, make_imagefolder, zombie_children

import cli


def run(*args, env=None):
    result = CliRunner().invoke(cli.main, [str(a) for a in args], env=env, catch_exceptions=False)
    return result


def test_every_command_has_help_with_an_example():
    for name in cli.main.commands:
        result = run(name, "--help")
        assert result.exit_code == 0, name
        assert "Example: timecat" in result.output, f"{name} --help lacks an example"
    assert "Example: timecat demo" in run("--help").output


def test_prepare_pretrain_extract_probe_report(tmp_path):
    data = make_fashion_root(tmp_path / "data", n_train=320, n_test=80)
    env = {
        "TIMECAT_DATA": str(data),
        "TIMECAT_RUNS": str(tmp_path / "runs"),
        "TIMECAT_CACHE": str(tmp_path / "f.zarr"),
        "TIMECAT_RESULTS": str(tmp_path / "results"),
    }
    result = run("prepare", "fashion-mnist", env=env)
    assert result.exit_code == 0 and "fashion-mnist/train: 320 images, 10 classes" in result.output
    for name, seed in (("run0", 0), ("run1", 1)):
        args = ["pretrain", "--name", name, "--dataset", "fashion-mnist", "--seed", seed, "--steps", 6]
        result = run(*args, "--batch-size", 32, "--json", env=env)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["step"] == 6
    result = run("extract", "--members", "run0,run1", "--dataset", "fashion-mnist", "--views", 1, env=env)
    assert result.exit_code == 0 and "fashion-mnist/test run1: written" in result.output
    assert "fashion-mnist/train view 0 run1: written" in result.output
    result = run("cache", "ls", env=env)
    assert "fashion-mnist/train view 0 run0: 320 x 128 float32, complete" in result.output
    result = run("probe", "--members", "run0,run1", "--dataset", "fashion-mnist", "--json", env=env)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["members"] == ["run0", "run1"] and record["dim"] == 256 and 0 <= record["top1"] <= 100
    result = run("probe", "--members", "run0", "--dataset", "fashion-mnist", env=env)
    assert result.exit_code == 0 and "run0 on fashion-mnist: top-1" in result.output
    # Two coarse C, not six: the torch backend's plumbing, not its C search (test_probe.py holds that).
    sweep = ["--cat", 1, "--from", "run0,run1", "--backend", "torch", "--dataset", "fashion-mnist", "--c-grid", "0.1,1"]
    result = run("probe", *sweep, env=env)
    assert result.exit_code == 0, result.output
    assert "Cat1 over 2 subsets on fashion-mnist: top-1" in result.output and "torch) ->" in result.output
    result = run("results", "backend=torch", "sweep.cat=1", "--json", env=env)
    assert sorted(r["members"][0] for r in json.loads(result.stdout)) == ["run0", "run1"]
    result = run("results", "members=run0,run1", env=env)
    assert result.exit_code == 0 and result.stdout.count("run0,run1") == 1
    result = run("probe", "--members", "run0", "--cat", 1, "--dataset", "fashion-mnist", env=env)
    assert result.exit_code == 2 and "either --members, or --cat N with --from POOL" in result.output
    result = run("report", "--layout", "table2", env=env)
    assert result.exit_code == 0 and result.stdout.splitlines()[0].split()[:2] == ["method", "params"], result.output
    assert "Cat2 x small-resnet" in result.output
    result = run("report", env=env)
    assert result.exit_code == 0 and result.stdout.splitlines()[0].split()[:3] == ["method", "steps/member", "total"]
    assert (tmp_path / "results/catn.png").is_file()
    data_json = json.loads(run("report", "--json", env=env).stdout)
    assert [r["method"] for r in data_json["rows"]] == ["Cat1", "Cat2"]


def test_errors_are_one_clean_line(tmp_path):
    env = {"TIMECAT_DATA": str(tmp_path), "TIMECAT_CACHE": str(tmp_path / "none.zarr")}
    result = run("prepare", "cifar10", env=env)
    assert result.exit_code == 1 and result.stderr.splitlines()[-1].startswith(
        "Error: cifar10: folder cifar-10-batches-py/"
    )
    assert result.stdout == "" and "Traceback" not in result.output  # the log's INFO line, then one error line
    result = run("prepare", "mnist", env=env)
    assert "unknown dataset 'mnist'; choose one of" in result.output
    result = run("prepare", "imagenet", env=env)
    assert result.exit_code == 1 and "imagenet/train: not a folder; expected one sub-folder" in result.output
    result = run("probe", "--members", "run0", "--dataset", "digits", env=env)
    assert result.exit_code == 1 and "no feature cache" in result.output
    result = run("report", "--results", tmp_path / "nothing")
    assert result.exit_code == 1 and "run `timecat probe` first" in result.output


def test_prepare_skips_and_lists_a_corrupt_image_when_asked(tmp_path):
    make_imagefolder(tmp_path / "train")
    make_imagefolder(tmp_path / "val")
    (tmp_path / "train/fox/1.png").write_bytes(b"\x89PNG cut short")
    args = ["prepare", "imagefolder", "--name", "pets", "--train", tmp_path / "train", "--test", tmp_path / "val"]
    result = run(*args, "--data-root", tmp_path / "data")
    assert result.exit_code == 1 and "train/fox/1.png" in result.output and "--on-corrupt skip" in result.output
    result = run(*args, "--data-root", tmp_path / "data", "--on-corrupt", "skip")
    assert result.exit_code == 0, result.output
    assert "pets/train: 11 images" in result.stdout
    assert f"skipped unreadable {tmp_path / 'train/fox/1.png'}" in result.stderr


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_small_fashion_mnist(tmp_path):
    # Cat1 and Cat2 (3 members) probed on one dataset: every stage and the paired comparison run; the full
    # demo (Cat4 and digits too) is `make demo`.
    data = make_fashion_root(tmp_path / "data", n_train=256, n_test=64)
    small = ["--workdir", tmp_path / "demo", "--data-root", data, "--total-steps", 4, "--cats", "1,2"]
    small += ["--transfer-datasets", "fashion-mnist"]
    result = run("demo", *small, "--precision", "fp32", "--json")
    assert result.exit_code == 0, result.output
    outcome = json.loads(result.stdout)
    records = [json.loads(line) for line in (tmp_path / "demo/results/probes.jsonl").read_text().splitlines()]
    assert {r["precision"] for r in records} == {"fp32"}  # the demo's --precision reaches every probe
    rows = {r["method"]: r for r in outcome["table"]["rows"]}
    assert set(rows) == {"Cat1", "Cat2"}
    assert (rows["Cat1"]["steps_per_member"], rows["Cat2"]["steps_per_member"]) == (4, 2)
    assert outcome["table"]["datasets"] == ["fashion-mnist"]
    assert all(r[d]["mean"] is not None for r in rows.values() for d in outcome["table"]["datasets"])
    assert all(len(r[d]["ci95"]) == 2 for r in rows.values() for d in outcome["table"]["datasets"])
    # Each CatN against Cat1 on the same rows, with its interval and what the interval says.
    paired = {(d["method"], d["dataset"]): d for d in outcome["differences"]}
    assert set(paired) == {("Cat2", "fashion-mnist")}
    for d in paired.values():
        by_rows = rows[d["method"]][d["dataset"]]["mean"] - rows["Cat1"][d["dataset"]]["mean"]
        assert d["difference"] == pytest.approx(by_rows, abs=1e-3) and d["excludes_zero"] == (
            not d["ci95"][0] <= 0 <= d["ci95"][1]
        )
    assert outcome["plots"] == [str(tmp_path / "demo/results/catn.png")]  # id_vs_ood.png needs a second dataset
    assert all(Path(p).is_file() for p in outcome["plots"])
    beside = json.loads((tmp_path / "demo/results/demo.json").read_text())  # config, version and summary
    assert beside["experiment"] == "demo" and beside["config"]["total_steps"] == 4 and beside["timecat_version"]
    assert beside["summary"]["differences"] == outcome["differences"]
    # A rerun keeps every member and cached array, and only re-probes.
    before = (tmp_path / "demo/runs/run0/checkpoint.pt").stat().st_mtime_ns
    rerun = run("demo", *small)
    assert rerun.exit_code == 0 and "Cat2 - Cat1 on fashion-mnist:" in rerun.output and "[95% CI" in rerun.output
    assert (tmp_path / "demo/runs/run0/checkpoint.pt").stat().st_mtime_ns == before
    assert f"timecat results --workdir {tmp_path / 'demo'}" in rerun.output  # what to type next, for this workspace
    # The overall progress, stage by stage, with the time left; each probe's result line with its counter.
    assert "demo: stage 1 of 4 (prepare)" in rerun.stderr and "demo: stage 4 of 4 (probe" in rerun.stderr
    assert "about " in rerun.stderr and " left" in rerun.stderr
    assert "INFO 2/2 probe run1,run2 on fashion-mnist: top-1" in rerun.stderr
    assert zombie_children() == []  # FFCV's writer processes were waited for


def test_cache_probe_and_report_work_without_ffcv(tmp_path):
    """Block ffcv's import in a fresh interpreter; probe and report must not need it, nor any image code."""
    import subprocess
    import sys

    from test_probe import blob_cache

    blob_cache(tmp_path / "c.zarr")
    script = f"""
import sys
sys.modules["ffcv"] = None  # any 'import ffcv' now raises ImportError
from click.testing import CliRunner
import cli
runner = CliRunner()
args = ["probe", "--members", "m", "--dataset", "toy",
        "--cache", {str(tmp_path / "c.zarr")!r}, "--results", {str(tmp_path / "r")!r}]
probe = runner.invoke(cli.main, args)
report = runner.invoke(cli.main, ["report", "--results", {str(tmp_path / "r")!r}])
image_code = {{"pipeline.data.loaders", "pipeline.data.datasets", "pipeline.members.models", "torchvision"}}
image_code &= set(sys.modules)
print(probe.exit_code, report.exit_code, sorted(image_code) or "none")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "0", "none"], out.stdout + out.stderr


def test_cache_ls_and_verify(tmp_path):
    import numpy as np
    from conftest import make_cache

    import cache

    make_cache(tmp_path / "c.zarr")
    result = run("cache", "ls", "--cache", tmp_path / "c.zarr")
    assert result.exit_code == 0 and "toy/train a: 50 x 6 float32, complete" in result.output
    assert [r["member"] for r in json.loads(run("cache", "ls", "--cache", tmp_path / "c.zarr", "--json").stdout)] == [
        "a",
        "b",
    ]
    result = run("cache", "verify", tmp_path / "c.zarr")
    assert result.exit_code == 0 and result.output.count(": ok") == 2
    for sub in ("ls", "verify"):
        assert "Example: timecat cache" in run("cache", sub, "--help").output
    store = cache.open(str(tmp_path / "c.zarr"), mode="a")
    store.group["toy/train/features/b"][3] = np.nan  # damage a complete member
    result = run("cache", "verify", tmp_path / "c.zarr")
    assert result.exit_code == 1
    assert (
        "toy/train b (50, 4): PROBLEM: member b has unwritten, unreadable or non-finite rows from row 0"
        in result.output
    )
    assert "1 of 2 arrays have problems" in result.output
