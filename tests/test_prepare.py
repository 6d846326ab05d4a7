"""prepare: .beton files with manifests, written atomically, never rewritten when complete."""

import json

import numpy as np
import pytest
from conftest import make_cifar10, make_imagefolder

from pipeline.configs import PrepareConfig
from pipeline.core.errors import TimecatError
from pipeline.data.prepare import prepare
from pipeline.data.splits import beton_path, is_complete, manifest_path, read_manifest


def test_digits_beton_and_manifest(tmp_path):
    manifests = prepare(PrepareConfig("digits", tmp_path))
    assert [m["split"] for m in manifests] == ["train", "test"]
    train = read_manifest(tmp_path, "digits", "train")
    assert train["rows"] == 1347 and train["kind"] == "digits" and len(train["classes"]) == 10
    assert sum(train["class_counts"]) == 1347
    assert 0 < train["mean"][0] < 255 and train["std"][0] > 1
    assert beton_path(tmp_path, "digits", "train").stat().st_size == train["bytes"]


def test_a_complete_dataset_is_not_rewritten(tmp_path):
    prepare(PrepareConfig("digits", tmp_path))
    before = beton_path(tmp_path, "digits", "train").stat().st_mtime_ns
    prepare(PrepareConfig("digits", tmp_path))
    assert beton_path(tmp_path, "digits", "train").stat().st_mtime_ns == before


def test_a_beton_without_manifest_counts_as_unfinished(tmp_path):
    prepare(PrepareConfig("digits", tmp_path))
    # As if prepare had been killed after renaming the .beton but before its manifest.
    manifest_path(tmp_path, "digits", "test").unlink()
    assert not is_complete(tmp_path, "digits", "test")
    with pytest.raises(TimecatError, match="run `timecat prepare digits`"):
        read_manifest(tmp_path, "digits", "test")
    train_before = beton_path(tmp_path, "digits", "train").stat().st_mtime_ns
    prepare(PrepareConfig("digits", tmp_path))
    assert is_complete(tmp_path, "digits", "test")
    assert beton_path(tmp_path, "digits", "train").stat().st_mtime_ns == train_before
    assert not list((tmp_path / "digits").glob(".*tmp*"))


def test_a_changed_beton_is_detected(tmp_path):
    prepare(PrepareConfig("digits", tmp_path))
    with open(beton_path(tmp_path, "digits", "test"), "ab") as f:
        f.write(b"junk")
    with pytest.raises(TimecatError, match="does not match its manifest"):
        read_manifest(tmp_path, "digits", "test")


def test_cifar_and_imagefolder(tmp_path):
    make_cifar10(tmp_path / "data")
    (m_train, m_test) = prepare(PrepareConfig("cifar10", tmp_path / "data"))
    assert (m_train["rows"], m_test["rows"]) == (60, 20)
    make_imagefolder(tmp_path / "pets" / "train")
    make_imagefolder(tmp_path / "pets" / "val", per_class=2)
    config = PrepareConfig(
        "imagefolder", tmp_path / "data", name="pets", train_dir=tmp_path / "pets/train", test_dir=tmp_path / "pets/val"
    )
    (m_train, m_test) = prepare(config)
    assert m_train["name"] == "pets" and m_train["classes"] == ["cat", "dog", "fox"] and m_test["rows"] == 6
    assert json.loads(manifest_path(tmp_path / "data", "pets", "train").read_text())["format"]["write_mode"] == "smart"


def test_corrupt_image_is_reported_by_path_and_nothing_is_written(tmp_path):
    make_imagefolder(tmp_path / "train")
    make_imagefolder(tmp_path / "val")
    (tmp_path / "train/dog/2.jpg").write_bytes(b"\xff\xd8 truncated")
    config = PrepareConfig("imagefolder", tmp_path / "data", "pets", tmp_path / "train", tmp_path / "val")
    with pytest.raises(TimecatError, match=r"unreadable image.*train/dog/2.jpg.*--on-corrupt skip"):
        prepare(config)
    assert not beton_path(tmp_path / "data", "pets", "train").exists()


