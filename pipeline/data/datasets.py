"""Where each dataset's images and labels come from, as indexable splits.

Every reader returns the same thing, ``{"train": Split, "test": Split}``, so the
rest of the pipeline never branches on the dataset. The registry ``DATASETS``
is looked up by exact name.
"""

from __future__ import annotations

import difflib
import functools
import gzip
import hashlib
import os
import pickle
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import TimecatError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # package dataset-fashion-mnist
DIGITS_SPLIT_SEED = 0  # fixed so every machine gets the same digits train/test split
DIGITS_TEST_FRACTION = 0.25


@dataclass(frozen=True)
class SourceOptions:
    """What a reader may need beyond the data root."""

    train_dir: Path | None = None  # imagefolder only
    test_dir: Path | None = None  # imagefolder only
    download: bool = False  # let torchvision fetch fashion-mnist / cifar when absent


class ArrayImages:
    """Images held in memory as uint8 (n, H, W) or (n, H, W, 3); served as (H, W, 3)."""

    def __init__(self, pixels: np.ndarray):
        if pixels.dtype != np.uint8 or pixels.ndim not in (3, 4):
            raise TimecatError(f"expected uint8 images (n, H, W[, 3]), got {pixels.dtype} {pixels.shape}")
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> np.ndarray:
        image = self.pixels[i]
        # FFCV's RGB field wants three channels; grey images are repeated.
        return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image

    def digest(self) -> str:
        """sha256 of every pixel, in order."""
        return hashlib.sha256(np.ascontiguousarray(self.pixels).tobytes()).hexdigest()

    def sample(self, indices: np.ndarray) -> np.ndarray:
        """Images at ``indices`` as float64 (k, H, W, 3), for statistics."""
        return np.stack([self[int(i)] for i in indices]).astype(np.float64)


# px per image file (8192 x 8192; a 50 MP photo fits): decoded as RGB it takes 192 MB per worker thread.
# Beyond it, a decompression bomb or a damaged header is far likelier than a photo, and it is refused as
# an unreadable file (prepare --on-corrupt skip leaves it out), before anything is decoded.
MAX_IMAGE_PIXELS = 8192 * 8192


class ImageTooLargeError(ValueError):
    """An image file whose header claims more pixels than MAX_IMAGE_PIXELS (prepare counts it as corrupt)."""


def check_image_size(size: tuple[int, int]) -> None:
    """Refuse, from its header's (width, height), an image above MAX_IMAGE_PIXELS."""
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(
            f"{width} x {height} px is above timecat's bound of {MAX_IMAGE_PIXELS:,} px per image "
            "(a decompression bomb, a damaged header, or a photo to shrink first)"
        )


class FileImages:
    """Images stored as files; decoded to RGB (H, W, 3) uint8 on access."""

    def __init__(self, paths: Sequence[Path], root: Path):
        self.paths = list(paths)
        self.root = root

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        from PIL import Image  # Pillow comes with torchvision

        try:
            with Image.open(self.paths[i]) as image:  # reads the header only
                check_image_size(image.size)  # before decoding, so decode memory is bounded
                return np.asarray(image.convert("RGB"))
        except Image.DecompressionBombError as e:  # Pillow's own refusal (at twice its limit) comes first
            raise ImageTooLargeError(f"{e} timecat decodes at most {MAX_IMAGE_PIXELS:,} px") from None

    def digest(self) -> str:
        """sha256 over relative paths and file sizes: cheap at ImageNet scale, changes when files do."""
        h = hashlib.sha256()
        for path in self.paths:
            h.update(f"{path.relative_to(self.root)}\0{path.stat().st_size}\n".encode())
        return h.hexdigest()

    def sample(self, indices: np.ndarray) -> np.ndarray:
        """Per-image channel means and mean squares, (k, 2, 3), for statistics of mixed sizes."""
        stats = []
        for i in indices:
            image = self[int(i)].astype(np.float64)
            stats.append([image.mean(axis=(0, 1)), (image**2).mean(axis=(0, 1))])
        return np.asarray(stats)


def check_labels(labels: np.ndarray, num_classes: int, where: str, fix: str) -> None:
    """Refuse a label that is not a class index 0..num_classes-1: training would fail on it with a traceback
    (or only at the final evaluation), and a probe would score it as always wrong."""
    labels = np.asarray(labels)
    outside = (labels < 0) | (labels >= num_classes)
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        raise TimecatError(
            f"{where}: label {int(labels[first])} (row {first}; {int(outside.sum())} such row(s)) is not one of the "
            f"{num_classes} classes, which are numbered 0 to {num_classes - 1}; {fix}"
        )


