"""A plan's members as submitit jobs (pipeline.jobs.launch): real processes through submitit's local executor,
and the sbatch script its SLURM executor writes, read without a cluster."""

import json

import pytest
import torch
from conftest import run

from pipeline.configs import LaunchConfig, PrepareConfig, PretrainConfig
from pipeline.core.errors import TimecatError
from pipeline.data.prepare import prepare
from pipeline.members import checkpoints
from pipeline.train import plan as plans
from pipeline.train.pretrain import pretrain

submitit = pytest.importorskip("submitit")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch") / "data"
    prepare(PrepareConfig("digits", root))
    return root


def _plan(tmp_path, batch_size: int = 64):
    made = plans.make_plan("digits", cat=2, total_steps=20, arch="small-resnet", batch_size=batch_size)
    return made, plans.save(made, tmp_path / "plan.json")


@pytest.mark.slow
def test_a_plan_as_local_jobs_trains_what_this_process_trains_and_never_a_member_twice(data, tmp_path):
    made, path = _plan(tmp_path)
    for m in made.members:  # the reference: each member trained in this process
        pretrain(PretrainConfig(m.name, "digits", m.seed, m.steps, batch_size=64), data, tmp_path / "ref")
    runs = tmp_path / "runs"
    args = ("pretrain", "--plan", path, "--launcher", "local", "--slurm-gpus-per-node", "0", "--runs", runs)
    out = run(*args, "--data-root", data, "--wait", "--json")
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    assert [(r["member"], r["state"], r["submitted"]) for r in rows] == [(m.name, "done", True) for m in made.members]
    for m in made.members:
        ref, job = (checkpoints.load(root / m.name / "checkpoint.pt")["model"] for root in (tmp_path / "ref", runs))
        assert all(torch.equal(ref[k], job[k]) for k in ref), m.name  # bit for bit on the CPU

    again = run(*args, "--data-root", data, "--json")  # submitted twice: nothing trains twice
    assert [(r["state"], r["submitted"]) for r in json.loads(again.stdout)] == [("done", False)] * 2
    assert len((runs / ".jobs/jobs.jsonl").read_text().splitlines()) == 2
    status = run("status", path, "--runs", runs)
    assert status.exit_code == 0 and status.output.count("(local): done") == 2, status.output


def test_a_failing_job_reaches_the_exit_code_of_wait_and_status(data, tmp_path):
    _, path = _plan(tmp_path, batch_size=4096)  # more than digits' 1,347 train images: each job fails
    runs = tmp_path / "runs"
    args = ("pretrain", "--plan", path, "--launcher", "local", "--slurm-gpus-per-node", "0", "--runs", runs)
    out = run(*args, "--member", "run1", "--data-root", data, "--wait")
    assert out.exit_code == 1 and "run1: failed" in out.output, out.output
    assert "batch size 4096 exceeds the 1347 training images" in out.output
    assert f"watch them: timecat status {path} --runs {runs}" in out.output
    status = run("status", path, "--runs", runs)
    assert "job" in status.output and "(local): failed: " in status.output and "batch size 4096" in status.output
    assert "log: " in status.output
    alone = run("status", "--runs", runs)  # every job, without the plan
    assert alone.exit_code == 0 and "run1: failed, job " in alone.output and "batch size 4096" in alone.output
    nothing = run("status", "--runs", tmp_path / "elsewhere")
    assert nothing.exit_code == 2 and "no jobs under" in nothing.output


def test_the_slurm_script_carries_the_partition_gpus_nodes_and_time_asked_for(tmp_path):
    from pipeline.jobs.launch import executor, sbatch_script

    extra = ("exclusive=true",)
    launch = LaunchConfig(
        launcher="slurm", partition="h100", account="vision", time_min=600, nodes=2, slurm_extra=extra
    )
    script = sbatch_script(launch, tmp_path)
    for line in ("--partition=h100", "--account=vision", "--time=600", "--nodes=2", "--gpus-per-node=8"):
        assert f"#SBATCH {line}" in script, line
    assert "#SBATCH --ntasks-per-node=8" in script and "#SBATCH --exclusive=true" in script
    assert "#SBATCH --signal=USR2@" in script  # submitit's preemption and timeout signal, which it requeues on
    with pytest.raises(TimecatError, match="slurm partition: SLURM options need --launcher slurm"):
        executor(LaunchConfig(launcher="local", partition="h100"), tmp_path)
    with pytest.raises(TimecatError, match="--launcher slurm: no SLURM here .*or use --launcher local"):
        executor(launch, tmp_path)  # this machine has no srun
    out = run("pretrain", "--name", "x", "--launcher", "local")
    assert out.exit_code == 2 and "--launcher submits a plan's members: give --plan FILE" in out.output


