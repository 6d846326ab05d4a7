"""Provenance: what each member array records of where its features came from, and when that makes it stale.

Every array's attributes hold a ``provenance`` dict (checkpoint sha256, arch,
preprocessing, recipe, precision, dataset fingerprint, view seed...) written
by ``timecat extract``. A rerun compares it with what it would write now.
"""

from __future__ import annotations

import json

# What makes cached features stale: (provenance key, what to call it). Keys other than the
# checkpoint are compared only when the cached array records them (older caches did not).
STALE_KEYS = (
    ("checkpoint_sha256", "checkpoint"),
    ("view_seed", "view seed"),
    ("views", "view recipe"),
    ("precision", "precision"),
    ("recipe", "recipe"),
    ("preprocessing", "preprocessing"),
)
# What arrays written before a field was recorded did: every resize was FFCV's area resize.
OLD_DEFAULTS = {"preprocessing": {"interpolation": "area"}}


def _json(value):
    return json.loads(json.dumps(value))  # attributes come back from JSON: tuples as lists


def stale_field(cached: dict, provenance: dict, key: str) -> tuple[str, object, object] | None:
    """``(field, cached value, new value)`` where a cached array's provenance differs from this run's, else None."""
    old, new = cached.get(key), _json(provenance.get(key))
    if key != "checkpoint_sha256" and old is None:
        return None
    if isinstance(old, dict) and isinstance(new, dict):  # the keys both record, with older arrays' defaults
        old = {**OLD_DEFAULTS.get(key, {}), **old}
        for k in sorted(old.keys() & new.keys()):
            if old[k] != new[k]:
                return f"{key}.{k}", old[k], new[k]
        return None
    return (key, old, new) if old != new else None


def first_stale(cached: dict, provenance: dict) -> tuple[str, str, object, object] | None:
    """``(what, field, cached value, new value)`` for the first stale key (``STALE_KEYS`` order), else None."""
    for key, what in STALE_KEYS:
        differs = stale_field(cached, provenance, key)
        if differs:
            return (what, *differs)
    return None
