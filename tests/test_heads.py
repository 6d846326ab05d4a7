"""Saved logreg heads: every probe writes one, results.head loads it, timecat predict applies it."""

from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import digits_cache

import cache
import cli
from pipeline.configs import ProbeConfig
from pipeline.probe import results
from pipeline.probe.run import few_shot, probe, sweep


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    path = tmp_path_factory.mktemp("heads") / "c.zarr"
    return str(path), digits_cache(path)


def eval_features(path: str, members) -> tuple[np.ndarray, np.ndarray]:
    return cache.open(path).features("digits", "test", list(members))


@pytest.mark.parametrize("backend", ["batched", "sklearn", "torch"])
def test_every_logreg_probe_saves_the_head_that_made_its_predictions(digits, tmp_path, backend):
    path, names = digits
    members = (names[2], names[0])  # not the cache's order: the head's columns follow the record's
    record = probe(ProbeConfig("digits", members, backend=backend), path, tmp_path)
    head = results.head(tmp_path, record["id"])
    assert record["head"] == f"heads/{record['id']}.npz" and (tmp_path / record["head"]).is_file()
    assert head.members == members and head.dims == (16, 16) and head.coef.shape == (32, 10)
    assert head.intercept.shape == (10,) and record["chosen"]["C"] == head.C and len(head.classes) == 10
    assert list(record["head_norms"]) == list(members) and record["head_norms"] == pytest.approx(head.norms())
    X, y = eval_features(path, members)
    saved = results.load_predictions(tmp_path, record)["top5"]
    ours = head.topk(X, 5)
    # The same head: the same ranking but for rows where two classes score within float32 rounding.
    assert (ours[:, 0] == saved[:, 0]).mean() >= 0.99
    assert abs(100 * (ours[:, 0] == y).mean() - record["top1"]) <= 100 / len(y) + 1e-9
    swapped = head.topk(eval_features(path, members[::-1])[0], 1)  # the columns in the wrong order
    assert 100 * (swapped[:, 0] == y).mean() < record["top1"] - 20


def test_sweeps_and_few_shot_draws_save_one_head_per_record(digits, tmp_path):
    path, names = digits
    config = ProbeConfig("digits", names[:3])
    records, _ = sweep(config, names[:3], 2, None, path, tmp_path)
    draws, _ = few_shot(replace(config, members=names[:2], shots=2, draws=2), path, tmp_path)
    for record in [*records, *draws]:
        head = results.head(tmp_path, record["id"])
        assert head.members == tuple(record["members"]) and head.coef.shape == (32, 10)
    assert len({r["head"] for r in [*records, *draws]}) == 5


def test_a_two_class_head_is_one_binomial_logit(tmp_path):
    from sklearn.datasets import load_digits

    X, y = load_digits(n_class=2, return_X_y=True)
    store = cache.open(str(tmp_path / "c.zarr"), mode="a")
    for split, rows in (("train", slice(0, 300)), ("test", slice(300, None))):
        store.write_labels("two", split, y[rows], "fp", ["zero", "one"])
        writer = store.create_features("two", split, "m", 64, {"dataset_fingerprint": "fp", "checkpoint_sha256": "m"})
        writer.append(X[rows].astype(np.float32))
        writer.close()
        store.finish_features("two", split, "m")
    store.consolidate()
    record = probe(ProbeConfig("two", ("m",)), str(tmp_path / "c.zarr"), tmp_path)
    head = results.head(tmp_path, record["id"])
    assert head.coef.shape == (64, 1) and head.intercept.shape == (1,) and head.classes == ("zero", "one")
    ranked = head.topk(X[300:].astype(np.float32), 5)
    assert ranked.shape == (len(y) - 300, 2) and (ranked[:, 0] == y[300:]).mean() > 0.95


def test_predict_applies_a_head_to_any_split_of_its_members(digits, tmp_path):
    path, names = digits
    record = probe(ProbeConfig("digits", names[:2]), path, tmp_path)
    runner = CliRunner()
    base = ["predict", record["id"], "--dataset", "digits", "--cache", path, "--results", str(tmp_path)]
    shown = runner.invoke(cli.main, [*base, "--split", "test", "--json"])
    assert shown.exit_code == 0, shown.output
    summary = __import__("json").loads(shown.output)
    assert summary["rows"] == 397 and summary["same_classes"] and abs(summary["top1"] - record["top1"]) <= 100 / 397
    train = runner.invoke(cli.main, [*base, "--split", "train", "--top-k", "3", "--out", str(tmp_path / "t.csv")])
    assert train.exit_code == 0 and "digits/train: 1,400 rows, top-1" in train.output, train.output
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0] == "row,label,top1,top2,top3" and len(lines) == 1401
    arrays = runner.invoke(cli.main, [*base, "--out", str(tmp_path / "t.npz")])
    with np.load(tmp_path / "t.npz") as saved:
        assert saved["topk"].shape == (397, 5) and saved["labels"].shape == (397,) and len(saved["classes"]) == 10
    assert arrays.exit_code == 0
    refused = runner.invoke(cli.main, [*base, "--out", str(tmp_path / "t.parquet")])
    assert refused.exit_code == 1 and "unknown file type '.parquet'; choose one of ['.npz', '.csv']" in refused.output
    assert not (tmp_path / "t.parquet").exists()


def test_predict_refuses_features_the_head_was_not_fit_on(digits, tmp_path):
    path, names = digits
    record = probe(ProbeConfig("digits", names[:1]), path, tmp_path)
    other = cache.open(str(tmp_path / "other.zarr"), mode="a")  # m0 extracted again, from another checkpoint
    X, y = eval_features(path, names[:1])
    other.write_labels("digits", "test", y, "fp", [str(c) for c in range(10)])
    writer = other.create_features(
        "digits", "test", names[0], 16, {"dataset_fingerprint": "fp", "checkpoint_sha256": "x"}
    )
    writer.append(X)
    writer.close()
    other.finish_features("digits", "test", names[0])
    other.consolidate()
    runner = CliRunner()
    base = ["predict", record["id"], "--dataset", "digits", "--results", str(tmp_path)]
    refused = runner.invoke(cli.main, [*base, "--cache", str(tmp_path / "other.zarr")])
    assert refused.exit_code == 1 and "the head would read another network's features" in refused.output
    knn = probe(ProbeConfig("digits", names[:1], protocol="knn"), path, tmp_path)
    missing = runner.invoke(
        cli.main, ["predict", knn["id"], "--dataset", "digits", "--cache", path, "--results", str(tmp_path)]
    )
    assert missing.exit_code == 1 and "has no saved head: only logreg probes save one" in missing.output
    unknown = runner.invoke(
        cli.main, ["predict", "feedbeef0000", "--dataset", "digits", "--cache", path, "--results", str(tmp_path)]
    )
    assert unknown.exit_code == 1 and "no record with id 'feedbeef0000'" in unknown.output
