"""timecat's command line: options in, one call into a stage, results out.

Every stage error (TimecatError, CacheError) becomes a ClickException here, in
one place, so users see one clean line instead of a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import click

from pipeline import __version__, options
from pipeline.configs import (
    DemoConfig,
    DiversityConfig,
    DominoesConfig,
    ExtractConfig,
    LaunchConfig,
    PlanConfig,
    PrepareConfig,
    PretrainConfig,
    ProbeConfig,
    ReportConfig,
    ToyConfig,
)
from pipeline.data.recipes import KINDS
from pipeline.options import CACHE, DATA_ROOT, JSON, NAMES, RESULTS, RUNS


def _out(data, as_json: bool, lines) -> None:
    """Print a command's result once: as JSON, or as the text lines ``lines(data)`` makes of it."""
    click.echo(json.dumps(data, indent=1) if as_json else "\n".join(lines(data)))


def _require(params: dict, *names: str) -> None:
    """A usage error naming the options that a command needs and were not given."""
    missing = [f"--{name.replace('_', '-')}" for name in names if params[name] is None]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)}")


def _without_option(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag VALUE`` / ``flag=VALUE`` (to hand the rest to launched processes)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


class TimecatGroup(click.Group):
    """A click group that turns stage errors into clean ClickExceptions; its commands share one workspace."""

    command_class = options.WorkspaceCommand
    group_class = type  # subgroups (``timecat cache``) are TimecatGroups too

    def invoke(self, ctx):
        import cache
        from pipeline.core.errors import TimecatError

        try:
            return super().invoke(ctx)
        except (TimecatError, cache.CacheError) as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=TimecatGroup)
@click.version_option(__version__, prog_name="timecat")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """timecat: pretrain CatN members, cache their features, probe any combination.

    Data flows one way: images -> .beton -> members -> feature cache -> probes -> reports.

    \b
    Environment: TIMECAT_WORKDIR (--workdir); TIMECAT_DATA, TIMECAT_RUNS,
    TIMECAT_CACHE, TIMECAT_RESULTS (one location each); TIMECAT_PROGRESS_EVERY
    (seconds between progress lines in a log file, default 30);
    TIMECAT_DIST_TIMEOUT_MIN (process-group timeout under torchrun, default
    180); TQDM_DISABLE=1 (no progress bars).

    Example: timecat demo
    """
    from pipeline.core.progress import configure_logging

    configure_logging(verbose)


@main.command()
@click.argument("kind")
@DATA_ROOT
@options.config_options(PrepareConfig)
def prepare(kind, data_root, **params):
    """Write the train and test splits of a dataset of KIND as FFCV .beton files.

    KIND (the dataset's registered kind, which picks its reader and recipes) is
    one of {kinds}. dominoes-mixture and dominoes-balanced put a digit above a
    Fashion-MNIST dress or coat, agreeing with the label 99% or 50% of the time.
    imagenet reads DATA_ROOT/imagenet/{train,val} (or --train/--test);
    inat2018 reads DATA_ROOT/inat2018/{train,val}2018.json, its labels from
    category_id through one mapping shared by both splits (never folder names).
    ImageNet's and iNat's val splits become the test split. Splits already
    prepared are kept as they are; a .beton is renamed into place when done and
    its manifest written last, so a killed prepare never leaves a split that
    looks complete. --storage defaults to each dataset's own (raw pixels for
    small images; JPEG q90 at most 500 px on the long side for ImageNet-size
    ones, about 65 GB for ImageNet-1k).

    \b
    Example: timecat prepare fashion-mnist
    Example: timecat prepare imagefolder --name pets --train pets/train --test pets/val
    Example: timecat prepare imagenet --train /data/imagenet/train --test /data/imagenet/val --on-corrupt skip
    Example: timecat prepare imagenet --name imagenet-mixed --storage mixed
    """
    from pipeline.data.prepare import prepare as prepare_stage

    config = options.make_config(PrepareConfig, params, kind=kind, data_root=data_root)
    for m in prepare_stage(config):
        click.echo(
            f"{m['name']}/{m['split']}: {m['rows']} images, {len(m['classes'])} classes, fingerprint {m['fingerprint']}"
        )
        for s in m.get("skipped", []):
            click.echo(f"  skipped unreadable {s['path']}: {s['error']}", err=True)


prepare.help = prepare.help.replace("{kinds}", ", ".join(KINDS))  # the registry's kinds, never a copied list


