"""The feature cache against damage, strangers' stores and races (issue 24): each case is refused in one line or mended.

Guards: every read goes through each array's own metadata, never a stale consolidated copy;
arrays whose metadata no resume can mend are refused by reads and verify and rewritten by
--overwrite (and --repair, in the dtype timecat writes); a store that is not a timecat cache is
never written; creating a store races no other extraction; --views is bounded and `cache rm`
drops a member's arrays under its lock; relabelled data and unreadable files get their real cause.
Each case asserts the message a user sees and that nothing already written is lost.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import make_cache, one_error, run, tree

import cache
from pipeline.configs import MAX_VIEWS, ExtractConfig, ProbeConfig
from pipeline.core.errors import TimecatError
from pipeline.data.splits import beton_path
from pipeline.features.extract import extract
from pipeline.probe.bn_linear import HeadRecipe
from pipeline.probe.run import probe


def cli_paths(copy) -> list:
    return ["--data-root", copy["data"], "--runs", copy["runs"], "--cache", copy["cache"]]


# -- 1. a killed extract --overwrite leaves the consolidated metadata stale ----------------------


def test_a_probe_after_a_killed_overwrite_reads_each_arrays_own_metadata(copy):
    # run0 retrained: `extract --overwrite` wrote its train array, then was killed before it
    # marked it complete and rewrote the consolidated metadata (which still says complete, old checkpoint).
    store = cache.open(copy["cache"], mode="a")
    new = {**store.provenance("digits", "train", "run1"), "member": "run0"}
    X = store.features("digits", "train", ["run1"])[0]
    writer = store.create_features("digits", "train", "run0", X.shape[1], new)
    writer.append(X)
    writer.close()  # status stays 'writing'; no consolidate: as after a kill
    before = tree(Path(copy["cache"]))
    with pytest.raises(TimecatError, match=r"member run0 is 'writing', not 'complete', for digits/train.*extract"):
        probe(ProbeConfig("digits", ("run0",)), copy["cache"])
    assert (
        cache.open(copy["cache"]).provenance("digits", "train", "run0")["checkpoint_sha256"] == new["checkpoint_sha256"]
    )
    # Killed after marking it complete: its test split still comes from the old checkpoint.
    store.finish_features("digits", "train", "run0")
    with pytest.raises(TimecatError, match=r"run0's arrays come from different checkpoints.*--overwrite"):
        probe(ProbeConfig("digits", ("run0", "run2")), copy["cache"])
    after = tree(Path(copy["cache"]))
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"digits/train/features/run0/zarr.json"}  # only the status the test set; probes write nothing


# -- 6 and 16. metadata no resume can mend ---------------------------------------------------------


def edit_metadata(store: str, member: str, change) -> None:
    path = Path(store) / f"digits/train/features/{member}/zarr.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def chunk_folder(store: str, member: str) -> None:
    chunk = next(p for p in (Path(store) / f"digits/train/features/{member}/c").rglob("*") if p.is_file())
    chunk.unlink()
    chunk.mkdir()


DAMAGES = {
    "rows": (lambda m: m.update(shape=[1000, m["shape"][1]]), "has 1000 rows, the split has 1347"),
    "width": (lambda m: m.update(shape=[m["shape"][0], 64]), "has 64 features, its model gives 128"),
    "1-D": (
        lambda m: m.update(
            shape=m["shape"][:1],
            chunk_grid={"name": "regular", "configuration": {"chunk_shape": [16384]}},
            dimension_names=["row"],
        ),
        "has shape (1347,), not (rows, features)",
    ),
    "provenance": (lambda m: m["attributes"].update(provenance="text"), "provenance in digits/train is a str"),
    "dtype": (lambda m: m.update(data_type="int8", fill_value=0), "stored as int8, not float32"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_metadata_no_resume_can_mend_is_one_error_line_everywhere(copy, damage):
    change, problem = DAMAGES[damage]
    edit_metadata(copy["cache"], "run1", change)
    before = tree(Path(copy["cache"]))
    paths = ["--cache", copy["cache"], "--runs", copy["runs"], "--results", copy["tmp"]]
    probed = run("probe", "--members", "run1", "--dataset", "digits", *paths)
    one_error(probed, problem, "--repair")
    extracted = run("extract", "--members", "run1", "--dataset", "digits", "--splits", "train", *cli_paths(copy))
    one_error(extracted, problem, "--repair", "--overwrite")
    verified = run("cache", "verify", copy["cache"])
    assert verified.exit_code == 1 and "Traceback" not in verified.output
    assert f"digits/train run1 {'(1347,)' if damage == '1-D' else ''}".strip() in verified.output
    assert problem in next(line for line in verified.output.splitlines() if "digits/train run1" in line)
    listed = run("cache", "ls", copy["cache"])
    assert listed.exit_code == 0 and "digits/train run1" in listed.output
    # Refused before anything was written. (extract's error path rewrites the consolidated copy in the
    # root zarr.json from each array's own metadata, so that copy is not compared.)
    after = tree(Path(copy["cache"]))
    assert {k: v for k, v in after.items() if k != "zarr.json"} == {k: v for k, v in before.items() if k != "zarr.json"}


def test_overwrite_rewrites_any_damaged_array_and_repair_never_keeps_an_edited_dtype(copy):
    original = cache.open(copy["cache"]).features("digits", "train", ["run0", "run1", "run2"])[0]
    edit_metadata(copy["cache"], "run0", DAMAGES["rows"][0])  # used to be 'kept' even with --overwrite
    edit_metadata(copy["cache"], "run1", DAMAGES["width"][0])  # --overwrite failed and left it 'writing'
    chunk_folder(copy["cache"], "run2")  # a traceback in extract
    out = run("extract", "--members", "run2", "--dataset", "digits", "--splits", "train", *cli_paths(copy))
    one_error(out, "a folder stands where a chunk belongs", "--overwrite")
    config = ExtractConfig("digits", ("run0", "run1", "run2"), splits=("train",), overwrite=True)
    summary = extract(config, copy["data"], copy["runs"], copy["cache"])
    assert {r["state"] for r in summary} == {"written"}
    assert all(r["ok"] for r in cache.open(copy["cache"]).verify())
    np.testing.assert_allclose(
        cache.open(copy["cache"]).features("digits", "train", ["run0", "run1", "run2"])[0], original, atol=1e-5
    )
    # Item 6: --repair writes an int8-edited array anew as float32 (its provenance's dtype), never as int8.
    edit_metadata(copy["cache"], "run1", DAMAGES["dtype"][0])
    summary = extract(ExtractConfig("digits", ("run1",), repair=True), copy["data"], copy["runs"], copy["cache"])
    assert {(r["split"], r["state"]) for r in summary} == {("train", "written"), ("test", "kept")}
    store = cache.open(copy["cache"])
    assert store.provenance("digits", "train", "run1")["dtype"] == "float32"
    assert all(r["ok"] for r in store.verify())
    np.testing.assert_allclose(store.features("digits", "train", ["run0", "run1", "run2"])[0], original, atol=1e-5)


# -- 11. a store that is not a timecat cache ------------------------------------------------------------


def test_a_store_that_is_not_a_timecat_cache_is_never_written(copy, tmp_path):
    theirs = zarr.open_group(str(tmp_path / "mydata.zarr"), mode="w")
    theirs.create_array("x", shape=(3,), dtype="int32")[:] = [1, 2, 3]
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("mine")
    for target, held in ((tmp_path / "mydata.zarr", "x"), (folder, "a.txt")):
        before = tree(target)
        paths = ["--data-root", copy["data"], "--runs", copy["runs"], "--cache", target]
        out = run("extract", "--members", "run0", "--dataset", "digits", "--splits", "test", *paths)
        one_error(out, "is not a timecat cache", f"holds {held}", "new or empty --cache")
        assert tree(target) == before and not Path(f"{target}.locks").exists()  # nothing beside it either
    (tmp_path / "empty").mkdir()  # an empty folder or a new path becomes a cache
    for fresh in (tmp_path / "empty", tmp_path / "new.zarr"):
        assert cache.open(str(fresh), mode="a").datasets() == []


# -- 15. concurrent first extractions create the store once ----------------------------------------------


def _open_new_store(args):
    """One of several processes starting at once on a store that does not exist yet."""
    path, barrier, name = args
    barrier.wait()
    store = cache.open(path, mode="a")
    store.write_labels("toy", "train", np.arange(8) % 2, "fp", ["a", "b"])
    return name


def test_concurrent_first_extractions_into_a_new_cache_never_race(tmp_path):
    # Without the store lock, 4 processes failed with ContainsGroupError in about half the trials.
    context = multiprocessing.get_context("fork")
    with context.Manager() as manager, context.Pool(4) as pool:
        for trial in range(6):
            path, barrier = str(tmp_path / f"{trial}.zarr"), manager.Barrier(4)
            assert sorted(pool.map(_open_new_store, [(path, barrier, f"m{i}") for i in range(4)])) == [
                "m0",
                "m1",
                "m2",
                "m3",
            ]
            assert cache.open(path).splits("toy") == ["train"]


# -- 14. --views is bounded; `cache rm` drops members' arrays under their lock ---------------------------


def test_views_are_bounded_and_cache_rm_drops_a_members_arrays_under_its_lock(tmp_path):
    assert HeadRecipe().epochs == MAX_VIEWS  # the bound's reason: bn-linear reads view e mod K at epoch e
    with pytest.raises(TimecatError, match=rf"views must be 0 to {MAX_VIEWS}, not 10000.*never be read"):
        ExtractConfig("digits", ("run0",), views=10000)
    one_error(run("extract", "--members", "run0", "--dataset", "digits", "--views", 10000), "views must be 0")
    path = tmp_path / "c.zarr"
    make_cache(path)
    store = cache.open(str(path), mode="a")
    for view in range(3):  # what a killed `--views K` leaves: empty 'writing' arrays
        store.create_features("toy", "train", "a", 6, {"dataset_fingerprint": "fp0"}, view=view)
    assert sum(not r["ok"] for r in store.verify()) == 3
    kept = {k: v for k, v in tree(path).items() if "/b" in k or "labels" in k}
    with store.lock("toy", "train", "a"):  # a live extract of member a
        one_error(run("cache", "rm", path, "--dataset", "toy", "--members", "a", "--views"), "being written")
    assert sum(not r["ok"] for r in store.verify()) == 3  # nothing removed
    out = run("cache", "rm", path, "--dataset", "toy", "--members", "a", "--views")
    assert out.exit_code == 0 and out.output.count("removed") == 3, out.output
    rows = cache.open(str(path)).verify()
    assert [r["member"] for r in rows] == ["a", "b"] and all(r["ok"] for r in rows)
    one_error(run("cache", "rm", path, "--dataset", "toy", "--members", "a", "--views"), "has no augmented views")
    one_error(run("cache", "rm", path, "--dataset", "toy", "--members", "c"), "has no arrays", "'a', 'b'")
    # A member folder that is a link: removing through it would delete what it points at.
    victim = tmp_path / "victim"
    features_a = path / cache.layout.features_path("toy", "train", "a", None)
    shutil.move(features_a, victim)
    features_a.symlink_to(victim)
    victim_files = tree(victim)
    one_error(run("cache", "rm", path, "--dataset", "toy", "--members", "a"), "symbolic link", "never through")
    assert tree(victim) == victim_files
    features_a.unlink()
    shutil.move(victim, features_a)
    assert run("cache", "rm", path, "--dataset", "toy", "--members", "a").exit_code == 0
    assert cache.open(str(path)).members("toy", "train") == ["b"]
    assert {k: v for k, v in tree(path).items() if k in kept} == kept  # member b and the labels untouched


# -- 18. messages that named the wrong cause ----------------------------------------------------------


def test_relabelled_data_is_named_as_such_not_as_another_dataset(tmp_path):
    path = tmp_path / "c.zarr"
    _, labels = make_cache(path)
    before = tree(path)
    store = cache.open(str(path), mode="a")
    with pytest.raises(cache.CacheError, match=r"other labels .*same fingerprint fp0.*without `timecat prepare`") as e:
        store.write_labels("toy", "train", labels[::-1], "fp0", [f"c{i}" for i in range(5)])
    assert "different dataset" not in str(e.value)
    assert tree(path) == before


def _deny(monkeypatch, needle: str) -> None:
    """Reads of store keys holding ``needle`` fail as for another user's files (root reads through chmod)."""
    store_get = zarr.storage.LocalStore.get

    async def get(self, key, *args, **kwargs):
        if needle in key:
            raise PermissionError(13, "Permission denied", str(Path(self.root) / key))
        return await store_get(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", get)


def test_files_this_user_may_not_read_are_named_not_called_damaged(copy, monkeypatch):
    before = tree(Path(copy["cache"]))
    _deny(monkeypatch, "train/features/run1/c/")
    with pytest.raises(TimecatError, match=r"run1/c/0/0 is not readable by this user.*ask its owner") as e:
        probe(ProbeConfig("digits", ("run1",)), copy["cache"])
    assert "--repair" not in str(e.value) and "delete" not in str(e.value)
    rows = {(r["split"], r["member"]): r for r in cache.open(copy["cache"]).verify()}
    assert "not readable by this user" in rows[("train", "run1")]["problems"][0]
    assert rows[("train", "run2")]["ok"]
    with pytest.raises(cache.CacheError, match="not readable by this user"):
        extract(ExtractConfig("digits", ("run1",), repair=True), copy["data"], copy["runs"], copy["cache"])
    monkeypatch.undo()
    _deny(monkeypatch, "digits/train/features/run1/zarr.json")  # the array's own metadata
    key = ("digits", "train", "run1")
    with pytest.raises(TimecatError, match=r"run1/zarr.json is not readable by this user") as e:
        probe(ProbeConfig("digits", ("run1",)), copy["cache"])
    assert "--overwrite" not in str(e.value) and "delete" not in str(e.value)
    (row,) = [r for r in cache.open(copy["cache"]).verify() if (r["dataset"], r["split"], r["member"]) == key]
    assert "not readable by this user" in row["problems"][0] and "delete" not in row["problems"][0]
    monkeypatch.undo()
    import ffcv.reader

    beton = beton_path(copy["data"], "digits", "test")

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(ffcv.reader, "Reader", denied)
    with pytest.raises(TimecatError, match=rf"{beton} is not readable by this user.*owner") as e:
        extract(ExtractConfig("digits", ("run0",), splits=("test",)), copy["data"], copy["runs"], copy["cache"])
    assert "delete" not in str(e.value) and "damaged" not in str(e.value)
    assert tree(Path(copy["cache"])) == before


def test_every_splits_refusal_comes_before_any_split_is_written(copy):
    """run0's test array is from another checkpoint and its train array is gone: extract used to write train
    (hours at ImageNet scale) and only then refuse test."""
    shutil.copy(Path(copy["runs"]) / "run1/checkpoint.pt", Path(copy["runs"]) / "run0/checkpoint.pt")
    removed = run("cache", "rm", copy["cache"], "--dataset", "digits", "--members", "run0", "--splits", "train")
    assert removed.exit_code == 0, removed.output
    before = {k: v for k, v in tree(Path(copy["cache"])).items() if k != "zarr.json"}  # the consolidated copy
    paths = ["--data-root", copy["data"], "--runs", copy["runs"], "--cache", copy["cache"]]
    one_error(run("extract", "--members", "run0", "--dataset", "digits", *paths), "digits/test", "--overwrite")
    assert {k: v for k, v in tree(Path(copy["cache"])).items() if k != "zarr.json"} == before
    assert "run0" not in cache.open(copy["cache"]).members("digits", "train")
