"""Data that lies, and training that fails, are refused with one error line (issue 24, items 3-5, 12, 13, 17).

Guards: a diverged member stops at its first non-finite loss and is never marked complete; labels
outside the classes are refused by prepare and by every .beton reader; a manifest is checked against
its file and for impossible values; a damaged .beton fails with its name instead of hanging; image
files too large to decode are unreadable files; an offline --download and an absurd --resolution are
one error line. Each case asserts what the user reads and that nothing already written was lost.
"""

from __future__ import annotations

import gzip
import json
import pickle
import re
import shutil
import struct
import threading
import urllib.error
import urllib.request
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_cifar10, make_fashion_root, make_imagefolder, run, tree

from pipeline.configs import ExtractConfig, PrepareConfig, PretrainConfig
from pipeline.core import files
from pipeline.core.errors import TimecatError
from pipeline.data.prepare import prepare
from pipeline.data.splits import beton_path, manifest_path
from pipeline.features.extract import extract
from pipeline.members import checkpoints
from pipeline.train.pretrain import json_line, pretrain

HANG_S = 120  # s: a call that has not returned by then hangs (each takes a few seconds)


def strict_json_lines(path: Path) -> list[dict]:
    """The records of a JSON-lines file, refusing the NaN and Infinity tokens that are not JSON."""

    def refuse(token):
        raise AssertionError(f"{path} holds the non-JSON token {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines() if line.strip()]


def returns_within(call, seconds: float = HANG_S):
    """What ``call()`` returns or raises, run in a thread: the test fails, and the suite goes on, if it hangs."""
    outcome = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as e:  # handed to the test
            outcome["error"] = e

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s: it hangs"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """digits prepared once; tests damage a copy."""
    root = tmp_path_factory.mktemp("prepared")
    prepare(PrepareConfig("digits", root))
    return root


@pytest.fixture
def data(prepared, tmp_path):
    """A private copy of the prepared digits."""
    shutil.copytree(prepared, tmp_path / "data")
    return tmp_path / "data"


def tiny(name: str, **kwargs) -> PretrainConfig:
    return PretrainConfig(name, "digits", 0, **{"steps": 6, "batch_size": 32, "num_workers": 1, **kwargs})


@pytest.fixture(scope="module")
def member(prepared, tmp_path_factory):
    """The runs folder of one member trained 2 steps on digits (something to extract)."""
    runs = tmp_path_factory.mktemp("member") / "runs"
    pretrain(tiny("m0", steps=2), prepared, runs)
    return runs


# -- 3. A diverged member --------------------------------------------------------------------------


def test_a_diverged_member_stops_at_its_first_nan_and_is_never_complete(data, tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(TimecatError, match=r"member big diverged: the training loss was nan at step \d") as e:
        pretrain(tiny("big", lr=1e30, log_every=1, checkpoint_every=1), data, runs)
    assert "lower --lr" in str(e.value) and "not marked complete" in str(e.value)
    payload = checkpoints.load(runs / "big" / "checkpoint.pt")
    assert not payload["complete"] and payload["final"] is None
    assert all(torch.isfinite(t).all() for t in payload["model"].values() if t.is_floating_point())
    steps = [r["step"] for r in strict_json_lines(runs / "big" / "log.jsonl")]
    assert steps == list(range(1, payload["step"] + 1))  # every logged loss was finite, and is JSON


def test_a_loss_that_turns_nan_between_log_records_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    import pipeline.train.pretrain as stage

    runs, calls, real = tmp_path / "runs", [], stage.train_one_step

    def nan_at_step_4(*args):
        result = real(*args)
        calls.append(1)
        return {**result, "loss": result["loss"] * float("nan")} if len(calls) == 4 else result

    monkeypatch.setattr(stage, "train_one_step", nan_at_step_4)
    with pytest.raises(TimecatError, match=r"training loss was nan at step 4 .*checkpoint at step 2 is kept"):
        pretrain(tiny("late", log_every=3, checkpoint_every=2), data, runs)
    payload = checkpoints.load(runs / "late" / "checkpoint.pt")
    assert payload["step"] == 2 and not payload["complete"]  # step 4's checkpoint was never written
    assert [r["step"] for r in strict_json_lines(runs / "late" / "log.jsonl")] == [3]
    assert json_line({"step": 1, "loss": float("nan"), "lr": float("inf")}) == '{"step": 1, "loss": null, "lr": null}\n'


@pytest.mark.parametrize(("checkpoint_every", "poisoned"), [(2, 2), (0, 3)])  # periodic, final
def test_weights_that_turn_inf_with_a_finite_loss_are_never_saved(
    data, tmp_path, monkeypatch, checkpoint_every, poisoned
):
    import pipeline.train.pretrain as stage

    runs, calls, real = tmp_path / "runs", [], stage.train_one_step

    def poison(net, *args):
        result = real(net, *args)
        calls.append(1)
        if len(calls) == poisoned:  # after the step: this step's loss was finite
            next(net.parameters()).data.fill_(float("inf"))
        return result

    monkeypatch.setattr(stage, "train_one_step", poison)
    with pytest.raises(TimecatError, match=rf"weights or BatchNorm statistics became non-finite at step {poisoned}"):
        pretrain(tiny("inf", steps=3, log_every=1, checkpoint_every=checkpoint_every), data, runs)
    assert not (runs / "inf" / "checkpoint.pt").exists()  # neither the periodic nor the final one


# -- 4. Labels outside the classes ---------------------------------------------------------------


def _relabel_cifar(root: Path, batch: str, label: int) -> None:
    path = root / "cifar10" / "cifar-10-batches-py" / batch
    content = pickle.loads(path.read_bytes())
    content[b"labels"][3] = label
    path.write_bytes(pickle.dumps(content))


@pytest.mark.parametrize(("batch", "label"), [("data_batch_3", 99), ("test_batch", -1)])
def test_prepare_refuses_a_cifar_label_outside_the_classes(tmp_path, batch, label):
    root = make_cifar10(tmp_path / "data")
    _relabel_cifar(root, batch, label)
    before = tree(root)
    with pytest.raises(TimecatError, match=rf"{batch}: label {label} \(row 3; 1 such row\(s\)\) is not one of the 10"):
        prepare(PrepareConfig("cifar10", root))
    assert tree(root) == before


def test_every_split_refuses_a_label_outside_its_classes():
    from pipeline.data.datasets import ArrayImages, Split

    with pytest.raises(TimecatError, match=r"made: label 2 \(row 1; 1 such row\(s\)\) is not one of the 2 classes"):
        Split(ArrayImages(np.zeros((2, 8, 8), np.uint8)), np.array([0, 2]), ("a", "b"), "made")


def test_prepare_refuses_an_idx_label_outside_the_classes(tmp_path):
    root = make_fashion_root(tmp_path / "data", 40, 20)
    path = root / "fashion-mnist" / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[8 + 5] = 200  # header of 8 bytes, then one byte per label
    path.write_bytes(gzip.compress(bytes(raw)))
    before = tree(root)
    with pytest.raises(TimecatError, match=r"train-labels-idx1-ubyte.gz: label 200 \(row 5.*10 classes"):
        prepare(PrepareConfig("fashion-mnist", root))
    assert tree(root) == before


def _edit_manifest(data: Path, split: str, **changes) -> None:
    path = manifest_path(data, "digits", split)
    manifest = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in manifest.items() if v is not None}))


def test_readers_refuse_labels_beyond_a_shortened_class_list(data, tmp_path, member):
    five = [str(c) for c in range(5)]
    _edit_manifest(data, "test", classes=five, class_counts=None)
    store, runs = tmp_path / "features.zarr", tmp_path / "runs"
    message = r"test.beton: label [5-9] \(row \d+; \d+ such row\(s\)\) is not one of the 5 classes"
    with pytest.raises(TimecatError, match=message):
        extract(ExtractConfig("digits", ("m0",), splits=("test",)), data, member, str(store))
    _edit_manifest(data, "train", classes=five, class_counts=None)
    with pytest.raises(TimecatError, match=r"train.beton: label [5-9] .*not one of the 5 classes"):
        pretrain(tiny("short"), data, runs)
    assert not store.exists() and not runs.exists()  # refused before anything was written


# -- 5. The manifest checked against its file --------------------------------------------------------


def test_a_beton_swapped_for_another_splits_is_refused(data, tmp_path, member):
    train, test = beton_path(data, "digits", "train"), beton_path(data, "digits", "test")
    shutil.copyfile(test, train)
    _edit_manifest(data, "train", bytes=train.stat().st_size)  # the size check alone is fooled
    store = tmp_path / "features.zarr"
    with pytest.raises(TimecatError, match=r"train.beton holds 450 rows but its manifest says 1347: the file was rep"):
        extract(ExtractConfig("digits", ("m0",), splits=("train",)), data, member, str(store))
    counts = json.loads(manifest_path(data, "digits", "test").read_text())["class_counts"]
    counts[0], counts[1] = counts[0] - 1, counts[1] + 1  # rows and counts edited to pass, off by one image
    _edit_manifest(data, "train", rows=450, class_counts=counts)
    with pytest.raises(TimecatError, match=r"train.beton: its labels do not match the class counts"):
        pretrain(tiny("swapped"), data, tmp_path / "runs")
    assert not store.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"std": [0, 0, 0]}, r"std is \[0, 0, 0\]: each must be above 0"),
        ({"std": [1, -2, 1]}, r"std is \[1, -2, 1\]: each must be above 0"),
        ({"mean": "abc"}, r"mean is abc, not three finite numbers"),
        ({"mean": [1, 2]}, r"mean is \[1, 2\], not three finite numbers"),
        ({"classes": "0123456789"}, r"classes is 0123456789, not a list of class names"),
        ({"classes": ["0", "1"]}, r"class_counts is \[.*\], not one count for each of the 2 classes"),
        ({"rows": -3}, r"rows is -3, not a positive integer"),
    ],
)
def test_impossible_manifest_values_are_refused(data, tmp_path, changes, message):
    _edit_manifest(data, "train", **changes)
    before = tree(data)
    result = run("pretrain", "--name", "m", "--dataset", "digits", "--seed", 0, "--steps", 2,
                 "--data-root", data, "--runs", tmp_path / "runs")  # fmt: skip
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert re.search(r"Error: .*train.json: " + message + r".*which prepare never writes; run `timecat prepare digits`",
                     result.output), result.output  # fmt: skip
    assert tree(data) == before and not (tmp_path / "runs").exists()


# -- 12. A damaged .beton fails with its name, never hangs ---------------------------------------------


def test_a_beton_with_its_tail_zeroed_fails_with_its_name_and_never_hangs(data, tmp_path, member):
    beton = beton_path(data, "digits", "train")
    damaged = bytearray(beton.read_bytes())
    damaged[-1000:] = bytes(1000)  # what a crash leaves of a file never flushed: its size, not its end
    beton.write_bytes(bytes(damaged))
    message = r"train.beton is damaged: its allocation table .* does not hold every image"
    with pytest.raises(TimecatError, match=message):
        returns_within(lambda: pretrain(tiny("hang"), data, tmp_path / "runs"))
    store = tmp_path / "features.zarr"
    with pytest.raises(TimecatError, match=message):
        returns_within(lambda: extract(ExtractConfig("digits", ("m0",)), data, member, str(store)))
    assert not (tmp_path / "runs").exists()


def test_a_loader_thread_that_dies_is_an_error_naming_the_file(data, monkeypatch):
    from ffcv.loader.epoch_iterator import EpochIterator

    from pipeline.data.loaders import eval_loader
    from pipeline.data.splits import Preprocess

    def crash(*args):
        raise SystemError("returned a result with an exception set")

    monkeypatch.setattr(EpochIterator, "run_pipeline", crash)
    loader = eval_loader(beton_path(data, "digits", "test"), Preprocess(8, (1, 1, 1), (1, 1, 1)), 64, 1)
    with pytest.raises(TimecatError, match=r"test.beton could not be read: FFCV's loader thread failed on it \(Syst"):
        returns_within(lambda: list(loader))


def test_written_files_reach_the_disk_before_their_rename(tmp_path, monkeypatch):
    import os

    events, real_replace = [], os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", str(a))), real_replace(a, b)))
    checkpoints.save(tmp_path / "checkpoint.pt", {"model": {}, "step": 1})
    files.write_text(tmp_path / "train.json", "{}")
    assert [kind for kind, _ in events] == ["fsync", "rename", "fsync", "rename"]
    assert events[0][1] == events[1][1] and events[2][1] == events[3][1]  # the temporary, flushed, then renamed


# -- 13. Decompression bombs -------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` RGB pixels (its data is one empty row)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_decompression_bombs_are_unreadable_files_skipped_or_named(tmp_path):
    train, test = make_imagefolder(tmp_path / "train"), make_imagefolder(tmp_path / "test")
    (train / "cat" / "bomb.png").write_bytes(png_header(40000, 40000))  # Pillow's own refusal, above 179 MP
    (train / "dog" / "big.png").write_bytes(png_header(12000, 12000))  # 144 MP: Pillow only warns
    data = tmp_path / "data"
    config = PrepareConfig("imagefolder", data, "pets", train, test)
    with (
        pytest.raises(TimecatError, match=r"2 unreadable image\(s\) in pets/train") as e,
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        prepare(config)
    assert not [w for w in caught if "decompression bomb" in str(w.message)]  # the error alone says it
    assert "bomb.png (ImageTooLargeError: Image size (1600000000 pixels) exceeds limit" in str(e.value)
    assert "big.png (ImageTooLargeError: 12000 x 12000 px is above timecat's bound of 67,108,864 px" in str(e.value)
    assert not (data / "pets").exists() or not any((data / "pets").iterdir())
    prepare(PrepareConfig("imagefolder", data, "pets", train, test, on_corrupt="skip"))
    skipped = json.loads(manifest_path(data, "pets", "train").read_text())["skipped"]
    assert sorted(Path(s["path"]).name for s in skipped) == ["big.png", "bomb.png"]


# -- 17. An offline --download, an absurd --resolution ---------------------------------------------------


def test_an_offline_download_is_one_error_naming_the_host_and_the_manual_way(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    result = run("prepare", "cifar10", "--download", "--data-root", tmp_path / "data")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "cannot fetch https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz from www.cs.toronto.edu" in (
        result.output
    )
    assert "name resolution" in result.output and "cifar-10-python.tar.gz (the python version)" in result.output
    assert "run again without --download" in result.output
    assert not [p for p in (tmp_path / "data").rglob("*") if p.is_file()]


def test_an_absurd_resolution_is_refused_with_the_range(data, tmp_path):
    result = run("pretrain", "--name", "m", "--dataset", "digits", "--seed", 0, "--steps", 2, "--resolution", 4096,
                 "--data-root", data, "--runs", tmp_path / "runs")  # fmt: skip
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "resolution must be at least 8 px and at most 1024 px (the input side), got 4096" in result.output
    assert not (tmp_path / "runs").exists()
