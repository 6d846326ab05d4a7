"""The probe results store: one JSON line per probe, append-only.

Appends take an exclusive ``flock`` on the file, so concurrent probes never
interleave half lines; readers skip nothing and parse every line.
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

from pipeline.errors import TimecatError

RESULTS_FILE = "probes.jsonl"


def results_path(results_root: Path) -> Path:
    """The JSONL file that holds every probe record under ``results_root``."""
    return Path(results_root) / RESULTS_FILE


def append(results_root: Path, record: dict) -> Path:
    """Append one record as a single line, under an exclusive lock; return the file."""
    path = results_path(results_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(line)
            f.flush()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return path


def load(results_root: Path) -> list[dict]:
    """Every record, oldest first; a malformed line is an error that names its number."""
    path = results_path(results_root)
    if not path.is_file():
        raise TimecatError(f"no results at {path}: run `timecat probe` first")
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise TimecatError(f"{path}:{number}: not a JSON record ({e})") from None
    return records


def latest_per_probe(records: list[dict]) -> list[dict]:
    """Keep the newest record for each (dataset, members, protocol, splits): reruns replace older runs."""
    latest = {}
    for r in records:
        key = (r["dataset"], tuple(r["members"]), r["protocol"], r["train_split"], r["eval_split"])
        latest[key] = r
    return list(latest.values())
