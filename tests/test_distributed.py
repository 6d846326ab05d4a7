"""Extraction under torchrun: 2 CPU processes with gloo write every row where one process writes it."""

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

import cache
from pipeline.configs import ExtractConfig
from pipeline.features.extract import extract

REPO = os.path.dirname(cache.__path__[0])


def torchrun(nproc: int, *args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += ["-m", "cli", *map(str, args)]
    env = {**os.environ, "TQDM_DISABLE": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo ranks on the CPU, even on a GPU box
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_gloo_processes_write_the_single_process_cache(pipeline_run, tmp_path):
    data, runs, members = pipeline_run["data"], pipeline_run["runs"], pipeline_run["members"]
    single, double = str(tmp_path / "single.zarr"), str(tmp_path / "double.zarr")
    # 96-row chunks: each rank owns several chunks of train, and its last chunk is short.
    extract(ExtractConfig("fashion-mnist", members, batch_size=96, chunk_rows=96), data, runs, single)
    args = ["extract", "--members", ",".join(members), "--dataset", "fashion-mnist", "--batch-size", 96]
    result = torchrun(2, *args, "--chunk-rows", 96, "--data-root", data, "--runs", runs, "--cache", double)
    assert result.returncode == 0, result.stderr[-3000:]

    one, two = cache.open(single), cache.open(double)
    rows = len(one.labels("fashion-mnist", "train"))
    assert rows % 96 and rows > 4 * 96
    for split in ("train", "test"):
        np.testing.assert_array_equal(one.labels("fashion-mnist", split), two.labels("fashion-mnist", split))
        for m in members:
            assert two.status("fashion-mnist", split, m) == "complete"
            a, _ = one.features("fashion-mnist", split, [m])
            b, _ = two.features("fashion-mnist", split, [m])
            # Every row in its place (a misplaced or lost row is off by the features' own size, about 1), equal
            # to float32 rounding: a rank runs with its share of the threads, and nothing promises that a
            # convolution sums in the same order with fewer threads on every CPU.
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert [r["ok"] for r in two.verify()] == [True] * 6


def test_row_ranges_are_contiguous_chunk_aligned_and_cover_every_row():
    from cache.layout import row_ranges

    assert row_ranges(1000, 128, 2) == [(0, 512), (512, 1000)]
    assert row_ranges(100, 128, 3) == [(0, 0), (0, 0), (0, 100)]
    for rows, chunk, parts in [(1, 1, 1), (10_000, 64, 7), (513, 512, 2), (5 * 512, 512, 8)]:
        ranges = row_ranges(rows, chunk, parts)
        assert ranges[0][0] == 0 and ranges[-1][1] == rows and len(ranges) == parts
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        assert all(lo % chunk == 0 and (hi % chunk == 0 or hi == rows) for lo, hi in ranges)
