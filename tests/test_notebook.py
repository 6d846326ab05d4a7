"""The cache and the results in a notebook: row subsets, the column map, xarray, pandas, the README walk-through."""

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import make_cache

import cache
from pipeline.configs import ProbeConfig
from pipeline.probe import results
from pipeline.probe.run import probe

README = Path(__file__).resolve().parents[1] / "README.md"
xarray = pytest.importorskip("xarray", reason="the notebook extra (make setup installs it)")


def test_a_row_subset_reads_the_same_rows_in_the_order_asked(tmp_path):
    arrays, labels = make_cache(tmp_path / "c.zarr")
    c = cache.open(str(tmp_path / "c.zarr"))
    whole = np.hstack([arrays["b"], arrays["a"]])
    for rows in ([5, 1, 1, 49, -1], slice(3, 20), slice(0, 50, 7), np.arange(50) % 3 == 0, np.array([], dtype=int)):
        X, y = c.features("toy", "train", ["b", "a"], rows=rows)
        np.testing.assert_array_equal(X, whole[rows])
        np.testing.assert_array_equal(y, labels[rows])
    for bad, message in (([50], "rows out of range"), ([0.5], "rows must be a slice"), (np.ones(3, bool), "mask")):
        with pytest.raises(cache.CacheError, match=message):
            c.features("toy", "train", ["a"], rows=bad)


def test_a_row_subset_decodes_only_the_chunks_that_hold_it(tmp_path):
    store = cache.open(str(tmp_path / "c.zarr"), mode="a")
    store.write_labels("toy", "train", np.arange(40) % 2, "fp", ["x", "y"])
    writer = store.create_features("toy", "train", "m", 3, {"dataset_fingerprint": "fp"}, chunk_rows=10)
    writer.append(np.arange(120, dtype=np.float32).reshape(40, 3))
    writer.close()
    store.finish_features("toy", "train", "m")
    (chunk,) = [
        p
        for p in (tmp_path / "c.zarr/toy/train/features/m").rglob("*")
        if p.is_file() and p.name == "0" and p.parent.name == "0"
    ]  # rows 0-9
    chunk.write_bytes(b"garbage")
    c = cache.open(str(tmp_path / "c.zarr"))
    X, _ = c.features("toy", "train", ["m"], rows=[15, 39, 12])  # chunks 1 and 3 only: the garbled one is not read
    np.testing.assert_array_equal(X[:, 0], [45, 117, 36])
    X, _ = c.features("toy", "train", ["m"], rows=slice(10, 40))
    assert X.shape == (30, 3)
    with pytest.raises(cache.CacheError, match="unreadable chunk"):
        c.features("toy", "train", ["m"], rows=[3])


def test_the_column_map_and_names_given_as_one_string(tmp_path):
    arrays, _ = make_cache(tmp_path / "c.zarr")  # a: 6 columns, b: 4
    c = cache.open(str(tmp_path / "c.zarr"))
    f = c.features("toy", "train", ["b", "a"])
    assert f.columns == {"b": slice(0, 4), "a": slice(4, 10)} == c.columns("toy", "train", ["b", "a"])
    np.testing.assert_array_equal(f.X[:, f.columns["a"]], arrays["a"])
    X, _ = c.features("toy", "train", "a")  # one string is one member, never its letters
    np.testing.assert_array_equal(X, arrays["a"])
    with pytest.raises(cache.CacheError, match=r"unknown member\(s\) \['ab'\]"):
        c.features("toy", "train", "ab")
    with pytest.raises(cache.CacheError, match="dataset 'nope' is not in the cache; cached: \\['toy'\\]"):
        c.members("nope", "train")
    with pytest.raises(cache.CacheError, match="split 'test' of toy is not cached; cached: \\['train'\\]"):
        c.members("toy", "test")


def test_to_xarray_and_xarray_open_zarr(tmp_path):
    arrays, labels = make_cache(tmp_path / "c.zarr")
    c = cache.open(str(tmp_path / "c.zarr"))
    da = c.to_xarray("toy", "train", ["a", "b"], rows=slice(10, 20))
    assert da.dims == ("row", "feature") and da.shape == (10, 10)
    assert list(da["row"].values) == list(range(10, 20)) and list(da["label"].values) == list(labels[10:20])
    assert list(da["member"].values) == ["a"] * 6 + ["b"] * 4
    assert list(da["class_name"].values[:2]) == ["c0", "c1"]
    np.testing.assert_array_equal(da.sel(feature=da["member"] == "b").values, arrays["b"][10:20])
    means = da.groupby("class_name").mean("row")
    assert means.shape == (5, 10)
    ds = xarray.open_zarr(str(tmp_path / "c.zarr"), group="toy/train/features", consolidated=False)
    assert ds["a"].dims == ("row", "feature_a") and ds["b"].shape == (50, 4)
    np.testing.assert_array_equal(ds["a"].values, arrays["a"])


def test_results_to_dataframe_flattens_records(tmp_path, digits_workspace):
    records = results.load(digits_workspace / "results")
    df = results.to_dataframe(records)
    assert len(df) == len(records) and {"top1", "chosen.C", "holdout.held_out_rows", "members"} <= set(df.columns)
    assert set(df["members"]) == {"run0", "run0,run1,run2"}
    assert df["top1"].tolist() == [r["top1"] for r in records]


@pytest.fixture()
def digits_workspace(pipeline_run, tmp_path):
    """The demo's layout over the shared run: demo/features.zarr linked in, demo/results from four probes."""
    work = tmp_path / "demo"
    work.mkdir()
    (work / "features.zarr").symlink_to(pipeline_run["cache"])
    for dataset in ("fashion-mnist", "digits"):
        for members in (("run0",), ("run0", "run1", "run2")):
            probe(ProbeConfig(dataset, members), pipeline_run["cache"], work / "results")
    return work


def test_the_readmes_notebook_walk_through_runs_as_written(digits_workspace, monkeypatch):
    text = README.read_text()
    marker = "<!-- notebook walk-through: executed by tests/test_notebook.py -->"
    assert marker in text
    code = re.search(r"```python\n(.*?)```", text[text.index(marker) :], re.S).group(1)
    monkeypatch.chdir(digits_workspace.parent)
    namespace = {}
    exec(compile(code, "README.md (notebook walk-through)", "exec"), namespace)
    cat4, f = namespace["cat4"], namespace["f"]
    assert cat4 == ["run0", "run1", "run2"] and list(f.columns) == cat4
    assert namespace["X"].shape[0] == namespace["y"].shape[0] == min(2000, len(namespace["y"]))
    assert namespace["per_member"].dims == ("class_name", "member") and namespace["per_member"].shape == (10, 3)
    assert set(namespace["ds"].data_vars) == {"run0", "run1", "run2"} and list(namespace["ds_cat4"].data_vars) == cat4
    table = namespace["table"]
    assert list(table.columns) == ["digits", "fashion-mnist"] and list(table.index) == ["run0", "run0,run1,run2"]
    head, top5 = namespace["head"], namespace["top5"]
    assert list(head.members) == cat4 and list(namespace["shares"]) == cat4 and top5.shape == (len(namespace["X"]), 5)
