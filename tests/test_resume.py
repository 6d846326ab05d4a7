"""Extraction survives kill -9: the rerun continues from the first unwritten chunk, bitwise identical."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import make_fashion_root

import cache
from pipeline.configs import ExtractConfig, PrepareConfig, PretrainConfig
from pipeline.data.prepare import prepare
from pipeline.features.extract import extract
from pipeline.train.pretrain import pretrain

ROWS, CHUNK = 3_000, 64  # 47 chunks per member: a wide window to kill in, at a fraction of the images


@pytest.mark.slow
def test_kill_9_then_rerun_is_bitwise_identical(tmp_path):
    data = make_fashion_root(tmp_path / "data", n_train=ROWS, n_test=256)
    prepare(PrepareConfig("fashion-mnist", data))
    runs = tmp_path / "runs"
    pretrain(PretrainConfig("run0", "fashion-mnist", 0, steps=3, batch_size=64), data, runs)
    config = ExtractConfig("fashion-mnist", ("run0",), batch_size=CHUNK, chunk_rows=CHUNK)
    extract(config, data, runs, str(tmp_path / "whole.zarr"))

    args = ["extract", "--members", "run0", "--dataset", "fashion-mnist", "--batch-size", CHUNK]
    args += ["--chunk-rows", CHUNK, "--data-root", data, "--runs", runs, "--cache", tmp_path / "killed.zarr"]
    command = [sys.executable, "-m", "cli", *map(str, args)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    chunks = tmp_path / "killed.zarr/fashion-mnist/train/features/run0/c"
    proc = subprocess.Popen(command, env=env, cwd=os.path.dirname(cache.__path__[0]), stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if chunks.is_dir() and sum(1 for _ in chunks.rglob("*")) >= 8:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "extraction ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    store = cache.open(str(tmp_path / "killed.zarr"), mode="a")
    assert store.status("fashion-mnist", "train", "run0") == "writing"
    resume_at = store.first_unwritten_row("fashion-mnist", "train", "run0")
    assert 0 < resume_at < ROWS and resume_at % CHUNK == 0

    assert subprocess.run(command, env=env, cwd=os.path.dirname(cache.__path__[0])).returncode == 0
    whole, killed = cache.open(str(tmp_path / "whole.zarr")), cache.open(str(tmp_path / "killed.zarr"))
    for split in ("train", "test"):
        assert killed.status("fashion-mnist", split, "run0") == "complete"
        a, _ = whole.features("fashion-mnist", split, ["run0"])
        b, _ = killed.features("fashion-mnist", split, ["run0"])
        np.testing.assert_array_equal(a, b)  # bitwise: same batches, same chunks
