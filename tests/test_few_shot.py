"""Few-shot probes: seeded per-class draws, the C search down to 2 shots, the fixed rule at 1, and the report."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import digits_cache
from PIL import Image

import cli
from pipeline import report, results
from pipeline.heldout import shot_rows
from pipeline.probe import ProbeConfig, few_shot


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
    assert [r["shots"] for r in records] == [{"per_class": 5, "draw": d, "draws": 3, "rows": 50} for d in range(3)]
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
        assert f"{shots}-shot Cat2 over 6 record(s) on digits" in result.output
        assert "(mean ± sample std over 3 subsets x 2 draws)" in result.output
    single = ["probe", "--members", names[0], "--dataset", "digits", "--shots", "5", "--draws", "2", "--json"]
    result = runner.invoke(cli.main, [*single, "--cache", path, "--results", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["summary"]["count"] == 2

    records = results.load(tmp_path)
    data = report.shots_table(records)
    by_method = {line["method"]: line["points"] for line in data["lines"]}
    assert [p["shots"] for p in by_method["Cat2"]] == [1, 5] and by_method["Cat2"][0]["count"] == 6
    assert [p["shots"] for p in by_method["Cat1"]] == [5] and by_method["Cat1"][0]["count"] == 2
    cat2_5 = [r["top1"] for r in records if r["n_members"] == 2 and r["shots"]["per_class"] == 5]
    assert by_method["Cat2"][1]["mean"] == pytest.approx(np.mean(cat2_5))

    result = runner.invoke(cli.main, ["report", "--results", str(tmp_path)])
    assert result.exit_code == 0, result.output  # few-shot records only: the shots plot, no table
    assert "digits  Cat2: 1-shot" in result.output and "shots.png" in result.output
    assert Image.open(tmp_path / report.SHOTS_FILE).size[0] > 300
