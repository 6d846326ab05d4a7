"""The next command an error or a finished job names: how to call timecat here, and what to extract.

A user who ran `make demo` has timecat in .venv/bin, not on PATH, so a command
shown as bare `timecat` fails when pasted (``program``). A member that is
trained but not cached, or a dataset not cached yet, is one `timecat extract`
away, so the probe's refusal names that command (``require_cached``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

from cache.errors import CacheError, did_you_mean


def program() -> str:
    """How to call timecat from the current folder: ``timecat`` when it is on PATH, else the path of this
    environment's script (``.venv/bin/timecat``), else ``python -m cli``."""
    if shutil.which("timecat"):
        return "timecat"
    script = Path(sys.executable).parent / "timecat"
    if script.is_file():
        relative = os.path.relpath(script)
        return relative if not relative.startswith("..") else str(script)
    return f"{shlex.quote(sys.executable)} -m cli"


def require_cached(store, dataset: str, members, runs: Path, where: str = "", split: str = "train") -> None:
    """Refuse members or a dataset missing from the cache with the command that caches them.

    ``store`` is an open cache; ``where`` the location flags to repeat in the
    command (e.g. ``--workdir demo``). A member with a checkpoint in ``runs`` is
    trained but not extracted; any other missing name gets the closest cached or
    trained one. Members are looked for in ``split``, the split the probe fits on.
    """
    trained = sorted(p.parent.name for p in Path(runs).glob("*/checkpoint.pt"))
    tail = f" {where}" if where else ""
    extract = f"{program()} extract --members {{}} --dataset {dataset}{tail}"
    cached_sets = store.datasets()
    if dataset not in cached_sets:
        known, guess = [m for m in members if m in trained], did_you_mean(dataset, cached_sets)
        fix = f"cache it: `{extract.format(','.join(known))}`" if known else "cache it with `timecat extract`"
        raise CacheError(
            f"dataset {dataset!r} is not in the cache{guess}; cached: {cached_sets or 'none'} (in {store.path})"
            + ("" if guess else f"; {fix}")
        )
    cached = store.members(dataset, split) if split in store.splits(dataset) else []
    missing = [m for m in members if m not in cached]
    if not missing:
        return
    uncached = [m for m in missing if m in trained]
    unknown = [m for m in missing if m not in trained]
    problems = []
    if uncached:
        problems.append(
            f"member(s) {uncached} are trained (in {runs}) but not cached for {dataset}: "
            f"`{extract.format(','.join(uncached))}`"
        )
    for m in unknown:
        problems.append(f"unknown member {m!r}{did_you_mean(m, [*cached, *trained])}")
    raise CacheError(f"{'; '.join(problems)}; cached for {dataset}: {cached or 'none'}, trained: {trained or 'none'}")
