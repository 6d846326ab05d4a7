"""timecat toy: the Section 3 counterexample, with its qualitative result asserted on fixed seeds."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from pipeline.configs import ToyConfig
from pipeline.core.errors import TimecatError
from pipeline.experiments.toy import MASSES, best_probe_accuracy, run


def test_each_component_is_separable_and_the_best_probe_is_exact():
    both, phi1, phi2 = np.array([[True, True]] * 4), np.array([[True, False]] * 4), np.array([[False, True]] * 4)
    assert best_probe_accuracy(MASSES, both).tolist() == [1.0] * 4
    # phi1 alone solves P1 and P2; on P3 and P4 the best it can do is drop one 1/4 point.
    assert best_probe_accuracy(MASSES, phi1).tolist() == [1.0, 1.0, 0.75, 0.75]
    assert best_probe_accuracy(MASSES, phi2).tolist() == [0.75, 0.75, 1.0, 1.0]


def test_a_sparse_rule_of_nearly_every_mixture_keeps_one_feature_and_fails_two_components():
    result = run(ToyConfig(mixtures=60, seed=1))
    summary = result["summary"]
    assert summary["one_feature"] >= 0.95 and summary["fails_two_components"] >= 0.95
    # It is the best linear rule of its mixture: everything but the lightest point.
    assert summary["mixture_rule_accuracy"] == pytest.approx(summary["best_rule_accuracy"], abs=1e-6)
    assert summary["direct_accuracy"] == [1.0] * 4  # while each component alone is solved
    rules, probes = np.abs(np.array(result["rules"])[:, :2]), np.array(result["probe_accuracy"])
    phi1_only = (rules[:, 0] > 0) & (rules[:, 1] == 0)
    assert phi1_only.any() and (~phi1_only).any()  # which feature survives depends on the mixture
    assert np.allclose(probes[phi1_only], [1.0, 1.0, 0.75, 0.75])


def test_without_a_sparsity_bias_far_fewer_mixtures_lose_a_feature():
    plain = run(ToyConfig(mixtures=60, seed=1, loss="logistic", strength=0.0))["summary"]
    assert plain["fails_two_components"] <= 0.3 and plain["one_feature"] <= 0.3
    network = run(ToyConfig(mixtures=60, seed=1, penalty="weight-decay"))["summary"]
    assert network["fails_two_components"] >= 0.95  # the two-layer network with weight decay drops one too


def test_toy_command_prints_json_and_draws_the_figure(tmp_path):
    # 300 steps, not 3,000: what the command prints, draws and writes beside the figure (results: run() above).
    args = ["toy", "--mixtures", "20", "--steps", "300", "--results", str(tmp_path), "--json"]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["mixtures"] == 20 and (tmp_path / "toy.png").stat().st_size > 10_000
    beside = json.loads((tmp_path / "toy.json").read_text())  # what the figure shows, readable without it
    assert beside["experiment"] == "toy" and beside["figure"] == "toy.png" and beside["timecat_version"]
    assert beside["config"]["mixtures"] == 20 and beside["config"]["steps"] == 300
    assert beside["summary"] == {k: v for k, v in summary.items() if k != "plot"}
    with pytest.raises(TimecatError, match=r"unknown penalty 'l0'; choose one of \['weight-decay', 'l1', 'none'\]"):
        ToyConfig(penalty="l0")


def test_the_kept_feature_threshold_is_stated_and_its_sensitivity_shown(tmp_path):
    import pipeline.experiments.toy as toy

    summary = run(ToyConfig(mixtures=30, seed=2))["summary"]
    assert summary["kept_threshold"] == ToyConfig().used == 0.05
    assert sorted(summary["threshold_sensitivity"]) == ["0.001", "0.01", "0.05"]
    assert summary["threshold_sensitivity"]["0.05"]["one_feature"] == summary["one_feature"]
    for findings in summary["threshold_sensitivity"].values():  # one finding: one feature means failing 2 of 4
        assert findings["fails_two_components"] == pytest.approx(findings["one_feature"] + findings["no_feature"])
    assert "sigmoid(-margin / 0.1)" in toy.__doc__ and "5%" in toy.__doc__ and ToyConfig().loss == "sigmoid"
    args = ["toy", "--mixtures", "10", "--steps", "300", "--results", str(tmp_path)]  # the wording, not the findings
    text = CliRunner().invoke(cli.main, args).output
    assert "reading one feature, so that its probe fails 2 of 4 components" in text
    assert "mixtures failing 2 of 4" not in text and "kept above 5.0%" in text and "0.1%:" in text