@main.command()
@options.config_options(PretrainConfig)
@options.config_options(LaunchConfig)
@click.option(
    "--plan",
    "plan_path",
    type=click.Path(path_type=Path),
    help="Train the members of a plan file (timecat plan); it sets each member's name, seed, steps, arch, width, "
    "dataset and batch size, and typing one of those too is refused.",
)
@click.option("--member", "only", help="With --plan: train only this member.")
@click.option(
    "--nproc-per-node",
    type=int,
    help="Launch K processes on this machine with torch's elastic launcher (several nodes: call torchrun yourself).",
)
@DATA_ROOT
@RUNS
@JSON
def pretrain(plan_path, only, nproc_per_node, data_root, runs, as_json, **params):
    """Train one member (or a plan's members) and save checkpoints under RUNS/NAME.

    --batch-size is the global batch: under torchrun each of W processes takes
    batch/W rows of every step (DDP; NCCL on GPU, gloo on CPU). A checkpoint is
    written every --checkpoint-every steps; run the same command again after a
    crash or preemption and it resumes there. A finished member is not retrained;
    a different recipe under the same name is refused, and so is a second
    process training the same member (a lock on RUNS/NAME/.lock). It writes
    RUNS/NAME/checkpoint.pt, config.json (the resolved config) and log.jsonl.
    On GPU the forward and backward run in bf16 autocast on channels_last
    inputs; weights and optimizer state stay float32.

    \b
    Example: timecat pretrain --name run0 --dataset fashion-mnist --seed 0 --steps 1000
    Example: timecat pretrain --plan plan.json --member run2
    Example: timecat pretrain --name sf0 --dataset digits --seed 0 --steps 500 --optimizer schedulefree --lr 0.003
    Example: timecat pretrain --plan table3.json --member cat4-run0 --nproc-per-node 8
    Example: timecat pretrain --plan table3.json --resolution 192 --min-resolution 160   # FFCV's ramp
    Example: torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
             $(which timecat) pretrain --plan table3.json --member cat4-run0
    Example: timecat pretrain --plan table3.json --launcher slurm --slurm-partition gpu --slurm-time 4320

    --launcher slurm (or local: processes of this machine) submits one submitit job per
    member that is not done, running or already submitted, prints the job ids and
    returns; `timecat status PLAN` shows the jobs. At SLURM's signal before
    preemption or the time limit, training checkpoints at its next step; submitit
    then requeues the job, which resumes there.
    """
    from pipeline.core import distributed
    from pipeline.train import plan as plans
    from pipeline.train.pretrain import pretrain_all

    if nproc_per_node is not None:
        if "LOCAL_RANK" in os.environ:
            raise click.UsageError("--nproc-per-node launches processes itself; under torchrun, leave it out")
        argv = _without_option(sys.argv[1:], "--nproc-per-node")
        if not argv or argv[0] != "pretrain":
            raise click.UsageError("--nproc-per-node works from the command line; from Python, use torchrun")
        distributed.launch(nproc_per_node, [sys.executable, "-m", "cli", *argv])
        return

    launch = options.make_config(LaunchConfig, params)
    if launch.launcher is not None and plan_path is None:
        raise click.UsageError("--launcher submits a plan's members: give --plan FILE (timecat plan writes one)")
    if plan_path is not None:
        plan = plans.load(plan_path)
        problem = plans.override_problem(plan, plan_path, options.typed(click.get_current_context()), only)
        if problem:
            raise click.UsageError(problem)
        chosen = [plan.member(only)] if only else list(plan.members)
        configs = [options.make_config(PretrainConfig, params, **plans.member_fields(plan, m)) for m in chosen]
    else:
        if only is not None:
            raise click.UsageError(f"--member {only} picks a member of --plan FILE; without a plan, use --name")
        missing = [f"--{k}" for k in ("name", "dataset", "seed", "steps") if params[k] is None]
        if missing:
            raise click.UsageError(f"missing {', '.join(missing)} (or give --plan FILE)")
        configs = [options.make_config(PretrainConfig, params)]
    if launch.launcher is not None:
        _submit_plan(configs, data_root, runs, launch, plan_path, as_json)
        return
    outcomes = pretrain_all(configs, data_root, runs)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun only rank 0 reports
    line = "{name}: {step} steps, test top-1 {test_top1:.2f}% -> {checkpoint}"
    _out(outcomes if plan_path else outcomes[0], as_json, lambda _: [line.format(**r) for r in outcomes])


def _job_lines(rows: list[dict]) -> list[str]:
    """One line per submitted (or skipped) piece of work: its state, job id and log, and a failure's error."""
    out = []
    for r in rows:
        job = f" job {r['job_id']}, log {r['log']}" if r.get("job_id") else ""
        out.append(f"{r['member']}: {r['state']}{job}" + (f": {r['error']}" if r.get("error") else ""))
    return out


