"""timecat diversity: linear CKA between cached members, and their probes, from the cache only."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from pipeline.configs import DiversityConfig
from pipeline.core.errors import TimecatError
from pipeline.experiments.diversity import cka_matrix, linear_cka, run


def test_linear_cka_sees_through_rotation_and_scale_but_not_through_independence():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 16)).astype(np.float32)
    rotation, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    assert linear_cka(X, 3.0 * X @ rotation + 5.0) == pytest.approx(1.0, abs=1e-6)  # also invariant to a shift
    assert linear_cka(X, rng.normal(size=(2000, 32))) < 0.05
    half = np.hstack([X[:, :8], rng.normal(size=(2000, 8))])  # shares half of X's directions
    assert 0.2 < linear_cka(X, half) < 0.8
    matrix = cka_matrix([X, half, X @ rotation])
    assert np.allclose(matrix, matrix.T) and np.allclose(np.diag(matrix), 1.0)


def test_cached_members_are_compared_pairwise(pipeline_run):
    members = pipeline_run["members"]
    summary, records = run(DiversityConfig("fashion-mnist", members, probe=False), pipeline_run["cache"])
    cka = np.array(summary["cka"])
    assert cka.shape == (3, 3) and np.allclose(cka, cka.T) and np.allclose(np.diag(cka), 1.0)
    assert np.all((cka > 0) & (cka <= 1 + 1e-9)) and records == []
    assert summary["rows"] == 160  # the whole tiny test split, under the row cap


def test_diversity_command_probes_each_member_and_the_concatenation(pipeline_run, tmp_path):
    members = ",".join(pipeline_run["members"][:2])
    args = ["diversity", "--members", members, "--dataset", "digits", "--cache", pipeline_run["cache"]]
    result = CliRunner().invoke(cli.main, [*args, "--results", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert sorted(summary["top1"]) == ["run0", "run0+run1", "run1"]
    assert all(0 < v <= 100 for v in summary["top1"].values())
    assert len((tmp_path / "probes.jsonl").read_text().splitlines()) == 3  # the probes are ordinary records
    assert (tmp_path / "diversity.png").stat().st_size > 10_000
    beside = json.loads((tmp_path / "diversity.json").read_text())
    assert beside["experiment"] == "diversity" and beside["config"]["members"] == list(pipeline_run["members"][:2])
    assert beside["summary"]["top1"] == summary["top1"] and beside["timecat_version"]


def test_bad_member_lists_are_refused_by_name(pipeline_run):
    with pytest.raises(TimecatError, match="at least 2 members"):
        DiversityConfig("digits", ("run0",))
    with pytest.raises(TimecatError, match="a member is named twice"):
        DiversityConfig("digits", ("run0", "run0"))
    with pytest.raises(
        TimecatError, match=r"unknown member\(s\) \['run9'\] \(did you mean 'run\d'\?\) for digits/test; available"
    ):
        run(DiversityConfig("digits", ("run0", "run9"), probe=False), pipeline_run["cache"])
