"""Schedule-free AdamW: BatchNorm statistics are re-estimated for the averaged weights, and those are saved."""

import json

import pytest
import torch
from conftest import make_fashion_root

from pipeline.configs import PrepareConfig, PretrainConfig
from pipeline.data.loaders import eval_loader
from pipeline.data.prepare import prepare
from pipeline.data.splits import Preprocess, beton_path
from pipeline.members import checkpoints
from pipeline.members.checkpoints import checkpoint_path
from pipeline.train.pretrain import pretrain, reestimate_bn


def test_saved_batchnorm_statistics_are_the_reestimated_ones(tmp_path):
    data = make_fashion_root(tmp_path / "data")
    prepare(PrepareConfig("fashion-mnist", data))
    config = PretrainConfig(
        "sf0", "fashion-mnist", 0, 30, batch_size=64, optimizer="schedulefree", lr=3e-3, eval_every=10, tensorboard=True
    )
    result = pretrain(config, data, tmp_path / "runs")
    log = [json.loads(line) for line in (tmp_path / "runs/sf0/log.jsonl").read_text().splitlines()]
    evals = [r for r in log if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [10, 20] and log[-1]["event"] == "end" and log[-1]["step"] == 30
    assert all(0 <= r["test_top1"] <= 100 and r["bn_reestimated_rows"] == 640 for r in evals)
    # Evaluated with the training-time statistics and with re-estimated ones: not the same model.
    assert result["bn_reestimated_rows"] == 640 and result["test_top1_stale_bn"] != result["test_top1"]

    # The same numbers as TensorBoard scalars, at the same steps.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "runs/sf0/tensorboard"))
    board.Reload()
    assert [(e.step, e.value) for e in board.Scalars("eval/test_top1")] == [
        (r["step"], pytest.approx(r["test_top1"])) for r in evals
    ]
    assert board.Scalars("end/test_top1")[0].value == pytest.approx(result["test_top1"])
    assert board.Scalars("train/loss")[0].step == 30

    payload = checkpoints.load(checkpoint_path(tmp_path / "runs", "sf0"))
    model = checkpoints.load_model(payload, "sf0").to(memory_format=torch.channels_last)  # as in training
    saved = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    for m in model.modules():  # forget them, then recompute from the saved (averaged) weights
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
    pre = Preprocess.from_dict(payload["preprocess"])
    reestimate_bn(model, eval_loader(beton_path(data, "fashion-mnist", "train"), pre, 256, 1), torch.device("cpu"))
    for key, value in model.state_dict().items():
        if "running_" in key:  # the same up to float32 summation order
            torch.testing.assert_close(value, saved[key], rtol=1e-2, atol=1e-4)