def _watch(runs, launch, plan_path=None) -> str:
    """The command that shows submitted jobs' states."""
    jobs = f" --jobs-dir {launch.jobs}" if launch.jobs is not None else ""
    return f"timecat status{f' {plan_path}' if plan_path else ''} --runs {runs}{jobs}"


def _submit_plan(configs, data_root, runs, launch, plan_path, as_json) -> None:
    """``pretrain --plan --launcher``: submit, print each member's job (or why none), how to watch them."""
    from pipeline.jobs.launch import submit_plan

    rows = submit_plan(configs, data_root, runs, launch)
    _out(rows, as_json, lambda rows: [*_job_lines(rows), f"watch them: {_watch(runs, launch, plan_path)}"])
    if any(r["state"] == "failed" for r in rows):
        raise SystemExit(1)


@main.command()
@options.config_options(PlanConfig)
@click.option("--out", type=click.Path(path_type=Path), default="plan.json", show_default=True, help="Plan file.")
@JSON
def plan(out, as_json, **params):
    """Plan a fixed-compute CatN experiment: members, seeds and steps each; write it to OUT.

    \b
    Example: timecat plan --dataset imagenet --cat 4 --total-steps 400000
    Example: timecat plan --dataset imagenet --preset paper-table3 --out table3.json
    """

    from pipeline.core import files
    from pipeline.train import plan as plans

    files.check_destination(out)  # before the work: a rename would replace a device or FIFO there
    _require(params, "dataset")
    made = plans.make_plan(**asdict(options.make_config(PlanConfig, params)))
    path = plans.save(made, out)
    _out({**asdict(made), "path": str(path)}, as_json, lambda _: plans.format_plan(made, path))


@main.command()
@click.argument("plan_path", type=click.Path(path_type=Path), required=False)
@RUNS
@click.option("--jobs-dir", "jobs", type=click.Path(path_type=Path), help="Folder of the jobs (default: RUNS/.jobs).")
@JSON
def status(plan_path, runs, jobs, as_json):
    """Show which members of a plan are done, running, stopped (resumable) or missing, and their steps.

    Without a plan: every job submitted with --launcher (members, extractions,
    sweeps' batches), each with its state and, if it failed, its error and log.

    \b
    Example: timecat status plan.json --runs runs
    Example: timecat status --runs runs
    """
    from pipeline.train import plan as plans

    if plan_path is None:
        _job_status(runs, jobs, as_json)
        return
    rows = plans.status(plans.load(plan_path), runs)
    folder = jobs or Path(runs) / ".jobs"
    if folder.is_dir():  # members submitted through a launcher: their jobs beside their runs
        from pipeline.jobs.launch import latest_jobs

        latest = latest_jobs(runs, folder)
        rows = [{**r, **({"job": latest[r["member"]]} if r["member"] in latest else {})} for r in rows]
    _out(rows, as_json, plans.format_status)


def _job_status(runs, jobs, as_json) -> None:
    """``status`` without a plan: each submitted job's latest state."""
    folder = jobs or Path(runs) / ".jobs"
    if not folder.is_dir():
        raise click.UsageError(f"no jobs under {folder} (--launcher submits them); give a PLAN to see its members")
    from pipeline.jobs.launch import latest_jobs

    rows = [{"name": name, **job} for name, job in latest_jobs(runs, folder).items()]

    def lines(rows):
        out = []
        for r in rows:
            line = f"{r['name']}: {r['job_state']}, job {r['job_id']} ({r['launcher']})"
            out.append(line + (f": {r['error']} (log: {r['log']})" if r.get("error") else ""))
        return out

    _out(rows, as_json, lines)


@main.command()
@options.config_options(ExtractConfig)
@options.config_options(LaunchConfig)
@DATA_ROOT
@RUNS
@CACHE
@JSON
def extract(data_root, runs, cache_path, as_json, **params):
    """Cache the penultimate features of frozen members for every split of DATASET.

    An interrupted extraction (even kill -9) resumes from its first unwritten chunk
    when the same command runs again. Under torchrun each process (one per GPU, or
    gloo processes on CPU) fills its own contiguous, chunk-aligned rows.

    \b
    Example: timecat extract --members run0,run1,run2,run3 --dataset digits
    Example: torchrun --nproc-per-node 8 --no-python timecat extract --members run0,run1 --dataset imagenet
    Example: timecat extract --members run0,run1 --dataset digits --views 4

    --views K caches, per member, K seeded random-resized crops and flips of
    each train image, as the paper's probe recipe for the dataset's kind draws
    them (CIFAR: scale 0.8-1, bicubic; ImageNet, iNat18 and others: 0.08-1): the
    same crops for every member, for protocol bn-linear.
    """
    from pipeline.features.extract import extract as extract_stage

    _require(params, "members", "dataset")
    config = options.make_config(ExtractConfig, params)
    launch = options.make_config(LaunchConfig, params)
    if launch.launcher is not None:  # one job: the dataset's extraction of these members, DDP over its GPUs
        from pipeline.jobs.launch import submit_extract

        rows = submit_extract(config, data_root, runs, str(cache_path), launch)
        _out(rows, as_json, lambda rows: [*_job_lines(rows), f"watch it: {_watch(runs, launch)}"])
        if any(r["state"] == "failed" for r in rows):
            raise SystemExit(1)
        return
    summary = extract_stage(config, data_root, runs, cache_path)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports for the job
        _out(summary, as_json, lambda rows: [f"{_where(r)} {r['member']}: {r['state']}" for r in rows])


