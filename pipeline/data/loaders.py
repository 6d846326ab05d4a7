"""Everything that touches FFCV: writing .beton files and streaming batches.

Only prepare, pretrain and extract import this module, so that the cache, the
probe and the report work without FFCV installed.

What it changes outside itself, and when:

- at import, once: FFCV's ``Compiler.set_num_threads`` no longer sets torch's
  thread count (timecat's ``--threads`` does; ``_keep_torch_threads``), and a
  loader whose producer thread died raises instead of waiting forever
  (``EpochIterator.run`` and ``__next__``: ``_keep_error``, ``_fail_when_dead``),
  and ``Compiler.compile`` compiles each distinct pipeline function once per
  process (``pipeline.data.jit_memo``);
- when the first loader is built: ``sys.unraisablehook`` drops one harmless
  numba finalizer message (``quiet_numba_finalizers``), and passes every other
  unraisable exception on;
- during ``write_beton`` only: ffcv.writer's ``tqdm``, ``Process``, ``Queue``
  and ``sleep`` are timecat's (progress through one place, a watch on dead
  writer processes), and are put back when it returns or fails.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import multiprocessing.queues
import operator
import os
import queue
import shutil
import sys
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import torch

from cache.errors import not_readable
from pipeline.core.errors import TimecatError
from pipeline.core.progress import progress
from pipeline.data.datasets import BetonFormat
from pipeline.data.jit_memo import memoized_compile
from pipeline.data.seeded import RowLabels, SeededRandomResizedCrop, StepOrder
from pipeline.data.splits import Preprocess

try:
    import ffcv.writer
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.pipeline.compiler import Compiler
    from ffcv.transforms import NormalizeImage, ToTensor, ToTorchImage
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise TimecatError(
        f"FFCV is not installed ({e}); install timecat with the 'images' extra: pip install -e '.[images]'"
    ) from e


def _drop_numba_finalizer_noise(previous):
    """An unraisable-exception hook that drops one known-harmless numba message.

    When an FFCV loader is garbage-collected, numba 0.68's dispatcher finalizer can
    raise KeyError while releasing the loader's generated functions; Python then
    prints "Exception ignored in: <finalize ...>" with a traceback, mid-progress-bar.
    Nothing is lost (the finalizer only frees memory), so that one case is dropped;
    every other unraisable exception goes to the previous hook.
    """

    def hook(unraisable):
        tb = unraisable.exc_traceback
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = tb.tb_frame.f_code.co_filename if tb is not None else ""
        if isinstance(unraisable.exc_value, KeyError) and where.endswith("numba/core/dispatcher.py"):
            return
        previous(unraisable)

    return hook


_QUIETED = []  # whether quiet_numba_finalizers has installed its hook (once per process)


def quiet_numba_finalizers() -> None:
    """Install ``_drop_numba_finalizer_noise`` in front of the current unraisable hook, once per process."""
    if not _QUIETED:
        sys.unraisablehook = _drop_numba_finalizer_noise(sys.unraisablehook)
        _QUIETED.append(True)


def _keep_torch_threads(set_num_threads):
    """FFCV's ``Compiler.set_num_threads``, minus its side effect on torch.

    FFCV sets numba's threads and also torch's intra-op threads to a loader's worker
    count (at import, when a Loader is built, at each epoch), so the same member
    trained with --workers 1 and 2 ran its convolutions on different thread counts
    and ended up to 0.32 apart in weights. Torch's count is timecat's setting
    (``--threads``), so it is put back after every call.
    """

    def numba_only(cls, n):
        threads = torch.get_num_threads()
        set_num_threads.__func__(cls, n)
        torch.set_num_threads(threads)

    return classmethod(numba_only)


def _keep_error(run):
    """FFCV's ``EpochIterator.run``, keeping the exception that ends it (for ``_fail_when_dead``)
    instead of letting the dying thread print a traceback."""

    def run_and_keep(self):
        try:
            run(self)
        except BaseException as e:  # anything: the reader must hear of it, or it waits forever
            self.timecat_error = e

    return run_and_keep


def _fail_when_dead(next_batch):
    """FFCV's ``EpochIterator.__next__``, which fails instead of waiting forever once the thread that
    produces batches has died (a damaged file, a failed decode): FFCV's own waits on a queue with no
    timeout. Waiting costs nothing more: a batch put in the queue wakes it at once."""

    def next_or_fail(self):
        ready = self.output_queue.not_empty  # the queue's condition; holding it, nothing is put meanwhile
        with ready:
            while not self.output_queue._qsize():
                if not self.is_alive():
                    raise _producer_died(self)
                ready.wait(0.5)
        return next_batch(self)

    return next_or_fail


def _producer_died(iterator) -> TimecatError:
    beton = Path(iterator.loader.reader.file_name)
    error = getattr(iterator, "timecat_error", None)
    cause = f"{type(error).__name__}: {str(error)[:160]}" if error is not None else "it stopped"
    return TimecatError(
        f"{beton} could not be read: FFCV's loader thread failed on it ({cause}); the file is probably damaged, "
        f"{_remedy(beton)}"
    )


# Explicit, once, at import: every FFCV loader timecat builds goes through this module.
Compiler.set_num_threads = _keep_torch_threads(Compiler.set_num_threads)
Compiler.compile = memoized_compile(Compiler.compile)
EpochIterator.run = _keep_error(EpochIterator.run)
EpochIterator.__next__ = _fail_when_dead(EpochIterator.__next__)


class _Labelled:
    """(image, label) pairs for FFCV's writer."""

    def __init__(self, images, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


class _WriterProgress:
    """Stands in for the tqdm that FFCV's writer draws itself, so its bar goes through ours."""

    def __init__(self, total: int):
        self.bar = progress(total=total, desc="write .beton", unit="img")

    def update(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


FORK = multiprocessing.get_context("fork")  # not the platform default, which Python 3.14 makes forkserver
DISK_FULL_EXIT = 28  # exit status of a writer process that found the disk full (ENOSPC's number)


class WriterDiedError(TimecatError):
    """An FFCV writer process exited before its work was done."""


class _Watch:
    """Stands in for FFCV writer's ``Process``, ``Queue`` and ``sleep`` to notice a worker that died.

    FFCV's parent process waits for its workers by polling a shared counter, then by
    reading one result per worker from a queue, both forever: a worker killed by a
    full disk (ENOSPC) or a crash leaves it waiting, and the other workers spin on the
    page it never wrote. Those three module names are the only hooks it offers, so the
    workers it starts are recorded here, and every wait of the parent checks them.
    """

    def __init__(self, path: Path):
        self.path, self.workers, self.parent = path, [], os.getpid()

    def process(self, target, args=(), **kwargs):
        def run(*work):
            try:
                target(*work)
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise  # a bug, not the user's disk: keep its traceback
                sys.exit(DISK_FULL_EXIT)  # quietly: the parent says what happened, once

        # Forked, as FFCV's writer assumes (its queues and allocator are inherited): a closure is fine.
        worker = FORK.Process(target=run, args=args, **kwargs)
        self.workers.append(worker)
        return worker

    def queue(self, maxsize: int = 0):
        return _WatchedQueue(self, maxsize)

    def check(self) -> None:
        """Raise if a worker died (only the parent, which started them, can ask)."""
        dead = [w.exitcode for w in self.workers if w.exitcode not in (None, 0)]
        if DISK_FULL_EXIT in dead:
            free = shutil.disk_usage(self.path.parent).free / 2**20
            raise WriterDiedError(
                f"no space left on the device while writing {self.path} ({free:.1f} MiB free): free some space "
                "and run the same command again (splits already prepared are kept)"
            )
        if dead:
            raise WriterDiedError(f"an FFCV writer process died (exit code {dead[0]}) while writing {self.path}")

    def sleep(self, seconds: float) -> None:
        self.check()
        time.sleep(seconds)

    def reap(self, timeout: float = 30.0) -> None:
        """Wait for the workers FFCV starts and never joins: an exited child stays a zombie until waited for.

        They exit once they have handed over their allocations, which the write has read by now.
        """
        for w in self.workers:
            w.join(timeout)
        self.stop()  # one still running after that is stuck: end it

    def stop(self) -> None:
        """Terminate and reap every worker still running (none is left behind as an orphan)."""
        for w in self.workers:
            if w.is_alive():
                w.terminate()
        for w in self.workers:
            w.join(timeout=10)


class _WatchedQueue(multiprocessing.queues.Queue):
    """A queue whose blocking ``get`` in the parent checks the workers every half second."""

    def __init__(self, watch: _Watch, maxsize: int = 0):
        super().__init__(maxsize, ctx=FORK)
        self._watch = watch

    def get(self, block: bool = True, timeout: float | None = None):
        if os.getpid() != self._watch.parent or not block or timeout is not None:
            return super().get(block, timeout)  # the workers' own reads, unchanged
        while True:
            try:
                return super().get(True, 0.5)
            except queue.Empty:
                self._watch.check()


def write_beton(path: Path, images, labels: np.ndarray, fmt: BetonFormat, num_workers: int) -> None:
    """Write images and int labels to ``path`` as an FFCV dataset; a worker that dies fails the write."""
    fields = {
        "image": RGBImageField(
            write_mode=fmt.write_mode,
            max_resolution=fmt.max_resolution,
            jpeg_quality=fmt.jpeg_quality,
            compress_probability=fmt.compress_probability,
        ),
        "label": IntField(),
    }
    watch = _Watch(Path(path))
    writer = ffcv.writer.DatasetWriter(str(path), fields, num_workers=num_workers)
    hooks = {"tqdm": _WriterProgress, "Process": watch.process, "Queue": watch.queue, "sleep": watch.sleep}
    saved = {name: getattr(ffcv.writer, name) for name in hooks}
    try:
        for name, hook in hooks.items():
            setattr(ffcv.writer, name, hook)
        writer.from_indexed_dataset(_Labelled(images, labels))
        watch.reap()
    except BaseException:
        watch.stop()
        memory = getattr(writer, "metadata_sm", None)  # FFCV's shared metadata block, unlinked only on success
        if isinstance(memory, shared_memory.SharedMemory):
            with contextlib.suppress(OSError):
                memory.close()
                memory.unlink()
        raise
    finally:
        for name, value in saved.items():
            setattr(ffcv.writer, name, value)


def _label_pipeline() -> list:
    return [IntDecoder(), ToTensor()]


def _normalize(pre: Preprocess) -> NormalizeImage:
    return NormalizeImage(np.array(pre.mean), np.array(pre.std), np.float32)


def train_loader(
    beton: Path,
    pre: Preprocess,
    global_batch: int,
    seed: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[Loader, StepOrder]:
    """This rank's shuffled, augmented batches of (G / world, 3, R, R) float32 and (G / world, 1) labels.

    Every batch is a function of (seed, epoch, step, rank) only (pipeline.data.seeded):
    resumable mid-epoch with ``order.resume_at`` and identical across world sizes.
    """
    rows = _row_count(beton)
    quiet_numba_finalizers()
    order = StepOrder(seed, global_batch, rank, world_size)
    crop = SeededRandomResizedCrop(
        (pre.resolution, pre.resolution), rows, seed, pre.mean, pre.std, scale=pre.crop_scale, flip=pre.flip
    )
    loader = Loader(
        str(beton),
        batch_size=order.per_rank,
        num_workers=num_workers,
        order=order,
        drop_last=True,
        distributed=world_size > 1,  # informational: StepOrder does the sharding (see pipeline.data.seeded)
        os_cache=True,
        pipelines={
            "image": [crop, ToTensor(), ToTorchImage()],  # crop also flips and normalises
            "label": [RowLabels(rows), ToTensor()],
        },
    )
    return loader, order


def set_train_resolution(loader: Loader, resolution: int) -> None:
    """Make a ``train_loader``'s next epochs crop to ``resolution`` px (progressive resizing).

    FFCV sizes its buffers and compiles its pipeline from the decoder's output
    size, so a change regenerates the pipeline (a few seconds, once per size).
    """
    crop = loader.pipeline_specs["image"].decoder
    if tuple(crop.output_size) != (resolution, resolution):
        crop.output_size = (resolution, resolution)
        loader.generate_code()


def eval_loader(
    beton: Path, pre: Preprocess, batch_size: int, num_workers: int, start_row: int = 0, stop_row: int | None = None
) -> Loader:
    """Batches of rows [start_row, stop_row) in dataset order, centre-cropped and resized, none dropped.

    A rank of a multi-process extraction reads only its own contiguous range;
    FFCV's distributed mode would interleave rows across ranks instead.
    """
    image = [
        CenterCropRGBImageDecoder((pre.resolution, pre.resolution), ratio=pre.crop_ratio),
        _normalize(pre),
        ToTensor(),
        ToTorchImage(),
    ]
    return _in_order(beton, image, batch_size, num_workers, start_row, stop_row)


def whole_loader(
    beton: Path, size: tuple[int, int], batch_size: int, num_workers: int, start_row: int = 0, stop_row=None
) -> Loader:
    """Like ``eval_loader``, but uint8 batches (B, 3, height, width) of each image unresized in its top-left
    corner (pipeline.data.whole), for a resize and normalisation in torch; ``size``: the largest image's."""
    from pipeline.data.whole import WholeImageDecoder

    image = [WholeImageDecoder(*size), ToTensor(), ToTorchImage()]
    return _in_order(beton, image, batch_size, num_workers, start_row, stop_row)


def _in_order(beton: Path, image: list, batch_size: int, num_workers: int, start_row: int, stop_row) -> Loader:
    """FFCV's loader of rows [start_row, stop_row) in dataset order through the ``image`` pipeline."""
    total = _row_count(beton)  # checks the file first
    quiet_numba_finalizers()
    return Loader(
        str(beton),
        batch_size=batch_size,
        num_workers=num_workers,
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        os_cache=True,
        # uint64 like FFCV's own default: int64 indices mix with its uint64 maths into float64.
        indices=_row_indices(total, start_row, stop_row),
        pipelines={"image": image, "label": _label_pipeline()},
    )


def _row_indices(total: int, start_row: int, stop_row: int | None) -> np.ndarray | None:
    stop_row = total if stop_row is None else stop_row
    if (start_row, stop_row) == (0, total):
        return None  # FFCV's default: every row
    return np.arange(start_row, stop_row, dtype=np.uint64)


MAX_SIDE = 16384  # px: a stored image side beyond this is a damaged header, not an image


def _remedy(beton: Path) -> str:
    return f"delete it and run `timecat prepare` again for {Path(beton).parent.name}"


def open_reader(beton: Path):
    """FFCV's reader of a .beton, checked: a damaged header, metadata or allocation table is an error,
    never a crash, a hang or a huge buffer."""
    from ffcv.reader import Reader

    try:
        reader = Reader(str(beton))
    except PermissionError as e:  # another user's file: not damaged, and not ours to delete
        raise TimecatError(not_readable(beton, e)) from None
    except Exception as e:  # FFCV asserts, or numpy fails, on a header it cannot parse
        raise TimecatError(f"{beton} is damaged ({type(e).__name__}: {str(e)[:120]}); {_remedy(beton)}") from None
    size = Path(beton).stat().st_size
    image = reader.metadata["f0"]  # timecat writes the image field first, then the label
    if len(image) and (
        image["width"].max() > MAX_SIDE or image["height"].max() > MAX_SIDE or image["data_ptr"].max() >= size
    ):
        raise TimecatError(
            f"{beton} is damaged: its metadata names images up to {image['width'].max()} x {image['height'].max()} "
            f"px or data beyond the file's {size:,} bytes; {_remedy(beton)}"
        )
    _check_allocations(beton, reader, size)
    return reader


def _check_allocations(beton: Path, reader, size: int) -> None:
    """Refuse an allocation table that does not hold every image: FFCV's loader threads die on it, and
    the caller then waits forever (a crash leaves zeros at the end of the file, where the table is)."""
    table_at = int(reader.header["alloc_table_ptr"])
    table = reader.alloc_table
    data_start = reader.header.nbytes + reader.field_descriptors.nbytes + reader.metadata.nbytes
    whole = (size - table_at) % table.itemsize == 0
    bad = (
        (table["size"] == 0)
        | (table["ptr"] < data_start)
        | (table["ptr"] + table["size"] > table_at)
        | (table["sample_id"] >= reader.num_samples)
    )
    image = reader.metadata["f0"]
    if not whole or bad.any() or not np.isin(image["data_ptr"], table["ptr"]).all():
        raise TimecatError(
            f"{beton} is damaged: its allocation table (the last {size - table_at:,} bytes) does not hold every "
            f"image ({int(bad.sum())} bad entries), as a crash or a copy cut short leaves it; {_remedy(beton)}"
        )


def _row_count(beton: Path) -> int:
    return open_reader(beton).num_samples


def image_sizes(beton: Path) -> np.ndarray:
    """The (n, 2) height and width of each stored image, from the .beton's metadata alone."""
    image = open_reader(beton).metadata["f0"]
    return np.stack([image["height"], image["width"]], axis=1).astype(np.int64)


def read_labels(beton: Path, manifest: dict) -> np.ndarray:
    """The (n,) int64 labels of a .beton in dataset order, checked against its manifest: the number of rows, every label
    one of the manifest's classes, and the per-class counts prepare recorded.

    Labels are read from the file's metadata (FFCV's int field keeps the value there), no image decoded.
    A .beton swapped for another split's, or a manifest edited by hand, is refused here.
    """
    from pipeline.data.datasets import check_labels

    reader = open_reader(beton)
    labels = np.asarray(reader.metadata["f1"], dtype=np.int64)  # the label field, written second
    fix = _remedy(beton)
    if len(labels) != manifest["rows"]:
        raise TimecatError(
            f"{beton} holds {len(labels)} rows but its manifest says {manifest['rows']}: the file was replaced "
            f"(another split's?) or the manifest edited; {fix}"
        )
    check_labels(labels, len(manifest["classes"]), str(beton), fix)
    counts = manifest.get("class_counts")
    if counts is not None and np.bincount(labels, minlength=len(manifest["classes"])).tolist() != counts:
        raise TimecatError(
            f"{beton}: its labels do not match the class counts of its manifest: the file was replaced "
            f"(another split's?) or the manifest edited; {fix}"
        )
    return labels


@contextlib.contextmanager
def one_epoch(loader: Loader):
    """The batches of one pass over ``loader``; leaving early stops and joins FFCV's producer thread.

    Otherwise that thread keeps decoding after a ``break``, and a process that
    exits while it runs numba code is aborted by C++ ("terminate called without
    an active exception", exit status 134), which torchrun reports as a failure.
    """
    batches = iter(loader)
    try:
        yield batches
    finally:
        batches.close()  # it notices within 0.5 s, once its queue is full
        # Its end-of-epoch marker is put without a timeout: if the queue is full then,
        # it waits for a reader forever. Once it has taken the epoch's last batch, read
        # (and drop) queued batches to let it finish. Never earlier: it would decode
        # further batches into the slot that still holds the caller's last batch.
        deadline = time.monotonic() + 60
        while batches.is_alive() and time.monotonic() < deadline:
            if operator.length_hint(batches.iter_ixes) == 0:
                with contextlib.suppress(queue.Empty):
                    batches.output_queue.get(timeout=0.1)
            batches.join(timeout=0.1)


def to_model_input(
    images: torch.Tensor, labels: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a loader batch to ``device``: images channels_last float32, labels (B,) int64."""
    images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True).view(-1).long()
