"""Dataset readers: real on-disk formats in, identical Split objects out."""

import gzip

import numpy as np
import pytest
from conftest import make_cifar10, make_fashion_root, make_imagefolder, write_idx

from pipeline.datasets import SourceOptions, get_spec, read_cifar10, read_digits, read_idx, read_imagefolder
from pipeline.errors import TimecatError


def test_idx_round_trip_and_bad_magic(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), array)
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
    with pytest.raises(TimecatError, match="bad.gz: not an IDX file"):
        read_idx(tmp_path / "bad.gz")
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01\x00\x00\x00\x09\x00")
    with pytest.raises(TimecatError, match="short.gz: IDX header says shape"):
        read_idx(tmp_path / "short.gz")


def test_fashion_mnist_from_the_data_root(tmp_path):
    root = make_fashion_root(tmp_path, n_train=30, n_test=10)
    splits = get_spec("fashion-mnist").read(root, SourceOptions())
    assert len(splits["train"].labels) == 30 and len(splits["test"].labels) == 10
    assert splits["train"].images[0].shape == (28, 28, 3)
    assert splits["train"].source.startswith(str(root))
    assert splits["train"].classes[9] == "Ankle boot"


def test_cifar10_pickles_are_read_as_hwc(tmp_path):
    root = make_cifar10(tmp_path, per_batch=4, test=6)
    splits = read_cifar10(root, SourceOptions())
    assert len(splits["train"].labels) == 20 and len(splits["test"].labels) == 6
    # The pickle row holds 1024 red values, then green, then blue.
    import pickle

    with open(root / "cifar10/cifar-10-batches-py/data_batch_1", "rb") as f:
        row = pickle.load(f, encoding="bytes")[b"data"][0]
    image = splits["train"].images[0]
    np.testing.assert_array_equal(image[:, :, 1], row[1024:2048].reshape(32, 32))
    assert splits["train"].classes[3] == "class3"


def test_missing_cifar_names_the_path(tmp_path):
    with pytest.raises(TimecatError, match=f"cifar-10-batches-py.*not found in {tmp_path}/cifar10"):
        read_cifar10(tmp_path, SourceOptions())


def test_malformed_cifar_batch_is_named(tmp_path):
    root = make_cifar10(tmp_path)
    (root / "cifar10/cifar-10-batches-py/data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(TimecatError, match="data_batch_3: not a CIFAR python pickle"):
        read_cifar10(root, SourceOptions())


def test_digits_split_is_fixed_and_stratified(tmp_path):
    a, b = read_digits(tmp_path, SourceOptions()), read_digits(tmp_path, SourceOptions())
    assert len(a["train"].labels) == 1347 and len(a["test"].labels) == 450
    assert a["train"].fingerprint() == b["train"].fingerprint()
    total = np.bincount(a["train"].labels) + np.bincount(a["test"].labels)
    assert np.abs(np.bincount(a["test"].labels) - 0.25 * total).max() <= 1  # stratified 75/25
    assert a["train"].images[0].dtype == np.uint8 and a["train"].images[0].max() > 200


def test_imagefolder_labels_come_from_the_train_classes(tmp_path):
    make_imagefolder(tmp_path / "train", classes=("ant", "bee", "cow"))
    make_imagefolder(tmp_path / "test", classes=("ant", "cow"), per_class=2)
    splits = read_imagefolder(tmp_path, SourceOptions(tmp_path / "train", tmp_path / "test"))
    assert splits["train"].classes == ("ant", "bee", "cow")
    # The test folder lacks "bee": "cow" must keep label 2, not shift to 1.
    assert splits["test"].labels.tolist() == [0, 0, 2, 2]
    assert splits["test"].images[0].shape[2] == 3


def test_imagefolder_errors(tmp_path):
    make_imagefolder(tmp_path / "train", classes=("ant",))
    make_imagefolder(tmp_path / "test", classes=("ant", "yak"))
    with pytest.raises(TimecatError, match="needs --train DIR and --test DIR"):
        read_imagefolder(tmp_path, SourceOptions())
    with pytest.raises(TimecatError, match=r"classes \['yak'\] are not in the train folder"):
        read_imagefolder(tmp_path, SourceOptions(tmp_path / "train", tmp_path / "test"))
    with pytest.raises(TimecatError, match="not a folder"):
        read_imagefolder(tmp_path, SourceOptions(tmp_path / "nowhere", tmp_path / "test"))


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(TimecatError, match=r"unknown dataset 'mnist'; choose one of \['cifar10', 'cifar100'"):
        get_spec("mnist")
