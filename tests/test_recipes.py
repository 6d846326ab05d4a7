"""The paper's probe recipe per dataset kind: views, resizing, imported members' preprocessing, grids, precision."""

import json
import pickle

import numpy as np
import pytest
import torch
from conftest import make_cifar10, make_imagefolder

import cache
from pipeline.configs import ExtractConfig, PrepareConfig, ProbeConfig
from pipeline.core.errors import TimecatError
from pipeline.data import recipes
from pipeline.data.datasets import DATASETS
from pipeline.data.prepare import prepare
from pipeline.data.splits import manifest_path
from pipeline.features.extract import extract, frozen_member
from pipeline.features.views import ViewSpec, _bicubic, augment, crop_params, resize_center
from pipeline.probe.run import probe


def test_every_dataset_kind_has_a_recipe_and_unknown_kinds_are_refused():
    assert set(recipes.RECIPES) == set(DATASETS)
    cifar, imagenet, inat = (recipes.RECIPES[k] for k in ("cifar10", "imagenet", "inat2018"))
    assert recipes.RECIPES["cifar100"] is cifar and cifar.paper and imagenet.paper and inat.paper
    assert cifar.view_scale == (0.8, 1.0) and cifar.interpolation == "bicubic"
    assert imagenet.view_scale == inat.view_scale == (0.08, 1.0) and imagenet.interpolation == "area"
    assert cifar.foreign["mean"] == pytest.approx([255 * v for v in (0.4914, 0.4822, 0.4465)])
    assert imagenet.foreign["crop_ratio"] == cifar.foreign["crop_ratio"] == 224 / 256
    assert inat.wd_grid == (1e-6, 1e-5, 1e-4) and imagenet.wd_grid == (1e-4, 5e-4)
    default = recipes.RECIPES["imagefolder"]
    assert not default.paper and default.differences  # says where it is not the paper's
    with pytest.raises(TimecatError, match=r"unknown dataset kind 'pets'; choose one of \['cifar10', 'cifar100'"):
        recipes.for_kind("pets", "here")


def test_bicubic_resizing_is_pils_kernel():
    """CIFAR's eval Resize(256, bicubic) + CenterCrop(224) and its views' crops, against torchvision on PIL."""
    from PIL import Image
    from torchvision import transforms as T

    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    pil = Image.fromarray(image)
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
    bicubic = T.InterpolationMode.BICUBIC
    expected = np.asarray(T.Compose([T.Resize(256, interpolation=bicubic), T.CenterCrop(224)])(pil), np.float64)
    ours = resize_center(x, 224, 256)[0].permute(1, 2, 0).numpy().clip(0, 255)
    assert ours.shape == (224, 224, 3) and np.abs(ours - expected).mean() < 0.5  # PIL rounds and clamps per pass
    plain = torch.nn.functional.interpolate(x, size=(256, 256), mode="bicubic")[0, :, 16:240, 16:240]
    assert np.abs(plain.permute(1, 2, 0).numpy().clip(0, 255) - expected).mean() > 2  # a = -0.75 is not PIL's
    spec = ViewSpec.for_recipe(recipes.RECIPES["cifar10"], seed=3)
    top, left, h, w, flip = crop_params(spec, 0, 5, 32, 32)
    assert h * w >= 0.8 * 32 * 32 * 0.95  # scale 0.8-1
    view = augment(x, np.array([5]), spec, 0, 224)[0].permute(1, 2, 0).numpy()
    crop = np.asarray(pil.crop((left, top, left + w, top + h)).resize((224, 224), Image.BICUBIC), np.float64)
    crop = crop[:, ::-1] if flip else crop
    assert np.abs(view.clip(0, 255) - crop).mean() < 0.5


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    make_cifar10(root, per_batch=4, test=4)
    prepare(PrepareConfig("cifar10", root))
    return root


def cifar_pixels(root, name="test_batch") -> np.ndarray:
    with open(root / "cifar10/cifar-10-batches-py" / name, "rb") as f:
        data = pickle.load(f, encoding="bytes")[b"data"]
    return data.reshape(-1, 3, 32, 32).astype(np.float32)  # (n, 3, 32, 32), 0-255