def test_skipped_corrupt_images_are_listed_in_the_manifest(tmp_path):
    make_imagefolder(tmp_path / "train")
    make_imagefolder(tmp_path / "val")
    (tmp_path / "train/dog/2.jpg").write_bytes(b"\xff\xd8 truncated")
    (tmp_path / "val/cat/0.jpg").write_bytes(b"not an image at all")
    config = PrepareConfig(
        "imagefolder", tmp_path / "data", "pets", tmp_path / "train", tmp_path / "val", on_corrupt="skip"
    )
    train, val = prepare(config)
    assert [s["path"] for s in train["skipped"]] == [str(tmp_path / "train/dog/2.jpg")]
    assert [s["path"] for s in val["skipped"]] == [str(tmp_path / "val/cat/0.jpg")]
    assert all(s["error"] for s in train["skipped"] + val["skipped"])
    per_class = 4  # make_imagefolder's default
    assert train["rows"] == 3 * per_class - 1 and train["class_counts"] == [per_class, per_class - 1, per_class]
    assert val["rows"] == 3 * per_class - 1 and val["class_counts"][0] == per_class - 1


def test_unknown_on_corrupt_names_the_choices(tmp_path):
    with pytest.raises(TimecatError, match=r"\['fail', 'skip'\]"):
        PrepareConfig("imagefolder", tmp_path, on_corrupt="ignore")


def test_missing_source_names_the_path(tmp_path):
    with pytest.raises(TimecatError, match="cifar-100-python"):
        prepare(PrepareConfig("cifar100", tmp_path))
    assert not (tmp_path / "cifar100").exists() or not any((tmp_path / "cifar100").iterdir())


def test_fingerprint_changes_with_the_data(tmp_path):
    make_cifar10(tmp_path / "a")
    make_cifar10(tmp_path / "b")
    import pickle

    path = tmp_path / "b/cifar10/cifar-10-batches-py/test_batch"
    batch = pickle.loads(path.read_bytes())
    batch[b"data"] = np.zeros_like(batch[b"data"])
    path.write_bytes(pickle.dumps(batch))
    fa = [m["fingerprint"] for m in prepare(PrepareConfig("cifar10", tmp_path / "a"))]
    fb = [m["fingerprint"] for m in prepare(PrepareConfig("cifar10", tmp_path / "b"))]
    assert fa[0] == fb[0] and fa[1] != fb[1]


def test_imagenet_and_inat_prepare_with_the_large_image_preset(tmp_path):
    from test_datasets import make_imagenet, make_inat

    make_imagenet(tmp_path, "csv")
    make_inat(tmp_path)
    (m_train, m_test) = prepare(PrepareConfig("imagenet", tmp_path))
    assert (m_train["rows"], m_test["rows"]) == (9, 4)
    assert m_train["format"] == {
        "write_mode": "jpg",
        "max_resolution": 500,
        "jpeg_quality": 90,
        "compress_probability": 0.5,  # used by --storage mixed only
    }
    (m_train, m_test) = prepare(PrepareConfig("inat2018", tmp_path))
    assert m_train["classes"] == ["species5", "species7", "species9"] and m_test["rows"] == 2


def test_storage_is_chosen_recorded_and_a_different_one_is_refused(tmp_path):
    from pipeline.data.loaders import eval_loader
    from pipeline.data.splits import Preprocess

    make_imagefolder(tmp_path / "pets" / "train")
    make_imagefolder(tmp_path / "pets" / "val", per_class=2)
    folders = {"name": "pets", "train_dir": tmp_path / "pets/train", "test_dir": tmp_path / "pets/val"}
    (m_train, _) = prepare(PrepareConfig("imagefolder", tmp_path / "data", storage="mixed", **folders))
    assert m_train["format"]["write_mode"] == "proportion" and m_train["format"]["compress_probability"] == 0.5
    pre = Preprocess(32, tuple(m_train["mean"]), tuple(m_train["std"]))
    images, labels = next(iter(eval_loader(beton_path(tmp_path / "data", "pets", "train"), pre, 12, 1)))
    assert images.shape == (12, 3, 32, 32) and labels.view(-1).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    with pytest.raises(TimecatError, match="pets/train is already prepared as proportion, not --storage raw"):
        prepare(PrepareConfig("imagefolder", tmp_path / "data", storage="raw", **folders))
    with pytest.raises(TimecatError, match=r"unknown storage 'png'; choose one of \['jpeg', 'mixed', 'raw'\]"):
        PrepareConfig("imagefolder", tmp_path / "data", storage="png", **folders)