@main.command()
@click.option("--members", type=NAMES, help="Comma-separated members to concatenate, e.g. run0,run1,run2,run3.")
@click.option("--cat", "cat", type=int, help="Sweep: probe every N-member subset of --from.")
@click.option("--from", "pool", type=NAMES, help="Sweep: the pool of members, e.g. run0,run1,run2,run3,run4.")
@click.option("--max-subsets", type=int, help="Sweep: a seeded sample of at most this many subsets.")
@options.config_options(ProbeConfig)
@options.config_options(LaunchConfig)
@CACHE
@RESULTS
@RUNS
@JSON
def probe(members, cat, pool, max_subsets, cache_path, results, runs, as_json, **params):
    """Linear-probe the concatenated cached features of MEMBERS on DATASET.

    C is chosen on a held-out part of the train split; top-1 and top-5 are
    measured on the eval split, and each record is appended to RESULTS/probes.jsonl.
    With --cat N --from POOL, every N-member subset of POOL (or a seeded sample
    of --max-subsets) is probed and the mean and std over subsets reported.

    \b
    Example: timecat probe --members run0,run1,run2,run3 --dataset fashion-mnist
    Example: timecat probe --cat 2 --from run0,run1,run2,run3,run4 --max-subsets 5 --dataset digits
    Example: timecat probe --members run0,run1 --dataset cifar100 --protocol bn-linear
    Example: timecat probe --members run0,run1 --dataset digits --protocol knn
    Example: timecat probe --members run0,run1 --dataset digits --backend sklearn --precision fp32
    Example: torchrun --nproc-per-node 8 --no-python timecat probe --cat 4 --from run0,run1,run2,run3,run4,run5 \\
             --dataset inat2018
    Example: timecat probe --members run0,run1 --dataset digits --shots 5 --draws 5

    Under torchrun (batched backend) the ranks split the subsets, or, for a
    single probe, the C candidates; each record is appended once.

    \b
    Example: timecat probe --cat 4 --from run0,...,run11 --dataset inat2018 --launcher slurm --slurm-partition gpu

    --launcher slurm (or local: processes of this machine) submits a sweep as a
    job array: one job per batch of subsets as one process cuts them
    (--memory-gib; one subset per job for knn and bn-linear), on one GPU each.
    Each job appends the records one process would; --wait prints their summary.
    """
    from pipeline.core.progress import plural
    from pipeline.probe.results import format_record, results_path
    from pipeline.probe.run import few_shot, sweep
    from pipeline.probe.run import probe as probe_one

    if (members is None) == (cat is None):
        raise click.UsageError("give either --members, or --cat N with --from POOL")
    if cat is not None and not pool:
        raise click.UsageError("--cat N needs --from POOL (comma-separated members)")
    _require(params, "dataset")
    config = options.make_config(ProbeConfig, params, members=members or pool)
    launch = options.make_config(LaunchConfig, params)
    if launch.launcher is not None and (cat is None or config.shots is not None):
        raise click.UsageError(
            "--launcher submits a sweep's subsets as jobs: give --cat N --from POOL, without --shots (a single "
            "probe or a few-shot probe runs here)"
        )
    _require_cached(cache_path, config.dataset, config.members, runs, config.train_split)
    shots, draws = config.shots, config.draws
    path = results_path(results)
    if launch.launcher is not None:
        _submit_sweep(config, pool, cat, max_subsets, cache_path, results, runs, launch, as_json)
        return
    if cat is None and shots is not None:
        records, summary = few_shot(config, cache_path, results)
        what = f"{shots}-shot Cat{len(members)} over {plural(len(records), 'draw')}"
        _print_many(records, summary, what, "draws", path, as_json)
        return
    if cat is None:
        record = probe_one(config, cache_path, results)
        if os.environ.get("RANK", "0") != "0":
            return  # under torchrun, rank 0 reports for the job
        _out(record, as_json, lambda r: [format_record(r, path)])
        return
    records, summary = sweep(config, pool, cat, max_subsets, cache_path, results)
    if shots is None:
        what, over = f"Cat{cat} over {plural(len(records), 'subset')}", "subsets"
    else:
        what = f"{shots}-shot Cat{cat} over {plural(len(records), 'record')}"
        over = f"{len(records) // draws} subsets x {draws} draws"
    _print_many(records, summary, what, over, path, as_json)


