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

from pipeline import __version__, files, report
from pipeline.configs import DemoConfig
from pipeline.progress import get_logger

log = get_logger(__name__)


def plan(config: DemoConfig):
    """Members for each CatN: names run0, run1, ... and seeds 0, 1, ..., each with B/N steps."""
    from pipeline.pretrain import PretrainConfig

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
    from pipeline.probe import ProbeConfig, probe

    differences = []
    for dataset in config.transfer_datasets:
        ids = {}
        for n, group in groups.items():
            config_n = ProbeConfig(dataset=dataset, members=tuple(m.name for m in group))
            ids[n] = probe(config_n, config.cache, config.results)["id"]
        # Each CatN against Cat1 on the same eval rows: is the gain more than resampling noise?
        base = min(ids)
        for n in sorted(ids):
            if n != base:
                paired = report.compare(config.results, ids[n], ids[base])
                differences.append({**paired, "dataset": dataset, "method": f"Cat{n}", "against": f"Cat{base}"})
    return differences


def run_demo(config: DemoConfig) -> dict:
    """Prepare, pretrain, extract, probe and report; completed steps are kept on a rerun."""
    from pipeline.extract import ExtractConfig, extract
    from pipeline.prepare import PrepareConfig, prepare
    from pipeline.pretrain import pretrain

    timings = {}
    started = time.perf_counter()
    for dataset in dict.fromkeys((config.pretrain_dataset, *config.transfer_datasets)):
        prepare(PrepareConfig(kind=dataset, data_root=config.data))
    timings["prepare_s"] = time.perf_counter() - started

    groups = plan(config)
    members = [m for group in groups.values() for m in group]
    mark = time.perf_counter()
    for i, member in enumerate(members, 1):
        log.info("pretraining %s (%d/%d): seed %d, %d steps", member.name, i, len(members), member.seed, member.steps)
        trained = pretrain(member, config.data, config.runs)
        # The demo prints no per-member line itself, so its log keeps each member's own accuracy.
        log.info("%s: test top-1 %.2f%% after %d steps", member.name, trained["test_top1"], trained["step"])
    timings["pretrain_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    names = tuple(m.name for m in members)
    for dataset in config.transfer_datasets:
        extract(ExtractConfig(dataset=dataset, members=names), config.data, config.runs, config.cache)
    timings["extract_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    differences = probe_and_compare(config, groups)
    timings["probe_s"] = time.perf_counter() - mark

    written = report.write(config.results)
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
    w = shlex.quote(str(config.workdir))
    largest = ",".join(m.name for m in groups[max(groups)])
    mixed = ",".join(group[0].name for group in groups.values())  # one member of each CatN: a new combination
    pretrained = config.pretrain_dataset
    commands = [
        f"timecat results --workdir {w}",
        f"timecat report --workdir {w}",
        f"timecat cache ls --workdir {w}",
        f"timecat probe --workdir {w} --members {mixed} --dataset {config.transfer_datasets[-1]}",
    ]
    if max(groups) > 1:  # diversity compares two members or more
        commands.append(f"timecat diversity --workdir {w} --members {largest} --dataset {pretrained}")
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
    lines = [report.format_table(outcome["table"])]
    lines.append("paired differences from Cat1 on the same eval rows (95% bootstrap intervals):")
    lines += ["  " + line for line in format_differences(outcome["differences"])]
    lines.append("plots: " + ", ".join(outcome["plots"]))
    lines.append("timings (s): " + ", ".join(f"{k} {v}" for k, v in outcome["timings"].items()))
    return [*lines, "next, in this workspace:", *("  " + command for command in outcome["next"])]
