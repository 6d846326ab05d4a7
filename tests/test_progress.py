"""Progress in logs: when stderr is not a terminal, long work logs its start, a line every interval, its end."""

import logging

import pytest

from pipeline.configs import PretrainConfig, ProbeConfig
from pipeline.core.progress import progress
from pipeline.probe.run import probe
from pipeline.train.pretrain import pretrain


@pytest.fixture()
def logged(monkeypatch, caplog):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # the suite hides bars; these tests want the lines
    monkeypatch.setenv("TIMECAT_PROGRESS_EVERY", "0")  # a line per update: the interval is not what is tested
    caplog.set_level(logging.INFO, logger="timecat")
    return caplog


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_a_loop_logs_its_start_each_step_with_rate_and_eta_and_its_end(logged):
    for _ in progress(range(4), desc="train x", unit="step"):
        pass
    lines = messages(logged)
    assert lines[0] == "train x: started (4 steps)"
    assert lines[1].startswith("train x: 1/4 steps (25%), ") and "step/s" in lines[1] and ", ETA " in lines[1]
    assert lines[-1].startswith("train x: 4/4 steps (100%)")
    assert len(lines) == 5  # nothing twice


def test_the_interval_bounds_how_many_lines_a_long_loop_writes(logged, monkeypatch):
    monkeypatch.setenv("TIMECAT_PROGRESS_EVERY", "3600")
    with progress(total=1000, desc="fast", unit="img") as bar:
        for _ in range(1000):
            bar.update(1)
            bar.set_postfix(loss="1.0")  # a refresh per step, as pretraining's loss makes: still not a line each
    lines = messages(logged)
    assert lines[0] == "fast: started (1,000 img)" and lines[-1].startswith("fast: 1,000/1,000 img (100%)")
    assert len(lines) <= 3  # start, maybe one, end: not a thousand lines


def test_pretraining_and_the_probes_refit_show_in_the_log_and_results_print_once(logged, pipeline_run, tmp_path):
    result = pretrain(
        PretrainConfig("p", "digits", 0, steps=4, batch_size=32, log_every=2), pipeline_run["data"], tmp_path / "runs"
    )
    lines = messages(logged)
    assert "pretrain p: small-resnet on digits, seed 0, 4 steps" in lines
    assert "p: started (4 steps)" in lines and any(line.startswith("p: 4/4 steps (100%)") for line in lines)
    assert not any("test top-1" in line for line in lines)  # the command prints the result; the log does not repeat it
    assert result["step"] == 4
    logged.clear()
    probe(ProbeConfig("digits", ("run0",), backend="sklearn"), pipeline_run["cache"])
    lines = messages(logged)
    assert lines[0] == "probe run0 on digits (logreg)"
    assert any(line.startswith("refit at C=") for line in lines), lines