@dataclass(frozen=True)
class Split:
    """One split of a dataset: images, integer labels and the class names they index."""

    images: ArrayImages | FileImages
    labels: np.ndarray  # (n,) int64
    classes: tuple[str, ...]
    source: str  # where it was read from, for error messages and provenance

    def __post_init__(self):
        if len(self.images) != len(self.labels):
            raise TimecatError(f"{self.source}: {len(self.images)} images but {len(self.labels)} labels")
        check_labels(self.labels, len(self.classes), self.source, "fix the labels or the class list")

    def fingerprint(self) -> str:
        """Content identity of this split: images (or file list) and labels."""
        h = hashlib.sha256(self.images.digest().encode())
        h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        h.update("\n".join(self.classes).encode())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class BetonFormat:
    """How images are stored in a .beton (FFCV ``RGBImageField`` arguments)."""

    write_mode: str = "raw"  # raw | jpg | smart | proportion
    max_resolution: int | None = None  # px, longest side kept; None keeps the source size
    jpeg_quality: int = 90  # 0-100, when JPEG is written
    compress_probability: float = 0.5  # proportion mode: the share of images stored as JPEG, the rest raw


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset's reader and the defaults the other stages use for it."""

    read: Callable[[Path, SourceOptions], dict[str, Split]]
    resolution: int  # px, default square input side for training and extraction
    crop_scale: tuple[float, float]  # RandomResizedCrop area range for training
    beton: BetonFormat
    description: str
    crop_ratio: float = 1.0  # eval centre crop side / image side (224/256 for ImageNet-size images)


def download(fetch: Callable[[], object], what: str, url: str, by_hand: str) -> None:
    """Run a torchvision download; a failure (offline, a proxy, a bad checksum) is one error that names
    the address and how to place the files by hand."""
    from urllib.parse import urlsplit

    try:
        fetch()
    except (OSError, RuntimeError) as e:  # urllib's URLError is an OSError; torchvision wraps some in RuntimeError
        reason = " ".join(str(getattr(e, "reason", e)).split())[:160]
        raise TimecatError(
            f"--download of {what} failed: cannot fetch {url} from {urlsplit(url).hostname} ({reason}); "
            f"this machine may be offline. Download it elsewhere, {by_hand}, and run again without --download"
        ) from None


# -- IDX (MNIST-style) ---------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes into an array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise TimecatError(f"{path}: cannot read IDX file ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise TimecatError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != int(np.prod(shape)):
        raise TimecatError(f"{path}: IDX header says shape {shape} but the file holds {len(data) - header} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_file(stem: str, folders: Sequence[Path]) -> Path | None:
    for folder in folders:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def read_fashion_mnist(data_root: Path, options: SourceOptions) -> dict[str, Split]:
    """Fashion-MNIST from IDX files in the data root or the Debian package's folder."""
    home = data_root / "fashion-mnist"
    folders = [home, home / "raw", home / "FashionMNIST" / "raw", data_root, DEBIAN_FASHION_MNIST]
    if options.download and _find_file("train-images-idx3-ubyte", folders) is None:
        from torchvision.datasets import FashionMNIST

        def fetch():
            FashionMNIST(str(home), train=True, download=True)
            FashionMNIST(str(home), train=False, download=True)

        where = "the four *-ubyte.gz files (train-images, train-labels, t10k-images, t10k-labels)"
        download(fetch, "Fashion-MNIST", FashionMNIST.mirrors[0], f"put {where} in {home}")
    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images_file = _find_file(f"{prefix}-images-idx3-ubyte", folders)
        labels_file = _find_file(f"{prefix}-labels-idx1-ubyte", folders)
        if images_file is None or labels_file is None:
            raise TimecatError(
                f"Fashion-MNIST {split} IDX files ({prefix}-images-idx3-ubyte[.gz], "
                f"{prefix}-labels-idx1-ubyte[.gz]) not found in {', '.join(map(str, folders))}; "
                "install the Debian package dataset-fashion-mnist, copy the files into "
                f"{home}, or pass --download"
            )
        images, labels = read_idx(images_file), read_idx(labels_file)
        if images.ndim != 3 or labels.ndim != 1:
            raise TimecatError(f"{images_file}: expected (n, 28, 28) images and (n,) labels")
        check_labels(labels, len(classes), str(labels_file), "restore the original file")
        splits[split] = Split(ArrayImages(images), labels.astype(np.int64), classes, str(images_file))
    return splits


# -- CIFAR python pickles --------------------------------------------------------


# What CIFAR's python pickles hold: dicts, lists, bytes and numpy arrays. Only the callables
# that rebuild those are loaded; anything else a pickle names (os.system, eval, ...) is refused,
# because a pickle runs whatever callable it names.
CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),  # arrays, numpy 1 (and the original Python 2 files)
    ("numpy._core.multiarray", "_reconstruct"),  # arrays, numpy 2
    ("numpy.core.numeric", "_frombuffer"),  # arrays, pickle protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which a CIFAR batch never holds (refused: a pickle runs what it names)"
            )
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = _CifarUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise TimecatError(f"{path}: not a CIFAR python pickle ({e})") from None
    if not isinstance(data, dict):
        raise TimecatError(f"{path}: not a CIFAR python pickle (holds a {type(data).__name__}, not a dict)")
    return data


