"""Augmented views: seeded per row, the same crops for every member, cached and read like features."""

import numpy as np
import pytest
import torch

import cache
from pipeline.configs import ExtractConfig
from pipeline.features.extract import extract, frozen_member, view_preprocess
from pipeline.features.views import ViewSpec, augment, crop_params


def test_crop_parameters_depend_only_on_seed_view_and_row():
    spec = ViewSpec(seed=3)
    assert crop_params(spec, 0, 17, 64, 48) == crop_params(spec, 0, 17, 64, 48)
    drawn = {crop_params(spec, v, r, 64, 48) for v in range(4) for r in range(50)}
    assert len(drawn) > 190  # different views and rows get different crops
    assert crop_params(ViewSpec(seed=4), 0, 17, 64, 48) != crop_params(spec, 0, 17, 64, 48)
    for top, left, h, w, _ in drawn:
        assert top >= 0 and top + h <= 64 and left >= 0 and left + w <= 48
        assert 0.08 * 64 * 48 * 0.9 <= h * w <= 64 * 48  # area within the scale range, up to rounding
    flips = [crop_params(spec, 0, r, 64, 48)[4] for r in range(400)]
    assert 0.4 < np.mean(flips) < 0.6


def test_a_whole_image_crop_without_flip_is_the_image():
    images = torch.randn(5, 3, 16, 16)
    whole = ViewSpec(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    np.testing.assert_allclose(augment(images, np.arange(5), whole, 0, 16).numpy(), images.numpy(), atol=1e-6)
    flipped = augment(images, np.arange(5), ViewSpec(scale=(1.0, 1.0), ratio=(1.0, 1.0)), 0, 16)
    for i in range(5):
        expected = images[i].flip(-1) if crop_params(ViewSpec(), 0, i, 16, 16)[4] else images[i]
        np.testing.assert_allclose(flipped[i].numpy(), expected.numpy(), atol=1e-6)


@pytest.mark.slow
def test_views_are_cached_per_member_as_the_same_crops(pipeline_run, tmp_path):
    from pipeline.data.loaders import eval_loader, to_model_input
    from pipeline.data.splits import Preprocess, beton_path

    data, runs, members = pipeline_run["data"], pipeline_run["runs"], pipeline_run["members"][:2]
    path = str(tmp_path / "views.zarr")
    config = ExtractConfig("digits", members, batch_size=128, views=2, view_seed=7)
    summary = extract(config, data, runs, path)
    assert sum(1 for r in summary if r.get("view") is not None and r["state"] == "written") == 2 * 2
    store = cache.open(path)
    assert store.views("digits", "train") == [0, 1] and store.views("digits", "test") == []
    assert all(r["ok"] for r in store.verify()) and len(store.verify()) == 2 * 2 + 2 * 2

    # Recompute the first batch of view 1 for each member: it must be what the cache holds.
    for name in members:
        member = frozen_member(runs, name, torch.device("cpu"))
        pre = Preprocess.from_dict(member.payload["preprocess"])
        images, labels = next(iter(eval_loader(beton_path(data, "digits", "train"), view_preprocess(pre), 128, 1)))
        images, _ = to_model_input(images, labels, torch.device("cpu"))
        with torch.no_grad():
            expected = member.model.backbone(augment(images, np.arange(128), ViewSpec(seed=7), 1, pre.resolution))
        cached, _ = store.features("digits", "train", [name], view=1)
        np.testing.assert_allclose(cached[:128], expected.numpy(), rtol=1e-5, atol=1e-5)
        plain, _ = store.features("digits", "train", [name])
        view0, _ = store.features("digits", "train", [name], view=0)
        assert not np.allclose(cached, plain) and not np.allclose(cached, view0)
    assert store.provenance("digits", "train", members[0], view=1)["view_seed"] == 7

    # A rerun keeps them; a rerun with another view seed is refused unless --overwrite.
    assert {r["state"] for r in extract(config, data, runs, path)} == {"kept"}
    other = ExtractConfig("digits", members, batch_size=128, views=2, view_seed=8)
    with pytest.raises(Exception, match=r"from another view seed.*--overwrite"):
        extract(other, data, runs, path)
