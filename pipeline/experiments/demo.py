"""The whole Time-Cat idea on a CPU in minutes: Cat1, Cat2 and Cat4 at one total budget.

Members are pretrained on Fashion-MNIST; their features are cached for
Fashion-MNIST (in-distribution) and scikit-learn digits (out-of-distribution,
resized to the members' input size); every CatN is probed from the cache.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import asdict
from pathlib import Path

from pipeline import __version__
from pipeline.configs import DemoConfig
from pipeline.core import files
from pipeline.core.progress import get_logger, plural
from pipeline.report import tables

log = get_logger(__name__)


def plan(config: DemoConfig):
    """Members for each CatN: names run0, run1, ... and seeds 0, 1, ..., each with B/N steps."""
    from pipeline.configs import PretrainConfig

    groups, index = {}, 0
    for n in config.cats:
        groups[n] = []
        for _ in range(n):
            groups[n].append(
                PretrainConfig(
                    name=f"run{index}",
                    dataset=config.pretrain_dataset,
                    seed=index,
                    steps=config.total_steps // n,
                    arch=config.arch,
                    batch_size=config.batch_size,
                )
            )
            index += 1
    return groups


def probe_and_compare(config: DemoConfig, groups: dict) -> list[dict]:
    """Probe each CatN on every transfer dataset; each against Cat1 on the same eval rows (paired intervals)."""
    from pipeline.configs import ProbeConfig
    from pipeline.probe.run import probe

    differences, done, total = [], 0, len(config.transfer_datasets) * len(groups)
    for dataset in config.transfer_datasets:
        ids = {}
        for n, group in groups.items():
            config_n = ProbeConfig(dataset=dataset, members=tuple(m.name for m in group), precision=config.precision)
            done += 1
            ids[n] = probe(config_n, config.cache, config.results, counter=f"{done}/{total}")["id"]
        # Each CatN against Cat1 on the same eval rows: is the gain more than resampling noise?
        base = min(ids)
        for n in sorted(ids):
            if n != base:
                paired = tables.compare(config.results, ids[n], ids[base])
                differences.append({**paired, "dataset": dataset, "method": f"Cat{n}", "against": f"Cat{base}"})
    return differences


# Each stage's share of the demo's time, from `make demo` on the 2-vCPU Xeon, 2026-12-07 (results/demo.json:
# prepare 9.9 s, pretrain 217.5 s, extract 76.4 s, probe and report 11.1 s of 316 s). Only the ratios are used:
# the overall ETA scales them by the time the stages done so far took on this machine.
STAGE_SHARES = {"prepare": 0.03, "pretrain": 0.69, "extract": 0.24, "probe": 0.04}


class Overall:
    """The demo's overall progress: ``demo: stage 2 of 4 (pretrain, 3 of 7 members trained), 31% done, elapsed
    01:40, about 03:40 left`` at every stage and member, from STAGE_SHARES and the time spent so far."""

    def __init__(self):
        self.started, self.stages = time.perf_counter(), list(STAGE_SHARES)

    def at(self, stage: str, done: float = 0.0, detail: str = "") -> None:
        """Log the line for ``stage``, ``done`` (0-1) of the way through it."""
        k = self.stages.index(stage)
        fraction = sum(STAGE_SHARES[s] for s in self.stages[:k]) + STAGE_SHARES[stage] * done
        elapsed = time.perf_counter() - self.started
        left = f", about {_clock(elapsed / fraction - elapsed)} left" if fraction > 0.02 else ""
        where = f"{stage}, {detail}" if detail else stage
        log.info(
            "demo: stage %d of %d (%s), %.0f%% done, elapsed %s%s",
            k + 1,
            len(self.stages),
            where,
            100 * fraction,
            _clock(elapsed),
            left,
        )


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes:02d}:{seconds:02d}"


def run_demo(config: DemoConfig) -> dict:
    """Prepare, pretrain, extract, probe and report; completed steps are kept on a rerun."""
    from pipeline.configs import ExtractConfig, PrepareConfig
    from pipeline.data.prepare import prepare
    from pipeline.features.extract import extract
    from pipeline.train.pretrain import pretrain

    timings, overall = {}, Overall()
    started = time.perf_counter()
    overall.at("prepare")
    for dataset in dict.fromkeys((config.pretrain_dataset, *config.transfer_datasets)):
        prepare(PrepareConfig(kind=dataset, data_root=config.data))
    timings["prepare_s"] = time.perf_counter() - started

    groups = plan(config)
    members = [m for group in groups.values() for m in group]
    mark, steps, steps_done = time.perf_counter(), sum(m.steps for m in members), 0
    for i, member in enumerate(members, 1):
        overall.at("pretrain", steps_done / steps, f"{i - 1} of {plural(len(members), 'member')} trained")
        log.info(
            "pretraining %s (%d/%d): seed %d, %s",
            member.name,
            i,
            len(members),
            member.seed,
            plural(member.steps, "step"),
        )
        trained = pretrain(member, config.data, config.runs)
        steps_done += member.steps
        # The demo prints no per-member line itself, so its log keeps each member's own accuracy.
        log.info("%s: test top-1 %.2f%% after %s", member.name, trained["test_top1"], plural(trained["step"], "step"))
    timings["pretrain_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    names = tuple(m.name for m in members)
    for i, dataset in enumerate(config.transfer_datasets):
        overall.at("extract", i / len(config.transfer_datasets), f"{dataset}, {plural(len(names), 'member')}")
        extract(ExtractConfig(dataset=dataset, members=names), config.data, config.runs, config.cache)
    timings["extract_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    overall.at("probe", 0.0, f"{plural(len(groups) * len(config.transfer_datasets), 'probe')}, then the report")
    differences = probe_and_compare(config, groups)
    timings["probe_s"] = time.perf_counter() - mark

    written = tables.write(config.results)
    timings["total_s"] = time.perf_counter() - started
    outcome = {
        "table": written["table"],
        "differences": differences,
        "plots": written["plots"],
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "next": next_commands(config, groups),
    }
    # Beside the report's plots: what made them (config, version) and what they show.
    summary = {"experiment": "demo", "timecat_version": __version__, "config": asdict(config), "summary": outcome}
    text = json.dumps(summary, indent=1, default=str)
    files.replace(config.results / "demo.json", lambda tmp: Path(tmp).write_text(text))
    return outcome


def next_commands(config: DemoConfig, groups: dict) -> list[str]:
    """What a user types after the demo, each pointed at the demo's workspace (``--workdir``)."""
    from pipeline.core.hints import program

    w, timecat = shlex.quote(str(config.workdir)), program()  # .venv/bin/timecat after make demo: not on PATH
    largest = ",".join(m.name for m in groups[max(groups)])
    mixed = ",".join(group[0].name for group in groups.values())  # one member of each CatN: a new combination
    pretrained = config.pretrain_dataset
    commands = [
        f"{timecat} results --workdir {w}",
        f"{timecat} report --workdir {w}",
        f"{timecat} cache ls --workdir {w}",
        f"{timecat} probe --workdir {w} --members {mixed} --dataset {config.transfer_datasets[-1]}",
    ]
    if max(groups) > 1:  # diversity compares two members or more
        commands.append(f"{timecat} diversity --workdir {w} --members {largest} --dataset {pretrained}")
    return commands


def format_differences(differences: list[dict]) -> list[str]:
    """One line per CatN against Cat1: the paired difference, its 95% interval and what it supports."""
    lines = []
    for d in differences:
        lo, hi = d["ci95"]
        verdict = "outside noise" if d["excludes_zero"] else "within noise (the interval includes 0)"
        lines.append(
            f"{d['method']} - {d['against']} on {d['dataset']}: {d['difference']:+.2f} points "
            f"[95% CI {lo:+.2f}, {hi:+.2f}], {d['rows']} eval rows: {verdict}"
        )
    return lines


def format_outcome(outcome: dict) -> list[str]:
    """``timecat demo``'s report: the table, the paired differences from Cat1, plots and timings."""
    lines = [tables.format_table(outcome["table"])]
    lines.append("paired differences from Cat1 on the same eval rows (95% bootstrap intervals):")
    lines += ["  " + line for line in format_differences(outcome["differences"])]
    lines.append("plots: " + ", ".join(outcome["plots"]))
    lines.append("timings (s): " + ", ".join(f"{k} {v}" for k, v in outcome["timings"].items()))
    return [*lines, "next, in this workspace:", *("  " + command for command in outcome["next"])]
