"""The logreg backends agree with scikit-learn on real features at the same C."""

import numpy as np
import pytest
import torch
from conftest import fashion_subset

from pipeline import backends
from pipeline.errors import TimecatError
from pipeline.probe import ProbeConfig, probe_matrices, standardize, topk_accuracy


@pytest.fixture(scope="module")
def fashion_pixels():
    """6,000 / 2,000 real Fashion-MNIST images as standardised 784-d float32 rows."""
    data = fashion_subset(6000, 2000)
    (X_train, y_train), (X_eval, y_eval) = data["train"], data["test"]
    X_train = X_train.reshape(len(X_train), -1).astype(np.float32)
    X_eval = X_eval.reshape(len(X_eval), -1).astype(np.float32)
    standardize(X_train, X_eval)
    return X_train, y_train, X_eval, y_eval


def fit_top1(name, data, C, **kwargs):
    X_train, y_train, X_eval, y_eval = data
    model = backends.make(name, backends.FitOptions(10), **kwargs)
    assert model.fit(X_train, y_train, C, max_iter=1000), f"{name} did not converge"
    return topk_accuracy(model.topk(X_eval, 1), y_eval, 1), model


@pytest.mark.parametrize("C", [0.01, 0.1])
def test_torch_agrees_with_sklearn_within_0_3_points(fashion_pixels, C):
    reference, _ = fit_top1("sklearn", fashion_pixels, C)
    ours, _ = fit_top1("torch", fashion_pixels, C)
    assert 80 < reference < 90
    assert abs(ours - reference) <= 0.3, (ours, reference)


def test_streamed_blocks_reach_the_same_fit_as_resident_data(fashion_pixels, monkeypatch):
    resident_top1, resident = fit_top1("torch", fashion_pixels, 0.1)
    # As when the data does not fit the device: every evaluation streams ~100-row blocks.
    monkeypatch.setattr(backends, "BLOCK_BYTES", 100 * 4 * (784 + 10))
    monkeypatch.setattr(backends.TorchBackend, "_resident", lambda self, X: False)
    streamed_top1, streamed = fit_top1("torch", fashion_pixels, 0.1)
    assert streamed_top1 == pytest.approx(resident_top1, abs=0.1)
    X_eval = fashion_pixels[2]
    same = (streamed.topk(X_eval, 1) == resident.topk(X_eval, 1)).mean()
    assert same >= 0.995  # the same optimum up to L-BFGS's tolerance: the same predictions


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cuml", "torch"])
def test_gpu_backends_agree_with_sklearn(fashion_pixels, name):
    pytest.importorskip("cuml") if name == "cuml" else None
    reference, _ = fit_top1("sklearn", fashion_pixels, 0.1)
    ours, _ = fit_top1(name, fashion_pixels, 0.1)
    assert abs(ours - reference) <= 0.3, (ours, reference)


def test_backend_choice_is_explicit_and_recorded():
    choices = r"\['auto', 'sklearn', 'torch', 'cuml'\]"
    with pytest.raises(TimecatError, match=rf"unknown backend 'jax'; choose one of {choices}"):
        ProbeConfig("d", ("a",), backend="jax")
    assert backends.choose("sklearn", 10, 2) == ("sklearn", "asked for")
    if not torch.cuda.is_available():
        assert backends.choose("auto", 1000, 10)[0] == "sklearn"
        assert backends.choose("auto", 437_513, 8142)[0] == "torch"  # full iNat18: logits streamed
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(200, 5)).astype(np.float32), np.arange(200) % 2
    result = probe_matrices(X.copy(), y, X.copy(), y, ProbeConfig("d", ("a",), backend="torch"))
    assert result["backend"] == "torch" and result["backend_reason"] == "asked for"


def test_cuml_without_the_gpu_extra_or_beyond_32_bit_indexing_is_refused():
    try:
        import cuml  # noqa: F401
    except ImportError:
        with pytest.raises(TimecatError, match=r"cuml backend needs the gpu extra.*timecat\[gpu\]"):
            backends.make("cuml", backends.FitOptions(10))
        return
    model = backends.make("cuml", backends.FitOptions(8142))
    X = np.zeros((300_000, 1), np.float32)  # 300k x 8142 > 2^31
    with pytest.raises(TimecatError, match="32-bit ints.*use --backend torch"):
        model.fit(X, np.zeros(300_000, np.int64), 1.0, 10)


@pytest.mark.parametrize("name", ["sklearn", "torch"])
def test_two_class_problems_rank_both_classes(name):
    # scikit-learn scores two classes with one column; top-k must still rank both.
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    X = (rng.normal(size=(400, 8)) + 2.0 * y[:, None]).astype(np.float32)
    model = backends.make(name, backends.FitOptions(2))
    model.fit(X, y, C=1.0, max_iter=200)
    ranked = model.topk(X, 5)
    assert ranked.shape == (400, 2) and np.mean(ranked[:, 0] == y) > 0.95 and np.all(ranked[:, 0] != ranked[:, 1])
