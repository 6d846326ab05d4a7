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

import numpy as np
import pytest
import torch
from conftest import run, tree

from pipeline.configs import ExtractConfig, PrepareConfig, PretrainConfig
from pipeline.core import files
from pipeline.core.errors import TimecatError
from pipeline.data.prepare import prepare
from pipeline.features.extract import extract
from pipeline.members import checkpoints
from pipeline.train.pretrain import pretrain

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
    from pipeline.report import tables
    from pipeline.train import plan

    def no_work(*args, **kwargs):
        raise AssertionError("the destination must be refused before the work")

    monkeypatch.setattr(plan, "make_plan", no_work)
    monkeypatch.setattr(checkpoints, "load_member", no_work)
    monkeypatch.setattr(tables, "load", no_work)  # the report's first work: reading the records
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
    # The plots a report draws beside catn.png, and the JSON beside each, are checked as well.
    for sibling in ("id_vs_ood.png", "shots.json"):
        os.mkfifo(out / sibling)
        result = run("report", "--results", out)
        assert result.exit_code == 1 and f"{sibling} is a FIFO" in result.output, result.output
        (out / sibling).unlink()


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
    with pytest.raises(
        TimecatError, match=r"dataset digits's folder .*digits is a symbolic link.*--train PATH --test PATH"
    ):
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


# -- Item 8: export keeps a foreign checkpoint's head ------------------------------------------


@pytest.fixture(scope="module")
def resnet50_state():
    """A random torchvision ResNet-50's state dict, with its (1000, 2048) fc."""
    from torchvision.models import resnet50

    torch.manual_seed(0)
    return resnet50(weights=None).state_dict()


def test_export_keeps_a_foreign_head_or_says_it_exports_the_backbone_only(resnet50_state, tmp_path):
    from torchvision.models import resnet50

    torch.save({"model_params": {f"module.{k}": v for k, v in resnet50_state.items()}}, tmp_path / "paper.pt")
    result = run("export", tmp_path / "paper.pt", "--out", tmp_path / "paper.pth")
    assert result.exit_code == 0 and "num_classes=1000" in result.output and "head, kept" in result.output
    exported = torch.load(tmp_path / "paper.pth", weights_only=True)
    assert torch.equal(exported["fc.weight"], resnet50_state["fc.weight"]) and exported["fc.weight"].shape == (
        1000,
        2048,
    )
    assert exported._metadata["timecat"]["head"] == "original" and exported._metadata["timecat"]["num_classes"] == 1000
    resnet50(weights=None).load_state_dict(exported, strict=True)
    # Without an fc: the backbone only, said so in the output and the file.
    torch.save({k: v for k, v in resnet50_state.items() if not k.startswith("fc.")}, tmp_path / "bare.pt")
    result = run("export", tmp_path / "bare.pt", "--out", tmp_path / "bare.pth")
    assert result.exit_code == 0 and "backbone only" in result.output and "num_classes" not in result.output
    exported = torch.load(tmp_path / "bare.pth", weights_only=True)
    assert not any(k.startswith("fc.") for k in exported) and exported._metadata["timecat"]["head"] == "none"
    # A self-supervised file's projection MLP as fc: not a head to keep; the backbone exports as before.
    mlp = {"fc.0.weight": torch.zeros(8, 2048), "fc.0.bias": torch.zeros(8), "fc.2.weight": torch.zeros(4, 8)}
    backbone = {k: v for k, v in resnet50_state.items() if not k.startswith("fc.")}
    torch.save({**backbone, **mlp}, tmp_path / "ssl.pt")
    result = run("export", tmp_path / "ssl.pt", "--out", tmp_path / "ssl.pth")
    assert result.exit_code == 0 and "backbone only" in result.output, result.output
    assert torch.load(tmp_path / "ssl.pth", weights_only=True)._metadata["timecat"]["head"] == "none"


# -- Item 17: damaged and foreign checkpoints, named before any allocation ---------------------


def damage(runs: Path, change) -> dict:
    """Rewrite run0's checkpoint with ``change(payload)`` applied; return the original payload."""
    path = runs / "run0/checkpoint.pt"
    payload = torch.load(path, weights_only=True)
    changed = {**payload, "member": dict(payload["member"]), "preprocess": dict(payload["preprocess"])}
    change(changed)
    torch.save(changed, path)
    return payload


BAD_FIELDS = {
    "num_classes 0": (lambda p: p.update(num_classes=0), r"num_classes 0 \(allowed: an integer from 1 to 100,000\)"),
    "num_classes text": (lambda p: p.update(num_classes="10"), r"num_classes '10' \(allowed: an integer"),
    "width": (lambda p: p["member"].update(width=99), r"member.width: .*width 99; allowed: \[1\]"),
    "resolution": (
        lambda p: p["preprocess"].update(resolution=100_000),
        r"preprocess.resolution 100000 \(allowed: an integer from 8 to 1024 px\)",
    ),
    "std": (lambda p: p["preprocess"].update(std=[0, 0, 0]), r"preprocess.std \[0, 0, 0\] \(allowed: 3 numbers"),
    "preprocess": (lambda p: p.update(preprocess="abc"), r"preprocess is a str, not a dict"),
}