@pytest.mark.slow
def test_a_job_preempted_the_way_slurm_does_checkpoints_at_the_signal_and_resumes_there(data, tmp_path):
    """No periodic checkpoint (checkpoint_every 0): the requeued job resumes at the step of the signal, so only
    the work since the signal is lost, and it ends where an uninterrupted job ends, bit for bit."""
    import os
    import signal
    import time
    from pathlib import Path

    from pipeline.jobs.launch import submit_plan

    made = plans.make_plan("digits", cat=1, total_steps=80, arch="small-resnet", batch_size=64)
    member = made.members[0]
    config = PretrainConfig(member.name, "digits", member.seed, 80, batch_size=64, checkpoint_every=0, log_every=2)
    runs = tmp_path / "runs"
    rows = submit_plan([config], data, runs, LaunchConfig(launcher="local", gpus_per_node=0))
    job = submitit.LocalJob(tmp_path / "runs/.jobs", rows[0]["job_id"])
    log = runs / member.name / "log.jsonl"

    def logged_step() -> int:
        lines = log.read_text().splitlines() if log.is_file() else []
        return max([json.loads(line).get("step", 0) for line in lines if line.endswith("}")], default=0)

    deadline = time.monotonic() + 80
    while logged_step() < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    signalled_after = logged_step()
    # SLURM signals the job's processes; here they are the children of submitit's local controller.
    job_id = rows[0]["job_id"]
    children = [int(p) for p in Path(f"/proc/{job_id}/task/{job_id}/children").read_text().split()]
    assert children and signalled_after < 80, "the job ended before it could be signalled"
    for child in children:
        os.kill(child, signal.SIGUSR2)  # what SLURM sends before preemption or the time limit (submitit's --signal)
    pretrain(PretrainConfig(member.name, "digits", member.seed, 80, batch_size=64), data, tmp_path / "ref")
    deadline = time.monotonic() + 180
    while not (job.paths.result_pickle.exists()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert f"Requeued job {job_id}" in job.paths.stdout.read_text()
    result = job.result()
    preempted = [json.loads(line) for line in log.read_text().splitlines() if '"preempted"' in line]
    assert len(preempted) == 1 and result["resumed_from"] == preempted[0]["step"] >= signalled_after
    assert result["step"] == 80
    payload = checkpoints.load(runs / member.name / "checkpoint.pt")
    ref = checkpoints.load(tmp_path / "ref" / member.name / "checkpoint.pt")["model"]
    assert payload["complete"] and all(torch.equal(ref[k], payload["model"][k]) for k in ref)


def test_a_local_job_killed_without_a_result_is_lost_and_its_member_can_be_submitted_again(tmp_path):
    import subprocess
    import sys

    from pipeline.jobs.launch import JOBS_FILE, latest_jobs

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = tmp_path / "runs/.jobs"
    folder.mkdir(parents=True)
    record = {"member": "run0", "job_id": gone.stdout.strip(), "launcher": "local", "folder": str(folder)}
    (folder / JOBS_FILE).write_text(json.dumps(record) + "\n")
    job = latest_jobs(tmp_path / "runs")["run0"]
    assert job["job_state"] == "lost" and "ended without a result" in job["error"]


def test_an_extraction_as_a_local_job_caches_what_this_process_caches(copy, tmp_path):
    import numpy as np

    import cache

    store = tmp_path / "job.zarr"
    args = ("extract", "--members", "run0,run1", "--dataset", "digits", "--batch-size", "128")
    args += ("--data-root", copy["data"], "--runs", copy["runs"], "--cache", store)
    out = run(*args, "--launcher", "local", "--slurm-gpus-per-node", "0", "--wait", "--json")
    assert out.exit_code == 0, out.output
    (row,) = json.loads(out.stdout)
    assert row["state"] == "done" and row["member"] == "extract:digits:run0,run1"
    for split in ("train", "test"):
        ours = cache.open(str(store)).features("digits", split, ["run0", "run1"])[0]
        theirs = cache.open(copy["cache"]).features("digits", split, ["run0", "run1"])[0]
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)  # another process: float32 rounding
    assert "extract:digits:run0,run1" in (copy["runs"] / ".jobs/jobs.jsonl").read_text()