def _submit_sweep(config, pool, cat, max_subsets, cache_path, results, runs, launch, as_json) -> None:
    """``probe --cat --launcher``: submit the sweep's batches; with --wait, their records' summary."""
    from pipeline.core import files
    from pipeline.core.progress import plural
    from pipeline.jobs.launch import submit_sweep
    from pipeline.probe.results import results_path
    from pipeline.probe.run import subsets, summarize

    chosen = subsets(pool, cat, max_subsets, config.seed)
    files.check_writable(results, "the results folder")  # now, not in every job
    extra = {"sweep": {"cat": cat, "pool": list(pool), "subsets": len(chosen)}}
    rows, records = submit_sweep(config, chosen, extra, str(cache_path), results, launch, runs)
    path = results_path(results)
    if records is not None:
        what = f"Cat{cat} over {plural(len(records), 'subset')}"
        _print_many(records, summarize(records), what, "subsets", path, as_json)
        return
    watch = f"records append to {path} as each job ends; watch the jobs: {_watch(runs, launch)}"
    _out(rows, as_json, lambda rows: [*_job_lines(rows), watch])
    if any(r["state"] == "failed" for r in rows):
        raise SystemExit(1)


def _require_cached(cache_path, dataset: str, members, runs, split: str) -> None:
    """Members or a dataset missing from the cache: one error with the `timecat extract` line that caches them."""
    import cache
    from pipeline.core.hints import require_cached

    where = options.location_flags(click.get_current_context())
    require_cached(cache.open(cache_path), dataset, members, runs, where, split)


def _print_many(records: list[dict], summary: dict, what: str, over: str, path, as_json: bool) -> None:
    """A sweep's or few-shot probe's records and their mean ± sample std (rank 0 only under torchrun)."""
    from pipeline.probe.results import format_many

    if os.environ.get("RANK", "0") == "0":
        _out(
            {"records": records, "summary": summary}, as_json, lambda _: format_many(records, summary, what, over, path)
        )


@main.command()
@click.argument("patterns", nargs=-1)
@RESULTS
@JSON
def results(patterns, results, as_json):
    """List the probe records that match every PATTERN.

    A PATTERN is FIELD=GLOB (lists such as members are joined by commas), a
    number comparison FIELD=gt:X, ge:X, lt:X, le:X (or FIELD>X, FIELD>=X, ...,
    quoted: a shell takes an unquoted > for a redirect), or a bare GLOB matched
    against dataset/protocol/backend/members. Dotted fields reach inside
    (chosen.C); total_steps, steps_per_member, arch and pretrained_on come from
    the members' provenance.

    \b
    Example: timecat results dataset=digits n_members=4
    Example: timecat results 'members=*run3*' top1=ge:90 backend=torch --json
    """
    from pipeline.probe import results as records

    rows = records.select(records.load(results), list(patterns))
    _out(rows, as_json, lambda rows: [records.format_row(r) for r in rows])
    if not as_json:
        click.echo(f"{len(rows)} record(s)", err=True)


@main.command()
@click.argument("id_a")
@click.argument("id_b")
@click.option("--resamples", default=1000, show_default=True, help="Bootstrap resamples of the eval rows (>= 1000).")
@click.option("--seed", default=0, show_default=True, help="Seed of the bootstrap.")
@RESULTS
@JSON
def compare(id_a, id_b, resamples, seed, results, as_json):
    """Paired difference in top-1 between two probe records (A - B) on the same eval rows, with its 95% interval.

    ID_A and ID_B are record ids (`timecat results` lists them), or their first 4 or
    more characters. The interval is a
    paired bootstrap over eval rows: only rows where the two probes disagree move
    it. Records scored on different eval rows are refused.

    \b
    Example: timecat compare 3f2a9c01b7d4 9e81c4a0f2b3 --workdir demo
    Example: timecat compare 3f2a 9e81 --workdir demo
    """
    from pipeline.report import tables as rep

    _out(rep.compare(results, id_a, id_b, resamples, seed), as_json, rep.format_compare)


