"""Every parameter is declared once: the stage configs' fields make the command line's options."""

import itertools
import shlex
from dataclasses import MISSING, fields

import pytest
from click.testing import CliRunner
from conftest import parses

import cli
from pipeline.configs import (
    DemoConfig,
    DiversityConfig,
    DominoesConfig,
    ExtractConfig,
    PlanConfig,
    PrepareConfig,
    PretrainConfig,
    ProbeConfig,
    ReportConfig,
    ToyConfig,
)

COMMANDS = {
    "prepare": PrepareConfig,
    "pretrain": PretrainConfig,
    "extract": ExtractConfig,
    "probe": ProbeConfig,
    "plan": PlanConfig,
    "report": ReportConfig,
    "toy": ToyConfig,
    "diversity": DiversityConfig,
    "dominoes": DominoesConfig,
    "demo": DemoConfig,
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_config_field_is_an_option_with_the_configs_default(command):
    options = {p.name: p for p in cli.main.commands[command].params}
    internal = []
    for field in fields(COMMANDS[command]):
        reason = field.metadata.get("cli", True)
        if reason is not True:  # set another way, and says how
            assert isinstance(reason, str) and reason, field.name
            internal.append(field.name)
            continue
        assert field.name in options, f"{command}: config field {field.name} has no option"
        default = None if field.default is MISSING else field.default
        assert options[field.name].default == default, (command, field.name, options[field.name].default, default)
        assert field.metadata.get("help"), f"{command}: {field.name} has no help text"
    shared = ["data_root"]  # the shared --data-root option
    expected = {"prepare": ["kind", *shared], "probe": ["members"], "dominoes": shared, "demo": shared}.get(command, [])
    assert internal == expected


def test_help_shows_defaults_and_units_from_the_config():
    runner = CliRunner()
    text = runner.invoke(cli.main, ["pretrain", "--help"]).output
    assert "--warmup FLOAT" in text and "Unit: fraction." in text and "[default: 0.05]" in text
    text = runner.invoke(cli.main, ["probe", "--help"]).output
    assert "--c-grid" in text and "0.0001,0.001,0.01,0.1,1,10" in text and "--memory-gib" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan", "--dataset", "d", "--cat", "2", "--total-steps", "4", "--seeds", "1,a"], "['a'] are not integers"),
        (["probe", "--members", "a", "--dataset", "d", "--wd-grid", "1e-3,zz"], "['zz'] are not positive numbers"),
        (["probe", "--members", "a", "--dataset", "d", "--c-grid", "1,-2"], "['-2'] are not positive numbers"),
        (["probe", "--members", "a", "--dataset", "d", "--k-grid", "10,x"], "['x'] are not integers"),
        (["pretrain", "--name", "a", "--ramp", "0.5"], "is not START,END"),
        (["extract", "--members", "a", "--dataset", "d", "--splits", "train,,test"], "[''] are not names"),
    ],
)
def test_bad_list_items_are_usage_errors_that_name_them(args, message):
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_a_config_field_reaches_the_stage_from_the_command_line(tmp_path, monkeypatch):
    seen = {}

    def fake_probe(config, cache_path, results_root=None, extra=None):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr("pipeline.probe.run.probe", fake_probe)
    monkeypatch.setattr(cli, "_require_cached", lambda *args: None)  # no cache here: only the config is looked at
    args = ["probe", "--members", "a,b", "--dataset", "d", "--holdout", "0.3", "--c-grid", "0.1,1", "--bootstrap"]
    CliRunner().invoke(cli.main, [*args, "2000", "--search-rows", "500", "--results", str(tmp_path)])
    config = seen["config"]
    assert (config.holdout, config.c_grid, config.bootstrap, config.search_rows) == (0.3, (0.1, 1.0), 2000, 500)
    assert config.members == ("a", "b") and config.k_grid == ProbeConfig.__dataclass_fields__["k_grid"].default


def _examples(command, name: str = "timecat") -> list[tuple[str, list[str]]]:
    """Every ``Example:`` in a command's help (and its subcommands'), as (where, timecat argv)."""
    found = []
    text = (command.help or "").replace("\\\n", " ")
    for line in text.splitlines():
        if "Example:" not in line or "timecat " not in line:
            continue
        words = shlex.split(line.split("Example:", 1)[1].split("   #")[0])
        start = max(i for i, w in enumerate(words) if w.endswith("timecat") or w == "$(which")
        argv = words[start + 1 :]
        argv = argv[1:] if argv and argv[0].startswith("timecat)") else argv  # $(which timecat)
        found.append((name, argv))
    for sub_name, sub in getattr(command, "commands", {}).items():
        found += _examples(sub, f"{name} {sub_name}")
    return found


def test_every_help_example_parses_and_names_real_members_and_kinds():
    from pipeline.data.datasets import DATASETS
    from pipeline.train import plan as plans

    examples = _examples(cli.main)
    assert len(examples) > 40
    table3 = {m.name for m in plans.make_plan("imagenet", preset="paper-table3").members}
    for where, argv in examples:
        parses(argv)  # options exist, types and choices hold
        words = dict(itertools.pairwise(argv))
        if "table3.json" in argv and "--member" in words:
            assert words["--member"] in table3, (where, argv)  # the preset's own member names
        if "--dataset" in words:
            assert words["--dataset"] in DATASETS, (where, argv)