@pytest.mark.slow
def test_a_sweep_split_over_three_local_jobs_writes_the_records_one_process_writes(tmp_path):
    """Six Cat2 subsets of four 16-d members, two per batch as one process cuts them (--memory-gib): three
    jobs, each appending its batch's records, which agree with one process's and carry nothing more."""
    from conftest import assert_agreeing_probe, digits_cache

    from pipeline.configs import ProbeConfig
    from pipeline.probe import c_search, results
    from pipeline.probe.run import sweep

    names = digits_cache(tmp_path / "c.zarr", members=4)
    path = str(tmp_path / "c.zarr")
    two = 2 * 8 * c_search.STATE_COPIES * 4 * 10 * 33  # two subsets: 8 candidates, 10 classes, 32 dims + intercept
    config = ProbeConfig("digits", names, precision="fp32", memory_gib=two / 2**30)
    single, _ = sweep(config, names, 2, None, path, tmp_path / "one")
    assert single[0]["batch"]["batches"] == 3
    args = ("probe", "--cat", "2", "--from", ",".join(names), "--dataset", "digits", "--precision", "fp32")
    args += ("--memory-gib", str(config.memory_gib), "--cache", path, "--runs", tmp_path / "runs")
    out = run(*args, "--results", tmp_path / "jobs", "--launcher", "local", "--slurm-gpus-per-node", "0", "--wait")
    assert out.exit_code == 0, out.output
    assert "Cat2 over 6 subsets" in out.stdout
    saved = {tuple(r["members"]): r for r in results.load(tmp_path / "jobs")}
    assert len(results.load(tmp_path / "jobs")) == 6 and len(saved) == 6  # each record appended once
    for one in single:
        two = saved[tuple(one["members"])]
        assert set(two) == set(one) and two["sweep"] == one["sweep"]  # the record one process writes, no more
        assert two["batch"] == one["batch"] == {"subsets": 6, "batches": 3, "memory_budget_gib": config.memory_gib}
        assert_agreeing_probe(one, two)
    status = run("status", "--runs", tmp_path / "runs", "--json")
    jobs = {r["name"].rsplit(":", 1)[1]: r["job_state"] for r in json.loads(status.stdout)}
    assert jobs == {f"{k}/3": "done" for k in (1, 2, 3)}

    refused = run(*args[:1], "--members", "m0,m1", *args[5:], "--launcher", "local")
    assert refused.exit_code == 2 and "give --cat N --from POOL" in refused.output


def test_a_preemption_signal_never_cuts_a_block_of_appends_in_two():
    """A sweep's job protects its signal: inside ``uncut`` it is held; a finished block drops it (the records
    are whole, the job returns), a failed one hands it on (the job is requeued and does the work again)."""
    import os
    import signal

    from pipeline.core import preemption

    seen = []
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        preemption.protect(signal.SIGUSR2)
        with preemption.uncut():
            os.kill(os.getpid(), signal.SIGUSR2)
            assert seen == []
        assert seen == []  # dropped: the block finished
        with pytest.raises(OSError), preemption.uncut():
            os.kill(os.getpid(), signal.SIGUSR2)
            raise OSError("disk full")
        assert seen == [signal.SIGUSR2]  # handed on: the block failed
        preemption.disarm()
        with preemption.uncut():  # nothing protected: a no-op
            os.kill(os.getpid(), signal.SIGUSR2)
        assert seen == [signal.SIGUSR2] * 2
    finally:
        preemption.disarm()
        signal.signal(signal.SIGUSR2, before)


