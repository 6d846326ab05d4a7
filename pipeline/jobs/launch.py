"""A plan's members, extractions and probe sweeps as jobs, through submitit: SLURM jobs, or processes of
this machine (its local executor).

``pretrain --plan FILE --launcher slurm|local`` submits one job per member that is neither done nor
running nor already submitted, as one job array. Each job trains its member with
``pipeline.train.pretrain`` under DDP over its processes: submitit's distributed environment gives every
process the RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR that torchrun would. A job that SLURM preempts,
or that reaches its time limit, is requeued by submitit (the job is ``Checkpointable``). At SLURM's
signal the training loop writes a checkpoint at its next step (pipeline.core.preemption) before submitit
requeues the job, which resumes there.

``extract --launcher`` submits the extraction as one job (DDP over its GPUs, resuming from each array's
first missing chunk), and ``probe --cat N --from POOL --launcher`` one job per batch of subsets as one
process cuts them (``--memory-gib``), each writing the records one process writes.

Every submission appends ``{member, job_id, launcher, folder}`` to ``JOBS/jobs.jsonl`` (``JOBS``:
``--jobs-dir``, default ``RUNS/.jobs``), beside submitit's scripts and logs; ``timecat status`` reads it.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from dataclasses import asdict, replace
from pathlib import Path

import submitit

from pipeline.configs import ExtractConfig, LaunchConfig, PretrainConfig, ProbeConfig
from pipeline.core import files, preemption
from pipeline.core.errors import TimecatError
from pipeline.data.splits import read_manifest
from pipeline.members import checkpoints

JOBS_FILE = "jobs.jsonl"


class MemberJob(submitit.helpers.Checkpointable):
    """One member's training, as submitit runs it in each process of the job (requeued as it is)."""

    def __init__(self, config: dict, data_root: str, runs_root: str):
        self.config, self.data_root, self.runs_root = config, data_root, runs_root

    def __call__(self) -> dict:
        from pipeline.train.pretrain import pretrain_all

        environment = submitit.JobEnvironment()
        if environment.num_tasks > 1:  # torchrun's contract, from SLURM's variables
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        # submitit's requeue waits for the training loop's next step, which checkpoints first.
        preemption.arm(environment._usr_sig())
        try:
            return pretrain_all([PretrainConfig(**self.config)], Path(self.data_root), Path(self.runs_root))[0]
        finally:
            preemption.disarm()


class ExtractJob(submitit.helpers.Checkpointable):
    """One extraction (a dataset, a group of members), as submitit runs it in each process of the job.

    Requeued as it is after preemption, it resumes from each array's first missing chunk.
    """

    def __init__(self, config: dict, data_root: str, runs_root: str, cache_path: str):
        self.config, self.data_root, self.runs_root, self.cache_path = config, data_root, runs_root, cache_path

    def __call__(self) -> list[dict]:
        from pipeline.features.extract import extract

        if submitit.JobEnvironment().num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        config = ExtractConfig(**self.config)
        return extract(config, Path(self.data_root), Path(self.runs_root), self.cache_path)


class SweepJob(submitit.helpers.Checkpointable):
    """One batch of a ``--cat`` sweep's subsets, fitted as one process fits that batch: the same records.

    Requeued as it is after preemption, it fits the batch again; its records are appended in one write its
    signal does not cut (pipeline.core.preemption), so none is appended twice.
    """

    def __init__(self, config: ProbeConfig, subsets: list, plan: dict, cache_path: str, results_root, extra: dict):
        self.config, self.subsets, self.plan = config, subsets, plan
        self.cache_path, self.results_root, self.extra = cache_path, results_root, extra

    def __call__(self) -> list[dict]:
        from pipeline.probe import c_search
        from pipeline.probe.run import probe, probe_many

        plan = self.plan
        if self.config.batched:  # the batch was cut for a precision: this device must resolve the same one
            found, why = c_search.solver_precision(self.config.precision, c_search.device(), plan["width"])
            if found != plan["precision"]:
                raise TimecatError(
                    f"this job's device resolves --precision {self.config.precision} to {found} ({why}), but the "
                    f"sweep was cut into batches for {plan['precision']}: submit it again with --precision {found}"
                )
        environment = submitit.JobEnvironment()
        if environment.num_tasks > 1:  # every task would append the same records
            raise TimecatError(f"a sweep's job runs one process, not {environment.num_tasks}")
        preemption.protect(environment._usr_sig())
        try:
            if self.config.batched:  # the batch as one process fits it: one fit, members in the sweep's order
                # a share of a sweep of several subsets: fitted as one process fits that batch
                sizes = None if plan["subsets"] == 1 else [len(self.subsets)]
                return probe_many(
                    self.config, self.subsets, self.cache_path, self.results_root, self.extra, sizes=sizes,
                    order=plan["order"],
                )  # fmt: skip
            return [
                probe(replace(self.config, members=tuple(s)), self.cache_path, self.results_root, self.extra)
                for s in self.subsets
            ]
        finally:
            preemption.disarm()


