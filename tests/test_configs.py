"""Configs hold every caller to their fields' declared types, choices and bounds; mirrored choice lists agree."""

import ast
import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

import cli
from cache.errors import CacheError
from pipeline import configs, options
from pipeline.configs import (
    DiversityConfig,
    DominoesConfig,
    ExtractConfig,
    PlanConfig,
    PrepareConfig,
    PretrainConfig,
    ProbeConfig,
    ReportConfig,
    ToyConfig,
    config,
    param,
)
from pipeline.core.errors import TimecatError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [c for c in vars(configs).values() if isinstance(c, type) and dataclasses.is_dataclass(c)]


def test_every_config_runs_the_field_validator():
    assert len(CONFIGS) == 11  # LaunchConfig (cluster jobs) is the eleventh
    for cls in CONFIGS:
        assert cls.__post_init__.__qualname__ == "config.<locals>.post_init", cls.__name__


@pytest.mark.parametrize(
    ("make", "message"),
    [
        # choices: ReportConfig has no rule of its own, only its fields' metadata
        (lambda: ReportConfig(layout="table9"), r"unknown layout 'table9'; choose one of \['table3', 'table2'\]"),
        (lambda: ProbeConfig("d", ("a",), protocol="knnn"), r"unknown protocol 'knnn'; .* \(did you mean 'knn'\?\)"),
        (lambda: ExtractConfig("d", ("a",), dtype="int8"), r"unknown dtype 'int8'; choose one of"),
        # lower bounds, closed and open
        (lambda: PlanConfig("d", cat=0), r"^cat must be at least 1, got 0$"),
        (lambda: ProbeConfig("d", ("a",), memory_gib=0.0), r"^memory_gib must be more than 0 GiB, got 0.0$"),
        (lambda: ToyConfig(steps=0), r"^steps must be at least 1, got 0$"),
        # upper bounds
        (lambda: PretrainConfig("a", "d", 0, 10, threads=5000), r"^threads must be at most 4096, got 5000$"),
        (lambda: ToyConfig(mixtures=2_000_000), r"^mixtures must be at most 1000000, got 2000000$"),
        # types, from the annotations
        (lambda: PretrainConfig("a", "d", 0, "10"), r"^steps must be an integer, got '10'$"),
        (lambda: PretrainConfig("a", "d", 0, 10, compile=1), r"^compile must be true or false, got 1$"),
        (lambda: PretrainConfig("a", "d", 0, True), r"^steps must be an integer, got True$"),
        (lambda: ProbeConfig("d", "run0"), r"^members must be a tuple of strings, got 'run0'$"),
        (lambda: ProbeConfig("d", ("a",), c_grid=(1, "x")), r"^c_grid must be a tuple of numbers"),
        (lambda: PretrainConfig("a", "d", 0, 10, ramp=(0.1,)), r"^ramp must be a tuple \(a number, a number\)"),
        (lambda: PrepareConfig("digits", 3), r"^data_root must be a path, got 3$"),
    ],
)
def test_python_callers_meet_the_fields_declared_rules(make, message):
    with pytest.raises(TimecatError, match=message):
        make()


def test_what_the_rules_let_through():
    # An int is a number, a str a path, a list a tuple, None an unset optional field; bounds are inclusive.
    PrepareConfig("digits", "data", stats_images=1, storage=None)
    ProbeConfig("d", ["a", "b"], holdout=0.5, memory_gib=1, c_grid=[1, 2.5], shots=None)
    ProbeConfig("d", ("a",), refine=())  # no refinement stage: a search of the coarse grid alone
    PretrainConfig("a", "d", 0, 1, threads=4096, eval_every=0)
    assert ToyConfig(mixtures=1_000_000).mixtures == 1_000_000


def test_an_alias_becomes_its_choice_for_python_callers_and_the_command_line():
    @config
    class Renamed:
        protocol: str = param("new", "A renamed choice.", choices=("new", "other"), aliases={"old": "new"})

    assert Renamed("old").protocol == "new" and Renamed("other").protocol == "other"
    with pytest.raises(TimecatError, match=r"unknown protocol 'nope'; choose one of \['new', 'other'\]"):
        Renamed("nope")
    field = dataclasses.fields(Renamed)[0]
    assert list(options.param_type(field, str).choices) == ["new", "other", "old"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan", "--dataset", "d", "--cat", "0"], "Invalid value for '--cat': 0 is not in the range x>=1."),
        (["report", "--layout", "table9"], "Invalid value for '--layout': 'table9' is not one of 'table3', 'table2'."),
        (["probe", "--members", "a", "--dataset", "d", "--memory-gib", "0"], "0.0 is not in the range x>0."),
    ],
)
def test_the_command_line_refuses_first_with_its_usage_error(args, message):
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_every_field_has_a_command_line_type_from_its_resolved_annotation():
    for cls in CONFIGS:
        hints = configs.field_types(cls)
        for field in dataclasses.fields(cls):
            if hints[field.name] is not bool:
                options.param_type(field, hints[field.name])  # raises on an annotation it cannot type


def test_the_choice_lists_the_command_line_shows_are_their_owners():
    from cache.layout import Compression
    from pipeline.data import datasets, prepare, recipes, splits
    from pipeline.members import models
    from pipeline.probe import logreg_backends
    from pipeline.report import tables
    from pipeline.train import plan

    assert tuple(sorted(models.ARCHS)) == configs.ARCH_NAMES
    assert set(configs.PROBE_BACKENDS) == {*logreg_backends.CHOICES, "batched"}  # batched: the probe's own solver
    assert tuple(prepare.STORAGE) == configs.STORAGES
    assert tuple(tables.METRICS) == configs.REPORT_METRICS and configs.REPORT_LAYOUTS == tables.LAYOUTS
    assert tuple(plan.PRESETS) == configs.PRESETS
    assert configs.SPLITS == splits.SPLITS
    assert tuple(c.value for c in Compression) == configs.COMPRESSIONS
    assert tuple(datasets.DATASETS) == recipes.KINDS  # one reader per registered kind, in the registry's order