@main.command()
@click.argument("record_id", metavar="ID")
@click.option("--dataset", required=True, help="Cached dataset whose features the head scores.")
@click.option("--split", default="test", show_default=True, help="Split of DATASET to score.")
@click.option("--top-k", "k", default=5, show_default=True, type=click.IntRange(min=1), help="Classes ranked per row.")
@click.option("--out", type=click.Path(path_type=Path), help="Save the ranked classes: FILE.npz or FILE.csv.")
@CACHE
@RESULTS
@JSON
def predict(record_id, dataset, split, k, out, cache_path, results, as_json):
    """Apply probe ID's saved head to the cached features of its members on DATASET/SPLIT.

    Ranks every row's classes (top-k); where the split has the head's classes,
    prints top-1 with its 95% interval and top-5; a split with other classes is
    ranked, not scored. The members' features must come from the checkpoints the
    head was fit on. ID is a record id (`timecat results` lists them), or its
    first 4 or more characters.

    \b
    Example: timecat predict 3f2a9c01b7d4 --dataset fashion-mnist --split test --workdir demo
    Example: timecat predict 3f2a9c01b7d4 --dataset digits --split train --out digits_train_top5.csv
    """
    from pipeline.probe import predict as apply

    predicted = apply.predict(results, record_id, dataset, split, cache_path, k)
    summary = {key: value for key, value in predicted.items() if key not in ("topk", "labels", "label_names")}
    if out is not None:
        summary["out"] = str(apply.write(out, predicted, summary["classes"]))
    _out(summary, as_json, lambda s: apply.format_summary(s, out))


@main.command()
@click.argument("patterns", nargs=-1)
@RESULTS
@options.config_options(ReportConfig)
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="PNG (default RESULTS/catn[_LAYOUT].png).")
@JSON
def report(patterns, results, plot_path, as_json, **params):
    """Print probe results in the paper's Table 3 (or Table 2) layout and save plots, of the records that match
    every PATTERN (`timecat results --help`; none: all).

    A cell is one probe's top-1 with its 95% bootstrap interval, or mean ± sample
    std (n) over member sets of the same kind. Plots: top-1 against N per dataset
    (RESULTS/catn.png), and in-distribution against transfer accuracy
    (RESULTS/id_vs_ood.png) when the members' pretraining dataset was probed too, and
    few-shot top-1 against shots per class for each CatN (RESULTS/shots.png).

    \b
    Rows go by total budget, then method; each plot line is one total budget
    (and architecture, pretraining data), named in the legend. A plot not
    drawn this time is removed, with the reason printed.

    \b
    Example: timecat report --workdir demo
    Example: timecat report total_steps=1000 dataset=fashion-mnist --workdir demo
    Example: timecat report --layout table2 --protocol bn-linear
    Example: timecat report --protocol bn-linear --metric top1_eval_selected   # the paper's optimistic selection
    """
    from pipeline.report import tables as rep

    written = rep.write(results, **params, plot_path=plot_path, patterns=patterns)
    shown = {**(written["table"] or {}), **{k: written[k] for k in ("shots", "plots", "not_drawn")}}
    _out(shown, as_json, lambda _: rep.format_written(written))


@main.command()
@click.argument("member")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Where to write the state dict.")
@RUNS
def export(member, out, runs):
    """Write MEMBER as a plain state dict that torchvision's resnet50 loads.

    MEMBER is a run name under RUNS, or a foreign checkpoint file (the paper's,
    AlgoPerf's or torchvision's), which this converts to torchvision's names. A
    foreign file's own fc is kept; a file without one exports its backbone only.
    The output line and the file's metadata (torch.load(OUT)._metadata["timecat"])
    say which.

    \b
    Example: timecat export run0 --out run0_resnet50.pth
    Example: timecat export algoperf/seed2/checkpoint.pt --out seed2.pth
    """
    from pipeline.core import files
    from pipeline.members import checkpoints, interop

    files.check_destination(out)  # before loading: a rename would replace a device or FIFO there
    payload = checkpoints.load_member(runs, member, finished=False).payload
    path, head = interop.export_torchvision(payload, out)
    classes = "" if payload.get("head") == "none" else f", num_classes={payload['num_classes']}"
    click.echo(f"{member} -> {path} (torchvision resnet50{classes}; {head})")


@main.group("cache")
def cache_group() -> None:
    """Inspect, check and prune a feature cache.

    Example: timecat cache ls --workdir demo
    """


def _where(row: dict) -> str:
    view = row.get("view")
    return f"{row['dataset']}/{row['split']}" + ("" if view is None else f" view {view}")


