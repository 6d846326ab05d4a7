"""timecat's command line: options in, one call into a stage, results out.

Every stage error (TimecatError, CacheError) becomes a ClickException here, in
one place, so users see one clean line instead of a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import click

from pipeline import __version__
from pipeline.configs import (
    ARCH_NAMES,
    PRESETS,
    PROTOCOLS,
    ExtractConfig,
    PrepareConfig,
    PretrainConfig,
    ProbeConfig,
)
from pipeline.report import LAYOUTS, METRICS


def _location(flag: str, default: str, env: str, what: str, dest: str | None = None, is_path: bool = True):
    """A --flag for one of timecat's locations, with a default and an environment variable."""
    decls = [flag, dest] if dest else [flag]
    kind = click.Path(path_type=Path) if is_path else str
    return click.option(*decls, type=kind, default=default, envvar=env, show_default=True, help=f"{what} (env {env}).")


DATA_ROOT = _location("--data-root", "data", "TIMECAT_DATA", "Folder of prepared datasets")
RUNS = _location("--runs", "runs", "TIMECAT_RUNS", "Folder of members, one sub-folder each")
# A string, not a Path: the cache may be any fsspec URL zarr accepts.
CACHE = _location("--cache", "features.zarr", "TIMECAT_CACHE", "Feature cache path or URL", "cache_path", False)
RESULTS = _location("--results", "results", "TIMECAT_RESULTS", "Folder of probe records and plots")
JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


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


def _fractions(value: str) -> tuple[float, float]:
    """'0.74,0.86' -> (0.74, 0.86); anything else is a usage error that shows the form."""
    try:
        start, end = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not START,END (two fractions of the budget, e.g. 0.74,0.86)") from None
    return start, end


class CommaList(click.ParamType):
    """``a,b,c`` -> a tuple, each item converted; bad or empty items are a usage error that names them."""

    def __init__(self, convert_item, what: str, example: str, unique: bool = False):
        self.convert_item, self.what, self.example, self.unique = convert_item, what, example, unique
        self.name = f"{what} list"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        items = [item.strip() for item in str(value).split(",")]
        bad, out = [], []
        for item in items:
            try:
                out.append(self.convert_item(item))
            except (TypeError, ValueError):
                bad.append(item)
        if bad:
            self.fail(
                f"{bad} are not {self.what}s; give comma-separated {self.what}s such as {self.example}", param, ctx
            )
        if self.unique and len(set(out)) != len(out):
            self.fail(f"an item is named twice in {value!r}", param, ctx)
        return tuple(out)


def _positive(item: str) -> float:
    number = float(item)
    if not number > 0 or number == float("inf"):
        raise ValueError(item)
    return number


def _name(item: str) -> str:
    if not item:
        raise ValueError(item)
    return item


def _integer(item: str) -> int:
    if not item.lstrip("-").isdigit():
        raise ValueError(item)
    return int(item)


POSITIVE_NUMBERS = CommaList(_positive, "positive number", "1e-4,5e-4")
INTEGERS = CommaList(_integer, "integer", "0,1,2", unique=True)
NAMES = CommaList(_name, "name", "run0,run1", unique=True)


class FractionPair(click.ParamType):
    """``START,END`` -> (start, end); a tuple passes through (a config default)."""

    name = "START,END"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return _fractions(value)
        except click.BadParameter as e:
            self.fail(e.message, param, ctx)


def _param_type(field):
    """The click type of a config field, from its annotation and metadata (pipeline.configs.param)."""
    meta, kind = field.metadata, str(field.type)
    low = meta.get("low")
    if meta.get("choices"):
        return click.Choice(list(meta["choices"]))
    for prefix, list_type in (("tuple[float, ...]", POSITIVE_NUMBERS), ("tuple[int, ...]", INTEGERS)):
        if kind.startswith(prefix):
            return list_type
    if kind.startswith("tuple[str, ...]"):
        return NAMES
    if kind.startswith("tuple[float, float]"):
        return FractionPair()
    if kind.startswith("int"):
        bounded = low is not None or meta.get("high") is not None
        return click.IntRange(min=low, max=meta.get("high")) if bounded else int
    if kind.startswith("float"):
        return click.FloatRange(min=low, min_open=meta.get("low_open", False)) if low is not None else float
    if kind.startswith("Path"):
        return click.Path(path_type=Path)
    return str