def sweep_precision(config: ProbeConfig, launch: LaunchConfig, width: int) -> str:
    """The solver precision a sweep's jobs will fit in (the cut into batches depends on it): the one asked
    for; for ``auto``, bf16 on a SLURM job's GPU (compute capability 8.0 and newer, checked by the job),
    else what this machine resolves (a local job runs here; a CPU job on SLURM is checked by the job)."""
    import torch

    from pipeline.probe import c_search

    if config.precision == "auto" and launch.launcher == "slurm" and launch.gpus_per_node:
        return "bf16"
    where = c_search.device() if launch.gpus_per_node else torch.device("cpu")
    return c_search.solver_precision(config.precision, where, width)[0]


def submit_sweep(
    config: ProbeConfig, chosen: list[tuple[str, ...]], extra: dict, cache_path: str, results_root, launch, runs_root
) -> tuple[list[dict], list[dict] | None]:
    """Submit a sweep's subsets as a job array, one job per batch as one process cuts them (``--memory-gib``;
    one subset per job for protocols without the batched solver). Returns a row per job and, with
    ``launch.wait``, every record in subset order (None if a job failed)."""
    from pipeline.probe.run import batch_positions, member_dims, order_of

    order = order_of(chosen)
    plan = {"order": order, "subsets": len(chosen)}
    if config.batched:  # one process's cut; the other protocols fit one subset at a time
        dims, _, _ = member_dims(config, order, cache_path)
        plan |= {"width": max(dims.values()), "precision": sweep_precision(config, launch, max(dims.values()))}
        batches = batch_positions(config, chosen, cache_path, 1, plan["precision"])
        # the records state the batch of one process's sweep, not the job's share of it
        batch = {"subsets": len(chosen), "batches": len(batches), "memory_budget_gib": config.memory_gib}
        extra = {**extra, "batch": batch}
    else:
        batches = [[i] for i in range(len(chosen))]
    folder = jobs_folder(launch, runs_root)
    ex = executor(launch, folder, one_process=True)
    folder.mkdir(parents=True, exist_ok=True)
    with ex.batch():
        jobs = [
            ex.submit(SweepJob(config, [chosen[i] for i in batch], plan, cache_path, results_root, extra))
            for batch in batches
        ]
    # The sweep's identity in its jobs' names, so that another sweep of the same dataset and N keeps its own.
    sweep = hashlib.sha256(json.dumps([order, str(config)]).encode()).hexdigest()[:6]
    names = [f"probe:{config.dataset}:Cat{len(chosen[0])}:{sweep}:{k}/{len(jobs)}" for k in range(1, len(jobs) + 1)]
    rows = [_record_job(name, job, launch, folder) for name, job in zip(names, jobs, strict=True)]
    if not launch.wait:
        return rows, None
    _wait(jobs, names, rows)
    if any(r["state"] == "failed" for r in rows):
        return rows, None
    return rows, [record for job in jobs for record in job.result()]


def _record_job(name: str, job, launch: LaunchConfig, folder: Path) -> dict:
    """Append a submitted job to the job list; its row (what was submitted, and its log)."""
    record = {"member": name, "job_id": job.job_id, "launcher": launch.launcher, "folder": str(folder)}
    with files.open_append(folder / JOBS_FILE) as fd:
        files.append_all_or_nothing(fd, (json.dumps(record) + "\n").encode(), f"the job list {folder}")
    return {**record, "state": "submitted", "submitted": True, "log": str(job.paths.stderr)}