def _cache_path(path: str | None, cache_path: str) -> str:
    """The cache a ``timecat cache`` command reads: PATH or --cache (either form; both only if they agree)."""
    from click.core import ParameterSource

    if path is None:
        return cache_path
    typed = click.get_current_context().get_parameter_source("cache_path") is ParameterSource.COMMANDLINE
    if typed and os.path.normpath(cache_path) != os.path.normpath(path):  # TIMECAT_CACHE gives way to PATH
        raise click.UsageError(f"PATH {path} and --cache {cache_path} name different caches; give one of them")
    return path


@cache_group.command("ls")
@click.argument("path", required=False)
@CACHE
@JSON
def cache_ls(path, cache_path, as_json):
    """List every cached array: dataset, split, member, shape, status and checkpoint.

    The cache is PATH, or --cache PATH, or WORKDIR/features.zarr.

    \b
    Example: timecat cache ls --workdir demo
    Example: timecat cache ls demo/features.zarr
    """
    import cache

    cache_path = _cache_path(path, cache_path)

    def line(r: dict) -> str:
        p = r["provenance"]
        sha, steps = (p.get("checkpoint_sha256") or "?")[:12], p.get("steps", "?")
        shape = " x ".join(f"{n:,}" if n is not None else "?" for n in (r["rows"], r["dim"])) + f" {r['dtype']}"
        pre = p.get("preprocessing") or {}
        seen = f"{pre.get('resolution', '?')} px, crop {pre.get('crop_ratio', '?')}, {pre.get('interpolation', '?')}"
        if "resize_px" in pre:  # a timm or torchvision model's own eval transform
            seen += f" (Resize {pre['resize_px']} + CenterCrop {pre['resolution']})"
        return (
            f"{_where(r)} {r['member']}: {shape}, {r['status']}, {p.get('arch', '?')} ({_weights_text(p)}), "
            f"checkpoint {sha}, steps {steps}, features: {p.get('feature_layer', '?')}, input {seen}"
        )

    _out(cache.open(cache_path).summary(), as_json, lambda rows: [line(r) for r in rows])


def _weights_text(provenance: dict) -> str:
    """Where an array's member got its weights, in a few words (older arrays record none)."""
    weights = provenance.get("weights") or {}
    if "tag" in weights:
        return f"{weights['library']} weights {weights['tag']}"
    if "weights" in weights:
        return f"{weights['library']} weights {weights['weights']}"
    if "file" in weights:
        return f"weights from {weights['file']}"
    return weights.get("kind") or "weights not recorded"


@cache_group.command("verify")
@click.argument("path", required=False)
@CACHE
@JSON
def cache_verify(path, cache_path, as_json):
    """Check a cache: status, a full NaN scan, shapes and label agreement across members.

    Also that each member's splits come from one checkpoint and each view from
    one seed. Every array's own metadata is read, never the consolidated copy a
    killed or edited store can leave stale. The cache is PATH, or --cache PATH,
    or WORKDIR/features.zarr. Exits with status 1 when any array has a problem.

    \b
    Example: timecat cache verify demo/features.zarr
    Example: timecat cache verify --workdir demo
    """
    path = _cache_path(path, cache_path)
    import cache

    def line(r: dict) -> str:
        verdict = "ok" if r["ok"] else "PROBLEM: " + "; ".join(r["problems"])
        shape = tuple(r["shape"]) if r["shape"] is not None else "(metadata unreadable)"
        what = f"{r['member']} {shape}" if r["member"] is not None else "labels "
        return f"{_where(r)} {what}: {verdict}"

    rows = cache.open(path).verify()
    _out(rows, as_json, lambda rows: [line(r) for r in rows])
    bad = sum(not r["ok"] for r in rows)
    if bad:
        raise click.ClickException(f"{bad} of {len(rows)} arrays have problems")


@cache_group.command("rm")
@click.argument("path", required=False)
@click.option("--dataset", required=True, help="Dataset whose arrays to remove.")
@click.option("--members", type=NAMES, required=True, help="Comma-separated members whose arrays to remove.")
@click.option("--splits", type=NAMES, help="Comma-separated splits (default: every cached split of DATASET).")
@click.option("--views", "views_only", is_flag=True, help="Remove only their augmented views (extract --views K).")
@CACHE
@JSON
def cache_rm(path, dataset, members, splits, views_only, cache_path, as_json):
    """Remove members' feature arrays (or only their augmented views) from a cache.

    The cache is PATH, or --cache PATH, or WORKDIR/features.zarr. A member that
    a live `timecat extract` is writing is refused. Other members are untouched;
    `timecat extract` caches a removed member again.

    \b
    Example: timecat cache rm --workdir demo --dataset digits --members run0 --views
    Example: timecat cache rm demo/features.zarr --dataset digits --members run0,run1 --splits train
    """
    import cache

    store = cache.open(_cache_path(path, cache_path), mode="a")
    removed = [
        {"dataset": dataset, "split": split, "view": view, "member": member}
        for member in members
        for split, view in store.remove(dataset, member, list(splits) if splits else None, views_only=views_only)
    ]
    _out(removed, as_json, lambda rows: [f"{_where(r)} {r['member']}: removed" for r in rows])