def _cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if b"data" not in batch or label_key not in batch:
        raise TimecatError(f"{path}: CIFAR batch without b'data' and {label_key!r} entries")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise TimecatError(f"{path}: expected data of shape (n, 3072), got {data.shape}")
    # Rows are 1024 red, then green, then blue values, row-major: (n, 3, 32, 32) -> NHWC.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(batch[label_key], dtype=np.int64)


def _read_cifar(
    data_root: Path, options: SourceOptions, name: str, folder: str, train_files, test_file, meta, label_key, names_key
):
    candidates = [data_root / name / folder, data_root / folder]
    base = next((c for c in candidates if c.is_dir()), None)
    if base is None and options.download:
        from torchvision import datasets as tvd

        source = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        by_hand = f"unpack {source.filename} (the python version) so that {candidates[0]} holds its batches"
        download(lambda: source(str(data_root / name), download=True), name, source.url, by_hand)
        base = candidates[0]
    if base is None:
        raise TimecatError(
            f"{name}: folder {folder}/ (the python pickle batches) not found in "
            f"{' or '.join(map(str, candidates))}; unpack the python version of {name} there, or pass --download"
        )
    missing = [f for f in (*train_files, test_file, meta) if not (base / f).is_file()]
    if missing:
        raise TimecatError(f"{name}: {base} lacks {missing}; expected the python pickle batches")
    classes = tuple(c.decode() if isinstance(c, bytes) else c for c in _unpickle(base / meta)[names_key])
    train = [_cifar_batch(base / f, label_key) for f in train_files]
    images = np.concatenate([t[0] for t in train])
    labels = np.concatenate([t[1] for t in train])
    test_images, test_labels = _cifar_batch(base / test_file, label_key)
    for f, batch_labels in zip((*train_files, test_file), [*(t[1] for t in train), test_labels], strict=True):
        check_labels(batch_labels, len(classes), str(base / f), f"restore the original {f}")  # names the batch
    return {
        "train": Split(ArrayImages(images), labels, classes, str(base)),
        "test": Split(ArrayImages(test_images), test_labels, classes, str(base / test_file)),
    }


def read_cifar10(data_root: Path, options: SourceOptions) -> dict[str, Split]:
    """CIFAR-10 from ``cifar-10-batches-py`` (data_batch_1..5, test_batch, batches.meta)."""
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    return _read_cifar(
        data_root,
        options,
        "cifar10",
        "cifar-10-batches-py",
        train_files,
        "test_batch",
        "batches.meta",
        b"labels",
        b"label_names",
    )


def read_cifar100(data_root: Path, options: SourceOptions) -> dict[str, Split]:
    """CIFAR-100 from ``cifar-100-python`` (train, test, meta), fine labels."""
    return _read_cifar(
        data_root,
        options,
        "cifar100",
        "cifar-100-python",
        ["train"],
        "test",
        "meta",
        b"fine_labels",
        b"fine_label_names",
    )


# -- scikit-learn digits -------------------------------------------------------


