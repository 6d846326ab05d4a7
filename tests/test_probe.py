"""The logreg probe protocol on matrices, on a synthetic cache, and on the tiny pipeline run's real cache."""

import numpy as np
import pytest
from conftest import add_member, make_cache, matrices_cache

import cache
from pipeline.configs import ProbeConfig
from pipeline.core.errors import TimecatError
from pipeline.probe.heldout import search_split, standardize_in_place, topk_accuracy
from pipeline.probe.logreg_backends import _topk_rows
from pipeline.probe.protocol import Inputs
from pipeline.probe.run import check_classes, probe, probe_matrices


def blobs(n, dim, classes, seed, spread=1.5):
    """Gaussian blobs: class c centred at a random point; learnable but not trivially."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(classes, dim)) * spread
    y = np.arange(n) % classes
    return (centres[y] + rng.normal(size=(n, dim))).astype(np.float32), y


def test_standardize_uses_train_statistics_in_place():
    X_train = np.array([[1.0, 5.0], [3.0, 5.0]], np.float32)
    X_eval = np.array([[2.0, 7.0]], np.float32)
    standardize_in_place(X_train, X_eval)
    np.testing.assert_allclose(X_train, [[-1, 0], [1, 0]])
    np.testing.assert_allclose(X_eval, [[0, 2]])  # constant column: centred, not divided by 0


def test_topk():
    proba = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    best = _topk_rows(proba, 5, np.array([0, 1, 2]))  # k larger than the classes: all, best first
    np.testing.assert_array_equal(best, [[1, 2, 0], [0, 2, 1]])
    assert topk_accuracy(best, np.array([1, 2]), 1) == 50.0
    assert topk_accuracy(best, np.array([1, 2]), 2) == 100.0


def test_held_out_split_is_seeded_stratified_and_capped():
    y = np.arange(1000) % 4
    config = ProbeConfig("d", ("a",), holdout=0.2, search_rows=300)
    fit_a, held_a = search_split(y, config)
    fit_b, _ = search_split(y, config)
    np.testing.assert_array_equal(fit_a, fit_b)
    assert len(held_a) == 200 and len(fit_a) == 300 and not set(fit_a) & set(held_a)
    assert np.bincount(y[held_a]).tolist() == [50] * 4


def four_class_cache(path, X_train, y_train, X_eval, y_eval) -> str:
    """A cache of one member 'a' of dataset 'd' holding these matrices (4 classes), for the production path."""
    splits = {"train": (X_train, y_train), "test": (X_eval, y_eval)}
    return matrices_cache(path, "d", "a", splits, ["c0", "c1", "c2", "c3"])


def test_probe_learns_and_never_looks_at_the_eval_labels(tmp_path):
    X_train, y_train = blobs(600, 8, 4, seed=0)
    X_eval, y_eval = blobs(200, 8, 4, seed=1)
    config = ProbeConfig("d", ("a",))
    result = probe(config, four_class_cache(tmp_path / "a.zarr", X_train, y_train, X_eval, y_eval))
    assert result["top1"] > 90 and result["top5"] == 100.0
    assert result["n_train"] == 600 and result["n_eval"] == 200 and result["dim"] == 8
    assert len(result["search"]) == len(config.c_grid) + len(config.refine)
    # Shuffling the eval labels changes the score but not a single choice.
    shuffled = probe(config, four_class_cache(tmp_path / "b.zarr", X_train, y_train, X_eval, np.roll(y_eval, 1)))
    assert shuffled["chosen"] == result["chosen"] and shuffled["search"] == result["search"]
    assert shuffled["top1"] < 50


def test_probe_matrices_runs_the_one_process_paths_and_sends_batched_logreg_to_the_cache():
    X, y = blobs(40, 4, 4, seed=0)
    with pytest.raises(TimecatError, match=r"backend auto fits member blocks read from the cache: call probe\(\)"):
        probe_matrices(Inputs(X.copy(), y, X.copy(), y, 4), ProbeConfig("d", ("a",)))
    knn = probe_matrices(Inputs(X.copy(), y, X.copy(), y, 4), ProbeConfig("d", ("a",), protocol="knn", k_grid=(1, 3)))
    assert knn.fields["chosen"]["k"] in (1, 3) and knn.eval_top5.shape == (40, 4) and knn.head is None


def test_a_class_missing_from_train_is_a_clear_error():
    with pytest.raises(TimecatError, match=r"no examples of class\(es\) \['c2'\]"):
        check_classes(np.array([0, 0, 1, 1]), ["c0", "c1", "c2"], ProbeConfig("d", ("a",)))


def test_probe_from_cache_refuses_unknown_members(tmp_path):
    make_cache(tmp_path / "c.zarr")
    with pytest.raises(TimecatError, match=r"unknown member\(s\) \['run9'\].*available: \['a', 'b'\]"):
        probe(ProbeConfig("toy", ("a", "run9"), eval_split="train", allow_same_split=True), str(tmp_path / "c.zarr"))


def test_probe_from_cache_refuses_mismatched_members(tmp_path):
    make_cache(tmp_path / "c.zarr")
    add_member(tmp_path / "c.zarr", "stale", 3, "old")
    with pytest.raises(TimecatError, match="member stale was extracted from a different toy/train"):
        probe(ProbeConfig("toy", ("a", "stale"), eval_split="train", allow_same_split=True), str(tmp_path / "c.zarr"))


def test_subsets_are_all_or_a_seeded_sample():
    from pipeline.probe.run import subsets

    pool = ("r0", "r1", "r2", "r3", "r4")
    assert len(subsets(pool, 2, None, 0)) == 10 and subsets(pool, 5, None, 0) == [pool]
    sample = subsets(pool, 2, 4, seed=3)
    assert len(sample) == 4 and sample == subsets(pool, 2, 4, seed=3) and len(set(sample)) == 4
    assert sample != subsets(pool, 2, 4, seed=4)
    with pytest.raises(TimecatError, match="--cat 6 needs between 1 and 5 members"):
        subsets(pool, 6, None, 0)


def test_sweep_probes_each_subset_and_reports_mean_and_std(tmp_path):
    from pipeline.probe import results
    from pipeline.probe.run import sweep

    make_cache(tmp_path / "c.zarr", members=("a", "b", "c"), dims=(6, 4, 5))
    config = ProbeConfig("toy", ("a",), eval_split="train", backend="sklearn", allow_same_split=True)
    records, summary = sweep(config, ("a", "b", "c"), 2, None, str(tmp_path / "c.zarr"), tmp_path / "r")
    assert [r["members"] for r in records] == [["a", "b"], ["a", "c"], ["b", "c"]]
    assert [r["id"] for r in results.load(tmp_path / "r")] == [r["id"] for r in records]  # saved as each finished
    assert all(r["sweep"] == {"cat": 2, "pool": ["a", "b", "c"], "subsets": 3} for r in records)
    top1 = np.array([r["top1"] for r in records])
    assert summary["count"] == 3 and summary["top1"]["mean"] == pytest.approx(top1.mean())
    assert summary["top1"]["std"] == pytest.approx(top1.std(ddof=1))


def blob_cache(path, views=0, n_train=400, n_eval=200):
    """A cache of one learnable 8-d member 'm' (blobs) with train/test splits and optional noisy views."""
    import cache

    store = cache.open(str(path), mode="a")
    for split, n, seed in (("train", n_train, 0), ("test", n_eval, 1)):
        X, y = blobs(n, 8, 4, seed=seed)
        store.write_labels("toy", split, y, "fp", ["c0", "c1", "c2", "c3"])
        arrays = [(None, X)] + [
            (k, X + np.random.default_rng(k).normal(scale=0.3, size=X.shape).astype(np.float32))
            for k in range(views if split == "train" else 0)
        ]
        for view, data in arrays:
            prov = {"dataset_fingerprint": "fp", "view_seed": 0}
            writer = store.create_features("toy", split, "m", 8, prov, view=view)
            writer.append(data)
            writer.close()
            store.finish_features("toy", split, "m", view=view)
    store.consolidate()
    return str(path)


@pytest.mark.parametrize("views", [0, 2])
def test_bn_linear_protocol_chooses_weight_decay_on_held_out_train_rows(tmp_path, views):
    path = blob_cache(tmp_path / "c.zarr", views=views)
    config = ProbeConfig("toy", ("m",), protocol="tc", wd_grid=(1e-4, 1e-2))  # the former name, an alias
    record = probe(config, path)
    assert record["protocol"] == "bn-linear" and record["config"]["protocol"] == "bn-linear"
    assert record["backend"] == "torch"
    assert [t["weight_decay"] for t in record["search"]] == [1e-4, 1e-2]
    assert record["chosen"]["weight_decay"] in (1e-4, 1e-2) and record["top1"] > 85
    assert record["trained_on"] == ("views 0..1" if views else "features")
    assert record["recipe"]["epochs"] == 28 and list(record["recipe"]["milestones"]) == [8, 16, 24]


def test_bn_linear_grids_are_the_papers_per_dataset_kind():
    from pipeline.probe.bn_linear import wd_grid

    assert wd_grid("inat2018") == (1e-6, 1e-5, 1e-4) and wd_grid("imagenet") == (1e-4, 5e-4)
    assert len(wd_grid("cifar100")) == 6 and wd_grid("imagefolder") == wd_grid("cifar10")
    assert wd_grid("imagenet", (0.1,)) == (0.1,)
    # A folder name is not a kind: an imagenet prepared as "imagenet-mixed" is found by its recorded kind.
    with pytest.raises(TimecatError, match=r"unknown dataset kind 'imagenet-mixed'; choose one of \['cifar10'"):
        wd_grid("imagenet-mixed")
    with pytest.raises(TimecatError, match="does not record its dataset kind.*--wd-grid"):
        wd_grid(None)
    with pytest.raises(TimecatError, match=r"unknown protocol 'dino'; choose one of \['logreg', 'bn-linear', 'knn'\]"):
        ProbeConfig("d", ("a",), protocol="dino")


def test_peak_memory_is_the_probes_own_not_its_parents():
    import subprocess
    import sys

    # The child imports only the torch-free measuring module (about 20 MiB), so 300 MB held here tells the two
    # apart: getrusage's ru_maxrss, which survives exec, reported the parent's peak (1,900 MiB from 1.5 GB).
    parent = np.ones(300_000_000 // 8)
    parent[::512] = 2  # touch every page
    code = "from pipeline.core.memory import peak_rss_mib; print(peak_rss_mib())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 2 < child < 150, child
    del parent


def test_probe_on_the_cache_equals_probe_on_hstacked_features(pipeline_run):
    store = cache.open(pipeline_run["cache"])
    members = ("run0", "run2")
    config = ProbeConfig("digits", members, backend="sklearn")  # one-at-a-time; batched: test_c_search
    record = probe(config, pipeline_run["cache"])
    parts = {s: [store.features("digits", s, [m])[0] for m in members] for s in ("train", "test")}
    y_train, y_eval = store.labels("digits", "train"), store.labels("digits", "test")
    by_hand = probe_matrices(Inputs(np.hstack(parts["train"]), y_train, np.hstack(parts["test"]), y_eval, 10), config)
    assert (
        record["top1"] == topk_accuracy(by_hand.eval_top5, y_eval, 1) and record["chosen"] == by_hand.fields["chosen"]
    )
    assert record["dim"] == 256 and record["top1"] > 50  # real features of real digits
    assert set(record["member_provenance"]) == set(members)