@main.command()
@options.config_options(ToyConfig)
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="PNG path (default: RESULTS/toy.png).")
@RESULTS
@JSON
def toy(plot_path, results, as_json, **params):
    """The paper's Section 3 counterexample: a sparse rule of a mixture fails half of it.

    Four components over two features (phi1, phi2), each linearly separable on
    its own (P1, P2 with phi1; P3, P4 with phi2); their mixture is not. For each
    random mixture, a linear rule with a sparsity bias is trained on it (full
    batch, exact population loss): by default with an L1 penalty under a smooth
    0-1 loss; --penalty weight-decay trains a two-layer diagonal linear network
    with weight decay instead (an implicit L1 penalty).
    Its kept features are then probed on each component with the best linear
    rule, against direct training on the component. The paper's argument: nearly
    every mixture keeps one feature and fails two of the four components; plain
    logistic regression without a penalty (--loss logistic --strength 0) is the
    control. A measured run: README, Experiments.

    \b
    Example: timecat toy
    Example: timecat toy --penalty weight-decay --json
    Example: timecat toy --loss logistic --penalty l1 --strength 0
    """
    from pipeline.experiments import toy as toys

    config = options.make_config(ToyConfig, params)
    result = toys.run(config)
    png = toys.plot(result, plot_path or Path(results) / "toy.png")
    _out({**result["summary"], "plot": str(png)}, as_json, lambda summary: toys.format_summary(summary, config))


@main.command()
@options.config_options(DiversityConfig)
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="PNG path (default: RESULTS/diversity.png).")
@CACHE
@RESULTS
@JSON
def diversity(plot_path, cache_path, results, as_json, **params):
    """How different members' features are: linear CKA between every pair, from the cache only.

    Beside it, the logreg probe top-1 of each member alone and of their
    concatenation (records appended to RESULTS/probes.jsonl). Low CKA between
    members of different seeds is the diversity Time-Cat concatenates. A probe
    already in the results with the same config and features is reused. The
    paper gives no CKA figures; the demo's Cat4: README, Experiments.

    \b
    Example: timecat diversity --members run3,run4,run5,run6 --dataset fashion-mnist --workdir demo
    Example: timecat diversity --members run0,run1 --dataset digits --no-probe --json
    """
    from pipeline.experiments import diversity as div

    _require(params, "members", "dataset")
    summary, _ = div.run(options.make_config(DiversityConfig, params), cache_path, results)
    summary["plot"] = str(div.plot(summary, plot_path or Path(results) / "diversity.png"))
    _out(summary, as_json, div.format_summary)


@main.command()
@options.config_options(DominoesConfig)
@DATA_ROOT
@JSON
def dominoes(data_root, as_json, **params):
    """The paper's spurious-feature test (Table 1): direct training against a probe of a mixture-pretrained CNN.

    Images stack a digit 0/1 (spurious) above a Fashion-MNIST dress/coat (the
    label). (a) A small CNN trained on the balanced set (digit independent of
    the label), tested on balanced data; (b) the same CNN, same budget,
    pretrained on the mixture (digit agrees 99%), then linear-probed on the
    balanced set through the feature cache. The paper: 97% against 94% on
    MNIST-Fashion dominoes; a measured run: README, Experiments. Data, runs,
    cache and plot go under WORKDIR (a few minutes on 2 CPU cores).

    \b
    Example: timecat dominoes
    Example: timecat dominoes --seeds 0 --steps 100 --json
    """
    from pipeline.experiments import dominoes as dom

    _out(dom.run(options.make_config(DominoesConfig, params, data_root=data_root)), as_json, dom.format_summary)


@main.command()
@options.config_options(DemoConfig)
@DATA_ROOT
@JSON
def demo(data_root, as_json, **params):
    """Run the whole pipeline on Fashion-MNIST (and digits for transfer) on a CPU.

    Cat1 (1 x B steps), Cat2 (2 x B/2) and Cat4 (4 x B/4) are pretrained, cached,
    probed, and shown as a table and a plot. A rerun keeps what is done.

    \b
    Example: timecat demo --workdir demo
    """
    from pipeline.experiments.demo import format_outcome, run_demo

    _out(run_demo(options.make_config(DemoConfig, params, data_root=data_root)), as_json, format_outcome)


if __name__ == "__main__":
    main()
