"""The command line's option types and options, built from the stages' configs (``pipeline.configs``).

Each config field declares its default, help, unit, choices and bounds once
(``configs.param``); ``config_options`` turns the fields of a config into
click options, so ``cli.py`` never repeats a default or a choice list. The
locations (data, runs, cache, results) share one workspace, ``--workdir``
(``WorkspaceCommand``).
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path

import click

from cache.errors import LOCATIONS
from pipeline.configs import field_types, optional


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
        if len(items) > 1 and not items[-1]:
            self.fail(
                f"{value!r} ends with a comma: a list typed with spaces (run0, run1) reaches timecat as separate "
                f"arguments; write {self.example} without spaces, or quote it",
                param,
                ctx,
            )
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


# Lists typed as comma-separated items, by the field's annotation (X | None taken as X).
LISTS = {
    tuple[float, ...]: POSITIVE_NUMBERS,
    tuple[int, ...]: INTEGERS,
    tuple[str, ...]: NAMES,
    tuple[float, float]: FractionPair(),
}


def param_type(field, hint):
    """The click type of a config field, from its resolved annotation ``hint`` and metadata (configs.param)."""
    meta = field.metadata
    low, high = meta.get("low"), meta.get("high")
    kind, _ = optional(hint)
    if meta.get("choices"):
        return click.Choice([*meta["choices"], *meta.get("aliases", {})])  # an alias becomes its choice in the config
    if kind in LISTS:
        return LISTS[kind]
    if kind is int:
        return click.IntRange(min=low, max=high) if low is not None or high is not None else int
    if kind is float:
        return click.FloatRange(min=low, min_open=meta.get("low_open", False)) if low is not None else float
    if kind is Path:
        return click.Path(path_type=Path)
    if kind is str:
        return str
    raise TypeError(f"config field {field.name}: no command-line type for {hint}")  # a new annotation: add it here


def option(field, hint):
    """One click option declared by a config field: its flag, type, default and help come from the field."""
    meta = field.metadata
    flag = meta.get("flag") or "--" + field.name.replace("_", "-")
    text = meta.get("help", "") + (f" Unit: {meta['unit']}." if meta.get("unit") else "")
    if hint is bool:  # a flag on by default is turned off with --no-NAME
        flag = f"{flag}/--no-{flag[2:]}" if field.default is True else flag
        return click.option(flag, field.name, is_flag=True, default=field.default, help=text, show_default=False)
    default = None if field.default is MISSING else field.default
    shown = (
        ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default) if isinstance(default, tuple) else None
    )
    kind = param_type(field, hint)
    return click.option(
        flag, field.name, type=kind, default=default, show_default=shown or default is not None, help=text
    )


def config_options(config_cls, skip: tuple[str, ...] = ()):
    """Options for every field of ``config_cls`` that the command line sets (pipeline.configs), in field order.

    A field whose ``cli`` metadata is a sentence is set another way (an argument, a shared option, a plan).
    """
    chosen = [f for f in fields(config_cls) if f.metadata.get("cli", True) is True and f.name not in skip]
    hints = field_types(config_cls)

    def decorate(command):
        for field in reversed(chosen):
            command = option(field, hints[field.name])(command)
        return command

    return decorate


def make_config(config_cls, params: dict, **given):
    """``config_cls`` from a command's parameters (the fields it has options for); ``given`` values win."""
    return config_cls(**{**{f.name: params[f.name] for f in fields(config_cls) if f.name in params}, **given})


# One workspace: every location defaults to a folder of WORKDIR (--workdir, env TIMECAT_WORKDIR,
# default the current folder); a location's own flag or environment variable still wins. The flags,
# variables and folders are cache.errors.LOCATIONS, which the not-found errors name too.
PARAMS = {"data_root": "data", "runs": "runs", "cache_path": "cache", "results": "results"}  # param -> location
WORKSPACE = {param: LOCATIONS[location][2] for param, location in PARAMS.items()}


def _location(name: str, what: str, is_path: bool = True):
    """A --flag for one of timecat's locations, with an environment variable; unset, it is WORKDIR/<its folder>."""
    flag, env, folder = LOCATIONS[PARAMS[name]]
    kind = click.Path(path_type=Path) if is_path else str
    return click.option(
        flag, name, type=kind, default=None, envvar=env, help=f"{what} (env {env}; default WORKDIR/{folder})."
    )


