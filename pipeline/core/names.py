"""The naming rules of members, datasets and splits, in one torch-free place.

A name becomes a folder and a cache path, so it is checked before anything is
made from it (``check_name``, the cache's own rule). A member given as a
checkpoint file (``path`` or ``name=path``, the paper's or AlgoPerf's members)
is named after the file unless a name is given.
"""

from __future__ import annotations

from pathlib import Path

from cache.layout import check_name

FOREIGN_SUFFIXES = (".pt", ".pth", ".tar", ".ckpt", ".bin")


def is_foreign(member: str) -> bool:
    """A member given as a checkpoint file (``path`` or ``name=path``) rather than a run name."""
    return "=" in member or "/" in member or member.endswith(FOREIGN_SUFFIXES)


def foreign_name_and_path(member: str) -> tuple[str, Path]:
    """``name=path`` -> (name, path); a bare path is named after its file (``seed2.pt`` -> ``seed2``)."""
    name, _, path = member.rpartition("=")
    path = Path(path)
    return (name or path.name.split(".")[0]), path


def member_name(member: str) -> str:
    """The name a member is cached under: a run's own name, or a checkpoint file's given or file name."""
    return foreign_name_and_path(member)[0] if is_foreign(member) else member


__all__ = ["FOREIGN_SUFFIXES", "check_name", "foreign_name_and_path", "is_foreign", "member_name"]
