"""Each measured figure lives in one place: the README's Performance rows quote benchmark docstrings.

A benchmark's module docstring is the record of its figures (a "Figures, DATE,
MACHINE" paragraph); the README's Performance table only summarises it, naming
the benchmark. Every number in a row's result must appear in that benchmark's
docstring, so the summary cannot drift from the record. Docstrings are read
with ``ast``: the benchmarks themselves are never imported.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "tests" / "benchmarks"
# 1.23x, 0.90, 0.84-0.97, 1,657, 72.3: a number not glued to a word (bf16, Cat4 and fp32 are names, not figures)
NUMBER = re.compile(r"(?<![\w.,])\d[\d,]*(?:\.\d+)?(?:-\d[\d,]*(?:\.\d+)?)?x?(?![\w]|[.,]\d)")


def performance_rows(readme: str) -> list[tuple[str, str]]:
    """(result, benchmark file) of each row of the README's Performance table that names a benchmark."""
    section = readme.split("\n## Performance\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`\w+\.py`", cells[3]):
            rows.append((cells[1], cells[3].strip("`")))
    return rows


def docstring(name: str) -> str:
    return ast.get_docstring(ast.parse((BENCHMARKS / name).read_text())) or ""


def numbers(text: str) -> set[str]:
    return set(NUMBER.findall(text))


def test_the_number_reader_finds_figures_and_skips_names():
    assert numbers("1.23x the floor (goal 1.5x), 0.84-0.97, 1,657 MiB; bf16, Cat4, fp32; 0.9.") == {
        "1.23x",
        "1.5x",
        "0.84-0.97",
        "1,657",
        "0.9",
    }


def test_every_benchmark_docstring_records_figures_and_the_readme_names_it():
    rows = performance_rows((ROOT / "README.md").read_text())
    named = {name for _, name in rows}
    for path in sorted(BENCHMARKS.glob("test_*.py")):
        assert path.name in named, f"the README's Performance table does not cite {path.name}"
        assert re.search(r"^Figures, \d{4}-\d{2}-\d{2}, ", docstring(path.name), re.M), f"{path.name} records none"


def test_every_number_in_a_performance_row_is_in_its_benchmarks_docstring():
    rows = performance_rows((ROOT / "README.md").read_text())
    assert len(rows) >= 10, rows  # the table was found
    for result, name in rows:
        missing = sorted(numbers(result) - numbers(docstring(name)))
        assert not missing, f"README Performance row for {name} quotes {missing}, which its docstring does not record"
