"""Members trained elsewhere: every naming scheme imports to torchvision's exact features; export round-trips."""

import pickle

import pytest
import torch
from conftest import make_imagefolder
from torchvision.models import resnet50

import cache
from pipeline.core.errors import TimecatError
from pipeline.members import checkpoints, interop


@pytest.fixture(scope="module")
def reference():
    """A random torchvision ResNet-50 (eval mode), its state dict, an input batch and its features."""
    torch.manual_seed(0)
    net = resnet50(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        net.fc, fc = torch.nn.Identity(), net.fc
        features = net(x)
        net.fc = fc
    return net.state_dict(), x, features


def paper_names(state: dict, prefix: str) -> dict:
    renamed = {}
    for key, value in state.items():
        key = key.replace(".downsample.0.", ".downsample.conv.").replace(".downsample.1.", ".downsample.bn.")
        renamed[prefix + key] = value
    return renamed


SCHEMES = {
    "algoperf": lambda s: {"model_params": paper_names(s, "module."), "global_step": 100_000},
    "compiled_ddp": lambda s: {"state_dict": paper_names(s, "_orig_mod.module.")},
    "model0": lambda s: paper_names(s, "module.model0."),
    "torchvision": lambda s: dict(s),
}


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_every_naming_scheme_gives_torchvisions_features_exactly(reference, tmp_path, scheme):
    state, x, expected = reference
    path = tmp_path / f"{scheme}.pt"
    torch.save(SCHEMES[scheme](state), path)
    payload = interop.load_foreign(path)
    model = checkpoints.load_model(payload, str(path)).eval()
    with torch.no_grad():
        assert torch.equal(model.backbone(x), expected)
    assert payload["member"]["arch"] == "resnet50" and payload["preprocess"]["resolution"] == 224


def test_missing_or_unexpected_backbone_keys_are_listed(reference, tmp_path):
    state, _, _ = reference
    broken = {k: v for k, v in state.items() if k != "layer1.0.conv1.weight"}
    broken["layer9.extra.weight"] = torch.zeros(1)
    torch.save({"model_params": broken}, tmp_path / "broken.pt")
    with pytest.raises(
        TimecatError, match=r"missing \['layer1.0.conv1.weight'\].*unexpected \['layer9.extra.weight'\]"
    ):
        interop.load_foreign(tmp_path / "broken.pt")


def test_a_pickle_that_is_not_just_tensors_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"model_params": {"w": object()}}, protocol=2))
    with pytest.raises(TimecatError, match="evil.pt: not a loadable checkpoint"):
        interop.load_foreign(path)


def test_export_loads_into_torchvision_strictly(reference, tmp_path):
    state, x, expected = reference
    torch.save(state, tmp_path / "tv.pt")
    payload = interop.load_foreign(tmp_path / "tv.pt")
    out, _ = interop.export_torchvision(payload, tmp_path / "export" / "member.pth")
    net = resnet50(weights=None, num_classes=payload["num_classes"])
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    net.fc = torch.nn.Identity()
    with torch.no_grad():
        assert torch.equal(net.eval()(x), expected)
    small = {"member": {"arch": "small-resnet"}, "model": {}}
    with pytest.raises(TimecatError, match="only resnet50-family members export"):
        interop.export_torchvision(small, tmp_path / "no.pth")


def test_extract_takes_a_foreign_checkpoint_as_a_member(reference, tmp_path):
    from pipeline.configs import ExtractConfig, PrepareConfig
    from pipeline.data.prepare import prepare
    from pipeline.features.extract import extract

    make_imagefolder(tmp_path / "train", per_class=2)
    make_imagefolder(tmp_path / "val", per_class=1)
    data = tmp_path / "data"
    prepare(PrepareConfig("imagefolder", data, "pets", tmp_path / "train", tmp_path / "val"))
    state, _, _ = reference
    torch.save({"model_params": paper_names(state, "module.")}, tmp_path / "seed2.pt")
    member = f"paper2={tmp_path / 'seed2.pt'}"
    extract(ExtractConfig("pets", (member,), batch_size=8), data, tmp_path / "runs", str(tmp_path / "c.zarr"))
    store = cache.open(str(tmp_path / "c.zarr"))
    X, y = store.features("pets", "train", ["paper2"])
    assert X.shape == (6, 2048) and len(y) == 6
    prov = store.provenance("pets", "train", "paper2")
    assert prov["arch"] == "resnet50" and prov["checkpoint_sha256"] == checkpoints.sha256(tmp_path / "seed2.pt")


def test_export_command_writes_a_torchvision_file(reference, tmp_path):
    from click.testing import CliRunner

    import cli

    state, _, _ = reference
    torch.save({"state_dict": paper_names(state, "_orig_mod.module.")}, tmp_path / "c.pt")
    args = ["export", str(tmp_path / "c.pt"), "--out", str(tmp_path / "tv.pth")]
    result = CliRunner().invoke(cli.main, args, catch_exceptions=False)
    assert result.exit_code == 0 and "torchvision resnet50" in result.output
    resnet50(weights=None).load_state_dict(torch.load(tmp_path / "tv.pth", weights_only=True))  # its own fc, kept
    result = CliRunner().invoke(cli.main, ["export", "run9", "--out", str(tmp_path / "x.pth"), "--runs", str(tmp_path)])
    assert result.exit_code == 1 and "unknown member 'run9': no " in result.output
