"""Pretraining: logged metrics that are real, and a finished member kept (a changed one refused)."""

import json

import pytest
import torch

from pipeline.configs import PretrainConfig
from pipeline.core.errors import TimecatError
from pipeline.members import checkpoints
from pipeline.members.checkpoints import checkpoint_path
from pipeline.train.pretrain import evaluate, pretrain


def test_logged_metrics_are_real(pipeline_run):
    """The final test top-1 in the log is what the saved model actually scores."""
    from pipeline.data.loaders import eval_loader
    from pipeline.data.splits import Preprocess, beton_path

    lines = [json.loads(line) for line in (pipeline_run["runs"] / "run0/log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "event" not in r]
    assert steps == [4, 8, 12]
    assert all(r["loss"] > 0 and r["images_per_s"] > 0 for r in lines[:-1])
    payload = checkpoints.load(checkpoint_path(pipeline_run["runs"], "run0"))
    model = checkpoints.load_model(payload, "run0")
    loader = eval_loader(
        beton_path(pipeline_run["data"], "fashion-mnist", "test"), Preprocess.from_dict(payload["preprocess"]), 100, 1
    )
    measured = evaluate(model.to(memory_format=torch.channels_last), loader, torch.device("cpu"))
    assert lines[-1]["event"] == "end" and lines[-1]["test_top1"] == pytest.approx(measured["top1"])
    config = json.loads((pipeline_run["runs"] / "run0/config.json").read_text())
    assert config["config"]["seed"] == 0 and config["timecat_version"] == "0.1.0"


def test_a_finished_member_is_kept_and_a_changed_one_refused(pipeline_run):
    data, runs = pipeline_run["data"], pipeline_run["runs"]
    before = checkpoint_path(runs, "run0").stat().st_mtime_ns
    result = pretrain(PretrainConfig("run0", "fashion-mnist", 0, steps=12, batch_size=64, log_every=4), data, runs)
    assert result["skipped"] and checkpoint_path(runs, "run0").stat().st_mtime_ns == before
    with pytest.raises(TimecatError, match=r"run0 already exists.*'steps': \(12, 99\)"):
        pretrain(PretrainConfig("run0", "fashion-mnist", 0, steps=99, batch_size=64, log_every=4), data, runs)