def read_digits(data_root: Path, options: SourceOptions) -> dict[str, Split]:
    """scikit-learn's bundled 8x8 digits, split with a fixed seed (stratified 75/25)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Values are 0..16 ink counts; scale to 0..255 grey levels.
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=labels
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    classes = tuple(str(c) for c in range(10))
    source = "sklearn.datasets.load_digits"
    return {
        "train": Split(ArrayImages(pixels[train_idx]), labels[train_idx], classes, source),
        "test": Split(ArrayImages(pixels[test_idx]), labels[test_idx], classes, source),
    }


# -- dominoes (the paper's Table 1 spurious-feature setting) -----------------------

DOMINO_FASHION = (3, 4)  # Fashion-MNIST Dress and Coat: the core feature, labels 0 and 1
DOMINO_DIGITS = (0, 1)  # scikit-learn digits 0 and 1: the simple, spurious feature
DOMINO_SEED = 0  # which digit goes with which item is fixed, so every machine builds the same images


def read_dominoes(data_root: Path, options: SourceOptions, agreement: float) -> dict[str, Split]:
    """Dominoes: a digit (0 or 1) stacked above a Fashion-MNIST dress or coat, 56 x 56 grey.

    The label is the Fashion item (dress 0, coat 1). The digit shows the label's
    digit with probability ``agreement`` (0.99: the correlated mixture; 0.5: the
    balanced set), otherwise the other one. Digits of the train split come from
    the digits train split, test from test. Each half is a 28 x 56 band with the
    image in its middle, so a centre crop or a mild random crop keeps both.
    """
    from PIL import Image

    fashion, digits = read_fashion_mnist(data_root, options), read_digits(data_root, options)
    rng = np.random.default_rng([DOMINO_SEED, round(agreement * 1000)])
    splits = {}
    for name in ("train", "test"):
        items = np.flatnonzero(np.isin(fashion[name].labels, DOMINO_FASHION))
        labels = (fashion[name].labels[items] == DOMINO_FASHION[1]).astype(np.int64)
        agree = rng.random(len(items)) < agreement
        digit_class = np.where(agree, labels, 1 - labels)
        pools = [np.flatnonzero(digits[name].labels == DOMINO_DIGITS[c]) for c in (0, 1)]
        picks = np.array([rng.choice(pools[c]) for c in digit_class])
        big = {
            int(i): np.asarray(Image.fromarray(digits[name].images.pixels[i]).resize((28, 28), Image.BILINEAR))
            for i in np.unique(picks)
        }
        pixels = np.zeros((len(items), 56, 56), dtype=np.uint8)
        pixels[:, 0:28, 14:42] = np.stack([big[int(i)] for i in picks])
        pixels[:, 28:56, 14:42] = fashion[name].images.pixels[items]
        source = f"dominoes from {fashion[name].source} and digits, digit agrees with the label {agreement:.0%}"
        splits[name] = Split(ArrayImages(pixels), labels, ("dress", "coat"), source)
    return splits


# -- image folders ---------------------------------------------------------------


def _list_class_folders(root: Path) -> dict[str, list[Path]]:
    if not root.is_dir():
        raise TimecatError(f"{root}: not a folder; expected one sub-folder of images per class")
    folders = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir():
            files = sorted(
                Path(dirpath) / f
                for dirpath, _, names in os.walk(entry.path)
                for f in names
                if f.lower().endswith(IMAGE_SUFFIXES)
            )
            folders[entry.name] = files
    if not folders:
        raise TimecatError(f"{root}: no class sub-folders; expected {root}/<class>/<image>.jpg")
    empty = [name for name, files in folders.items() if not files]
    if empty:
        raise TimecatError(f"{root}: class folder(s) {empty[:5]} hold no images ({', '.join(IMAGE_SUFFIXES)})")
    return folders


def read_imagefolder(data_root: Path, options: SourceOptions) -> dict[str, Split]:
    """Any ``<split>/<class>/<image>`` trees; classes are numbered by the train folder's sorted names."""
    if options.train_dir is None or options.test_dir is None:
        raise TimecatError("imagefolder needs --train DIR and --test DIR (one sub-folder per class in each)")
    train = _list_class_folders(Path(options.train_dir))
    test = _list_class_folders(Path(options.test_dir))
    classes = tuple(train)
    # One mapping for both splits, from the train classes: a test folder that lacks a
    # class must not shift the labels of the others.
    return {
        "train": _folder_split(train, classes, Path(options.train_dir)),
        "test": _folder_split(test, classes, Path(options.test_dir)),
    }


