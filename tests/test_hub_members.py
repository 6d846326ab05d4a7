"""Members from timm and torchvision (pipeline.members.hub): pretrained models as cached members, offline.

timm's test models (test_vit: a 64-d ViT with 16 px patches; test_resnet: a 96-d ResNet) get random, seeded
weights saved to files, and stand in for the pretrained models a user names the same way.
"""

import json

import numpy as np
import pytest
import torch
from conftest import run

import cache
from pipeline.features.extract import extract_batch, frozen_member
from pipeline.members import hub
from pipeline.members.checkpoints import sha256

timm = pytest.importorskip("timm")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Seeded random weights of timm's test_vit (safetensors) and test_resnet (a DDP-wrapped torch file)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    vit = timm.create_model("test_vit").eval()  # its tag's 1,000 classes, as a real cached file has
    save_file(vit.state_dict(), str(root / "vit.safetensors"))
    cnn = timm.create_model("test_resnet", num_classes=7).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in cnn.state_dict().items()}}, root / "cnn.pth")
    return {"root": root, "vit": (vit, root / "vit.safetensors"), "cnn": (cnn, root / "cnn.pth")}


def _timm_features(net, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return net.forward_head(net.forward_features(x), pre_logits=True).numpy()


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_features_are_timms_own_pre_logits(weights, kind):
    net, path = weights[kind]
    model = "test_vit" if kind == "vit" else "test_resnet"
    member = frozen_member("unused-runs", f"m=timm:{model}@{path}", CPU)
    x = torch.randn(6, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    ours = extract_batch([member.model], x.contiguous(memory_format=torch.channels_last))[0]
    # channels_last convolutions may sum in another order: equal within float32 rounding, not bitwise.
    np.testing.assert_allclose(ours, _timm_features(net, x), rtol=1e-4, atol=1e-5)
    assert member.model.feature_dim == (64 if kind == "vit" else 96) and member.sha256 == sha256(path)
    # The model's own pretrained config, as timm resolves it (test_vit: bicubic, test_resnet: bilinear).
    stated = timm.data.resolve_model_data_config(net)
    pre = member.payload["preprocess"]
    assert (pre["resolution"], pre["crop_ratio"], pre["mean"]) == (160, stated["crop_pct"], [127.5] * 3)
    assert member.payload["model_config"]["interpolation"] == stated["interpolation"]


def test_timms_pretrained_weights_come_from_the_local_hugging_face_cache(weights, tmp_path, monkeypatch):
    from huggingface_hub import constants

    net, path = weights["vit"]
    snapshot = tmp_path / "hub/models--timm--test_vit.r160_in1k/snapshots/0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(path.read_bytes())
    (tmp_path / "hub/models--timm--test_vit.r160_in1k/refs").mkdir()
    (tmp_path / "hub/models--timm--test_vit.r160_in1k/refs/main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    member = frozen_member("unused-runs", "timm:test_vit", CPU)  # no name: named after the model
    assert member.name == "test_vit" and member.payload["member"]["arch"] == "timm:test_vit.r160_in1k"
    assert member.weights_source() == {
        "library": "timm",
        "tag": "r160_in1k",
        "path": str(snapshot / "model.safetensors"),
        "sha256": sha256(path),
    }
    x = torch.randn(2, 3, 160, 160)
    np.testing.assert_allclose(extract_batch([member.model], x)[0], _timm_features(net, x), rtol=1e-4, atol=1e-5)


def test_a_damaged_file_in_the_hugging_face_cache_is_refused_not_loaded_in_part(weights, tmp_path, monkeypatch):
    from huggingface_hub import constants
    from safetensors.torch import save_file

    from pipeline.core.errors import TimecatError

    state = dict(weights["vit"][0].state_dict())
    state.pop("blocks.0.attn.qkv.weight")  # a file missing a tensor: timm must not leave it random
    snapshot = tmp_path / "hub/models--timm--test_vit.r160_in1k/snapshots/0123abcd"
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / "model.safetensors"))
    (tmp_path / "hub/models--timm--test_vit.r160_in1k/refs").mkdir()
    (tmp_path / "hub/models--timm--test_vit.r160_in1k/refs/main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(TimecatError, match=r"timm could not load it as test_vit.r160_in1k .*blocks.0.attn.qkv"):
        frozen_member("unused-runs", "timm:test_vit", CPU)


def test_torchvision_models_come_from_a_file_or_torch_hubs_cache(tmp_path, monkeypatch):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    net = resnet18().eval()  # 1,000 classes, as torchvision's own file has
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (tmp_path / "torch/hub/checkpoints").mkdir(parents=True)
    (tmp_path / "torch/hub/checkpoints/resnet18-f37072fd.pth").write_bytes((tmp_path / "r18.pth").read_bytes())
    x = torch.randn(2, 3, 64, 64)
    net.fc = torch.nn.Identity()
    with torch.no_grad():
        expected = net(x).numpy()  # the input of torchvision's fc: the pooled 512-d features
    for member in (f"a=torchvision:resnet18@{tmp_path / 'r18.pth'}", "b=torchvision:resnet18.IMAGENET1K_V1"):
        m = frozen_member("unused-runs", member, CPU)
        np.testing.assert_allclose(extract_batch([m.model], x)[0], expected, rtol=1e-4, atol=1e-5)
        assert m.payload["preprocess"]["resolution"] == 224 and m.payload["preprocess"]["crop_ratio"] == 224 / 256
        assert m.payload["resize"] == {"kernel": "bilinear", "resize_px": 256, "crop_mode": "center"}
    assert m.weights_source()["weights"] == "IMAGENET1K_V1"


def test_extraction_is_the_models_own_eval_transform_on_real_photos(weights, tmp_path):
    """Crops of varied size from scikit-learn's two bundled photos, as an imagefolder: each member's cached
    features equal its own model on timm's own eval transform of the same files (PIL's Resize with the model's
    kernel, CenterCrop, ToTensor, Normalize), far closer than FFCV's area resize gets (measured: 2-5% of the
    features' norm on the worst image; the model's transform: under 0.1%)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos, rng = load_sample_images().images, np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "src" / label).mkdir(parents=True)
        for i in range(5):
            photo = photos[i % 2]
            h, w = (150, 150) if i == 4 else rng.integers(120, 256, size=2)  # one square image
            top, left = rng.integers(0, photo.shape[0] - h), rng.integers(0, photo.shape[1] - w)
            Image.fromarray(photo[top : top + h, left : left + w]).save(tmp_path / "src" / label / f"{i}.png")
    data, store = tmp_path / "data", str(tmp_path / "features.zarr")
    src = str(tmp_path / "src")
    assert run("prepare", "imagefolder", "--train", src, "--test", src, "--data-root", data).exit_code == 0
    specs = f"vit=timm:test_vit@{weights['vit'][1]},cnn=timm:test_resnet@{weights['cnn'][1]}"
    common = ("--dataset", "imagefolder", "--splits", "test", "--runs", tmp_path / "runs", "--batch-size", "5")
    common += ("--chunk-rows", "5", "--data-root", data, "--cache", store)
    out = run("extract", "--members", specs, *common)
    assert out.exit_code == 0, out.output

    paths = sorted((tmp_path / "src").glob("*/*.png"))  # the imagefolder reader's row order
    expected = {}
    for name, kernel in (("vit", "bicubic"), ("cnn", "bilinear")):
        net = weights[name][0]
        config = timm.data.resolve_model_data_config(net)
        transform = timm.data.create_transform(**config, is_training=False)
        expected[name] = _timm_features(net, torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]))
        features, _ = cache.open(store).features("imagefolder", "test", [name])
        error = np.linalg.norm(features - expected[name], axis=1) / np.linalg.norm(expected[name], axis=1)
        assert error.max() < 5e-3, (name, error)  # PIL rounds between its two resize passes; torch does not
        pre = cache.open(store).provenance("imagefolder", "test", name)["preprocessing"]
        assert (config["interpolation"], pre["interpolation"], pre["resize_px"]) == (kernel, kernel, 168)
    # Resumed from row 5 (a deleted chunk), as a rank or a requeued job starts mid-split: each image keeps its size.
    (tmp_path / "features.zarr/imagefolder/test/features/cnn/c/1/0").unlink()
    assert run("extract", "--members", specs, *common).exit_code == 0
    features, _ = cache.open(store).features("imagefolder", "test", ["cnn"])
    error = np.linalg.norm(features - expected["cnn"], axis=1) / np.linalg.norm(expected["cnn"], axis=1)
    assert error.max() < 5e-3, error


def test_a_models_resize_is_its_librarys_and_one_timecat_cannot_apply_is_refused():
    from pipeline.core.errors import TimecatError
    from pipeline.features.views import resized_size

    timm_config = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center"}
    assert hub.model_resize("m", timm_config) == {"kernel": "bicubic", "resize_px": 248, "crop_mode": "center"}
    torchvision = {"crop_size": 224, "resize_size": 232, "interpolation": "bilinear"}
    assert hub.model_resize("m", torchvision) == {"kernel": "bilinear", "resize_px": 232, "crop_mode": "center"}
    for bad, words in (
        ({"interpolation": "lanczos"}, "resizes with 'lanczos'"),
        ({"crop_mode": "border"}, "crop mode 'border'"),
        ({"crop_pct": 1.2}, "from a resize to 186 px"),
    ):
        with pytest.raises(TimecatError, match=words):
            hub.model_resize("m", {**timm_config, **bad})
    # torchvision's Resize(248) of a 300 x 500 image: 248 x 413 (truncated); timm's squash: 248 x 248.
    assert resized_size(300, 500, 248, "center") == (248, 413) and resized_size(500, 300, 248, "center") == (413, 248)
    assert resized_size(300, 500, 248, "squash") == (248, 248)


def test_members_of_different_widths_and_libraries_in_every_protocol_table_and_cka(weights, copy):
    """A 64-d ViT and a 96-d ResNet from timm, beside the 128-d small-resnets, extracted on digits."""
    specs = [f"vit=timm:test_vit@{weights['vit'][1]}", f"cnn=timm:test_resnet@{weights['cnn'][1]}"]
    common = ("--cache", copy["cache"], "--dataset", "digits")
    out = run("extract", "--members", ",".join(specs), "--data-root", copy["data"], "--runs", copy["runs"], *common)
    assert out.exit_code == 0, out.output
    store = cache.open(copy["cache"])
    provenance = store.provenance("digits", "test", "vit")
    assert provenance["arch"] == "timm:test_vit" and provenance["feature_dim"] == 64
    assert provenance["weights"] == {
        "library": "timm",
        "file": str(weights["vit"][1]),
        "path": str(weights["vit"][1]),
        "sha256": sha256(weights["vit"][1]),
    }
    assert provenance["feature_layer"] == hub.TIMM_LAYER
    assert provenance["preprocessing"]["resolution"] == 160
    assert provenance["preprocessing"]["model_config"]["interpolation"] == "bicubic"
    assert store.provenance("digits", "test", "run0")["weights"]["kind"] == "timecat run"
    listed = run("cache", "ls", copy["cache"]).output
    assert f"digits/test vit: 450 x 64 float32, complete, timm:test_vit (weights from {weights['vit'][1]})" in listed
    assert "input 160 px, crop 0.95, bicubic (Resize 168 + CenterCrop 160)" in listed  # floor(160 / 0.95)

    results = copy["tmp"] / "results"
    probes = (
        ("--protocol", "logreg"),
        ("--protocol", "logreg", "--backend", "sklearn"),
        ("--protocol", "knn"),
        ("--protocol", "bn-linear", "--wd-grid", "1e-4"),
    )
    for members, protocols in (("vit,cnn", probes), ("vit,cnn,run0", probes[:1])):
        for protocol in protocols:
            out = run("probe", "--members", members, *common, "--results", results, "--json", *protocol)
            assert out.exit_code == 0, out.output
            record = json.loads(out.stdout)
            dims = {"vit": 64, "cnn": 96, "run0": 128}
            widths = {m: p["feature_dim"] for m, p in record["member_provenance"].items()}
            assert widths == {m: dims[m] for m in members.split(",")} and record["dim"] == sum(widths.values())
            assert 10.0 < record["top1"] <= 100.0  # percent; 10 classes
    for members in ("vit", "cnn"):
        assert run("probe", "--members", members, *common, "--results", results).exit_code == 0
    out = run("report", "--results", results, "--layout", "table2", "--json")
    assert out.exit_code == 0, out.output
    methods = [row["method"] for row in json.loads(out.stdout)["rows"]]
    assert methods.index("timm:test_resnet") < methods.index("timm:test_vit")  # grouped by architecture
    assert "Cat2 of timm:test_resnet + timm:test_vit" in methods
    assert "Cat3 of small-resnet + timm:test_resnet + timm:test_vit" in methods

    out = run("diversity", "--members", "vit,cnn,run0", *common, "--no-probe", "--json")
    assert out.exit_code == 0, out.output
    cka = np.array(json.loads(out.stdout)["cka"])
    assert cka.shape == (3, 3) and np.allclose(np.diag(cka), 1.0) and np.all((cka > 0) & (cka < 1 + 1e-9))


def test_bad_library_members_are_one_error_before_anything_is_written(weights, copy, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch"))
    store = tmp_path / "new.zarr"
    cases = {
        "m=timm:resnet81": "unknown timm model 'resnet81' (close matches: resnet18",
        "m=timm:test_vit.nope": "timm has no pretrained weights test_vit.nope; its tags: ['r160_in1k']",
        "m=timm:test_vit": "are not in the local cache",
        f"m=timm:test_vit@{tmp_path / 'absent.safetensors'}": "no weight file at",
        f"m=timm:test_resnet@{weights['vit'][1]}": "weights do not fit the architecture; missing ['bn1.bias'",
        "m=torchvision:resnet81": "unknown torchvision model 'resnet81' (close matches: resnet18",
        "m=torchvision:fasterrcnn_resnet50_fpn": "unknown torchvision model",  # classifiers only
        "m=torchvision:resnet18.V9": "torchvision's resnet18 has no weights 'V9'; choose one of",
        "m=timm:test_vit@": "cannot read the member 'timm:test_vit@'",
    }
    for member, message in cases.items():
        args = ("extract", "--members", member, "--dataset", "digits", "--data-root", copy["data"])
        out = run(*args, "--runs", copy["runs"], "--cache", store)
        assert out.exit_code in (1, 2) and message in out.output, (member, out.output)
        assert "Traceback" not in out.output
    assert "pass --download to fetch them" in run(*args[:2], "m=timm:test_vit", *args[3:], "--cache", store).output
    assert not store.exists()
