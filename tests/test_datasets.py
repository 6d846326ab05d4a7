"""Dataset readers: real on-disk formats in, identical Split objects out."""

import gzip

import numpy as np
import pytest
from conftest import make_cifar10, make_fashion_root, make_imagefolder, write_idx

from pipeline.core.errors import TimecatError
from pipeline.data.datasets import SourceOptions, get_spec, read_cifar10, read_digits, read_idx, read_imagefolder


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


def make_imagenet(root, flat_val: str | None = None):
    """imagenet/train/<wnid>/*.JPEG and val/ as class folders, or flat with a labels file."""
    from PIL import Image

    wnids = ("n01440764", "n01443537", "n01484850")
    base = root / "imagenet"
    make_imagefolder(base / "train", classes=wnids, per_class=3)
    truth = ["n01484850", "n01440764", "n01443537", "n01484850"]
    if flat_val is None:
        make_imagefolder(base / "val", classes=wnids, per_class=1)
        return base, truth
    (base / "val").mkdir()
    for i, _ in enumerate(truth):
        Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(base / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
    if flat_val == "csv":
        lines = ["ImageId,PredictionString"]
        lines += [f"ILSVRC2012_val_{i + 1:08d},{w} 1 2 30 40" for i, w in reversed(list(enumerate(truth)))]
        (base / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    else:
        (base / "val_labels.txt").write_text("\n".join(["2", "n01440764", "1", "n01484850"]) + "\n")
    return base, truth


@pytest.mark.parametrize("flat_val", [None, "csv", "txt"])
def test_imagenet_train_folders_and_every_val_layout(tmp_path, flat_val):
    _, truth = make_imagenet(tmp_path, flat_val)
    splits = get_spec("imagenet").read(tmp_path, SourceOptions())
    classes = splits["train"].classes
    assert classes == ("n01440764", "n01443537", "n01484850") and len(splits["train"].labels) == 9
    if flat_val is None:
        assert splits["test"].labels.tolist() == [0, 1, 2]
    else:
        assert [classes[i] for i in splits["test"].labels] == truth
    assert splits["test"].images[0].shape[2] == 3


def test_imagenet_flat_val_without_labels_says_what_to_add(tmp_path):
    base, _ = make_imagenet(tmp_path, "txt")
    (base / "val_labels.txt").unlink()
    with pytest.raises(TimecatError, match="LOC_val_solution.csv or val_labels.txt"):
        get_spec("imagenet").read(tmp_path, SourceOptions())


def make_inat(root, train_categories=(5, 9, 7), val_categories=(9, 7)):
    """inat2018/train2018.json and val2018.json (COCO style) with images under train_val2018/."""
    import json

    from PIL import Image

    base = root / "inat2018"
    for split, cats in (("train", train_categories), ("val", val_categories)):
        images, annotations = [], []
        for i, cat in enumerate(cats):
            name = f"train_val2018/Plantae/{cat}/{split}{i}.jpg"
            (base / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((16, 16, 3), 10 * cat, np.uint8)).save(base / name)
            images.append({"id": 100 * (split == "val") + i, "file_name": name, "width": 16, "height": 16})
            annotations.append({"id": i, "image_id": images[-1]["id"], "category_id": cat})
        categories = [{"id": c, "name": f"species{c}"} for c in sorted(set(cats))]
        data = {"images": images, "annotations": annotations, "categories": categories}
        (base / f"{split}2018.json").write_text(json.dumps(data))
    return base


def test_inat_labels_share_one_category_mapping(tmp_path):
    make_inat(tmp_path)
    splits = get_spec("inat2018").read(tmp_path, SourceOptions())
    # Category ids 5, 7, 9 -> 0, 1, 2 in both splits, although val lacks 5.
    assert splits["train"].classes == ("species5", "species7", "species9")
    assert splits["train"].labels.tolist() == [0, 2, 1]
    assert splits["test"].labels.tolist() == [2, 1]
    assert splits["test"].images[1].shape == (16, 16, 3)


def test_inat_errors_name_the_file(tmp_path):
    with pytest.raises(TimecatError, match="train2018.json not found"):
        get_spec("inat2018").read(tmp_path, SourceOptions())
    base = make_inat(tmp_path)
    (base / "val2018.json").write_text('{"images": []}')
    with pytest.raises(TimecatError, match="val2018.json: expected COCO-style keys"):
        get_spec("inat2018").read(tmp_path, SourceOptions())