@pytest.mark.parametrize("case", sorted(BAD_FIELDS))
def test_a_checkpoint_field_out_of_range_is_named_before_any_allocation(copy, monkeypatch, case):
    change, message = BAD_FIELDS[case]
    damage(copy["runs"], change)
    monkeypatch.setattr(checkpoints, "build", lambda *a, **k: pytest.fail("the model was built"))
    store = copy["tmp"] / "new.zarr"
    with pytest.raises(TimecatError, match=rf"run0/checkpoint.pt: a damaged timecat checkpoint: {message}"):
        extract(ExtractConfig("digits", ("run0",)), copy["data"], copy["runs"], str(store))
    result = run("export", "run0", "--runs", copy["runs"], "--out", copy["tmp"] / "x.pth")
    assert result.exit_code == 1 and "a damaged timecat checkpoint" in result.output
    assert not store.exists() and not (copy["tmp"] / "x.pth").exists()


def test_tensors_of_the_wrong_shape_are_named(copy):
    damage(copy["runs"], lambda p: p.update(model={**p["model"], "head.weight": torch.zeros(5, 128)}))
    with pytest.raises(TimecatError, match=r"checkpoint.pt: .*head.weight \(5, 128\), not \(10, 128\).*damaged"):
        extract(ExtractConfig("digits", ("run0",)), copy["data"], copy["runs"], str(copy["tmp"] / "new.zarr"))


def test_a_foreign_architecture_is_named_with_what_timecat_accepts(resnet50_state, copy):
    from torchvision.models import wide_resnet50_2

    wide = copy["tmp"] / "wide.pt"
    torch.save(wide_resnet50_2(weights=None).state_dict(), wide)
    gray = copy["tmp"] / "gray.pt"
    torch.save({**resnet50_state, "conv1.weight": resnet50_state["conv1.weight"][:, :1]}, gray)
    store = copy["tmp"] / "new.zarr"
    for path, looks in ((wide, "wide_resnet50_2"), (gray, "resnet50, with 1 input channel")):
        for args in (
            ("extract", "--members", f"m={path}", "--dataset", "digits", "--data-root", copy["data"], "--cache", store),
            ("export", path, "--out", copy["tmp"] / "x.pth"),
        ):
            result = run(*args)
            assert result.exit_code == 1 and f"it looks like {looks}" in result.output, result.output
            assert "takes foreign checkpoints of torchvision's resnet50 only" in result.output
            assert "size mismatch" not in result.output and "Traceback" not in result.output
    assert not store.exists() and not (copy["tmp"] / "x.pth").exists()


# -- Item 18: status of a damaged member; a timecat checkpoint given as a file ------------------


def test_status_shows_a_damaged_member_beside_the_others(copy):
    from pipeline.train import plan

    config = torch.load(copy["runs"] / "run0/checkpoint.pt", weights_only=True)["member"]
    members = tuple(plan.PlannedMember(f"run{i}", "Cat3", i, config["steps"], config["arch"]) for i in range(3))
    path = plan.save(plan.Plan(config["dataset"], members, config["batch_size"]), copy["tmp"] / "plan.json")
    (copy["runs"] / "run1/checkpoint.pt").write_bytes(b"garbage, not a pickle")
    damage(copy["runs"], lambda p: p.update(num_classes=-1))
    result = run("status", path, "--runs", copy["runs"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert "damaged" in lines["run0"] and "num_classes -1" in lines["run0"]
    assert "damaged" in lines["run1"] and "not a loadable checkpoint" in lines["run1"]
    assert "--member run1" in lines["run1"] and " done " in lines["run2"]


def test_a_timecat_checkpoint_given_as_a_file_is_taken_as_it_is(copy):
    import cache

    ckpt = copy["runs"] / "run1/checkpoint.pt"
    store = str(copy["tmp"] / "new.zarr")
    extract(ExtractConfig("digits", (f"other={ckpt}",), splits=("test",)), copy["data"], copy["runs"], store)
    mine, _ = cache.open(store).features("digits", "test", ["other"])
    cached, _ = cache.open(copy["cache"]).features("digits", "test", ["run1"])
    np.testing.assert_allclose(mine, cached, rtol=1e-4, atol=1e-5)  # the same weights and preprocessing
    loaded = checkpoints.load_member(copy["runs"], f"other={ckpt.parent}")  # its run folder stands for it
    assert loaded.path == ckpt and not loaded.foreign
    result = run("export", ckpt, "--out", copy["tmp"] / "x.pth")
    assert result.exit_code == 1 and "only resnet50-family members export" in result.output  # a small-resnet