DATA_ROOT = _location("data_root", "Folder of prepared datasets")
RUNS = _location("runs", "Folder of members, one sub-folder each")
# A string, not a Path: the cache may be any fsspec URL zarr accepts.
CACHE = _location("cache_path", "Feature cache path or URL", is_path=False)
RESULTS = _location("results", "Folder of probe records and plots")
WORKDIR = click.Option(
    ["--workdir"],
    type=click.Path(path_type=Path),
    default=Path("."),
    envvar="TIMECAT_WORKDIR",
    show_default=True,
    help="Workspace: WORKDIR/data, WORKDIR/runs, WORKDIR/features.zarr and WORKDIR/results (env TIMECAT_WORKDIR).",
)
JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


def _verbose(ctx, param, value) -> None:
    if value:
        from pipeline.core.progress import configure_logging

        configure_logging(True)


# `timecat probe ... -v` as well as `timecat -v probe ...`: a flag typed after the subcommand was refused.
VERBOSE = click.Option(
    ["-v", "--verbose"], is_flag=True, expose_value=False, callback=_verbose, help="Log debug messages."
)


class WorkspaceCommand(click.Command):
    """A command whose locations default to folders of one ``--workdir`` (added to every command that has one),
    and which takes -v/--verbose after its name too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        names = {p.name for p in self.params}
        if names & WORKSPACE.keys() and "workdir" not in names:
            self.params.append(WORKDIR)
        if "verbose" not in names:
            self.params.append(VERBOSE)

    def invoke(self, ctx):
        # demo and dominoes keep their own --workdir (a config field); the others' is only for the locations.
        own = any(p.name == "workdir" and p is not WORKDIR for p in self.params)
        given = {name for name in ("workdir", *WORKSPACE) if name in typed(ctx)}
        workdir = Path(ctx.params["workdir"] if own else ctx.params.pop("workdir", ".") or ".")
        ctx.meta["timecat.locations"] = {name: ctx.params.get(name, workdir) for name in given}
        for name, folder in WORKSPACE.items():
            if name in ctx.params and ctx.params[name] is None:
                ctx.params[name] = str(workdir / folder) if name == "cache_path" else workdir / folder
        check_folders(ctx, {"workdir": workdir, **{name: ctx.params[name] for name in WORKSPACE if name in ctx.params}})
        return super().invoke(ctx)


def check_folders(ctx: click.Context, paths: dict) -> None:
    """Refuse, before any work, a location that is a file or lies under one: every stage makes or reads a folder
    there, and would fail deep inside (a traceback) or say a misleading "not found"."""
    from pipeline.core.errors import TimecatError

    for name, path in paths.items():
        if path is None or "://" in str(path):  # a URL cache is not a local folder
            continue
        blocker = _file_in_the_way(Path(path))
        if blocker is not None:
            what = "is a file" if blocker == Path(path) else f"lies under the file {blocker}"
            raise TimecatError(
                f"{path} ({_named_by(ctx, name)}) {what}, not a folder: name a folder (timecat makes it if absent), "
                "or move the file away"
            )


def _file_in_the_way(path: Path) -> Path | None:
    """``path`` or its nearest existing parent, if that is not a folder; None otherwise (or when it cannot be
    looked at: the command's own errors say why)."""
    import stat

    for candidate in (path, *path.parents):
        try:
            mode = candidate.stat().st_mode
        except (FileNotFoundError, NotADirectoryError):  # absent, or under a file: look further up
            continue
        except OSError:
            return None
        return None if stat.S_ISDIR(mode) else candidate
    return None


def _named_by(ctx: click.Context, name: str) -> str:
    """Where a location came from: its flag, its environment variable, or WORKDIR's folder."""
    from click.core import ParameterSource

    flag, env, folder = ("--workdir", "TIMECAT_WORKDIR", ".") if name == "workdir" else LOCATIONS[PARAMS[name]]
    source = ctx.get_parameter_source(name)
    if source == ParameterSource.ENVIRONMENT:
        return f"from the environment variable {env}"
    if source == ParameterSource.COMMANDLINE:
        return f"from {flag}"
    return f"the workspace's {folder}, the default of {flag}" if name != "workdir" else "the workspace"


def location_flags(ctx: click.Context, names=("workdir", "data_root", "runs", "cache_path")) -> str:
    """The location flags the user gave (``--workdir demo``), to repeat in a command an error suggests."""
    import shlex

    given = ctx.meta.get("timecat.locations", {})
    flag = {"workdir": "--workdir", **{name: LOCATIONS[location][0] for name, location in PARAMS.items()}}
    return " ".join(f"{flag[n]} {shlex.quote(str(given[n]))}" for n in names if n in given)


def typed(ctx: click.Context) -> dict:
    """The options the user gave (command line or environment), not left at their defaults."""
    from click.core import ParameterSource

    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return {name: value for name, value in ctx.params.items() if ctx.get_parameter_source(name) in given}