def test_the_prepare_help_lists_the_registrys_kinds():
    from pipeline.data.recipes import KINDS

    text = " ".join(CliRunner().invoke(cli.main, ["prepare", "--help"], terminal_width=10_000).output.split())
    assert "one of " + ", ".join(KINDS) + "." in text


def test_configs_are_imported_from_pipeline_configs_only():
    names = {cls.__name__ for cls in CONFIGS}
    wrong = []
    for path in [ROOT / "cli.py", *ROOT.glob("pipeline/**/*.py"), *ROOT.glob("tests/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "pipeline.configs":
                wrong += [
                    f"{path.relative_to(ROOT)}: {a.name} from {node.module}" for a in node.names if a.name in names
                ]
    assert wrong == []


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: PrepareConfig("digits", "data", name="../x"), "invalid dataset name '../x'"),
        (lambda: PretrainConfig("a b", "d", 0, 1), "invalid member name 'a b'"),
        (lambda: PretrainConfig("a", "d", -1, 1), "seed must be an integer from 0"),
        (lambda: PretrainConfig("a", "d", 0, 1, lr=float("nan")), "lr must be a finite positive number"),
        (lambda: PretrainConfig("a", "d", 0, 1, warmup=1.0), r"warmup is a fraction in \[0, 1\)"),
        (lambda: PretrainConfig("a", "d", 0, 1, resolution=4096), "resolution must be at least 8 px and at most"),
        (lambda: PretrainConfig("a", "d", 0, 1, ramp=(0.9, 0.1)), "ramp is two budget fractions"),
        (lambda: ExtractConfig("d", ()), "no members given"),
        (lambda: ExtractConfig("d", ("a", "a=/x.pt")), "a member is named twice"),
        (lambda: ExtractConfig("d", ("a",), views=29), "views must be 0 to 28, not 29"),
        (lambda: ExtractConfig("d", ("a",), view_seed=-1), "view seed must be an integer"),
        (lambda: ProbeConfig("d", ("a",), holdout=1.0), r"holdout is a fraction in \(0, 1\)"),
        (lambda: ProbeConfig("d", ("a",), k_grid=(0,)), "knn needs k values >= 1"),
        (lambda: ProbeConfig("d", ("a",), eval_split="a/b"), "invalid split name 'a/b'"),
        (lambda: ToyConfig(strength=float("inf")), "strength must be a finite number, got inf"),
        (lambda: DiversityConfig("d", ("a",)), "diversity compares at least 2 members"),
        (lambda: DominoesConfig(seeds=()), "give at least one seed"),
        (lambda: DominoesConfig(seeds=(1, 1)), r"a seed is given twice in \(1, 1\)"),
        (lambda: ProbeConfig("d", ("a",), c_grid=(1.0, -1.0)), "c_grid holds finite positive numbers only"),
        (lambda: ProbeConfig("d", ("a",), wd_grid=()), "wd_grid is one or more finite positive numbers"),
        (lambda: ProbeConfig("d", ("a",), refine=(float("nan"),)), "refine holds finite positive numbers only"),
        # nan fails every bound: each comparison with nan is false, so a bound must be written to fail it.
        (lambda: ProbeConfig("d", ("a",), temperature=float("nan")), "temperature must be more than 0"),
        (lambda: ProbeConfig("d", ("a",), memory_gib=float("nan")), "memory_gib must be more than 0"),
        (lambda: ToyConfig(mixtures=10**7), "mixtures must be at most 1000000"),
        (lambda: ProbeConfig("d", ("a",), c_grid=1.0), r"c_grid must be a tuple of numbers, got 1.0"),
    ],
)
def test_a_fields_own_rule_holds_for_python_callers(make, message):
    # Declared once, as param(rule=...), and run by the one validator: no __post_init__ states it.
    with pytest.raises((TimecatError, CacheError), match=message):  # a bad name is the cache's CacheError
        make()


def _self_fields(node: ast.AST) -> set[str]:
    return {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and getattr(n.value, "id", "") == "self"}


def test_post_init_keeps_only_rules_across_fields():
    """A config's __post_init__ (and each _check_ method it calls) reads two or more of its fields: a rule of one
    field alone belongs in that field's param(rule=...), where the validator runs it for every caller."""
    tree = ast.parse((ROOT / "pipeline/configs.py").read_text())
    names = {cls.__name__ for cls in CONFIGS}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in names):
        methods = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
        for name in ["__post_init__"] + [m for m in methods if m.startswith("_check_")]:
            assigned = {}  # a local variable -> the fields it was computed from
            for statement in methods[name].body if name in methods else []:
                read = _self_fields(statement) - set(methods)
                read |= set().union(*(assigned.get(getattr(n, "id", None), set()) for n in ast.walk(statement)))
                if isinstance(statement, ast.Assign):
                    assigned.update({t.id: read for t in statement.targets if isinstance(t, ast.Name)})
                elif not read and not isinstance(statement, ast.Expr | ast.Return):
                    raise AssertionError(f"{cls.name}.{name}: {ast.unparse(statement)[:60]} reads no field")
                elif read:  # a docstring or a call of another _check_ method reads none
                    where = f"{cls.name}.{name}: {ast.unparse(statement)[:60]}"
                    assert len(read) >= 2, f"{where} reads only {sorted(read)}: make it that field's rule"