def _folder_split(folders: dict[str, list[Path]], classes: tuple[str, ...], root: Path) -> Split:
    """A split from {class folder: files}, labelled by position in ``classes`` (the train classes)."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(folders) - set(index))
    if unknown:
        raise TimecatError(f"{root}: classes {unknown[:5]} are not in the train folder (its classes: {classes[:5]}...)")
    paths = [p for name in folders for p in folders[name]]
    labels = np.asarray([index[name] for name in folders for _ in folders[name]], dtype=np.int64)
    return Split(FileImages(paths, root), labels, classes, str(root))


# -- ImageNet-1k -----------------------------------------------------------------


def _imagenet_val_labels(val: Path, root: Path, classes: tuple[str, ...]) -> tuple[np.ndarray, list[Path]]:
    """Labels of a flat val folder, from LOC_val_solution.csv or a one-label-per-line file."""
    files = sorted(p for p in val.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    index = {name: i for i, name in enumerate(classes)}
    csv = next((p for p in (root / "LOC_val_solution.csv", val / "LOC_val_solution.csv") if p.is_file()), None)
    txt = next((p for p in (root / "val_labels.txt", val / "val_labels.txt") if p.is_file()), None)
    if csv is not None:
        import csv as csvlib

        with open(csv, newline="") as f:
            # ImageId,PredictionString where the string starts with the wnid: "n01751748 x0 y0 x1 y1 ..."
            by_id = {row["ImageId"]: row["PredictionString"].split()[0] for row in csvlib.DictReader(f)}
        missing = [p.name for p in files if p.stem not in by_id]
        if missing:
            raise TimecatError(f"{csv}: no label for {len(missing)} val image(s), e.g. {missing[:3]}")
        wnids = [by_id[p.stem] for p in files]
    elif txt is not None:
        wnids = [line.strip() for line in txt.read_text().splitlines() if line.strip()]
        if len(wnids) != len(files):
            raise TimecatError(f"{txt}: {len(wnids)} labels for {len(files)} images in {val} (sorted by name)")
        # A line is a class folder name (wnid) or an index into the sorted train classes.
        wnids = [classes[int(w)] if w.isdigit() and int(w) < len(classes) else w for w in wnids]
    else:
        raise TimecatError(
            f"{val} holds images but no class folders; put LOC_val_solution.csv or val_labels.txt "
            f"(one label per image, sorted by file name) in {root} or {val}"
        )
    unknown = sorted({w for w in wnids if w not in index})
    if unknown:
        raise TimecatError(f"val labels name classes that are not train folders: {unknown[:5]}")
    return np.asarray([index[w] for w in wnids], dtype=np.int64), files


def read_imagenet(data_root: Path, options: SourceOptions) -> dict[str, Split]:
    """ImageNet-1k: train/<wnid>/ and val/<wnid>/ (or a flat val/ with a labels file); val is our test split."""
    root = Path(options.train_dir).parent if options.train_dir else data_root / "imagenet"
    train_dir = Path(options.train_dir or root / "train")
    val = Path(options.test_dir or root / "val")
    train = _list_class_folders(train_dir)
    classes = tuple(train)
    if not val.is_dir():
        raise TimecatError(f"{val}: ImageNet val folder not found (expected val/<wnid>/ or a flat val/)")
    if any(p.is_dir() for p in val.iterdir()):
        test = _folder_split(_list_class_folders(val), classes, val)
    else:
        val_labels, files = _imagenet_val_labels(val, root, classes)
        test = Split(FileImages(files, val), val_labels, classes, str(val))
    return {"train": _folder_split(train, classes, train_dir), "test": test}


# -- iNaturalist 2018 ------------------------------------------------------------


def _load_coco(path: Path) -> dict:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TimecatError(f"{path}: cannot read iNat JSON ({e})") from None
    if not all(k in data for k in ("images", "annotations", "categories")):
        raise TimecatError(f"{path}: expected COCO-style keys images, annotations and categories")
    return data


def read_inat2018(data_root: Path, options: SourceOptions) -> dict[str, Split]:
    """iNaturalist 2018 from train2018.json / val2018.json; val is our test split.

    Labels come from category_id through one mapping shared by both splits (the
    sorted ids of the union of their categories), never from folder names.
    """
    root = data_root / "inat2018"
    files = {"train": root / "train2018.json", "test": root / "val2018.json"}
    for path in files.values():
        if not path.is_file():
            raise TimecatError(f"{path} not found; put train2018.json, val2018.json and train_val2018/ in {root}")
    data = {split: _load_coco(path) for split, path in files.items()}
    names = {}
    for d in data.values():
        names.update({c["id"]: c.get("name", str(c["id"])) for c in d["categories"]})
    ids = sorted(names)
    index = {cid: i for i, cid in enumerate(ids)}
    classes = tuple(names[c] for c in ids)
    splits = {}
    for split, d in data.items():
        label_of = {a["image_id"]: a["category_id"] for a in d["annotations"]}
        images = sorted(d["images"], key=lambda im: im["id"])
        unlabelled = [im["file_name"] for im in images if im["id"] not in label_of]
        if unlabelled:
            raise TimecatError(f"{files[split]}: {len(unlabelled)} image(s) without annotation, e.g. {unlabelled[:3]}")
        paths = [root / im["file_name"] for im in images]
        missing = [str(p) for p in paths[:1000] if not p.is_file()]
        if missing:
            raise TimecatError(f"{files[split]}: image files not found under {root}, e.g. {missing[:3]}")
        labels = np.asarray([index[label_of[im["id"]]] for im in images], dtype=np.int64)
        splits[split] = Split(FileImages(paths, root), labels, classes, str(files[split]))
    return splits


SMALL_RAW = BetonFormat(write_mode="raw")
# ImageNet-size images: JPEG q90 at most 500 px on the long side (about 65 GB for ImageNet-1k;
# FFCV's own recipe mixes raw and JPEG, 340 GB, for faster decoding).
LARGE_JPEG = BetonFormat(write_mode="jpg", max_resolution=500, jpeg_quality=90)

# Each kind of the registry pipeline.data.recipes.RECIPES, with its reader and reading defaults.
DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        read_fashion_mnist, 28, (0.35, 1.0), SMALL_RAW, "Fashion-MNIST, 28x28 grey, 10 classes"
    ),
    "cifar10": DatasetSpec(read_cifar10, 32, (0.35, 1.0), SMALL_RAW, "CIFAR-10, 32x32 colour, 10 classes"),
    "cifar100": DatasetSpec(read_cifar100, 32, (0.35, 1.0), SMALL_RAW, "CIFAR-100, 32x32 colour, 100 fine classes"),
    "digits": DatasetSpec(read_digits, 8, (0.5, 1.0), SMALL_RAW, "scikit-learn digits, 8x8 grey, 10 classes"),
    "imagenet": DatasetSpec(
        read_imagenet, 224, (0.08, 1.0), LARGE_JPEG, "ImageNet-1k, train/ and val/ (val is the test split)", 224 / 256
    ),
    "inat2018": DatasetSpec(
        read_inat2018, 224, (0.08, 1.0), LARGE_JPEG, "iNaturalist 2018, 8142 classes from COCO JSON", 224 / 256
    ),
    "dominoes-mixture": DatasetSpec(
        functools.partial(read_dominoes, agreement=0.99),
        32,
        (0.8, 1.0),
        SMALL_RAW,
        "digit 0/1 above a Fashion-MNIST dress/coat, digit agreeing with the label 99% of the time",
    ),
    "dominoes-balanced": DatasetSpec(
        functools.partial(read_dominoes, agreement=0.5),
        32,
        (0.8, 1.0),
        SMALL_RAW,
        "digit 0/1 above a Fashion-MNIST dress/coat, digit independent of the label",
    ),
    "imagefolder": DatasetSpec(
        read_imagefolder,
        64,
        (0.25, 1.0),
        BetonFormat(write_mode="smart", max_resolution=256, jpeg_quality=90),
        "any <class>/<image> folders (--train, --test)",
    ),
}


def get_spec(name: str) -> DatasetSpec:
    """The spec of a registered dataset kind, or an error listing the kinds."""
    try:
        return DATASETS[name]
    except KeyError:
        guess = closest_kind(name)
        hint = f" (did you mean {guess!r}? `timecat prepare {guess}`)" if guess else ""
        raise TimecatError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}{hint}") from None


def closest_kind(name: str) -> str | None:
    """The registered kind closest to a mistyped one (``fashionmnist`` -> ``fashion-mnist``), or None."""
    found = difflib.get_close_matches(name.lower(), list(DATASETS), n=1, cutoff=0.6)
    return found[0] if found else None
