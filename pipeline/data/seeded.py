"""FFCV pieces that make every training batch a pure function of (seed, epoch, step, rank).

Resuming a killed run bitwise, and checking that 2 ranks equal 1 process, both
need batches that do not depend on threads or on how many batches ran before.
FFCV does not give that: its RandomResizedCrop and RandomHorizontalFlip draw
from numba's per-thread, unseeded generator, and its distributed order uses
torch's DistributedSampler, which pads with repeated rows and cannot start
mid-epoch. So:

- ``StepOrder`` (a FFCV traversal order) shuffles epoch e with a generator seeded
  by (seed, e), cuts it into global batches of G rows (the last partial one is
  dropped) and hands rank r the r-th slice of G / world rows of each. One process
  and 2 ranks therefore see the same rows at every step, and a run resumed at
  step s starts exactly where it stopped, without decoding the skipped batches.
- Each index it emits encodes ``epoch * rows + row``, so the decoders below know
  the epoch without any shared state (numba freezes closure values at compile
  time, and FFCV passes nothing else per batch).
- ``SeededRandomResizedCrop`` decodes like FFCV's RandomResizedCropRGBImageDecoder
  (same crop algorithm, same resize) and flips, but reseeds numba's generator per
  image from (seed, epoch, row) first, so a crop never depends on which thread
  drew it. ``RowLabels`` decodes the label of the encoded row.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder, get_random_crop
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.state import State
from ffcv.transforms import NormalizeImage
from ffcv.traversal_order.base import TraversalOrder

from pipeline.core.errors import TimecatError


class StepOrder(TraversalOrder):
    """Epoch order shared by every rank: global batch ``step`` is rows [step*G, (step+1)*G) of a seeded permutation."""

    def __init__(self, seed: int, global_batch: int, rank: int = 0, world_size: int = 1):
        # No super().__init__ here: FFCV 1.0.2 takes a custom order only as an
        # instance, which it then calls with the loader (loader.py, ORDER_MAP branch).
        if global_batch % world_size:
            raise TimecatError(f"global batch {global_batch} does not split evenly over {world_size} ranks")
        # Not self.seed: TraversalOrder.__init__ overwrites that with the loader's (None).
        self.shuffle_seed, self.global_batch, self.rank, self.world_size = seed, global_batch, rank, world_size
        self.per_rank = global_batch // world_size
        self._resume: tuple[int, int] | None = None

    def __call__(self, loader) -> StepOrder:
        super().__init__(loader)
        self.rows = len(self.indices)
        if self.rows < self.global_batch:
            raise TimecatError(f"global batch {self.global_batch} exceeds the {self.rows} training images")
        return self

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per epoch (the last partial one is dropped)."""
        return len(self.indices) // self.global_batch

    def resume_at(self, epoch: int, batch: int) -> None:
        """Make the loader's next pass over ``epoch`` start at its ``batch``-th global batch."""
        self._resume = (epoch, batch)

    def global_rows(self, epoch: int) -> np.ndarray:
        """(steps_per_epoch, G) dataset rows of every global batch of ``epoch``."""
        perm = np.random.default_rng([self.shuffle_seed, epoch]).permutation(len(self.indices))
        return perm[: self.steps_per_epoch * self.global_batch].reshape(self.steps_per_epoch, self.global_batch)

    def sample_order(self, epoch: int) -> np.ndarray:
        """This rank's encoded indices for ``epoch`` (``epoch * rows + row``, uint64 like FFCV's own)."""
        batches = self.global_rows(epoch)
        mine = batches[:, self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
        if self._resume is not None and self._resume[0] == epoch:
            mine = mine[self._resume[1] :]
            self._resume = None
        return mine.reshape(-1).astype(np.uint64) + np.uint64(epoch) * np.uint64(len(self.indices))


def _crop_seed(seed, epoch, row):
    """A 31-bit generator seed from (seed, epoch, row): splitmix64 over a mix of the three (uint64 arithmetic)."""
    x = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
    x ^= np.uint64(epoch) * np.uint64(0xBF58476D1CE4E5B9) + np.uint64(row)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return np.int64(x >> np.uint64(33))


def _flip_normalize(image, destination, flip, table):
    """``destination`` (float32) = ``table[image]`` per channel, mirrored left-right when ``flip``."""
    height, width = image.shape[0], image.shape[1]
    for y in range(height):
        for x in range(width):
            source_x = width - 1 - x if flip else x
            destination[y, x, 0] = table[image[y, source_x, 0], 0]
            destination[y, x, 1] = table[image[y, source_x, 1], 1]
            destination[y, x, 2] = table[image[y, source_x, 2], 2]


class SeededRandomResizedCrop(ResizedCropRGBImageDecoder):
    """FFCV's random-resized-crop decoder, plus flip and normalisation, seeded per (seed, epoch, row).

    The crop and its resize are FFCV's own (libffcv's OpenCV INTER_AREA
    resize). The flip and the normalisation to float32 are done here, in one
    pass over each image while it is still in cache, rather than as FFCV's
    separate flip (a copy per flipped image) and NormalizeImage operations (a
    second pass over the whole batch): the same numbers, bit for bit (FFCV's
    lookup table), in less time per image (tests/benchmarks/test_training_throughput.py
    records how much).
    """

    def __init__(
        self, output_size, rows: int, seed: int, mean, std, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip=True
    ):
        super().__init__(output_size)
        self.rows, self.seed = rows, seed
        self.scale, self.ratio, self.flip = np.array(scale), np.array(ratio), flip
        # FFCV's own NormalizeImage table, so the output equals its CPU path exactly.
        self.table = NormalizeImage(np.array(mean), np.array(std), np.float32).lookup_table

    @property
    def get_crop_generator(self):
        return get_random_crop

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        state, (_, decoded) = super().declare_state_and_memory(previous_state)
        shape = (*self.output_size, 3)
        resized = int(np.prod(shape))  # the uint8 resize, placed after the decoded image in the scratch buffer
        return (
            replace(state, dtype=np.dtype("<f4")),
            (AllocationQuery(shape, np.dtype("<f4")), AllocationQuery((decoded.shape[0] + resized,), np.uint8)),
        )

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        get_crop_c = Compiler.compile(get_random_crop)
        seed_c = Compiler.compile(_crop_seed)
        flip_normalize_c = Compiler.compile(_flip_normalize)
        scale, ratio, flip, seed, table = self.scale, self.ratio, self.flip, np.uint64(self.seed), self.table
        rows = np.uint64(self.rows)  # uint64 throughout: numba turns uint64 (op) int64 into float64
        out_h, out_w = self.output_size
        resized_at = np.uint64(self.max_height * self.max_width * np.uint64(3))

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                code = batch_indices[dst_ix]
                source_ix = code % rows
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                scratch = temp_storage[dst_ix]
                if field["mode"] == jpg:
                    imdecode_c(image_data, scratch, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = scratch[: 3 * height * width].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                np.random.seed(seed_c(seed, code // rows, source_ix))  # this thread's generator, this image
                i, j, h, w = get_crop_c(height, width, scale, ratio)
                resized = scratch[resized_at:].reshape(out_h, out_w, 3)
                resize_crop_c(image, i, i + h, j, j + w, resized)
                mirror = flip and np.random.random() < 0.5
                flip_normalize_c(resized, destination[dst_ix], mirror, table)
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


class RowLabels(IntDecoder):
    """FFCV's int decoder for indices encoded as ``epoch * rows + row``."""

    def __init__(self, rows: int):
        super().__init__()
        self.rows = rows

    def generate_code(self):
        rows = np.uint64(self.rows)

        def decoder(indices, destination, metadata, storage_state):
            for ix, code in enumerate(indices):
                destination[ix] = metadata[code % rows]
            return destination[: len(indices)]

        return decoder
