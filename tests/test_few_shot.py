"""Few-shot probes: seeded per-class draws, the C search down to 2 shots, the fixed rule at 1, and the report."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import digits_cache
from PIL import Image

import cli
from pipeline.configs import ProbeConfig
from pipeline.probe import results
from pipeline.probe.heldout import shot_rows
from pipeline.probe.run import few_shot
from pipeline.report import tables


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    path = tmp_path_factory.mktemp("shots") / "c.zarr"
    return str(path), digits_cache(path)


def test_shot_rows_are_seeded_per_class_draws_that_nest_as_shots_grow():
    y = np.repeat(np.arange(4), [10, 10, 10, 3])
    five = shot_rows(y, 5, seed=0, draw=0)
    assert np.bincount(y[five]).tolist() == [5, 5, 5, 3]  # a class with fewer rows gives all of them
    assert np.array_equal(five, shot_rows(y, 5, seed=0, draw=0))
    assert not np.array_equal(five, shot_rows(y, 5, seed=0, draw=1))
    assert set(shot_rows(y, 2, seed=0, draw=0)) <= set(five)  # more shots add rows, never swap them


def test_each_draw_is_a_record_searched_on_its_own_rows(digits, tmp_path):
    path, names = digits
    config = ProbeConfig("digits", names[:2], shots=5, draws=3, precision="fp32")
    records, summary = few_shot(config, path, tmp_path)
    shots = [{k: v for k, v in r["shots"].items() if k != "run"} for r in records]
    assert shots == [{"per_class": 5, "draw": d, "draws": 3, "rows": 50} for d in range(3)]
    assert len({r["shots"]["run"] for r in records}) == 1  # one run id for the draws of one command
    assert all(r["n_train"] == 50 and len(r["search"]) == 8 for r in records)  # 6 coarse + 2 refined
    assert all(r["holdout"]["held_out_rows"] > 0 for r in records)
    assert len({r["top1"] for r in records}) > 1  # different rows, different probes
    top1 = [r["top1"] for r in records]
    assert summary["count"] == 3 and summary["top1"]["mean"] == pytest.approx(np.mean(top1))
    assert summary["top1"]["std"] == pytest.approx(np.std(top1, ddof=1))
    assert [r["id"] for r in results.load(tmp_path)] == [r["id"] for r in records]
    assert 30 < np.mean(top1) < 95  # 50 rows of 10 classes: far from chance (10%), short of all 1,400 rows


def test_two_shots_still_search_c_and_one_shot_uses_the_fixed_rule(digits):
    path, names = digits
    (two,), _ = few_shot(ProbeConfig("digits", names[:1], shots=2, draws=1), path)
    assert two["holdout"]["held_out_rows"] > 0 and len(two["search"]) == 8 and "rule" not in two["chosen"]
    (one,), _ = few_shot(ProbeConfig("digits", names[:1], shots=1, draws=1, fixed_c=0.5), path)
    assert one["search"] == [] and one["chosen"]["C"] == 0.5 and one["chosen"]["rule"] == "fixed"
    assert one["holdout"]["held_out_rows"] == 0 and "C fixed at 0.5" in one["holdout"]["rule"]
    assert one["n_train"] == 10 and one["top1"] > 20


def test_shots_need_the_batched_logreg_probe():
    with pytest.raises(Exception, match="--shots runs the logreg protocol on the batched solver"):
        ProbeConfig("digits", ("m0",), shots=5, backend="sklearn")


def test_the_cli_prints_every_draw_and_report_plots_shots_per_catn(digits, tmp_path):
    path, names = digits
    runner = CliRunner()
    for shots in (1, 5):
        args = ["probe", "--cat", "2", "--from", ",".join(names[:3]), "--dataset", "digits", "--shots", str(shots)]
        result = runner.invoke(cli.main, [*args, "--draws", "2", "--cache", path, "--results", str(tmp_path)])
        assert result.exit_code == 0, result.output
        assert f"{shots}-shot Cat2 over 6 records on digits" in result.output
        assert "(mean ± sample std over 3 subsets x 2 draws)" in result.output
    single = ["probe", "--members", names[0], "--dataset", "digits", "--shots", "5", "--draws", "2", "--json"]
    result = runner.invoke(cli.main, [*single, "--cache", path, "--results", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["summary"]["count"] == 2

    records = results.load(tmp_path)
    data = tables.shots_table(records)
    by_method = {line["method"]: line["points"] for line in data["lines"]}
    assert [p["shots"] for p in by_method["Cat2"]] == [1, 5] and by_method["Cat2"][0]["count"] == 6
    assert [p["shots"] for p in by_method["Cat1"]] == [5] and by_method["Cat1"][0]["count"] == 2
    cat2_5 = [r["top1"] for r in records if r["n_members"] == 2 and r["shots"]["per_class"] == 5]
    assert by_method["Cat2"][1]["mean"] == pytest.approx(np.mean(cat2_5))

    result = runner.invoke(cli.main, ["report", "--results", str(tmp_path)])
    assert result.exit_code == 0, result.output  # few-shot records only: the shots plot, no table
    assert "digits  Cat2: 1-shot" in result.output and "shots.png" in result.output
    assert Image.open(tmp_path / tables.SHOTS_FILE).size[0] > 300


def test_a_rerun_replaces_its_older_draws_and_other_refusals_still_show(digits, tmp_path):
    path, names = digits
    runner = CliRunner()
    base = ["probe", "--members", names[0], "--dataset", "digits", "--shots", "2", "--cache", path]
    for draws in ("3", "1"):  # the rerun has fewer draws: the first run's draws 1 and 2 must not linger
        result = runner.invoke(cli.main, [*base, "--draws", draws, "--results", str(tmp_path)])
        assert result.exit_code == 0, result.output
    (line,) = tables.shots_table(results.load(tmp_path))["lines"]
    assert line["points"][0]["count"] == 1
    whole = ["probe", "--members", names[0], "--dataset", "digits", "--cache", path, "--results", str(tmp_path)]
    assert runner.invoke(cli.main, whole).exit_code == 0
    result = runner.invoke(cli.main, ["report", "--results", str(tmp_path), "--metric", "top1_eval_selected"])
    assert result.exit_code == 1 and "top1_eval_selected exists for protocol bn-linear only" in result.output


def test_only_a_one_shot_probe_falls_back_to_the_fixed_c(digits):
    import torch

    from pipeline.probe import c_search

    y = np.arange(10)  # one row per class, as a 1-shot draw
    blocks = {0: torch.from_numpy(np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32))}
    evals = (blocks, y)
    with pytest.raises(Exception, match="single train row"):  # a whole-split probe cannot search: refused
        c_search.probe_subsets(blocks, y, lambda: evals, [(0,)], ProbeConfig("d", ("m",)), 10)
    (one,) = c_search.probe_subsets(blocks, y, lambda: evals, [(0,)], ProbeConfig("d", ("m",), shots=1), 10)
    assert one.fields["chosen"]["rule"] == "fixed"
