"""Extraction: every member's features of every image, in order, with provenance; kept, resumed or refused by name."""

import numpy as np
import pytest
import torch

import cache
from pipeline.configs import ExtractConfig
from pipeline.core.errors import TimecatError
from pipeline.data.datasets import read_idx
from pipeline.data.splits import read_manifest
from pipeline.features.extract import extract
from pipeline.members import checkpoints
from pipeline.members.checkpoints import checkpoint_path


def test_features_have_the_right_shapes_and_one_row_order(pipeline_run):
    store = cache.open(pipeline_run["cache"])
    assert store.datasets() == ["digits", "fashion-mnist"]
    for dataset, rows in (("fashion-mnist", {"train": 640, "test": 160}), ("digits", {"train": 1347, "test": 450})):
        for split, n in rows.items():
            assert store.members(dataset, split) == list(pipeline_run["members"])
            X, y = store.features(dataset, split, pipeline_run["members"])
            assert X.shape == (n, 3 * 128) and y.shape == (n,)
            assert np.isfinite(X).all()
    # Labels are stored once, in dataset order: they are the IDX file's labels.
    idx = read_idx(pipeline_run["data"] / "fashion-mnist/t10k-labels-idx1-ubyte.gz")
    np.testing.assert_array_equal(store.labels("fashion-mnist", "test"), idx)


def test_cached_rows_are_the_members_features_of_each_image_in_order(pipeline_run):
    """Recompute features straight from the IDX pixels with torch, no FFCV, and compare row by row."""
    path = checkpoint_path(pipeline_run["runs"], "run1")
    payload = checkpoints.load(path)
    model = checkpoints.load_model(payload, str(path)).eval()
    pre = payload["preprocess"]
    pixels = read_idx(pipeline_run["data"] / "fashion-mnist/t10k-images-idx3-ubyte.gz")[:64].astype(np.float32)
    x = np.repeat(pixels[:, None], 3, axis=1)  # (64, 3, 28, 28): grey repeated as RGB
    x = (x - np.array(pre["mean"])[None, :, None, None]) / np.array(pre["std"])[None, :, None, None]
    with torch.no_grad():
        expected = model.backbone(torch.from_numpy(x.astype(np.float32))).numpy()
    X, _ = cache.open(pipeline_run["cache"]).features("fashion-mnist", "test", ["run1"])
    np.testing.assert_allclose(X[:64], expected, rtol=1e-4, atol=1e-4)


def test_provenance_names_checkpoint_arch_layer_preprocessing_and_data(pipeline_run):
    store = cache.open(pipeline_run["cache"])
    manifest = read_manifest(pipeline_run["data"], "digits", "test")
    prov = store.provenance("digits", "test", "run2")
    assert prov["checkpoint_sha256"] == checkpoints.sha256(checkpoint_path(pipeline_run["runs"], "run2"))
    assert prov["arch"] == "small-resnet" and prov["feature_dim"] == 128 and prov["seed"] == 2
    assert prov["feature_layer"].startswith("global average pool")
    assert prov["preprocessing"]["resolution"] == 28  # digits resized to the member's input size
    assert prov["dataset_fingerprint"] == manifest["fingerprint"] == store.split_attrs("digits", "test")["fingerprint"]
    assert prov["timecat_version"] == "0.1.0" and prov["pretrain_dataset"] == "fashion-mnist"
    assert store.status("digits", "test", "run2") == "complete"


def test_extract_keeps_cached_members_and_refuses_unknown_ones(pipeline_run):
    config = ExtractConfig("digits", ("run0",))
    summary = extract(config, pipeline_run["data"], pipeline_run["runs"], pipeline_run["cache"])
    assert {row["state"] for row in summary} == {"kept"}
    with pytest.raises(TimecatError, match=r"unknown member 'run7'.*trained members: \['run0', 'run1', 'run2'\]"):
        extract(ExtractConfig("digits", ("run7",)), pipeline_run["data"], pipeline_run["runs"], pipeline_run["cache"])


def test_extract_of_an_unprepared_dataset_says_how_to_prepare(pipeline_run, tmp_path):
    with pytest.raises(TimecatError, match=r"'cifar10' split 'train' is not prepared.*timecat prepare cifar10"):
        extract(ExtractConfig("cifar10", ("run0",)), pipeline_run["data"], pipeline_run["runs"], str(tmp_path / "c"))


def test_a_member_cached_from_another_checkpoint_is_refused_or_overwritten(pipeline_run, tmp_path):
    import shutil

    runs, store_path = tmp_path / "runs", str(tmp_path / "features.zarr")
    shutil.copytree(pipeline_run["runs"], runs)
    shutil.copytree(pipeline_run["cache"], store_path)
    # run0 is retrained elsewhere: same name, different weights, so a different sha256.
    shutil.copy(runs / "run1/checkpoint.pt", runs / "run0/checkpoint.pt")
    config = ExtractConfig("digits", ("run0",))
    with pytest.raises(cache.CacheError, match="member run0 is cached for digits/train from another checkpoint"):
        extract(config, pipeline_run["data"], runs, store_path)
    extract(ExtractConfig("digits", ("run0",), overwrite=True), pipeline_run["data"], runs, store_path)
    store = cache.open(store_path)
    assert store.provenance("digits", "test", "run0")["checkpoint_sha256"] == checkpoints.sha256(
        runs / "run0/checkpoint.pt"
    )
    np.testing.assert_array_equal(
        store.features("digits", "test", ["run0"])[0], store.features("digits", "test", ["run1"])[0]
    )


def test_a_second_extraction_of_a_member_being_written_is_refused(pipeline_run, tmp_path):
    import shutil

    store_path = str(tmp_path / "features.zarr")
    shutil.copytree(pipeline_run["cache"], store_path)
    before = cache.open(store_path).verify()
    holder = cache.open(store_path, mode="a")
    with holder.lock("digits", "test", "run1"):  # as another `timecat extract` would hold it
        config = ExtractConfig("digits", ("run0", "run1"), overwrite=True)
        with pytest.raises(cache.CacheError, match="member run1 of digits/test is being written by another process"):
            extract(config, pipeline_run["data"], pipeline_run["runs"], store_path)
    assert cache.open(store_path).verify() == before
