"""Issue 24's results-side cases: k-NN at small temperatures, name checks, damaged or foreign results files,
misplaced workspace folders, results filters, report and compare errors.

Each case asserts the message a user sees (one ``Error:`` line, no traceback) and, where something was written
before, that nothing already written is lost.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import digits_cache

import cli
from pipeline import results


def run(*args, env=None):
    return CliRunner().invoke(cli.main, [str(a) for a in args], env=env)


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for folders): a snapshot to compare."""
    return {
        str(p.relative_to(root)): None if p.is_dir() or p.is_symlink() else p.read_bytes()
        for p in sorted(Path(root).rglob("*"))
    }


def one_error(result, *words: str) -> str:
    """The single ``Error:`` line of a failed command, checked for ``words`` and for the absence of a traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught error
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


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
