"""The feature cache on its own: layout, round trips, invariants and refusals."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import add_member, make_cache

import cache
from cache import layout, locks


def test_features_round_trip_equals_hstack(tmp_path):
    arrays, labels = make_cache(tmp_path / "c.zarr")
    X, y = cache.open(str(tmp_path / "c.zarr")).features("toy", "train", ["b", "a"])
    assert X.dtype == np.float32 and X.shape == (50, 10)
    np.testing.assert_array_equal(X, np.hstack([arrays["b"], arrays["a"]]))
    np.testing.assert_array_equal(y, labels)


def test_iter_rows_covers_the_same_matrix(tmp_path):
    arrays, _ = make_cache(tmp_path / "c.zarr")
    store = cache.open(str(tmp_path / "c.zarr"))
    blocks = list(store.iter_rows("toy", "train", ["a", "b"], block_rows=16))
    assert [b[0].start for b in blocks] == [0, 16, 32, 48]
    np.testing.assert_array_equal(np.vstack([b[1] for b in blocks]), np.hstack([arrays["a"], arrays["b"]]))


def test_listing_and_provenance(tmp_path):
    make_cache(tmp_path / "c.zarr")
    store = cache.open(str(tmp_path / "c.zarr"))
    assert store.datasets() == ["toy"]
    assert store.splits("toy") == ["train"]
    assert store.members("toy", "train") == ["a", "b"]
    assert store.status("toy", "train", "a") == "complete"
    prov = store.provenance("toy", "train", "a")
    assert prov["dataset_fingerprint"] == "fp0"
    assert prov["labels_sha256"] == store.split_attrs("toy", "train")["labels_sha256"]
    rows = store.summary()
    assert [(r["member"], r["rows"], r["dim"]) for r in rows] == [("a", 50, 6), ("b", 50, 4)]


def test_chunks_are_whole_rows_of_about_8_mib():
    assert layout.chunk_rows(2048, "float32") == 1024
    assert layout.chunk_rows(128, "float32") == 16384
    assert layout.chunk_rows(2048, "float16") == 2048


def test_writer_writes_whole_chunks_only(tmp_path):
    store = cache.open(str(tmp_path / "c.zarr"), mode="a")
    store.write_labels("toy", "train", np.zeros(10, dtype=int), "fp", ["c"])
    writer = store.create_features("toy", "train", "m", 2, {})
    writer.rows_per_chunk = 4  # as if chunks held 4 rows
    writer.append(np.ones((3, 2), np.float32))
    assert writer.next_row == 0  # less than a chunk: nothing written yet
    writer.append(np.ones((6, 2), np.float32))
    assert writer.next_row == 8
    assert writer.close() == 9


def test_unwritten_rows_keep_member_writing(tmp_path):
    store = cache.open(str(tmp_path / "c.zarr"), mode="a")
    store.write_labels("toy", "train", np.zeros(10, dtype=int), "fp", ["c"])
    writer = store.create_features("toy", "train", "m", 3, {"dataset_fingerprint": "fp"})
    writer.append(np.ones((4, 3), np.float32))
    writer.close()
    with pytest.raises(cache.CacheError, match="unwritten or NaN rows"):
        store.finish_features("toy", "train", "m")
    assert store.status("toy", "train", "m") == "writing"
    with pytest.raises(cache.CacheError, match="member m is 'writing'"):
        store.features("toy", "train", ["m"])


def test_unknown_member_lists_available(tmp_path):
    make_cache(tmp_path / "c.zarr")
    with pytest.raises(cache.CacheError, match=r"unknown member\(s\) \['zz'\].*available: \['a', 'b'\]"):
        cache.open(str(tmp_path / "c.zarr")).features("toy", "train", ["a", "zz"])


def test_member_from_other_dataset_is_refused_by_name(tmp_path):
    make_cache(tmp_path / "c.zarr")
    store = add_member(tmp_path / "c.zarr", "odd", 2, "other")
    with pytest.raises(cache.CacheError, match="member odd was extracted from a different toy/train"):
        store.features("toy", "train", ["a", "odd"])


def test_labels_must_agree(tmp_path):
    make_cache(tmp_path / "c.zarr")
    store = cache.open(str(tmp_path / "c.zarr"), mode="a")
    store.write_labels("toy", "train", np.arange(50) % 5, "fp0", [])  # same: accepted
    with pytest.raises(cache.CacheError, match="cached with other labels .*same fingerprint fp0"):
        store.write_labels("toy", "train", np.zeros(50, dtype=int), "fp0", [])


def test_float16_refuses_out_of_range(tmp_path):
    store = cache.open(str(tmp_path / "c.zarr"), mode="a")
    store.write_labels("toy", "train", np.zeros(4, dtype=int), "fp", ["c"])
    writer = store.create_features("toy", "train", "m", 2, {}, dtype="float16")
    with pytest.raises(cache.CacheError, match="exceeds float16"):
        writer.append(np.full((4, 2), 1e6, np.float32))
    with pytest.raises(cache.CacheError, match="NaN or inf"):
        writer.append(np.full((4, 2), np.inf, np.float32))


def test_float16_round_trip_widens_to_float32(tmp_path):
    arrays, _ = make_cache(tmp_path / "c.zarr", dtype="float16")
    X, _ = cache.open(str(tmp_path / "c.zarr")).features("toy", "train", ["a"])
    assert X.dtype == np.float32
    np.testing.assert_allclose(X, arrays["a"], rtol=2**-10, atol=1e-4)


def test_read_only_cache_refuses_writes_and_missing_cache_is_explained(tmp_path):
    make_cache(tmp_path / "c.zarr")
    with pytest.raises(cache.CacheError, match="read-only"):
        cache.open(str(tmp_path / "c.zarr")).write_labels("x", "y", np.zeros(1), "f", [])
    with pytest.raises(cache.CacheError, match="run `timecat extract` first"):
        cache.open(str(tmp_path / "absent.zarr"))
    with pytest.raises(cache.CacheError, match="dataset 'nope' is not in the cache"):
        cache.open(str(tmp_path / "c.zarr")).labels("nope", "train")


def test_bad_names_are_refused(tmp_path):
    store = cache.open(str(tmp_path / "c.zarr"), mode="a")
    with pytest.raises(cache.CacheError, match="invalid member name"):
        store.write_labels("toy", "train", np.zeros(2, dtype=int), "fp", ["c"])
        store.create_features("toy", "train", "a/b", 2, {})


def test_cache_imports_nothing_but_numpy_zarr_numcodecs():
    banned = "{'torch', 'pipeline', 'ffcv', 'torchvision', 'sklearn'}"
    code = f"import sys, cache; print({banned} & set(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "set()"


def test_nan_written_into_a_complete_member_is_refused(tmp_path):
    make_cache(tmp_path / "c.zarr")
    store = cache.open(str(tmp_path / "c.zarr"), mode="a")
    store.group["toy/train/features/b"][7] = np.nan  # damage after it was marked complete
    store.features("toy", "train", ["a", "b"])  # the fast path trusts 'complete' and the chunk count
    with pytest.raises(cache.CacheError, match="member b holds non-finite \\(NaN or inf\\) values in toy/train"):
        store.features("toy", "train", ["a", "b"], scan_nan=True)


def test_a_complete_member_with_a_missing_chunk_is_refused(tmp_path):
    import shutil

    make_cache(tmp_path / "c.zarr")
    shutil.rmtree(tmp_path / "c.zarr/toy/train/features/a/c")  # as an interrupted copy of the cache leaves it
    store = cache.open(str(tmp_path / "c.zarr"))
    with pytest.raises(cache.CacheError, match=r"member a of toy/train is missing 1 of its 1 chunks"):
        store.features("toy", "train", ["a", "b"])


def test_non_finite_features_name_the_rows_and_stay_writing(tmp_path):
    store = cache.open(str(tmp_path / "c.zarr"), mode="a")
    store.write_labels("toy", "train", np.zeros(10, dtype=int), "fp", ["c"])
    writer = store.create_features("toy", "train", "m", 2, {})
    writer.append(np.ones((4, 2), np.float32))
    block = np.ones((4, 2), np.float32)
    block[1, 0], block[3, 1] = np.nan, np.inf
    with pytest.raises(cache.CacheError, match=r"toy/train/features/m: 2 row\(s\) of non-finite.*rows \[5, 7\]"):
        writer.append(block)
    assert store.status("toy", "train", "m") == "writing"


def test_resume_starts_at_the_first_unwritten_chunk(tmp_path):
    store = cache.open(str(tmp_path / "c.zarr"), mode="a")
    store.write_labels("toy", "train", np.zeros(10, dtype=int), "fp", ["c"])
    X = np.arange(20, dtype=np.float32).reshape(10, 2)
    writer = store.create_features("toy", "train", "m", 2, {"dataset_fingerprint": "fp"}, chunk_rows=4)
    writer.append(X[:6])  # one whole chunk reaches the store; 2 rows stay buffered, as if killed
    assert store.first_unwritten_row("toy", "train", "m") == 4
    resumed = store.resume_features("toy", "train", "m")
    assert resumed.next_row == 4
    resumed.append(X[4:])
    resumed.close()
    store.finish_features("toy", "train", "m")
    np.testing.assert_array_equal(store.features("toy", "train", ["m"])[0], X)


def test_a_truncated_chunk_counts_as_unwritten(tmp_path):
    store = cache.open(str(tmp_path / "c.zarr"), mode="a")
    store.write_labels("toy", "train", np.zeros(8, dtype=int), "fp", ["c"])
    writer = store.create_features("toy", "train", "m", 2, {}, chunk_rows=4)
    writer.append(np.ones((8, 2), np.float32))
    writer.close()
    chunk = tmp_path / "c.zarr/toy/train/features/m/c/1/0"
    chunk.write_bytes(chunk.read_bytes()[:5])  # as if the writer was killed mid-file
    assert store.first_unwritten_row("toy", "train", "m") == 4


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "a\\b", ".hidden", "", " pad"])
def test_names_that_could_escape_the_store_are_refused(name):
    from pipeline.configs import PrepareConfig, PretrainConfig

    with pytest.raises(cache.CacheError, match="invalid member name"):
        layout.check_name("member", name)
    with pytest.raises(cache.CacheError, match="invalid member name"):
        PretrainConfig(name, "digits", 0, 10)
    with pytest.raises(cache.CacheError, match="invalid dataset name"):
        PrepareConfig("imagefolder", "data", name=name or "/")


def _toy_member(tmp_path, rows=16, chunk=4):
    store = cache.open(str(tmp_path / "c.zarr"), mode="a")
    store.write_labels("toy", "train", np.zeros(rows, dtype=int), "fp", ["c"])
    store.create_features("toy", "train", "m", 3, {"dataset_fingerprint": "fp"}, chunk_rows=chunk)
    return store, np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)


def test_background_writer_writes_in_order_and_raises_the_threads_error(tmp_path):
    store, X = _toy_member(tmp_path)
    background = cache.BackgroundWriter(max_pending=2)
    writer = store.resume_features("toy", "train", "m")
    for start in range(0, 16, 3):
        background.append(writer, X[start : start + 3])
    background.close()
    store.finish_features("toy", "train", "m")
    np.testing.assert_array_equal(store.features("toy", "train", ["m"])[0], X)

    store, X = _toy_member(tmp_path / "nan")
    X[9, 1] = np.nan
    background = cache.BackgroundWriter(max_pending=1)
    writer = store.resume_features("toy", "train", "m")
    with pytest.raises(cache.CacheError, match=r"non-finite.*rows \[9\]"):
        for start in range(0, 16, 2):
            background.append(writer, X[start : start + 2])
        background.close()
    assert store.status("toy", "train", "m") == "writing"
    assert store.first_unwritten_row("toy", "train", "m") == 8  # chunks before the bad row are kept


def test_an_aborted_background_writer_keeps_whole_chunks_only(tmp_path):
    store, X = _toy_member(tmp_path)
    background = cache.BackgroundWriter()
    writer = store.resume_features("toy", "train", "m")
    background.append(writer, X[:6])  # one whole chunk of 4 rows, and 2 rows of the next
    background.abort()
    assert writer.next_row == 4 and store.first_unwritten_row("toy", "train", "m") == 4


def test_a_full_disk_is_a_clear_error_and_no_chunk_counts_as_written(tmp_path, monkeypatch):
    import errno

    import zarr.storage._local as local

    store, X = _toy_member(tmp_path)
    real_put, chunk_writes = local._put, []

    def put(path, value, exclusive=False):
        if "/c/" in str(path):
            chunk_writes.append(path)
            if len(chunk_writes) == 3:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(bytes(value.as_buffer_like())[:7])  # a partial file, as a full disk leaves
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(path, value, exclusive)

    monkeypatch.setattr(local, "_put", put)
    writer = store.resume_features("toy", "train", "m")
    full = r"no space left .* rows 8-11 of toy/train/features/m.*resumes from row 8"
    with pytest.raises(cache.CacheError, match=full):
        for start in range(0, 16, 4):
            writer.append(X[start : start + 4])
    assert writer.next_row == 8
    monkeypatch.setattr(local, "_put", real_put)
    assert store.first_unwritten_row("toy", "train", "m") == 8
    with pytest.raises(cache.CacheError, match="unwritten or NaN rows from row 8"):
        store.finish_features("toy", "train", "m")
    resumed = store.resume_features("toy", "train", "m")
    resumed.append(X[resumed.next_row :])
    resumed.close()
    store.finish_features("toy", "train", "m")
    np.testing.assert_array_equal(store.features("toy", "train", ["m"])[0], X)


def test_a_second_writer_of_the_same_member_is_refused_by_name(tmp_path):
    first, _ = _toy_member(tmp_path)
    second = cache.open(str(tmp_path / "c.zarr"), mode="a")
    with first.lock("toy", "train", "m"):
        busy = r"member m of toy/train is being written by another process.*pid"
        with pytest.raises(cache.CacheError, match=busy), second.lock("toy", "train", "m"):
            pass
        with second.lock("toy", "train", "other"):  # other members stay free
            pass
        assert locks.holder(str(tmp_path / "c.zarr.locks/toy/train/m.lock"))["pid"] == os.getpid()
    assert locks.holder(str(tmp_path / "c.zarr.locks/toy/train/m.lock")) is None
    with second.lock("toy", "train", "m"):  # released with the first holder
        pass
    # The lock lives beside the store, so zarr never sees a foreign file inside it.
    assert (tmp_path / "c.zarr.locks/toy/train/m.lock").is_file()


def test_views_of_members_drawn_with_different_seeds_are_refused(tmp_path):
    store = cache.open(str(tmp_path / "c.zarr"), mode="a")
    store.write_labels("toy", "train", np.zeros(6, dtype=int), "fp", ["c"])
    for member, seed in (("a", 0), ("b", 0), ("c", 1)):
        prov = {"dataset_fingerprint": "fp", "view_seed": seed}
        writer = store.create_features("toy", "train", member, 2, prov, view=0)
        writer.append(np.full((6, 2), seed, np.float32))
        writer.close()
        store.finish_features("toy", "train", member, view=0)
    assert store.views("toy", "train") == [0] and store.members("toy", "train") == []
    X, _ = store.features("toy", "train", ["a", "b"], view=0)
    assert X.shape == (6, 4)
    with pytest.raises(cache.CacheError, match=r"views of toy/train view 0 come from different view seeds"):
        store.features("toy", "train", ["a", "c"], view=0)
    with pytest.raises(cache.CacheError, match=r"unknown member\(s\) \['a'\] for toy/train; available: none"):
        store.features("toy", "train", ["a"])
    verified = store.verify()  # one invariant, read or verified: the views of a split share one seed
    assert [(r["view"], r["member"], r["ok"]) for r in verified] == [(0, "a", False), (0, "b", False), (0, "c", False)]
    assert all("come from different view seeds" in r["problems"][0] for r in verified)
