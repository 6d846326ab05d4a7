"""Members, checkpoints and destinations: what issue 24 found, each refused with one line or handled.

Guards: destinations that are not regular files (a FIFO, a symlink to /dev/null) are never
replaced, and are refused before the work; member, dataset and cache folders that are
symlinks are never written through; foreign checkpoints keep their head on export, and
checkpoints of the wrong shape or size are named before any allocation; `status` shows a
damaged member beside the others. Each case asserts the message a user sees and that
nothing already written was lost.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import cli
from pipeline import checkpoints, files
from pipeline.errors import TimecatError
from pipeline.extract import ExtractConfig, extract
from pipeline.prepare import PrepareConfig, prepare
from pipeline.pretrain import PretrainConfig, pretrain


def run(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def tree(root: Path) -> dict[str, bytes | str | None]:
    """Every path under ``root``: bytes of files, a link's target, None for folders and FIFOs."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        if path.is_symlink():
            out[str(path.relative_to(root))] = os.readlink(path)
        elif path.is_file():
            out[str(path.relative_to(root))] = path.read_bytes()
        else:
            out[str(path.relative_to(root))] = None
    return out


@pytest.fixture
def copy(pipeline_run, tmp_path):
    """A private copy of the shared tiny pipeline's runs and cache, to damage."""
    runs, store = tmp_path / "runs", tmp_path / "features.zarr"
    shutil.copytree(pipeline_run["runs"], runs)
    shutil.copytree(pipeline_run["cache"], store)
    return {"data": pipeline_run["data"], "runs": runs, "cache": str(store), "tmp": tmp_path}


# -- Item 9: destinations that are not regular files -------------------------------------------


def special_files(folder: Path) -> dict[str, Path]:
    """A FIFO and a symlink to /dev/null (never the real /dev/null itself) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    fifo, link = folder / "fifo.png", folder / "null.png"
    os.mkfifo(fifo)
    link.symlink_to(os.devnull)
    return {"FIFO": fifo, "character device": link}


def test_a_rename_never_replaces_a_fifo_or_a_device(tmp_path):
    for kind, path in special_files(tmp_path / "out").items():
        with pytest.raises(TimecatError, match=rf"is a {kind}.*not a regular file.*choose another path"):
            files.replace(path, lambda tmp: tmp.write_text("x"))
    assert (tmp_path / "out/fifo.png").is_fifo() and os.readlink(tmp_path / "out/null.png") == os.devnull
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fifo.png", "null.png"]  # no temporary left
    # A symlink to a regular file is replaced by the rename, never written through.
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "out/link.txt").symlink_to(victim)
    files.write_text(tmp_path / "out/link.txt", "new")
    assert victim.read_text() == "precious" and (tmp_path / "out/link.txt").read_text() == "new"


def test_plan_export_and_report_refuse_a_fifo_or_a_device_before_the_work(copy, monkeypatch):
    from pipeline import plan, report

    def no_work(*args, **kwargs):
        raise AssertionError("the destination must be refused before the work")

    monkeypatch.setattr(plan, "make_plan", no_work)
    monkeypatch.setattr(checkpoints, "load_member", no_work)
    monkeypatch.setattr(report, "write", no_work)
    out = copy["tmp"] / "out"
    for kind, path in special_files(out).items():
        before = tree(out)
        for args in (
            ("plan", "--dataset", "digits", "--cat", 2, "--total-steps", 10, "--out", path),
            ("export", "run0", "--runs", copy["runs"], "--out", path),
            ("report", "--results", out, "--plot", path),
        ):
            result = run(*args)
            assert result.exit_code == 1 and f"is a {kind}" in result.output, (args, result.output)
            assert "not a regular file" in result.output and "Traceback" not in result.output
            assert tree(out) == before
    assert (out / "fifo.png").is_fifo() and os.readlink(out / "null.png") == os.devnull


# -- Item 10: folder symlinks inside the workspace ---------------------------------------------


def victim_folder(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.mkdir()
    for name in ("config.json", "log.jsonl", "checkpoint.pt", "train.beton", "train.json"):
        (victim / name).write_text("precious")
    return victim


def test_a_symlinked_member_folder_is_refused_before_anything_is_written(copy):
    victim = victim_folder(copy["tmp"])
    before = tree(victim)
    (copy["runs"] / "evil").symlink_to(victim)
    with pytest.raises(TimecatError, match=r"member evil's folder .*evil is a symbolic link .*remove the link"):
        pretrain(PretrainConfig("evil", "fashion-mnist", 0, steps=2, batch_size=64), copy["data"], copy["runs"])
    result = run("pretrain", "--name", "evil", "--dataset", "fashion-mnist", "--seed", 0, "--steps", 2,
                 "--data-root", copy["data"], "--runs", copy["runs"])  # fmt: skip
    assert result.exit_code == 1 and "is a symbolic link" in result.output and "Traceback" not in result.output
    assert tree(victim) == before


def test_a_symlinked_dataset_folder_is_refused_by_prepare(tmp_path):
    victim = victim_folder(tmp_path)
    before = tree(victim)
    data = tmp_path / "data"
    data.mkdir()
    (data / "digits").symlink_to(victim)
    with pytest.raises(TimecatError, match=r"dataset digits's folder .*digits is a symbolic link"):
        prepare(PrepareConfig("digits", data))
    assert tree(victim) == before


def test_symlinked_cache_folders_are_refused_and_a_symlinked_cache_root_is_not(copy):
    victim = victim_folder(copy["tmp"])
    before_victim = tree(victim)
    root = Path(copy["cache"])
    member = root / "digits/train/features/run0"
    shutil.rmtree(member)
    member.symlink_to(victim)
    before = tree(root)
    with pytest.raises(TimecatError, match=r"cache folder of member run0 .*run0 is a symbolic link"):
        extract(ExtractConfig("digits", ("run0",), overwrite=True), copy["data"], copy["runs"], copy["cache"])
    assert tree(root) == before and tree(victim) == before_victim
    member.unlink()
    (root / "digits/test").rename(copy["tmp"] / "split")
    (root / "digits/test").symlink_to(copy["tmp"] / "split")
    before = tree(root)
    with pytest.raises(TimecatError, match=r"the cache folder .*digits/test is a symbolic link"):
        extract(ExtractConfig("digits", ("run1",)), copy["data"], copy["runs"], copy["cache"])
    assert tree(root) == before
    # The cache root itself may be a link: the user chose it.
    (root / "digits/test").unlink()
    (copy["tmp"] / "split").rename(root / "digits/test")
    linked = copy["tmp"] / "linked.zarr"
    linked.symlink_to(root)
    rows = extract(ExtractConfig("digits", ("run1",)), copy["data"], copy["runs"], str(linked))
    assert {r["state"] for r in rows} == {"kept"}