def test_an_imported_member_gets_the_papers_cifar_preprocessing(tiny_cifar, tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(0)
    torch.save(resnet50(weights=None).state_dict(), tmp_path / "seed2.pt")
    config = ExtractConfig("cifar10", (f"paper2={tmp_path / 'seed2.pt'}",), batch_size=8)
    extract(config, tiny_cifar, tmp_path / "runs", str(tmp_path / "c.zarr"))
    store = cache.open(str(tmp_path / "c.zarr"))
    prov = store.provenance("cifar10", "test", "paper2")
    assert prov["recipe"] == "cifar" and prov["preprocessing"]["interpolation"] == "bicubic"
    assert prov["preprocessing"]["mean"] == pytest.approx(recipes.CIFAR_MEAN)  # not ImageNet's statistics
    assert store.split_attrs("cifar10", "test")["kind"] == "cifar10"
    # By hand: CIFAR statistics, Resize(256, bicubic), CenterCrop(224), the backbone.
    member = frozen_member(tmp_path / "runs", f"paper2={tmp_path / 'seed2.pt'}", torch.device("cpu"))
    mean, std = (torch.tensor(recipes.CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(recipes.CIFAR_STD).view(1, 3, 1, 1))
    x = (torch.from_numpy(cifar_pixels(tiny_cifar)) - mean) / std
    with torch.no_grad():
        expected = member.model.backbone(resize_center(x, 224, 256)).numpy()
    X, _ = store.features("cifar10", "test", ["paper2"])
    np.testing.assert_allclose(X, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_a_timecat_member_keeps_its_statistics_and_gets_cifar_views(tiny_cifar, pipeline_run, tmp_path):
    path = str(tmp_path / "c.zarr")
    extract(
        ExtractConfig("cifar10", ("run0",), batch_size=8, views=1, view_seed=4), tiny_cifar, pipeline_run["runs"], path
    )
    store = cache.open(path)
    member = frozen_member(pipeline_run["runs"], "run0", torch.device("cpu"))
    own = member.payload["preprocess"]
    prov = store.provenance("cifar10", "train", "run0", view=0)
    assert prov["preprocessing"]["mean"] == pytest.approx(own["mean"])  # its pretraining's, not CIFAR's
    assert "scale (0.8, 1.0)" in prov["views"] and "bicubic" in prov["views"] and prov["view_seed"] == 4
    # View 0 of train row 3, by hand: normalise, the seeded crop of the 32 px image, bicubic to 28 px, flip.
    pixels = torch.from_numpy(cifar_pixels(tiny_cifar, "data_batch_1")[3:4])
    x = (pixels - torch.tensor(own["mean"]).view(1, 3, 1, 1)) / torch.tensor(own["std"]).view(1, 3, 1, 1)
    spec = ViewSpec.for_recipe(recipes.RECIPES["cifar10"], seed=4)
    top, left, h, w, flip = crop_params(spec, 0, 3, 32, 32)
    view = _bicubic(x[:, :, top : top + h, left : left + w], own["resolution"])
    with torch.no_grad():
        expected = member.model.backbone(view.flip(-1) if flip else view).numpy()
    X, _ = store.features("cifar10", "train", ["run0"], view=0)
    np.testing.assert_allclose(X[3:4], expected, rtol=1e-3, atol=1e-4)


def test_recipes_follow_the_kind_not_the_folder_name(pipeline_run, tmp_path):
    for split in ("train", "val"):
        make_imagefolder(tmp_path / "imagenet" / split, per_class=4 if split == "train" else 2)
    data = tmp_path / "data"
    prepare(PrepareConfig("imagenet", data, "imagenet-mixed", tmp_path / "imagenet/train", tmp_path / "imagenet/val"))
    assert json.loads(manifest_path(data, "imagenet-mixed", "train").read_text())["kind"] == "imagenet"
    path = str(tmp_path / "c.zarr")
    extract(ExtractConfig("imagenet-mixed", ("run0",), batch_size=8), data, pipeline_run["runs"], path)
    assert cache.open(path).split_attrs("imagenet-mixed", "train")["kind"] == "imagenet"
    record = probe(ProbeConfig("imagenet-mixed", ("run0",), protocol="bn-linear"), path)
    assert [t["weight_decay"] for t in record["search"]] == [1e-4, 5e-4]  # ImageNet's grid, not CIFAR's
    assert record["dataset_recipe"]["name"] == "imagenet" and record["kind"] == "imagenet"
    # A manifest naming a kind timecat does not know is refused before anything is written.
    manifest = manifest_path(data, "imagenet-mixed", "train")
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "kind": "imagenet-2"}))
    with pytest.raises(TimecatError, match=r"unknown dataset kind 'imagenet-2'; choose one of"):
        extract(ExtractConfig("imagenet-mixed", ("run1",), batch_size=8), data, pipeline_run["runs"], path)
    assert "run1" not in cache.open(path).members("imagenet-mixed", "train")


def test_precision_is_chosen_recorded_and_never_mixed(pipeline_run, tmp_path):
    path = str(tmp_path / "bf16.zarr")
    extract(ExtractConfig("digits", ("run1",), precision="bf16"), pipeline_run["data"], pipeline_run["runs"], path)
    bf16, fp32 = cache.open(path), cache.open(pipeline_run["cache"])
    assert bf16.provenance("digits", "test", "run1")["precision"] == "bf16"
    assert fp32.provenance("digits", "test", "run1")["precision"] == "fp32"  # the CPU default
    X16, X32 = bf16.features("digits", "test", ["run1"])[0], fp32.features("digits", "test", ["run1"])[0]
    assert not np.array_equal(X16, X32) and np.abs(X16 - X32).max() < 0.05 * np.abs(X32).max()
    with pytest.raises(cache.CacheError, match="from another precision.*--overwrite"):
        extract(ExtractConfig("digits", ("run1",), precision="fp32"), pipeline_run["data"], pipeline_run["runs"], path)
    assert probe(ProbeConfig("digits", ("run1",)), path)["member_provenance"]["run1"]["precision"] == "bf16"
    with pytest.raises(TimecatError, match=r"unknown precision 'fp16'; choose one of \['bf16', 'fp32'\]"):
        ExtractConfig("digits", ("run1",), precision="fp16")


def test_arrays_cached_before_a_field_was_recorded_are_compared_with_what_they_did():
    from cache.provenance import stale_field

    old = {"checkpoint_sha256": "a", "preprocessing": {"resolution": 28, "mean": [1, 2, 3]}}  # no interpolation
    area = {"checkpoint_sha256": "a", "preprocessing": {"resolution": 28, "mean": (1, 2, 3), "interpolation": "area"}}
    bicubic = {**area, "preprocessing": {**area["preprocessing"], "interpolation": "bicubic"}}
    assert stale_field(old, area, "preprocessing") is None  # older arrays were all area-resized
    assert stale_field(old, bicubic, "preprocessing") == ("preprocessing.interpolation", "area", "bicubic")
    assert stale_field(old, {**area, "precision": "fp32"}, "precision") is None  # not recorded then
    assert stale_field(old, {**area, "checkpoint_sha256": "b"}, "checkpoint_sha256") == ("checkpoint_sha256", "a", "b")
