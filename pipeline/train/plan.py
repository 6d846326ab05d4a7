"""The Time-Cat planner: which members to train, with which seeds and step budgets.

A plan is a JSON file: the dataset, the recipe shared by every member, and one
entry per member (name, group, seed, steps, arch, width). ``timecat pretrain
--plan FILE`` trains them; ``timecat status FILE`` says which are done. Each
member's checkpoint lives at ``<runs>/<name>/checkpoint.pt``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from cache.errors import CacheError
from cache.layout import check_name
from pipeline import __version__, configs
from pipeline.core import files
from pipeline.core.errors import TimecatError, check_seed

PAPER_SEEDS = (2, 550, 23, 477, 8529)  # the seeds of the paper's released members (richreps-timecat)


@dataclass(frozen=True)
class PlannedMember:
    """One member of a plan."""

    name: str
    group: str  # the table row it belongs to: Cat4, resnet50w2, ...
    seed: int
    steps: int  # optimizer steps of this member
    arch: str
    width: int | None = None

    def __post_init__(self):
        check_name("member", self.name)
        check_seed(self.seed, f"member {self.name}'s seed")
        configs.arch_rule("arch", self.arch)
        if self.steps < 1:
            raise TimecatError(f"member {self.name}: steps must be at least 1, got {self.steps}")


@dataclass(frozen=True)
class Plan:
    """Members to train on one dataset with one recipe."""

    dataset: str
    members: tuple[PlannedMember, ...]
    batch_size: int = 128
    preset: str | None = None

    def __post_init__(self):
        check_name("dataset", self.dataset)
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise TimecatError(f"a member name appears twice in the plan: {names}")

    def member(self, name: str) -> PlannedMember:
        """The member called ``name``, or an error listing the plan's members."""
        for m in self.members:
            if m.name == name:
                return m
        raise TimecatError(f"no member {name!r} in the plan; its members: {[m.name for m in self.members]}")


def seeds_for(n: int, seeds: tuple[int, ...] | None) -> tuple[int, ...]:
    """n seeds: the given ones, or the paper's five, then 0, 1, 2, ... beyond them."""
    pool = tuple(seeds) if seeds else PAPER_SEEDS + tuple(s for s in range(n + 5) if s not in PAPER_SEEDS)
    if len(pool) < n:
        raise TimecatError(f"{n} members need {n} seeds, {len(pool)} given")
    return pool[:n]