def submit_extract(
    config: ExtractConfig, data_root: Path, runs_root: Path, cache_path: str, launch: LaunchConfig
) -> list[dict]:
    """Submit ``config``'s extraction as one job (DDP over its GPUs); one row saying what was submitted."""
    for split in config.splits:  # an unprepared dataset or split: refused before the job
        read_manifest(data_root, config.dataset, split)
    folder = jobs_folder(launch, runs_root)
    ex = executor(launch, folder)
    folder.mkdir(parents=True, exist_ok=True)
    job = ex.submit(ExtractJob(asdict(config), str(data_root), str(runs_root), str(cache_path)))
    name = f"extract:{config.dataset}:{','.join(config.members)}"
    rows = [_record_job(name, job, launch, folder)]
    if launch.wait:
        _wait([job], [name], rows)
    return rows


def jobs_folder(launch: LaunchConfig, runs_root: Path) -> Path:
    return Path(launch.jobs) if launch.jobs is not None else Path(runs_root) / ".jobs"


def executor(launch: LaunchConfig, folder: Path, one_process: bool = False):
    """submitit's executor for ``launch``: one task per GPU (one on a CPU), the cluster options asked for;
    ``one_process``: one task on one node with at most one GPU (a sweep's batch fits on one device).

    submitit's SLURM executor needs ``srun`` on this machine (a cluster's login node has it); without
    one the error says so, and ``sbatch_script`` still writes the script it would submit.
    """
    if one_process:
        launch = replace(launch, nodes=1, gpus_per_node=min(1, launch.gpus_per_node))
    tasks = max(1, launch.gpus_per_node)
    slurm = _slurm_options(launch)
    if launch.launcher != "slurm":
        if slurm:
            raise TimecatError(f"{', '.join(f'slurm {k}' for k in sorted(slurm))}: SLURM options need --launcher slurm")
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=launch.time_min, tasks_per_node=tasks, gpus_per_node=launch.gpus_per_node)
        return ex
    try:
        ex = submitit.SlurmExecutor(folder=folder)
    except RuntimeError as e:  # submitit looks for srun first
        raise TimecatError(
            f"--launcher slurm: no SLURM here ({e}); submit from the cluster's login node, or use --launcher local"
        ) from None
    ex.update_parameters(**slurm_parameters(launch, slurm))
    return ex


def _slurm_options(launch: LaunchConfig) -> dict:
    """The SLURM-only options the user gave (partition, account, ...), in submitit's names."""
    slurm = {
        name: value
        for name, value in (
            ("partition", launch.partition),
            ("account", launch.account),
            ("qos", launch.qos),
            ("constraint", launch.constraint),
            ("mem", f"{launch.mem_gb}GB" if launch.mem_gb else None),
        )
        if value
    }
    if launch.slurm_extra:
        slurm["additional_parameters"] = dict(pair.split("=", 1) for pair in launch.slurm_extra)
    return slurm


def slurm_parameters(launch: LaunchConfig, options: dict) -> dict:
    """The parameters of submitit's SLURM executor (its sbatch options) for ``launch``."""
    return {
        "job_name": "timecat",
        "time": launch.time_min,
        "nodes": launch.nodes,
        "ntasks_per_node": max(1, launch.gpus_per_node),
        "gpus_per_node": launch.gpus_per_node,
        "cpus_per_task": launch.cpus_per_task,
        **options,
    }


def sbatch_script(launch: LaunchConfig, folder: Path, command: str = "python -m submitit.core._submit") -> str:
    """The sbatch script submitit writes for ``launch``, made without a cluster (to show or to test it)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=command, folder=folder, **slurm_parameters(launch, _slurm_options(launch)))


def error_line(text: str) -> str:
    """The line of a job's traceback or log that names its error (``TimecatError: ...``), shortened."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    for line in reversed(lines):
        name, colon, message = line.partition(": ")
        if colon and name.rsplit(".", 1)[-1].endswith(("Error", "Exception", "Interrupt")):
            return f"{name.rsplit('.', 1)[-1]}: {message}"[:300]
    return (lines[-1] if lines else "no error text")[:300]