def _option(field):
    """One click option declared by a config field: its flag, type, default and help come from the field."""
    meta = field.metadata
    flag = meta.get("flag") or "--" + field.name.replace("_", "-")
    text = meta.get("help", "") + (f" Unit: {meta['unit']}." if meta.get("unit") else "")
    if str(field.type) == "bool":
        return click.option(flag, field.name, is_flag=True, default=field.default, help=text)
    default = None if field.default is MISSING else field.default
    shown = (
        ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default) if isinstance(default, tuple) else None
    )
    kind = _param_type(field)
    return click.option(
        flag, field.name, type=kind, default=default, show_default=shown or default is not None, help=text
    )


def config_options(config_cls, skip: tuple[str, ...] = ()):
    """Options for every field of ``config_cls`` that the command line sets (pipeline.configs), in field order.

    A field whose ``cli`` metadata is a sentence is set another way (an argument, a shared option, a plan).
    """
    chosen = [f for f in fields(config_cls) if f.metadata.get("cli", True) is True and f.name not in skip]

    def decorate(command):
        for field in reversed(chosen):
            command = _option(field)(command)
        return command

    return decorate


def _config(config_cls, params: dict, **given):
    """``config_cls`` from a command's parameters (the fields it has options for); ``given`` values win."""
    return config_cls(**{**{f.name: params[f.name] for f in fields(config_cls) if f.name in params}, **given})


def _choice(flag: str, choices: list[str], default: str, help_text: str):
    """An option with fixed choices and a shown default (click lists the choices in --help and in errors)."""
    return click.option(flag, type=click.Choice(choices), default=default, show_default=True, help=help_text)


