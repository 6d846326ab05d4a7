"""Probes under torchrun: 2 gloo processes give the probes one process gives, each record appended once."""

import json
import os
import subprocess
import sys

import pytest
from conftest import assert_agreeing_probe, digits_cache

import cache
from pipeline.configs import ProbeConfig
from pipeline.probe import c_search, results
from pipeline.probe.run import probe, sweep

REPO = os.path.dirname(cache.__path__[0])


def torchrun(nproc: int, *args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += ["-m", "cli", *map(str, args)]
    env = {**os.environ, "TQDM_DISABLE": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo ranks on the CPU, even on a GPU box
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_gloo_processes_split_a_sweeps_subsets_and_append_each_record_once(tmp_path):
    # Five members of unequal width (13, 13, 13, 13, 12 dims): rank 1's batches use the members in
    # another first-use order than one process, and not always the widest one.
    names = digits_cache(tmp_path / "c.zarr", members=5)
    path = str(tmp_path / "c.zarr")
    # A budget of two subsets per batch: five batches, which the ranks take whole (rank 0 three, rank 1 two).
    two = 2 * 8 * c_search.STATE_COPIES * 4 * 10 * 27  # 8 candidates, 10 classes, 26 dims + intercept
    config = ProbeConfig("digits", names, precision="fp32", memory_gib=two / 2**30)
    single, _ = sweep(config, names, 2, None, path, tmp_path / "one")
    assert single[0]["batch"]["batches"] == 5
    args = ["probe", "--cat", 2, "--from", ",".join(names), "--dataset", "digits", "--precision", "fp32", "--json"]
    args += ["--memory-gib", config.memory_gib]
    result = torchrun(2, *args, "--cache", path, "--results", tmp_path / "two")
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout)  # rank 0 alone prints, and prints every record
    saved = results.load(tmp_path / "two")
    assert sorted(r["id"] for r in saved) == sorted(r["id"] for r in printed["records"])
    assert [r["members"] for r in printed["records"]] == [r["members"] for r in single]
    assert {r["ranks"]["split"] for r in saved} == {"subsets"} and len(saved) == 10
    for one, two in zip(single, printed["records"], strict=True):
        assert_agreeing_probe(one, two)
    assert printed["summary"]["top1"]["mean"] == pytest.approx(sum(r["top1"] for r in single) / 10)


@pytest.mark.slow
def test_two_gloo_processes_split_one_probes_c_candidates(tmp_path):
    names = digits_cache(tmp_path / "c.zarr")
    path = str(tmp_path / "c.zarr")
    config = ProbeConfig("digits", names, precision="fp32")
    single = probe(config, path, tmp_path / "one")
    args = ["probe", "--members", ",".join(names), "--dataset", "digits", "--precision", "fp32"]
    result = torchrun(2, *args, "--cache", path, "--results", tmp_path / "two")
    assert result.returncode == 0, result.stderr[-3000:]
    (saved,) = results.load(tmp_path / "two")  # appended once, by rank 0
    assert saved["ranks"] == {"world_size": 2, "split": "C candidates"}
    assert_agreeing_probe(single, saved)
    assert result.stdout.count(saved["id"]) == 1


def test_one_process_protocols_refuse_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = ProbeConfig("digits", ("m0",), backend="sklearn")
    with pytest.raises(Exception, match="runs in one process; under torchrun use --protocol logreg"):
        probe(config, str(tmp_path / "none.zarr"))


def test_gathered_candidates_come_back_in_problem_order():
    """Each rank fits problems rank, rank + 2, ...; the merged weights and trials are in problem order."""
    import torch

    from pipeline.probe import batched_lbfgs as bl

    full = bl.Params(
        {0: torch.arange(5 * 3 * 2, dtype=torch.float32).reshape(3, 5, 2)},
        torch.arange(10, dtype=torch.float32).reshape(5, 2),
        {0: torch.arange(5)},
    )
    shares = [[0, 2, 4], [1, 3]]
    parts = [(m, bl.take(full, torch.tensor(m)), [{"C": i} for i in m]) for m in shares]

    class Rank1:
        rank, world_size = 1, 2

        def all_gather(self, obj):
            assert obj[0] == shares[1]
            return parts

    merged, trials = c_search._gathered(Rank1(), shares[1], parts[1][1], parts[1][2], 5, torch.device("cpu"))
    assert [t["C"] for t in trials] == [0, 1, 2, 3, 4]
    assert torch.equal(merged.b, full.b) and torch.equal(merged.W[0], full.W[0])
