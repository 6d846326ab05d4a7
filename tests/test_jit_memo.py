"""FFCV's pipeline functions compiled once per process (pipeline.data.jit_memo), never shared when they differ."""

import collections
import dataclasses

import numba
import numpy as np
import pytest
import torch
from conftest import make_fashion_root

from pipeline.configs import PrepareConfig, PretrainConfig
from pipeline.data import jit_memo
from pipeline.data.prepare import prepare
from pipeline.data.splits import beton_path, read_manifest
from pipeline.train.pretrain import make_preprocess


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_fashion_root(tmp_path_factory.mktemp("jit") / "data", n_train=256, n_test=64)
    prepare(PrepareConfig("fashion-mnist", root))
    return root


def _first_batch(data, seed: int, mean=None, eval_split: bool = False) -> tuple[torch.Tensor, dict]:
    """The first batch of a new train (or eval) loader, and how many functions it compiled or reused."""
    from pipeline.data.loaders import eval_loader, one_epoch, train_loader

    manifest = read_manifest(data, "fashion-mnist", "train")
    pre = make_preprocess(PretrainConfig("x", "fashion-mnist", 0, 1), manifest)
    if mean is not None:
        pre = dataclasses.replace(pre, mean=mean)
    before = dict(jit_memo.COUNTS)
    beton = beton_path(data, "fashion-mnist", "train")
    loader = eval_loader(beton, pre, 32, 2) if eval_split else train_loader(beton, pre, 32, seed, 2)[0]
    with one_epoch(loader) as epoch:
        images = next(epoch)[0].clone()
    return images, {k: jit_memo.COUNTS[k] - before[k] for k in before}


def test_a_second_identical_loader_reuses_the_compiled_pipeline_and_yields_the_same_batch(data):
    first, _ = _first_batch(data, seed=3)
    again, counts = _first_batch(data, seed=3)
    assert counts["compiled"] == 0 and counts["reused"] >= 2 and counts["unkeyable"] == 0, counts
    assert torch.equal(first, again)  # the same machine code in the same process
    _, counts = _first_batch(data, seed=3, eval_split=True)
    assert counts["unkeyable"] == 0, counts


def test_a_loader_that_differs_in_a_closed_over_value_compiles_its_own(data):
    # The seed is a closure scalar of the crop and the normalisation table an array: numba bakes both into
    # the machine code, so sharing the first loader's would hand back its crops and its colours.
    base, _ = _first_batch(data, seed=11)
    other_seed, counts = _first_batch(data, seed=12)
    assert counts["compiled"] >= 1 and not torch.equal(base, other_seed), counts
    other_mean, counts = _first_batch(data, seed=11, mean=(10.0, 20.0, 30.0))
    assert counts["compiled"] >= 1 and not torch.equal(base, other_mean), counts


def test_keys_tell_apart_what_numba_compiles_apart():
    frozen = jit_memo._frozen
    a = np.arange(4, dtype=np.float32)
    assert frozen(a) == frozen(a.copy()) and frozen(a) != frozen(a + 1) and frozen(a) != frozen(a.astype(np.int32))
    assert frozen(np.uint64(3)) != frozen(3) != frozen(3.0)  # numba types these differently

    def make(value, offset=0):
        def f(x):
            return x + value + offset

        return f

    assert frozen(make(1)) == frozen(make(1)) and frozen(make(1)) != frozen(make(2))
    assert frozen(make(1)) != frozen(make(1, offset=1))
    # What compares equal in Python but compiles apart in numba.
    assert frozen(0.0) != frozen(-0.0) and frozen(np.float64(0.0)) != frozen(np.float64(-0.0))
    Pair = collections.namedtuple("Pair", "a b")
    assert frozen((1, 2)) != frozen(Pair(1, 2)) and frozen(True) != frozen(1)
    a, b = np.zeros(2, dtype=[("x", "<i4"), ("y", "<i4")]), np.zeros(2, dtype=[("u", "<i4"), ("v", "<i4")])
    assert a.tobytes() == b.tobytes() and frozen(a) != frozen(b)

    def with_default(k):
        def f(x, k=k):
            return x + k

        return f

    assert frozen(with_default(1)) != frozen(with_default(2))
    with pytest.raises(jit_memo._UnkeyableError):
        frozen(make({"a": 1}))  # a dict could change after compilation: never keyed


def test_an_unkeyable_closure_and_a_leaf_are_compiled_as_ffcv_does():
    from ffcv.pipeline.compiler import Compiler

    import pipeline.data.loaders  # noqa: F401  installs the memo

    def leaf(x):
        return x + 1

    assert Compiler.compile(leaf) is not Compiler.compile(leaf)  # closure-less: never shared
    table = {"a": 1}

    def closure(x):
        return x + len(table)

    before = jit_memo.COUNTS["unkeyable"]
    compiled = Compiler.compile(closure)
    assert isinstance(compiled, numba.core.dispatcher.Dispatcher) and jit_memo.COUNTS["unkeyable"] == before + 1
