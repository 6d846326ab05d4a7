"""A timm architecture pretrained as a Time-Cat member: planned, killed with SIGKILL and resumed bit for bit,
extracted and probed beside a small-resnet member, on scikit-learn's digits."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import run

import cache
from pipeline.configs import PrepareConfig, PretrainConfig
from pipeline.core.errors import TimecatError
from pipeline.data.prepare import prepare
from pipeline.members import checkpoints
from pipeline.train.pretrain import pretrain

pytest.importorskip("timm")
REPO = os.path.dirname(cache.__path__[0])
RECIPE = {"steps": 40, "batch_size": 64, "resolution": 32, "arch": "timm:test_resnet", "lr": 0.05}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-pretrain") / "data"
    prepare(PrepareConfig("digits", root))
    return root


@pytest.mark.slow
def test_a_timm_member_resumes_after_kill_9_bitwise_then_is_probed_beside_a_small_resnet(data, tmp_path):
    runs = tmp_path / "runs"
    ref = pretrain(PretrainConfig("ref", "digits", 0, checkpoint_every=0, **RECIPE), data, runs)
    assert ref["skipped"] is False

    args = ["pretrain", "--name", "t", "--dataset", "digits", "--seed", "0", "--checkpoint-every", "5"]
    args += ["--steps", "40", "--batch-size", "64", "--resolution", "32", "--arch", "timm:test_resnet", "--lr", "0.05"]
    args += ["--data-root", str(data), "--runs", str(runs)]
    proc = subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=REPO, env={**os.environ, "TQDM_DISABLE": "1"})
    ckpt = runs / "t/checkpoint.pt"
    try:
        deadline = time.monotonic() + 180
        while not ckpt.is_file() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    killed = checkpoints.load(ckpt)
    assert not killed["complete"] and killed["step"] % 5 == 0 and 0 < killed["step"] < 40, killed["step"]
    resumed = pretrain(PretrainConfig("t", "digits", 0, checkpoint_every=5, **RECIPE), data, runs)
    assert resumed["resumed_from"] == killed["step"]
    a, b = (checkpoints.load(runs / n / "checkpoint.pt") for n in ("ref", "t"))
    assert a["model"].keys() == b["model"].keys() and any(k.startswith("backbone.net.") for k in a["model"])
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    # The member's width and size are recorded, and its architecture is timm's by name.
    assert (b["feature_dim"], b["member"]["arch"]) == (96, "timm:test_resnet")
    model = checkpoints.load_model(b, "t")
    assert b["backbone_params"] == sum(p.numel() for p in model.backbone.parameters()) > 100_000

    small = PretrainConfig("s", "digits", 1, steps=10, batch_size=64, resolution=32)
    pretrain(small, data, runs)
    store = str(tmp_path / "features.zarr")
    common = ("--dataset", "digits", "--data-root", data, "--runs", runs, "--cache", store)
    assert run("extract", "--members", "t,s", *common).exit_code == 0
    assert cache.open(store).provenance("digits", "test", "t")["feature_layer"].startswith("timm pre-logits")
    out = run("probe", "--members", "t,s", "--dataset", "digits", "--cache", store, "--results", tmp_path, "--json")
    assert out.exit_code == 0, out.output
    record = json.loads(out.stdout)
    assert record["dim"] == 96 + 128 and record["member_provenance"]["t"]["arch"] == "timm:test_resnet"


def test_plan_takes_a_timm_architecture_and_a_vit_is_refused_at_a_side_its_patches_do_not_tile(data, tmp_path):
    out = run(
        "plan",
        "--dataset",
        "digits",
        "--cat",
        "2",
        "--total-steps",
        "20",
        "--arch",
        "timm:test_vit",
        "--out",
        tmp_path / "p.json",
        "--json",
    )
    assert out.exit_code == 0, out.output
    assert {m["arch"] for m in json.loads(out.stdout)["members"]} == {"timm:test_vit"}
    runs = tmp_path / "runs"
    with pytest.raises(TimecatError, match=r"timm:test_vit cannot take 8 px inputs .*multiples of its patch 16 px"):
        pretrain(PretrainConfig("v", "digits", 0, steps=2, batch_size=64, arch="timm:test_vit"), data, runs)
    assert not runs.exists()  # refused before the member's folder was made
    with pytest.raises(TimecatError, match="unknown timm model 'test_vitt' .close matches: test_vit"):
        pretrain(PretrainConfig("v", "digits", 0, steps=2, batch_size=64, arch="timm:test_vitt"), data, runs)
    # torchvision's GoogLeNet returns its auxiliary heads' outputs when training: refused, nothing written.
    with pytest.raises(TimecatError, match="torchvision:googlenet returns a GoogLeNetOutputs when training"):
        pretrain(
            PretrainConfig("g", "digits", 0, 2, batch_size=64, arch="torchvision:googlenet", resolution=64), data, runs
        )
    assert not runs.exists()
    # At 32 px its 2 x 2 patches tile the image: two steps train, and the checkpoint rebuilds at that side.
    pretrain(PretrainConfig("v", "digits", 0, steps=2, batch_size=64, arch="timm:test_vit", resolution=32), data, runs)
    payload = checkpoints.load(runs / "v/checkpoint.pt")
    assert checkpoints.load_model(payload, "v").backbone.net.patch_embed.img_size == (32, 32)


@pytest.mark.slow
def test_two_gloo_processes_train_a_timm_member_on_the_global_batch_one_process_trains_on(data, tmp_path):
    from pipeline.members.models import build

    runs, recipe = tmp_path / "runs", {"steps": 4, "resolution": 32, "arch": "timm:test_resnet", "lr": 0.05}
    for name, batch in (("one", 128), ("half", 64)):
        pretrain(PretrainConfig(name, "digits", 3, batch_size=batch, **recipe), data, runs)
    args = ["pretrain", "--name", "two", "--dataset", "digits", "--seed", "3", "--steps", "4", "--batch-size", "128"]
    args += ["--resolution", "32", "--arch", "timm:test_resnet", "--lr", "0.05", "--nproc-per-node", "2"]
    env = {**os.environ, "TQDM_DISABLE": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo ranks on the CPU
    command = [sys.executable, "-m", "cli", *args, "--data-root", str(data), "--runs", str(runs)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((runs / "two/config.json").read_text())["world_size"] == 2
    torch.manual_seed(3)
    init = build("timm:test_resnet", 10, img_size=32).state_dict()
    keys = [k for k, v in init.items() if v.is_floating_point() and "running_" not in k]

    def gap(name: str) -> float:  # distance to one process's weights, over the distance it travelled
        a, b = (checkpoints.load(runs / n / "checkpoint.pt")["model"] for n in (name, "one"))
        flat = lambda s: torch.cat([s[k].flatten() for k in keys])  # noqa: E731
        return ((flat(a) - flat(b)).norm() / (flat(b) - flat(init)).norm()).item()

    # Each rank normalises BatchNorm over its own 64 rows, so not bitwise: measured 0.36 for two ranks on
    # Xeon-AMX, against 0.77 for one process on a rank's half batch alone.
    ddp, half = gap("two"), gap("half")
    assert ddp < 0.5 and half > 1.5 * ddp, (ddp, half)
