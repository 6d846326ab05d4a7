"""Architectures, checkpoints and the learning-rate schedule."""

import argparse
import itertools

import pytest
import torch

from pipeline.configs import PretrainConfig
from pipeline.core.errors import TimecatError
from pipeline.members import checkpoints, torch_io
from pipeline.members.models import build
from pipeline.train.pretrain import lr_factor, make_optimizer


def test_small_resnet_features_and_logits():
    model = build("small-resnet", 10).eval()
    x = torch.randn(3, 3, 28, 28)
    assert model.backbone(x).shape == (3, 128)
    assert model(x).shape == (3, 10)
    assert model.backbone(torch.randn(2, 3, 32, 32)).shape == (2, 128)  # any input size


def test_resnet50_is_torchvisions_with_2048_features():
    from torchvision.models import resnet50

    model = build("resnet50", 7).eval()
    assert model.feature_dim == 2048
    reference = resnet50(weights=None)
    # Same weights, same penultimate features: the backbone is torchvision's, fc removed.
    state = {k: v for k, v in model.backbone.state_dict().items()}
    reference.load_state_dict({**state, "fc.weight": reference.fc.weight, "fc.bias": reference.fc.bias})
    reference.fc = torch.nn.Identity()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x), reference.eval()(x))


def test_unknown_arch_lists_the_choices():
    choices = r"\['resnet50', 'resnet50w2', 'small-resnet'\]"
    with pytest.raises(TimecatError, match=rf"unknown architecture 'vit'; choose one of {choices}"):
        build("vit", 10)
    # The config says the same, and that timm and torchvision models are architectures too.
    with pytest.raises(TimecatError, match=rf"unknown architecture 'vit'; choose one of {choices}, or timm:<model>"):
        PretrainConfig("run0", "digits", 0, 10, arch="vit")


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, 100, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert factors[-1] < 0.01


def test_no_weight_decay_on_batchnorm_and_biases():
    model = build("small-resnet", 10)
    groups = make_optimizer(model, PretrainConfig("run0", "digits", 0, 10)).param_groups
    assert groups[0]["weight_decay"] == 5e-4 and all(p.ndim > 1 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0.0 and all(p.ndim == 1 for p in groups[1]["params"])


def test_checkpoint_save_is_atomic_and_load_is_strict(tmp_path):
    model = build("small-resnet", 10)
    payload = {"model": model.state_dict(), "member": {"arch": "small-resnet"}, "num_classes": 10}
    checkpoints.save(tmp_path / "m/checkpoint.pt", payload)
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["checkpoint.pt"]
    loaded = checkpoints.load_model(checkpoints.load(tmp_path / "m/checkpoint.pt"), "test")
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())
    state = dict(model.state_dict())
    state["extra.weight"] = state.pop("head.weight")
    with pytest.raises(TimecatError, match=r"missing \['head.weight'\].*unexpected \['extra.weight'\]"):
        torch_io.load_state_strict(build("small-resnet", 10), state, "bad.pt")


def test_loading_refuses_garbage_and_foreign_pickles(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"nope")
    with pytest.raises(TimecatError, match="junk.pt: not a loadable checkpoint"):
        checkpoints.load(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(TimecatError, match="not a timecat checkpoint"):
        checkpoints.load(tmp_path / "other.pt")
    # Any class outside torch's allow-list is refused by weights_only=True.
    torch.save({"model": argparse.Namespace(x=1), "member": {}}, tmp_path / "evil.pt")
    with pytest.raises(TimecatError, match="evil.pt: not a loadable checkpoint"):
        checkpoints.load(tmp_path / "evil.pt")


def test_preprocessing_takes_the_dataset_defaults_and_train_statistics():
    from pipeline.train.pretrain import make_preprocess

    manifest = {"kind": "imagenet", "mean": [120.0, 110.0, 100.0], "std": [60.0, 58.0, 57.0]}
    pre = make_preprocess(PretrainConfig("run0", "imagenet", 0, 10, arch="resnet50"), manifest)
    assert (pre.resolution, pre.crop_ratio, pre.crop_scale) == (224, 224 / 256, (0.08, 1.0))
    assert pre.mean == (120.0, 110.0, 100.0)
    small = make_preprocess(PretrainConfig("run0", "x", 0, 10, resolution=32), {**manifest, "kind": "cifar10"})
    assert (small.resolution, small.crop_ratio) == (32, 1.0)


def test_resnet50w2_doubles_every_width_like_the_papers_table_2():
    from pipeline.members.models import build

    params = sum(p.numel() for p in build("resnet50w2", 1000).backbone.parameters())  # the paper counts no fc
    assert abs(params - 93.9e6) / 93.9e6 < 0.01  # Table 2: ResNet50W2 (93.9M)
    assert build("resnet50w2", 10).feature_dim == 4096 and build("resnet50", 10, width=3).feature_dim == 6144
    with pytest.raises(TimecatError, match=r"resnet50w2 does not take width 3; allowed: \[2\]"):
        build("resnet50w2", 10, width=3)
    with pytest.raises(TimecatError, match=r"small-resnet does not take width 2; allowed: \[1\]"):
        build("small-resnet", 10, width=2)


def test_scaled_resnet50_at_width_1_is_torchvisions_resnet50():
    from torchvision.models import resnet50

    from pipeline.members.models import ScaledResNet50

    torch.manual_seed(0)
    reference = resnet50(weights=None).eval()
    reference.fc = torch.nn.Identity()
    ours = ScaledResNet50(1).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)  # the same module names
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x))
