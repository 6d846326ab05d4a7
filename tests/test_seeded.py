"""The seeded train order and crops (pipeline.data.seeded): the same batches whatever the threads, ranks or resumes."""

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_fashion_root

from pipeline.configs import PrepareConfig, PretrainConfig
from pipeline.core.errors import TimecatError
from pipeline.data.prepare import prepare
from pipeline.data.seeded import StepOrder
from pipeline.data.splits import beton_path, read_manifest
from pipeline.train.pretrain import make_preprocess


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_fashion_root(tmp_path_factory.mktemp("seeded") / "data")
    prepare(PrepareConfig("fashion-mnist", root))
    return root


def _order(rows: int, global_batch: int, rank: int, world: int, seed: int = 5) -> StepOrder:
    loader = SimpleNamespace(indices=np.arange(rows, dtype=np.uint64), seed=None, distributed=world > 1)
    return StepOrder(seed, global_batch, rank, world)(loader)


def test_ranks_split_each_global_batch_and_a_resumed_epoch_starts_mid_way():
    one = _order(100, 16, 0, 1)
    assert one.steps_per_epoch == 6
    for epoch in (0, 1):
        single = one.sample_order(epoch).reshape(6, 16)
        shards = [_order(100, 16, r, 2).sample_order(epoch).reshape(6, 8) for r in (0, 1)]
        np.testing.assert_array_equal(np.concatenate(shards, axis=1), single)  # step s: the same 16 rows
        assert np.all(single // 100 == epoch) and len(set((single % 100).ravel().tolist())) == 96
    assert not np.array_equal(one.sample_order(0) % 100, one.sample_order(1) % 100)  # reshuffled per epoch
    one.resume_at(1, 4)
    np.testing.assert_array_equal(one.sample_order(1), _order(100, 16, 0, 1).sample_order(1)[4 * 16 :])
    assert len(one.sample_order(1)) == 96  # only the resumed pass is shortened
    with pytest.raises(TimecatError, match="global batch 16 does not split evenly over 3 ranks"):
        StepOrder(0, 16, 0, 3)


def test_training_batches_do_not_depend_on_threads_ranks_or_resuming(data):
    from pipeline.data.loaders import one_epoch, train_loader

    beton = beton_path(data, "fashion-mnist", "train")
    pre = make_preprocess(PretrainConfig("x", "fashion-mnist", 0, 1), read_manifest(data, "fashion-mnist", "train"))

    def batches(workers=2, rank=0, world=1, resume=None, n=3):
        loader, order = train_loader(beton, pre, 64, 7, workers, rank, world)
        if resume:
            loader.next_epoch = resume[0]
            order.resume_at(*resume)
        with one_epoch(loader) as epoch:
            return [(x.clone(), y.clone().view(-1)) for _, (x, y) in zip(range(n), epoch, strict=False)]

    first = batches()
    for other in (batches(workers=1), batches(workers=2)):
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, other, strict=True))
    shards = zip(batches(rank=0, world=2), batches(rank=1, world=2), strict=True)
    for (x, y), ((x0, y0), (x1, y1)) in zip(first, shards, strict=True):
        assert len(x0) == len(x1) == 32
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    resumed = batches(resume=(0, 1), n=2)
    assert torch.equal(resumed[0][0], first[1][0]) and torch.equal(resumed[1][0], first[2][0])
    # Every epoch is reshuffled.
    _, order = train_loader(beton, pre, 64, 7, 2)
    assert not np.array_equal(order.global_rows(0), order.global_rows(1))


def test_leaving_an_epoch_early_stops_the_loader_thread_even_once_it_has_decoded_the_rest(data):
    from pipeline.data.loaders import one_epoch, train_loader

    pre = make_preprocess(PretrainConfig("x", "fashion-mnist", 0, 1), read_manifest(data, "fashion-mnist", "train"))
    loader, _ = train_loader(beton_path(data, "fashion-mnist", "train"), pre, 64, 0, 2)
    for leave_after in (1, 7):  # 7 of 10: the last 3 fill its queue and its end marker waited (it used to hang)
        with one_epoch(loader) as epoch:
            for _ in range(leave_after):
                held, _ = next(epoch)  # a view of the loader's buffers, as every batch is
            kept = held.clone()
            time.sleep(1.0)  # the rest is decoded by now
            left = time.monotonic()
        assert not epoch.is_alive() and time.monotonic() - left < 5
        assert torch.equal(held, kept)  # stopping it did not decode over the caller's last batch


def test_a_training_image_is_ffcvs_crop_then_flip_then_normalisation_of_its_seeded_draw(data):
    """The decoder's fused flip + normalisation gives exactly what FFCV's separate operations give."""
    from ffcv.fields.decoders import SimpleRGBImageDecoder
    from ffcv.fields.rgb_image import get_random_crop
    from ffcv.libffcv import resize_crop
    from ffcv.loader import Loader, OrderOption
    from numba import njit

    from pipeline.data.loaders import one_epoch, train_loader
    from pipeline.data.seeded import _crop_seed

    beton = beton_path(data, "fashion-mnist", "train")
    pre = make_preprocess(PretrainConfig("x", "fashion-mnist", 0, 1), read_manifest(data, "fashion-mnist", "train"))
    assert read_manifest(data, "fashion-mnist", "train")["format"]["write_mode"] == "raw"  # pixels known exactly
    stored = Loader(
        str(beton), batch_size=1000, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
        pipelines={"image": [SimpleRGBImageDecoder()], "label": None},
    )  # fmt: skip
    pixels = np.concatenate([np.asarray(b[0]) for b in stored])
    rows, seed = len(pixels), 7

    crop, crop_seed = njit(get_random_crop), njit(_crop_seed)

    @njit
    def draw(generator_seed, height, width, scale, ratio):  # numba's generator, as in the decoder
        np.random.seed(generator_seed)
        i, j, h, w = crop(height, width, scale, ratio)
        return i, j, h, w, np.random.random() < 0.5

    table = ((np.arange(256)[:, None] - np.array(pre.mean)) / np.array(pre.std)).astype(np.float32)  # FFCV's
    loader, order = train_loader(beton, pre, 64, seed, 2)
    with one_epoch(loader) as epoch:
        images, _ = next(epoch)
    flips = 0
    for code, image in zip(order.sample_order(0)[:64], images, strict=True):
        row = int(code % rows)
        source = np.ascontiguousarray(pixels[row])
        i, j, h, w, flip = draw(crop_seed(np.uint64(seed), np.uint64(0), np.uint64(row)), *source.shape[:2],
                                np.array(pre.crop_scale), np.array((3 / 4, 4 / 3)))  # fmt: skip
        resized = np.zeros((pre.resolution, pre.resolution, 3), np.uint8)
        resize_crop(source, i, i + h, j, j + w, resized)
        resized = resized[:, ::-1] if flip else resized
        expected = table[resized, np.arange(3)]  # table[value, channel]
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected)
        flips += flip
    assert 10 < flips < 54  # both branches exercised