class TimecatGroup(click.Group):
    """A click group that turns stage errors into clean ClickExceptions."""

    def invoke(self, ctx):
        import cache
        from pipeline.errors import TimecatError

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

    Example: timecat demo
    """
    from pipeline.progress import configure_logging

    configure_logging(verbose)


@main.command()
@click.argument("dataset")
@DATA_ROOT
@config_options(PrepareConfig)
def prepare(dataset, data_root, **params):
    """Write DATASET's train and test splits as FFCV .beton files.

    DATASET is one of fashion-mnist, cifar10, cifar100, digits, imagenet,
    inat2018, imagefolder, dominoes-mixture, dominoes-balanced (a digit above a
    Fashion-MNIST dress or coat, agreeing with the label 99% or 50% of the time).
    imagenet reads DATA_ROOT/imagenet/{train,val} (or --train/--test);
    inat2018 reads DATA_ROOT/inat2018/{train,val}2018.json.
    Splits already prepared are kept as they are. --storage defaults to each
    dataset's own (raw pixels for small images, JPEG q90 for ImageNet-size ones).

    \b
    Example: timecat prepare fashion-mnist
    Example: timecat prepare imagefolder --name pets --train pets/train --test pets/val
    Example: timecat prepare imagenet --train /data/imagenet/train --test /data/imagenet/val --on-corrupt skip
    Example: timecat prepare imagenet --name imagenet-mixed --storage mixed
    """
    from pipeline.prepare import prepare as run

    config = _config(PrepareConfig, params, dataset=dataset, data_root=data_root)
    for m in run(config):
        click.echo(
            f"{m['name']}/{m['split']}: {m['rows']} images, {len(m['classes'])} classes, fingerprint {m['fingerprint']}"
        )
        for s in m.get("skipped", []):
            click.echo(f"  skipped unreadable {s['path']}: {s['error']}", err=True)


@main.command()
@config_options(PretrainConfig)
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), help="Train the members of a plan file.")
@click.option("--member", "only", help="With --plan: train only this member.")
@click.option("--nproc-per-node", type=int, help="Launch K processes on this machine with torch's elastic launcher.")
@DATA_ROOT
@RUNS
@JSON
def pretrain(plan_path, only, nproc_per_node, data_root, runs, as_json, **params):
    """Train one member (or a plan's members) and save checkpoints under RUNS/NAME.

    --batch-size is the global batch: under torchrun each of W processes takes
    batch/W rows of every step (DDP; NCCL on GPU, gloo on CPU). A checkpoint is
    written every --checkpoint-every steps; run the same command again after a
    crash or preemption and it resumes there. A finished member is not retrained.

    \b
    Example: timecat pretrain --name run0 --dataset fashion-mnist --seed 0 --steps 1000
    Example: timecat pretrain --plan plan.json --member run2
    Example: timecat pretrain --name sf0 --dataset digits --seed 0 --steps 500 --optimizer schedulefree --lr 0.003
    Example: timecat pretrain --plan table3.json --member cat4_0 --nproc-per-node 8
    Example: timecat pretrain --plan table3.json --resolution 192 --min-resolution 160   # FFCV's ramp
    Example: torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
             $(which timecat) pretrain --plan table3.json --member cat4_0
    """
    from pipeline import distributed
    from pipeline import plan as plans
    from pipeline.pretrain import pretrain_all

    if nproc_per_node is not None:
        if "LOCAL_RANK" in os.environ:
            raise click.UsageError("--nproc-per-node launches processes itself; under torchrun, leave it out")
        argv = _without_option(sys.argv[1:], "--nproc-per-node")
        if not argv or argv[0] != "pretrain":
            raise click.UsageError("--nproc-per-node works from the command line; from Python, use torchrun")
        distributed.launch(nproc_per_node, [sys.executable, "-m", "cli", *argv])
        return

    if plan_path is not None:
        plan = plans.load(plan_path)
        _refuse_overrides(click.get_current_context(), plan, plan_path, only)
        chosen = [plan.member(only)] if only else list(plan.members)
        configs = [_config(PretrainConfig, params, **_from_plan(plan, m)) for m in chosen]
    else:
        if only is not None:
            raise click.UsageError(f"--member {only} picks a member of --plan FILE; without a plan, use --name")
        missing = [f"--{k}" for k in ("name", "dataset", "seed", "steps") if params[k] is None]
        if missing:
            raise click.UsageError(f"missing {', '.join(missing)} (or give --plan FILE)")
        configs = [_config(PretrainConfig, params)]
    outcomes = pretrain_all(configs, data_root, runs)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun only rank 0 reports
    if as_json:
        click.echo(json.dumps(outcomes if plan_path else outcomes[0], indent=1))
        return
    for r in outcomes:
        click.echo(f"{r['name']}: {r['step']} steps, test top-1 {r['test_top1']:.2f}% -> {r['checkpoint']}")


def _from_plan(plan, member) -> dict:
    """The fields a plan decides for one of its members."""
    return {
        "name": member.name,
        "dataset": plan.dataset,
        "seed": member.seed,
        "steps": member.steps,
        "arch": member.arch,
        "width": member.width,
        "batch_size": plan.batch_size,
    }


def _typed(ctx: click.Context, name: str) -> bool:
    """Whether the user gave option ``name`` (command line or environment), not its default."""
    from click.core import ParameterSource

    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def _refuse_overrides(ctx: click.Context, plan, plan_path: Path, only: str | None) -> None:
    """With --plan, refuse typed options the plan decides: a silent winner would train another member."""
    per_member = [f"--{k}" for k in ("name", "seed", "steps", "arch", "width") if _typed(ctx, k)]
    if per_member:
        hint = f"--member {only}" if only else "--member NAME to train one of them"
        raise click.UsageError(
            f"{', '.join(per_member)} cannot go with --plan {plan_path}: the plan sets each member's name, seed, "
            f"steps, arch and width; leave them out (use {hint}), or drop --plan"
        )
    for key, flag in (("dataset", "--dataset"), ("batch_size", "--batch-size")):
        typed, planned = ctx.params[key], getattr(plan, key)
        if _typed(ctx, key) and typed != planned:
            raise click.UsageError(
                f"{flag} {typed} conflicts with the plan's {key} {planned} ({plan_path}); leave {flag} out, or "
                "make a plan with that value (`timecat plan`)"
            )


@main.command()
@click.option("--dataset", required=True, help="Prepared dataset the members train on.")
@click.option("--cat", "cat", type=int, help="N members sharing the budget.")
@click.option("--total-steps", type=int, help="Total steps S (each member: S / N); per member for paper-table2.")
@click.option("--preset", type=click.Choice(list(PRESETS)), help="The paper's experiments.")
@click.option(
    "--arch",
    type=click.Choice(list(ARCH_NAMES)),
    default="resnet50",
    show_default=True,
    help="Architecture of --cat members.",
)
@click.option(
    "--seeds", type=INTEGERS, help="Comma-separated seeds (default: the paper's 2,550,23,477,8529, then 0,1,...)."
)
@click.option("--batch-size", default=128, show_default=True, help="Images per step, for every member.")
@click.option("--out", type=click.Path(path_type=Path), default="plan.json", show_default=True)
@JSON
def plan(dataset, cat, total_steps, preset, arch, seeds, batch_size, out, as_json):
    """Plan a fixed-compute CatN experiment: members, seeds and steps each; write it to OUT.

    \b
    Example: timecat plan --dataset imagenet --cat 4 --total-steps 400000
    Example: timecat plan --dataset imagenet --preset paper-table3 --out table3.json
    """
    from dataclasses import asdict

    from pipeline import plan as plans

    seed_list = seeds or None
    made = plans.make_plan(dataset, cat, total_steps, preset, arch, seed_list, batch_size)
    path = plans.save(made, out)
    if as_json:
        click.echo(json.dumps({**asdict(made), "path": str(path)}, indent=1))
        return
    for m in made.members:
        click.echo(f"{m.name:<16} {m.group:<12} seed {m.seed:<5} {m.steps:>9,} steps  {m.arch}")
    total = sum(m.steps for m in made.members)
    click.echo(f"{len(made.members)} members, {total:,} steps in all on {dataset} -> {path}")


@main.command()
@click.argument("plan_path", type=click.Path(path_type=Path))
@RUNS
@JSON
def status(plan_path, runs, as_json):
    """Show which members of a plan are done, running, stopped (resumable) or missing, and their steps.

    \b
    Example: timecat status plan.json --runs runs
    """
    from pipeline import plan as plans

    rows = plans.status(plans.load(plan_path), runs)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        line = f"{r['member']:<16} {r['group']:<12} {r['state']:<8} {r['step']:>9,} / {r['steps']:,} steps"
        if r["state"] in ("running", "stopped"):
            line += f"  (checkpoint at step {r['checkpoint_step']:,})"
        if r["holder"]:
            line += f"  pid {r['holder'].get('pid')} on {r['holder'].get('host')}"
        click.echo(line)


@main.command()
@config_options(ExtractConfig)
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
    same crops for every member, for protocol tc.
    """
    from pipeline.extract import extract as run

    for required in ("members", "dataset"):
        if params[required] is None:
            raise click.UsageError(f"missing --{required}")
    config = _config(ExtractConfig, params)
    summary = run(config, data_root, runs, cache_path)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports for the job
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        return
    for row in summary:
        click.echo(f"{_where(row)} {row['member']}: {row['state']}")


@main.command()
@click.option("--members", type=NAMES, help="Comma-separated members to concatenate, e.g. run0,run1,run2,run3.")
@click.option("--cat", "cat", type=int, help="Sweep: probe every N-member subset of --from.")
@click.option("--from", "pool", type=NAMES, help="Sweep: the pool of members, e.g. run0,run1,run2,run3,run4.")
@click.option("--max-subsets", type=int, help="Sweep: a seeded sample of at most this many subsets.")
@config_options(ProbeConfig)
@CACHE
@RESULTS
@JSON
def probe(members, cat, pool, max_subsets, cache_path, results, as_json, **params):
    """Linear-probe the concatenated cached features of MEMBERS on DATASET.

    C is chosen on a held-out part of the train split; top-1 and top-5 are
    measured on the eval split, and each record is appended to RESULTS/probes.jsonl.
    With --cat N --from POOL, every N-member subset of POOL (or a seeded sample
    of --max-subsets) is probed and the mean and std over subsets reported.

    \b
    Example: timecat probe --members run0,run1,run2,run3 --dataset fashion-mnist
    Example: timecat probe --cat 2 --from run0,run1,run2,run3,run4 --max-subsets 5 --dataset digits
    Example: timecat probe --members run0,run1 --dataset cifar100 --protocol tc
    Example: timecat probe --members run0,run1 --dataset digits --protocol knn
    Example: timecat probe --members run0,run1 --dataset digits --backend sklearn --precision fp32
    Example: torchrun --nproc-per-node 8 --no-python timecat probe --cat 4 --from run0,...,run11 --dataset inat18
    Example: timecat probe --members run0,run1 --dataset digits --shots 5 --draws 5

    Under torchrun (batched backend) the ranks split the subsets, or, for a
    single probe, the C candidates; each record is appended once.
    """
    from pipeline.probe import few_shot, sweep
    from pipeline.probe import probe as run
    from pipeline.results import results_path

    if (members is None) == (cat is None):
        raise click.UsageError("give either --members, or --cat N with --from POOL")
    if cat is not None and not pool:
        raise click.UsageError("--cat N needs --from POOL (comma-separated members)")
    if params["dataset"] is None:
        raise click.UsageError("missing --dataset")
    config = _config(ProbeConfig, params, members=members or pool)
    shots, draws = config.shots, config.draws
    path = results_path(results)
    if cat is None and shots is not None:
        records, summary = few_shot(config, cache_path, results)
        what = f"{shots}-shot Cat{len(members)} over {len(records)} draw(s)"
        _print_many(records, summary, what, "draws", path, as_json)
        return
    if cat is None:
        record = run(config, cache_path, results)
        if os.environ.get("RANK", "0") != "0":
            return  # under torchrun, rank 0 reports for the job
        click.echo(json.dumps(record, indent=1) if as_json else _probe_line(record, path))
        return
    records, summary = sweep(config, pool, cat, max_subsets, cache_path, results)
    if shots is None:
        what, over = f"Cat{cat} over {len(records)} subset(s)", "subsets"
    else:
        what = f"{shots}-shot Cat{cat} over {len(records)} record(s)"
        over = f"{len(records) // draws} subsets x {draws} draws"
    _print_many(records, summary, what, over, path, as_json)


def _print_many(records: list[dict], summary: dict, what: str, over: str, path, as_json: bool) -> None:
    """A sweep's or few-shot probe's records and their mean ± sample std (rank 0 only under torchrun)."""
    if os.environ.get("RANK", "0") != "0":
        return
    if as_json:
        click.echo(json.dumps({"records": records, "summary": summary}, indent=1))
        return
    for record in records:
        click.echo(_probe_line(record, path))
    top1, top5 = summary["top1"], summary["top5"]
    click.echo(
        f"{what} on {records[0]['dataset']}: top-1 {top1['mean']:.2f} ± "
        f"{top1['std']:.2f}%, top-5 {top5['mean']:.2f} ± {top5['std']:.2f}% (mean ± sample std over {over})"
    )


def _probe_line(record: dict, path) -> str:
    chosen = ", ".join(f"{k}={v:.3g}" for k, v in record["chosen"].items() if k in ("C", "weight_decay"))
    lo, hi = record["top1_ci95"]
    held = record["holdout"]
    line = (
        f"{record['id']}  {','.join(record['members'])} on {record['dataset']}: top-1 {record['top1']:.2f}% "
        f"[95% CI {lo:.2f}, {hi:.2f}], top-5 {record['top5']:.2f}% ({record['protocol']}, {chosen}, "
        f"{record['dim']} dims, held out {held['held_out_rows']:,} rows of {held['held_out_classes']:,} / "
        f"{held['classes']:,} classes, {record['backend']}{' ' + record['precision'] if 'precision' in record else ''})"
        f" -> {path}"
    )
    if "top1_eval_selected" in record:
        line += f"\n  paper's selection on the eval split (optimistic): {record['top1_eval_selected']:.2f}%"
    return line


@main.command()
@click.argument("patterns", nargs=-1)
@RESULTS
@JSON
def results(patterns, results, as_json):
    """List the probe records that match every PATTERN.

    A PATTERN is FIELD=GLOB (lists such as members are joined by commas), a
    number comparison FIELD>X, FIELD<X, FIELD>=X, FIELD<=X (dotted fields reach
    inside, e.g. chosen.C), or a bare GLOB matched against
    dataset/protocol/backend/members.

    \b
    Example: timecat results dataset=digits n_members=4
    Example: timecat results 'members=*run3*' 'top1>=90' backend=torch --json
    """
    from pipeline import results as store

    rows = store.select(store.load(results), list(patterns))
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        ci = "[{:.2f}, {:.2f}]  ".format(*r["top1_ci95"]) if r.get("top1_ci95") else ""
        click.echo(
            f"{r['id']}  {r['time'][:19]}  {r['dataset']}  {r['protocol']}/{r.get('backend', '?')}  "
            f"{','.join(r['members'])}  top-1 {r['top1']:.2f} {ci} top-5 {r['top5']:.2f}  {r['wall_s']:.1f} s"
        )
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

    ID_A and ID_B are record ids (`timecat results` lists them). The interval is a
    paired bootstrap over eval rows: only rows where the two probes disagree move
    it. Records scored on different eval rows are refused.

    \b
    Example: timecat compare 3f2a9c01b7d4 9e81c4a0f2b3 --results demo/results
    """
    from pipeline import report as rep

    out = rep.compare(results, id_a, id_b, resamples, seed)
    if as_json:
        click.echo(json.dumps(out, indent=1))
        return
    lo, hi = out["ci95"]
    a, b = out["a"], out["b"]
    click.echo(
        f"{','.join(a['members'])} ({a['top1']:.2f}%) - {','.join(b['members'])} ({b['top1']:.2f}%) on "
        f"{out['dataset']}/{out['eval_split']}: {out['difference']:+.2f} points [95% CI {lo:+.2f}, {hi:+.2f}] over "
        f"{out['rows']:,} rows ({out['only_a_correct']} right only for A, {out['only_b_correct']} only for B)"
    )
    verdict = "the interval excludes 0" if out["excludes_zero"] else "the interval includes 0: no difference shown"
    click.echo(verdict)


@main.command()
@RESULTS
@_choice(
    "--layout",
    list(LAYOUTS),
    LAYOUTS[0],
    "table3: CatN at fixed total steps. table2: parameter-matched (architectures and CatN).",
)
@_choice("--protocol", list(PROTOCOLS), PROTOCOLS[0], "Which protocol's records to report.")
@_choice(
    "--metric",
    list(METRICS),
    "top1",
    "top1: chosen on held-out train rows. top1_eval_selected (tc): the paper's code's best epoch and weight "
    "decay on the eval split, OPTIMISTIC, only to compare with its tables.",
)
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="PNG path (default: RESULTS/catn.png).")
@JSON
def report(results, layout, protocol, metric, plot_path, as_json):
    """Print probe results in the paper's Table 3 (or Table 2) layout and save plots.

    A cell is one probe's top-1 with its 95% bootstrap interval, or mean ± sample
    std (n) over member sets of the same kind. Plots: top-1 against N per dataset
    (RESULTS/catn.png), and in-distribution against transfer accuracy
    (RESULTS/id_vs_ood.png) when the members' pretraining dataset was probed too, and
    few-shot top-1 against shots per class for each CatN (RESULTS/shots.png).

    \b
    Example: timecat report --results demo/results
    Example: timecat report --layout table2 --protocol tc
    Example: timecat report --protocol tc --metric top1_eval_selected   # the paper's optimistic selection
    """
    from pipeline import report as rep

    written = rep.write(results, layout, protocol, metric, plot_path)
    data, shots, plots = written["table"], written["shots"], written["plots"]
    if as_json:
        click.echo(json.dumps({**(data or {}), "shots": shots, "plots": plots}, indent=1))
        return
    if data is not None:
        click.echo(rep.format_table(data))
    if shots is not None:
        click.echo(rep.format_shots(shots))
    click.echo("plots: " + ", ".join(plots))


@main.command()
@click.argument("member")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Where to write the state dict.")
@RUNS
def export(member, out, runs):
    """Write MEMBER as a plain state dict that torchvision's resnet50 loads.

    MEMBER is a run name under RUNS, or a foreign checkpoint file (the paper's,
    AlgoPerf's or torchvision's), which this converts to torchvision's names.

    \b
    Example: timecat export run0 --out run0_resnet50.pth
    Example: timecat export algoperf/seed2/checkpoint.pt --out seed2.pth
    """
    from cache.layout import check_name
    from pipeline import checkpoints, interop
    from pipeline.checkpoints import checkpoint_path

    if interop.is_foreign(member):
        payload = interop.load_foreign(interop.foreign_name_and_path(member)[1])
    else:
        payload = checkpoints.load(checkpoint_path(runs, check_name("member", member)))
    path = interop.export_torchvision(payload, out)
    click.echo(f"{member} -> {path} (torchvision resnet50, num_classes={payload['num_classes']})")


@main.group("cache")
def cache_group() -> None:
    """Inspect and check a feature cache.

    Example: timecat cache ls --cache demo/features.zarr
    """


def _where(row: dict) -> str:
    view = row.get("view")
    return f"{row['dataset']}/{row['split']}" + ("" if view is None else f" view {view}")


@cache_group.command("ls")
@CACHE
@JSON
def cache_ls(cache_path, as_json):
    """List every cached array: dataset, split, member, shape, status and checkpoint.

    \b
    Example: timecat cache ls --cache demo/features.zarr
    """
    import cache

    rows = cache.open(cache_path).summary()
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        sha = (r["provenance"].get("checkpoint_sha256") or "?")[:12]
        click.echo(
            f"{_where(r)} {r['member']}: {r['rows']} x {r['dim']} {r['dtype']}, "
            f"{r['status']}, checkpoint {sha}, steps {r['provenance'].get('steps', '?')}"
        )


@cache_group.command("verify")
@click.argument("path")
@JSON
def cache_verify(path, as_json):
    """Check a cache: status, a full NaN scan, shapes and label agreement across members.

    Exits with status 1 when any array has a problem.

    \b
    Example: timecat cache verify demo/features.zarr
    """
    import cache

    rows = cache.open(path).verify()
    if as_json:
        click.echo(json.dumps(rows, indent=1))
    else:
        for r in rows:
            verdict = "ok" if r["ok"] else "PROBLEM: " + "; ".join(r["problems"])
            shape = tuple(r["shape"]) if r["shape"] is not None else "(metadata unreadable)"
            what = r["member"] if r["member"] is not None else "labels"
            click.echo(f"{_where(r)} {what} {'' if r['member'] is None else shape}: {verdict}")
    bad = sum(not r["ok"] for r in rows)
    if bad:
        raise click.ClickException(f"{bad} of {len(rows)} arrays have problems")


@main.command()
@click.option("--mixtures", default=200, show_default=True, help="Random mixture weights drawn, Dirichlet(1,1,1,1).")
@_choice(
    "--penalty",
    ["l1", "weight-decay", "none"],
    "l1",
    "Sparsity bias: explicit L1 on a linear rule, weight decay on a two-layer diagonal linear net, or none.",
)
@click.option("--strength", default=0.01, show_default=True, help="Penalty coefficient.")
@_choice("--loss", ["sigmoid", "logistic"], "sigmoid", "sigmoid: a smooth 0-1 loss (the paper's best rule); logistic.")
@click.option("--seed", default=0, show_default=True, help="Seed of the mixtures and initial weights.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="PNG path (default: RESULTS/toy.png).")
@RESULTS
@JSON
def toy(mixtures, penalty, strength, loss, seed, plot_path, results, as_json):
    """The paper's Section 3 counterexample: a sparse rule of a mixture fails half of it.

    Four components over two features (phi1, phi2), each linearly separable on
    its own (P1, P2 with phi1; P3, P4 with phi2); their mixture is not. For each
    random mixture, a linear rule with a sparsity bias is trained on it (full
    batch, exact population loss): by default with an L1 penalty under a smooth
    0-1 loss; --penalty weight-decay trains a two-layer diagonal linear network
    with weight decay instead (an implicit L1 penalty).
    Its kept features are then probed on each component with the best linear
    rule, against direct training on the component. The paper's argument: nearly
    every mixture keeps one feature and fails two of the four components. Here
    (seed 0): 100% of 200 mixtures with the default L1 penalty or the weight-decay
    network; plain logistic regression without a penalty (--loss logistic
    --strength 0) keeps both features in most mixtures (16% fail).

    \b
    Example: timecat toy
    Example: timecat toy --penalty weight-decay --json
    Example: timecat toy --loss logistic --penalty l1 --strength 0
    """
    from pipeline.experiments import toy as toys

    config = toys.ToyConfig(mixtures=mixtures, seed=seed, penalty=penalty, strength=strength, loss=loss)
    result = toys.run(config)
    png = toys.plot(result, plot_path or Path(results) / "toy.png")
    summary = {**result["summary"], "plot": str(png)}
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        return
    click.echo(f"{mixtures} mixtures, {loss} loss, penalty {penalty} ({strength}):")
    click.echo(
        f"  accuracy on its own mixture:       {summary['mixture_rule_accuracy']:.1%} "
        f"(best linear rule: {summary['best_rule_accuracy']:.1%})"
    )
    click.echo(
        f"  rules reading one feature, so that its probe fails 2 of 4 components: {summary['one_feature']:.1%} "
        f"(reading none: {summary['no_feature']:.1%})"
    )
    click.echo(f"  a feature is kept above {summary['kept_threshold']:.1%} of the rule's largest weight; at other")
    click.echo(
        "  thresholds, rules reading one feature: "
        + ", ".join(f"{float(t):.1%}: {v['one_feature']:.1%}" for t, v in summary["threshold_sensitivity"].items())
    )
    click.echo("  mean accuracy per component P1..P4:")
    rows = {
        "mixture rule": "mean_mixture_rule_accuracy",
        "probe of kept features": "mean_probe_accuracy",
        "direct training": "direct_accuracy",
    }
    for label, key in rows.items():
        click.echo(f"    {label:<24}" + "  ".join(f"{100 * a:5.1f}" for a in summary[key]))
    click.echo(f"plot: {png}")


@main.command()
@click.option("--members", type=NAMES, required=True, help="Comma-separated cached members, e.g. run3,run4,run5,run6.")
@click.option("--dataset", required=True, help="Cached dataset.")
@click.option("--split", default="test", show_default=True, help="Split whose rows CKA is measured on.")
@click.option("--rows", default=10_000, show_default=True, help="At most this many rows (seeded sample) for CKA.")
@click.option("--no-probe", is_flag=True, help="CKA only: skip probing each member and the concatenation.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="PNG path (default: RESULTS/diversity.png).")
@CACHE
@RESULTS
@JSON
def diversity(members, dataset, split, rows, no_probe, plot_path, cache_path, results, as_json):
    """How different members' features are: linear CKA between every pair, from the cache only.

    Beside it, the logreg probe top-1 of each member alone and of their
    concatenation (records appended to RESULTS/probes.jsonl). Low CKA between
    members of different seeds is the diversity Time-Cat concatenates. On the
    demo's Cat4 (Fashion-MNIST test): CKA 0.94-0.97, members 86.6-87.8% top-1
    alone, 89.6% concatenated: +1.8 points over the best (95% CI 1.4-2.3, paired
    over the eval rows: `timecat compare`). The paper gives no CKA figures.

    \b
    Example: timecat diversity --members run3,run4,run5,run6 --dataset fashion-mnist --cache demo/features.zarr
    Example: timecat diversity --members run0,run1 --dataset digits --no-probe --json
    """
    from pipeline.experiments import diversity as div

    config = div.DiversityConfig(dataset, members, split=split, rows=rows, probe=not no_probe)
    summary, _ = div.run(config, cache_path, results)
    png = div.plot(summary, plot_path or Path(results) / "diversity.png")
    summary["plot"] = str(png)
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        return
    names = summary["members"]
    width = max(len(n) for n in names) + 2
    click.echo(f"linear CKA on {dataset}/{split} ({summary['rows']} rows):")
    click.echo(" " * width + "".join(f"{n:>{width}}" for n in names))
    for name, row in zip(names, summary["cka"], strict=True):
        click.echo(f"{name:<{width}}" + "".join(f"{v:>{width}.3f}" for v in row))
    click.echo(f"mean pairwise CKA: {summary['mean_pairwise_cka']:.3f}")
    for subset, top1 in summary["top1"].items():
        click.echo(f"probe top-1 {subset}: {top1:.2f}%")
    click.echo(f"plot: {png}")


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), default="dominoes", show_default=True)
@DATA_ROOT
@click.option(
    "--seeds", type=INTEGERS, default="0,1,2", show_default=True, help="Comma-separated seeds, one run of each model."
)
@click.option("--steps", default=300, show_default=True, help="SGD steps of every CNN (equal budgets).")
@JSON
def dominoes(workdir, data_root, seeds, steps, as_json):
    """The paper's spurious-feature test (Table 1): direct training against a probe of a mixture-pretrained CNN.

    Images stack a digit 0/1 (spurious) above a Fashion-MNIST dress/coat (the
    label). (a) A small CNN trained on the balanced set (digit independent of
    the label), tested on balanced data; (b) the same CNN, same budget,
    pretrained on the mixture (digit agrees 99%), then linear-probed on the
    balanced set through the feature cache. The paper: 97% against 94% on
    MNIST-Fashion dominoes; here (3 seeds, 300 steps): 93.2% against 91.8%,
    a gap of +1.4 points whose 95% interval over seeds (-0.8, +3.6) includes 0.
    Runs, cache and plot go under WORKDIR; about 4 minutes on 2 CPU cores.

    \b
    Example: timecat dominoes
    Example: timecat dominoes --seeds 0 --steps 100 --json
    """
    from pipeline.experiments.dominoes import DominoesConfig, run

    seed_list = seeds
    summary = run(DominoesConfig(workdir=workdir, data_root=data_root, seeds=seed_list, steps=steps))
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        return
    for key, label in (("direct", "direct training on balanced"), ("probe", "probe of mixture-pretrained CNN")):
        runs = ", ".join(f"{v:.2f}" for v in summary[key]["runs"])
        click.echo(f"{label:<33} {summary[key]['mean']:6.2f} +- {summary[key]['std']:.2f} %  ({runs})")
    ci = summary["gap_ci95"]
    interval = f" [95% CI {ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else " (no interval from one seed)"
    click.echo(f"gap {summary['gap']:+.2f} points{interval} (paper: 97 vs 94, gap +3) over {len(seed_list)} seed(s)")
    head = summary["mixture_head"]
    click.echo(
        f"mixture CNN's own head: {head['mixture_test']['mean']:.2f}% where the digit agrees (mixture test), "
        f"{head['balanced_test']['mean']:.2f}% on balanced test"
    )
    click.echo(f"plot: {summary['plot']}  ({summary['wall_s']:.0f} s)")


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), default="demo", show_default=True)
@DATA_ROOT
@click.option("--total-steps", default=1000, show_default=True, help="Budget B shared by every CatN.")
@JSON
def demo(workdir, data_root, total_steps, as_json):
    """Run the whole pipeline on Fashion-MNIST (and digits for transfer) on a CPU.

    Cat1 (1 x B steps), Cat2 (2 x B/2) and Cat4 (4 x B/4) are pretrained, cached,
    probed, and shown as a table and a plot. A rerun keeps what is done.

    \b
    Example: timecat demo --workdir demo
    """
    from pipeline import report as rep
    from pipeline.experiments.demo import DemoConfig, format_differences, run_demo

    outcome = run_demo(DemoConfig(workdir=workdir, data_root=data_root, total_steps=total_steps))
    if as_json:
        click.echo(json.dumps(outcome, indent=1))
    else:
        click.echo(rep.format_table(outcome["table"]))
        click.echo("paired differences from Cat1 on the same eval rows (95% bootstrap intervals):")
        for line in format_differences(outcome["differences"]):
            click.echo("  " + line)
        click.echo("plots: " + ", ".join(outcome["plots"]))
        click.echo("timings (s): " + ", ".join(f"{k} {v}" for k, v in outcome["timings"].items()))


if __name__ == "__main__":
    main()
