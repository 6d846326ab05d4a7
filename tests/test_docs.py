"""The README against the real command line: every command is documented, every documented command parses.

As sqlite-utils does: walking ``cli.main`` finds every command and subcommand,
and each must appear in the README as ``timecat NAME``; every ``timecat ...``
line of the README's shell blocks is parsed by the real click command
(``make_context``: options, types, choices and required options), never run.
"""

import re
import shlex
from pathlib import Path

import click
import pytest
from conftest import parses

import cli

README = Path(__file__).resolve().parents[1] / "README.md"
SHELL_BLOCK = re.compile(r"^```(?:sh|bash|shell|console)\n(.*?)^```", re.S | re.M)
SEPARATORS = {";", "&&", "||", "|", "&", "do", "then", "done", "fi"}  # where one shell command ends
PLACEHOLDER = "1"  # stands for a shell variable ($k in a loop): every documented one is a number


def command_paths(group: click.Group = cli.main, prefix: str = "") -> list[str]:
    """Every command and subcommand as typed after ``timecat``: ['cache', 'cache ls', ..., 'probe', ...]."""
    paths = []
    for name, command in group.commands.items():
        paths.append(f"{prefix}{name}")
        if isinstance(command, click.Group):
            paths += command_paths(command, f"{prefix}{name} ")
    return paths


def timecat_lines(text: str) -> list[tuple[str, list[str]]]:
    """Every ``timecat`` invocation in the shell blocks of ``text``, as (the line as written, its argv).

    Continuation lines (a trailing backslash) are joined, shell comments dropped, and a line is cut at
    ``;``, ``&&``, ``|`` and loop keywords, so ``a && timecat b`` and ``for ...; do timecat c; done`` give
    ``b`` and ``c``. ``$(which timecat)`` and ``.venv/bin/timecat`` are timecat; a ``$VAR`` is a number.
    """
    found = []
    for block in SHELL_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line.replace("$(which timecat)", "timecat"), posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words, command = list(lexer), None
            for word in [*words, ";"]:
                if word in SEPARATORS:
                    if command:
                        found.append((line.strip(), command))
                    command = None
                elif command is not None:
                    command.append(PLACEHOLDER if word.startswith("$") else word)
                elif word == "timecat" or word.endswith("/timecat"):
                    command = []
    return found


def test_every_command_and_subcommand_appears_in_the_readme():
    text = README.read_text()
    paths = command_paths()
    assert {"probe", "cache", "cache ls", "cache verify", "cache rm"} <= set(paths)
    missing = [path for path in paths if not re.search(rf"\btimecat {re.escape(path)}\b", text)]
    assert not missing, f"commands the README never shows as `timecat NAME`: {missing}"


def test_every_timecat_line_in_the_readmes_shell_blocks_parses():
    lines = timecat_lines(README.read_text())
    assert len(lines) > 20, lines  # the blocks were found, and the continuation and loop lines with them
    for line, argv in lines:
        try:
            parses(argv)
        except (click.UsageError, AssertionError) as e:
            pytest.fail(f"README line does not parse: {line}\n  {e}")


def test_the_line_reader_joins_continuations_and_finds_commands_inside_loops():
    text = (
        "```sh\n"
        "timecat probe --members a,b --dataset digits   # a comment --no-such-option\n"
        "torchrun --nproc-per-node 8 \\\n"
        "    $(which timecat) pretrain --plan p.json --member m\n"
        "for k in 1 2; do .venv/bin/timecat probe --shots $k; done\n"
        "timecat prepare imagenet && timecat prepare inat2018\n"
        "```\n"
        "```\ntimecat not-a-shell-block\n```\n"
    )
    assert [argv for _, argv in timecat_lines(text)] == [
        ["probe", "--members", "a,b", "--dataset", "digits"],
        ["pretrain", "--plan", "p.json", "--member", "m"],
        ["probe", "--shots", "1"],
        ["prepare", "imagenet"],
        ["prepare", "inat2018"],
    ]


def test_the_readme_names_only_test_files_that_exist():
    root = README.parent
    named = set(re.findall(r"`(tests/[\w/]+\.py)`", README.read_text()))
    assert len(named) > 10
    assert not [path for path in sorted(named) if not (root / path).is_file()]