def _records(folder: Path) -> list[dict]:
    path = folder / JOBS_FILE
    if not path.is_file():
        return []
    return [record for _, record in files.read_jsonl(path)[0]]  # a line torn by a crash is skipped


def latest_jobs(runs_root: Path, launch_folder: Path | None = None) -> dict[str, dict]:
    """Each member's last submitted job, with its state now (``job_state``)."""
    folder = launch_folder or Path(runs_root) / ".jobs"
    latest = {}
    for record in _records(folder):
        latest[record["member"]] = record
    return {member: {**record, **job_state(record, runs_root)} for member, record in latest.items()}


def job_state(record: dict, runs_root: Path) -> dict:
    """A submitted job's state: done, failed (with the end of its log), or SLURM's / the run folder's word."""
    folder = Path(record["folder"])
    paths = submitit.core.utils.JobPaths(folder, job_id=record["job_id"], task_id=0)
    if paths.result_pickle.exists():
        with open(paths.result_pickle, "rb") as f:
            outcome, value = pickle.load(f)  # submitit's own file: ("success", result) or ("error", traceback)
        if outcome == "success":
            return {"job_state": "done"}
        return {"job_state": "failed", "error": error_line(value), "log": str(paths.stderr)}
    if record["launcher"] == "slurm":
        return {"job_state": submitit.SlurmJob(folder, record["job_id"]).state.lower()}
    # A local job's id is its controller's pid: gone without a result, the job was killed (it is lost, and
    # its member may be submitted again); alive, it trains once it holds the member's lock.
    if not files.pid_alive(int(record["job_id"])):
        return {"job_state": "lost", "error": "its process ended without a result (killed?)", "log": str(paths.stderr)}
    if ":" in record["member"]:  # an extraction or a sweep's batch (a member's name has no colon): it runs
        return {"job_state": "running"}
    held = checkpoints.holder(Path(runs_root), record["member"])
    return {"job_state": "running" if held else "pending"}


def submit_plan(configs: list[PretrainConfig], data_root: Path, runs_root: Path, launch: LaunchConfig) -> list[dict]:
    """Submit the members of ``configs`` that need training; one row per member saying what was done."""
    from pipeline.train.pretrain import recipe

    folder = jobs_folder(launch, runs_root)
    for dataset in sorted({c.dataset for c in configs}):  # an unprepared dataset: refused before any job
        read_manifest(data_root, dataset, "train")
    earlier = latest_jobs(runs_root, folder)
    rows, todo = [], []
    for config in configs:
        payload = checkpoints.existing(runs_root, config.name, recipe(config))
        holder = checkpoints.holder(runs_root, config.name)
        job = earlier.get(config.name)
        if payload is not None and payload["complete"]:
            rows.append({"member": config.name, "state": "done", "submitted": False})
        elif holder is not None:
            rows.append({"member": config.name, "state": f"running ({json.dumps(holder)})", "submitted": False})
        elif job is not None and job["job_state"] in ("pending", "running", "requeued"):
            rows.append(
                {"member": config.name, "state": f"already submitted as job {job['job_id']}", "submitted": False}
            )
        else:
            todo.append(config)
    if todo:
        ex = executor(launch, folder)
        folder.mkdir(parents=True, exist_ok=True)
        with ex.batch():
            jobs = [ex.submit(MemberJob(asdict(c), str(data_root), str(runs_root))) for c in todo]
        rows += [_record_job(config.name, job, launch, folder) for config, job in zip(todo, jobs, strict=True)]
        if launch.wait:
            _wait(jobs, [c.name for c in todo], rows)
    return rows


def _wait(jobs: list, names: list[str], rows: list[dict]) -> None:
    """Block until every job ends; a failed one's error goes into its row (the command then exits 1)."""
    by_name = {r["member"]: r for r in rows}
    while not all(job.done() for job in jobs):
        time.sleep(1)
    for name, job in zip(names, jobs, strict=True):
        try:
            job.result()
            by_name[name]["state"] = "done"
        except Exception as e:  # submitit's FailedJobError, or UncompletedJobError for a killed job
            by_name[name]["state"] = "failed"
            by_name[name]["error"] = error_line(job.stderr() or str(e))