def test_a_sweeps_records_are_appended_in_one_uncut_write(tmp_path, monkeypatch):
    """The wiring: a signal that lands while the sweep appends its records waits for the append, which is one."""
    import os
    import signal

    from conftest import digits_cache

    from pipeline.configs import ProbeConfig
    from pipeline.core import preemption
    from pipeline.probe import results
    from pipeline.probe import run as probe_run

    names = digits_cache(tmp_path / "c.zarr", members=3)
    seen, appends = [], []
    append = results.append

    def signalled_append(root, *records):
        os.kill(os.getpid(), signal.SIGUSR2)  # SLURM's signal, in the middle of the append
        appends.append((len(records), len(seen)))
        return append(root, *records)

    monkeypatch.setattr(results, "append", signalled_append)
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        preemption.protect(signal.SIGUSR2)
        config = ProbeConfig("digits", names, precision="fp32")
        probe_run.sweep(config, names, 2, None, str(tmp_path / "c.zarr"), tmp_path / "r")
    finally:
        preemption.disarm()
        signal.signal(signal.SIGUSR2, before)
    assert appends == [(3, 0)] and seen == [] and len(results.load(tmp_path / "r")) == 3


def test_a_sweeps_cut_counts_the_bf16_reference_and_a_job_on_another_precision_refuses(tmp_path):
    """bf16 fits keep a per-row reference, so one process cuts them into more batches; jobs are cut for the
    precision they will fit in, and a job whose device resolves another one refuses rather than fit its batch
    over the memory budget, or differently from one process."""
    from conftest import digits_cache

    from pipeline.configs import ProbeConfig
    from pipeline.jobs.launch import SweepJob, sweep_precision
    from pipeline.probe import c_search
    from pipeline.probe.run import batch_positions, subsets

    names = digits_cache(tmp_path / "c.zarr", members=4)
    path, chosen = str(tmp_path / "c.zarr"), subsets(names, 2, None, 0)
    fp32 = 6 * 8 * c_search.STATE_COPIES * 4 * 10 * 33  # every pair in one batch, without a reference
    config = ProbeConfig("digits", names, precision="fp32", memory_gib=fp32 / 2**30)
    assert len(batch_positions(config, chosen, path, 1, "fp32")) == 1
    assert len(batch_positions(config, chosen, path, 1, "bf16")) == 6  # 1,400 rows' reference: one pair each
    slurm = LaunchConfig(launcher="slurm", gpus_per_node=8)
    assert sweep_precision(ProbeConfig("digits", names), slurm, 16) == "bf16"
    assert sweep_precision(config, slurm, 16) == "fp32"  # asked for
    cpu = LaunchConfig(launcher="local", gpus_per_node=0)
    here = c_search.solver_precision("auto", torch.device("cpu"), 16)[0]
    assert sweep_precision(ProbeConfig("digits", names), cpu, 16) == here

    plan = {"order": list(names), "subsets": 6, "width": 16, "precision": "bf16"}
    job = SweepJob(config, chosen[:1], plan, path, tmp_path / "r", {"sweep": {}})  # as submitit calls it
    with pytest.raises(TimecatError, match=r"resolves --precision fp32 to fp32 \(asked for\), but the sweep was cut"):
        job()
    assert not (tmp_path / "r").exists()  # refused before anything was written


def _ranks_agree(rank: int, port: int, out: str) -> None:
    import os
    import signal

    import torch.distributed as dist

    from pipeline.core import preemption

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    handled = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: handled.append(signum))
    preemption.arm(signal.SIGUSR2)
    first = None
    for step in range(1, 7):
        if rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGUSR2)  # SLURM's signal reaches one rank only
        if preemption.requested() and first is None:
            first = step
    preemption.disarm()
    dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        f.write(f"{first} {len(handled)}")


def test_ranks_agree_on_the_step_to_checkpoint_when_one_of_them_is_signalled(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ranks_agree, args=(port, str(tmp_path / "first")), nprocs=2)
    # Both stop at the step the signal came in, and neither ran submitit's handler in the middle of a step.
    assert [(tmp_path / f"first.{r}").read_text() for r in (0, 1)] == ["3 0", "3 0"]


def test_a_signal_noted_after_the_last_step_is_handed_on_when_released():
    import os
    import signal

    from pipeline.core import preemption

    handled = []
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: handled.append(signum))
    try:
        preemption.arm(signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert handled == [] and preemption.requested()
        preemption.release()  # the final stage: submitit's handler again, and the signal it missed
        assert handled == [signal.SIGUSR2] and not preemption.requested()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert handled == [signal.SIGUSR2] * 2
    finally:
        preemption.disarm()
        signal.signal(signal.SIGUSR2, before)