def catn(n: int, total_steps: int, arch: str, seeds: tuple[int, ...] | None = None, prefix: str = "run") -> list:
    """CatN at a fixed total budget: n members of total_steps // n steps each."""
    if n < 1 or total_steps < n:
        raise TimecatError(f"--cat {n} with --total-steps {total_steps}: need 1 <= N <= total steps")
    if total_steps % n:
        raise TimecatError(
            f"--total-steps {total_steps} does not split into {n} equal members; "
            f"use {total_steps - total_steps % n} or {total_steps - total_steps % n + n}"
        )
    return [
        PlannedMember(f"{prefix}{i}", f"Cat{n}", seed, total_steps // n, arch)
        for i, seed in enumerate(seeds_for(n, seeds))
    ]


def paper_table3(arch: str = "resnet50") -> list[PlannedMember]:
    """Table 3: Cat1 at 450k steps; Cat2, Cat4 and Cat5 at 400k in total."""
    members = catn(1, 450_000, arch, prefix="cat1-run")
    for n in (2, 4, 5):
        members += catn(n, 400_000, arch, prefix=f"cat{n}-run")
    return members


def paper_table2(steps: int = 450_000) -> list[PlannedMember]:
    """Table 2, parameter-matched: ResNet50 against ResNet50W2 against Cat4 of ResNet50, each member ``steps``."""
    return [
        PlannedMember("r50-run0", "resnet50", PAPER_SEEDS[0], steps, "resnet50"),
        PlannedMember("r50w2-run0", "resnet50w2", PAPER_SEEDS[0], steps, "resnet50w2"),
        *(
            PlannedMember(f"cat4-r50-run{i}", "Cat4", seed, steps, "resnet50")
            for i, seed in enumerate(seeds_for(4, None))
        ),
    ]


PRESETS = {"paper-table3": paper_table3, "paper-table2": paper_table2}


def make_plan(
    dataset: str,
    cat: int | None = None,
    total_steps: int | None = None,
    preset: str | None = None,
    arch: str | None = configs.PlanConfig.arch,
    seeds: tuple[int, ...] | None = None,
    batch_size: int = configs.PlanConfig.batch_size,
) -> Plan:
    """A plan from ``--cat N --total-steps S`` or from a preset; ``arch`` None picks one for the dataset."""
    check_name("dataset", dataset)  # a bad name first: it is the mistake to fix, whatever else is missing
    if preset is not None:
        if preset not in PRESETS:
            raise TimecatError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        table3 = preset == "paper-table3"
        members = paper_table3(arch or "resnet50") if table3 else paper_table2(total_steps or 450_000)
    elif cat is None or total_steps is None:
        raise TimecatError("give --cat N and --total-steps S, or --preset paper-table3 / paper-table2")
    else:
        members = catn(cat, total_steps, arch or default_arch(dataset), seeds)
    return Plan(dataset, tuple(members), batch_size, preset)


SMALL_PX = 64  # registered kinds of at most this side train small-resnet by default; larger ones resnet50


def default_arch(dataset: str) -> str:
    """The architecture ``--cat`` members get without ``--arch``: by the dataset kind's image size.

    A ResNet-50 on 28 px images is the wrong default (its stem alone downsamples 4x);
    a name that is not a registered kind says nothing about its images, so it is refused.
    """
    from pipeline.data.datasets import DATASETS

    if dataset not in DATASETS:
        raise TimecatError(
            f"--arch is needed for dataset {dataset!r}: it is not a registered kind, so its image size is not known "
            f"here; give --arch resnet50 for ImageNet-size images or --arch small-resnet for {SMALL_PX} px or less "
            f"(choices: {list(configs.ARCH_NAMES)})"
        )
    return "small-resnet" if DATASETS[dataset].resolution <= SMALL_PX else "resnet50"


def save(plan: Plan, path: Path) -> Path:
    """Write the plan as JSON (temporary file, then rename)."""
    payload = {**asdict(plan), "checkpoint_layout": "<runs>/<name>/checkpoint.pt", "timecat_version": __version__}
    return files.write_text(path, json.dumps(payload, indent=1))


def load(path: Path) -> Plan:
    """Read a plan file, or an error that names what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise TimecatError(f"no plan at {path}: write one with `timecat plan`")
    try:
        data = json.loads(path.read_text())
        members = tuple(PlannedMember(**m) for m in data["members"])
        return Plan(data["dataset"], members, data.get("batch_size", 128), data.get("preset"))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise TimecatError(f"{path}: not a timecat plan ({type(e).__name__}: {e})") from None
    except (CacheError, TimecatError) as e:  # a hand-edited member: a bad name, arch or step count
        raise TimecatError(f"{path}: {e}") from None


def status(plan: Plan, runs_root: Path) -> list[dict]:
    """Per member: its state and steps.

    ``done``: finished checkpoint. ``running``: a process holds the member's lock
    now (pid and host given). ``stopped``: started, not running, resumable from
    its last checkpoint. ``missing``: never started. ``other``: the folder holds a
    member of another recipe under this name (``differs`` lists each field as
    [found, planned]), so it is not this plan's member whatever its steps.
    ``damaged``: its checkpoint cannot be read (``damage`` says why); the other members
    are shown as they are.
    ``step`` is the last logged step; ``checkpoint_step`` the step a restart resumes from.
    """
    from pipeline.members import checkpoints
    from pipeline.members.checkpoints import checkpoint_path, run_dir

    rows = []
    for m in plan.members:
        folder, ckpt = run_dir(runs_root, m.name), checkpoint_path(runs_root, m.name)
        payload, damage = _read_checkpoint(ckpt)
        saved = payload["step"] if payload is not None else 0
        logged = _last_logged_step(folder / "log.jsonl")
        holder = checkpoints.holder(runs_root, m.name)
        differs = _differs(plan, m, payload["member"] if payload is not None else _logged_config(folder))
        if damage:
            state = "damaged"
        elif differs:
            state = "other"
        elif payload is not None and payload.get("complete"):
            state = "done"
        elif holder is not None:
            state = "running"
        elif payload is not None or logged:
            state = "stopped"
        else:
            state = "missing"
        row = {"member": m.name, "group": m.group, "state": state, "step": max(saved, logged), "steps": m.steps}
        rows.append({**row, "checkpoint_step": saved, "holder": holder, "differs": differs, "damage": damage})
    return rows


def _read_checkpoint(ckpt: Path) -> tuple[dict | None, str | None]:
    """A member's checkpoint (metadata only; None if there is none), or why it cannot be read.

    One damaged member must not hide the state of the others.
    """
    from pipeline.members import checkpoints

    if not ckpt.is_file():
        return None, None
    try:
        payload = checkpoints.require(checkpoints.load(ckpt, mmap=True), ("step",), ckpt)
    except TimecatError as e:
        return None, str(e)
    if not isinstance(payload["step"], int) or isinstance(payload["step"], bool):
        return None, f"{ckpt}: a damaged timecat checkpoint: step {payload['step']!r} is not an integer"
    return payload, None


def _differs(plan: Plan, member: PlannedMember, found: dict | None) -> dict:
    """Each recipe field where a trained member's config (``found``) is not what the plan asks: [found, planned]."""
    if not found:
        return {}
    planned = {**{k: getattr(member, k) for k in ("seed", "steps", "arch")}, "dataset": plan.dataset}
    planned["batch_size"] = plan.batch_size
    if member.width is not None or found.get("width") is not None:
        planned["width"] = member.width
    return {k: [found.get(k), v] for k, v in planned.items() if k in found and found[k] != v}


def _logged_config(folder: Path) -> dict | None:
    """The config a started member wrote before its first checkpoint (``config.json``), if any."""
    try:
        return json.loads((folder / "config.json").read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        return None


def _last_logged_step(path: Path) -> int:
    if not path.is_file():
        return 0
    lines, _ = files.read_jsonl(path)  # a line torn by a kill mid-write is not a step
    return max((r.get("step", 0) for _, r in lines if isinstance(r.get("step", 0), int)), default=0)


PER_MEMBER = ("name", "seed", "steps", "arch", "width")  # what a plan sets for each member
SHARED = ("dataset", "batch_size")  # what a plan sets for all of them


def member_fields(plan: Plan, member: PlannedMember) -> dict:
    """The ``PretrainConfig`` fields a plan decides for one of its members."""
    return {
        **{key: getattr(member, key) for key in PER_MEMBER},
        **{key: getattr(plan, key) for key in SHARED},
    }


def override_problem(plan: Plan, plan_path: Path, typed: dict, only: str | None) -> str | None:
    """Why options typed beside ``--plan`` (``typed``: field -> value) cannot be honoured, else None.

    A silent winner would train another member than the one asked for, so the
    plan's per-member fields cannot be typed at all, and its shared ones only
    with the plan's own value.
    """
    per_member = [f"--{key}" for key in PER_MEMBER if key in typed]
    if per_member:
        hint = f"--member {only}" if only else "--member NAME to train one of them"
        return (
            f"{', '.join(per_member)} cannot go with --plan {plan_path}: the plan sets each member's name, seed, "
            f"steps, arch and width; leave them out (use {hint}), or drop --plan"
        )
    for key in SHARED:
        flag, planned = "--" + key.replace("_", "-"), getattr(plan, key)
        if key in typed and typed[key] != planned:
            return (
                f"{flag} {typed[key]} conflicts with the plan's {key} {planned} ({plan_path}); leave {flag} out, "
                "or make a plan with that value (`timecat plan`)"
            )
    return None


def format_plan(plan: Plan, path: Path) -> list[str]:
    """``timecat plan``'s table: one line per member, then the totals."""
    lines = [f"{m.name:<16} {m.group:<12} seed {m.seed:<5} {m.steps:>9,} steps  {m.arch}" for m in plan.members]
    total = sum(m.steps for m in plan.members)
    return [*lines, f"{len(plan.members)} members, {total:,} steps in all on {plan.dataset} -> {path}"]


def format_status(rows: list[dict]) -> list[str]:
    """``timecat status``'s table: one line per member with its state, steps, checkpoint and holder."""
    lines = []
    for r in rows:
        line = f"{r['member']:<16} {r['group']:<12} {r['state']:<8} {r['step']:>9,} / {r['steps']:,} steps"
        if r["state"] in ("running", "stopped"):
            line += f"  (checkpoint at step {r['checkpoint_step']:,})"
        if r["holder"]:
            line += f"  pid {r['holder'].get('pid')} on {r['holder'].get('host')}"
        if r.get("damage"):
            line += (
                f"  damaged: {r['damage']} (move that file away, then `timecat pretrain --plan PLAN "
                f"--member {r['member']}` trains it again)"
            )
        if r.get("job"):
            job = r["job"]
            line += f"  job {job['job_id']} ({job['launcher']}): {job['job_state']}"
            if job.get("error"):
                line += f": {job['error']} (log: {job['log']})"
        if r["differs"]:
            shown = ", ".join(f"{k} {found} (plan {planned})" for k, (found, planned) in r["differs"].items())
            line += f"  another recipe under this name: {shown}; train the plan's with another --runs"
        lines.append(line)
    return lines
