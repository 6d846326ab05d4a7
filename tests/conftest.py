"""Shared fixtures: small datasets in real on-disk formats, and one tiny pipeline run.

Everything is offline: Fashion-MNIST comes from the Debian package (a few
hundred real images rewritten as IDX files), digits from scikit-learn, and
CIFAR pickles, image folders and IDX files are generated here.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import cache
from pipeline.data.datasets import DEBIAN_FASHION_MNIST, read_idx

TINY_TRAIN, TINY_TEST = 640, 160  # images per split of the tiny Fashion-MNIST


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped IDX file (the MNIST format)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def fashion_subset(n_train: int, n_test: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The first images of real Fashion-MNIST (Debian package), or a stand-in with learnable classes."""
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images_file = DEBIAN_FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz"
        if images_file.is_file():
            images = read_idx(images_file)[:n]
            labels = read_idx(DEBIAN_FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz")[:n]
        else:  # a class-dependent bright square, so probes have something to learn
            rng = np.random.default_rng(1 if split == "train" else 2)
            labels = (np.arange(n) % 10).astype(np.uint8)
            images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
            for i, c in enumerate(labels):
                images[i, 2 * c : 2 * c + 8, 4:24] = 255
        out[split] = (images, labels)
    return out


def make_fashion_root(root: Path, n_train: int = TINY_TRAIN, n_test: int = TINY_TEST) -> Path:
    """A data root whose fashion-mnist/ folder holds a few hundred real images as IDX files."""
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in fashion_subset(n_train, n_test).items():
        prefix = "train" if split == "train" else "t10k"
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def make_cifar10(root: Path, per_batch: int = 12, test: int = 20) -> Path:
    """cifar10/cifar-10-batches-py with five tiny data batches, a test batch and batches.meta."""
    base = root / "cifar10" / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", test)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}
        batch[b"labels"] = [i % 10 for i in range(n)]
        with open(base / name, "wb") as f:
            pickle.dump(batch, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, f)
    return root


def make_imagefolder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 4, size=(40, 30)) -> Path:
    """<root>/<class>/<i>.png and .jpg images of varied size."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1] + i, size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def make_cache(path, members=("a", "b"), rows=50, dims=(6, 4), fingerprint="fp0", dtype="float32"):
    """A cache with one split of ``rows`` rows and random features per member; returns the arrays."""
    rng = np.random.default_rng(0)
    store = cache.open(str(path), mode="a")
    labels = np.arange(rows) % 5
    store.write_labels("toy", "train", labels, fingerprint, [f"c{i}" for i in range(5)])
    arrays = {}
    for name, dim in zip(members, dims, strict=True):
        X = rng.normal(size=(rows, dim)).astype(np.float32)
        writer = store.create_features("toy", "train", name, dim, {"dataset_fingerprint": fingerprint}, dtype=dtype)
        for start in range(0, rows, 7):  # blocks that do not line up with chunks
            writer.append(X[start : start + 7])
        writer.close()
        store.finish_features("toy", "train", name)
        arrays[name] = X
    store.consolidate()
    return arrays, labels


def matrices_cache(path, dataset: str, member: str, splits: dict, classes: list[str], kind=None) -> str:
    """A cache of one member holding given matrices, ``{split: (X, y)}`` (fingerprint fp-SPLIT), so a test drives
    the production path (``probe`` on a cache) with data it chose."""
    store = cache.open(str(path), mode="a")
    for split, (X, y) in splits.items():
        store.write_labels(dataset, split, y, f"fp-{split}", classes, kind)
        writer = store.create_features(dataset, split, member, X.shape[1], {"dataset_fingerprint": f"fp-{split}"})
        writer.append(X)
        writer.close()
        store.finish_features(dataset, split, member)
    store.consolidate()
    return str(path)


def add_member(path, name, dim, fingerprint, rows=50):
    """Add a complete member of zeros to the toy split, extracted from ``fingerprint``."""
    store = cache.open(str(path), mode="a")
    writer = store.create_features("toy", "train", name, dim, {"dataset_fingerprint": fingerprint})
    writer.append(np.zeros((rows, dim), np.float32))
    writer.close()
    store.finish_features("toy", "train", name)
    store.consolidate()
    return store


def parses(argv: list[str]) -> None:
    """Parse a timecat command line as click would run it (types, choices, required options), without running it."""
    import click

    import cli

    command, name, parent = cli.main, "timecat", None
    while isinstance(command, click.Group):
        parent = click.Context(command, info_name=name, parent=parent)
        name, argv = argv[0], argv[1:]
        command = command.get_command(parent, name)
        assert command is not None, f"no command {name!r}"
    command.make_context(name, list(argv), parent=parent)


def zombie_children() -> list[int]:
    """Pids of this process's children that exited and were never waited for (Linux /proc)."""
    zombies = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] == "Z":
            zombies.append(int(stat.parent.name))
    return zombies


def digits_cache(path, members: int = 4) -> tuple[str, ...]:
    """A cache of digits cut into ``members`` 16-d members (train 1,400 / test 397 rows)."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    X, y = X[order].astype(np.float32), y[order]
    store = cache.open(str(path), mode="a")
    names = tuple(f"m{j}" for j in range(members))
    for split, rows in (("train", slice(0, 1400)), ("test", slice(1400, None))):
        store.write_labels("digits", split, y[rows], "fp", [str(c) for c in range(10)])
        for name, part in zip(names, np.array_split(X[rows], members, axis=1), strict=True):
            prov = {"dataset_fingerprint": "fp", "checkpoint_sha256": name}
            writer = store.create_features("digits", split, name, part.shape[1], prov)
            writer.append(np.ascontiguousarray(part))
            writer.close()
            store.finish_features("digits", split, name)
    store.consolidate()
    return names


def probe_record(members, dataset, top1, steps, protocol="logreg", arch="resnet50", params=23_500_000):
    """A minimal probe record as results and report read it."""
    return {
        "dataset": dataset,
        "members": members,
        "n_members": len(members),
        "protocol": protocol,
        "train_split": "train",
        "eval_split": "test",
        "top1": top1,
        "member_provenance": {
            m: {"steps": steps, "arch": arch, "params": params, "pretrain_dataset": "fmnist"} for m in members
        },
    }


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory):
    """One tiny end-to-end run shared by several tests: prepare, 3 members, extract, on real data.

    Returns the paths and the member names; tests must not modify what it wrote.
    """
    from pipeline.configs import ExtractConfig, PrepareConfig, PretrainConfig
    from pipeline.data.prepare import prepare
    from pipeline.features.extract import extract
    from pipeline.train.pretrain import pretrain

    root = tmp_path_factory.mktemp("pipeline")
    data = make_fashion_root(root / "data")
    runs, store = root / "runs", str(root / "features.zarr")
    prepare(PrepareConfig("fashion-mnist", data))
    prepare(PrepareConfig("digits", data))
    members = ("run0", "run1", "run2")
    for seed, name in enumerate(members):
        pretrain(PretrainConfig(name, "fashion-mnist", seed, steps=12, batch_size=64, log_every=4), data, runs)
    for dataset in ("fashion-mnist", "digits"):
        extract(ExtractConfig(dataset, members, batch_size=128), data, runs, store)
    return {"data": data, "runs": runs, "cache": store, "members": members}


def logreg_optimum(X: np.ndarray, y: np.ndarray, C: float) -> float:
    """The float64 optimum of scikit-learn's L2 logistic objective (mean log-loss + ||W||^2 / (2 C n),
    intercept free; two classes are one binomial logit), by trust-region Newton with exact Hessian products
    (scipy's trust-krylov; the products in float64 torch, which uses every core).

    Agrees with scikit-learn's newton-cholesky at tol 1e-12 within 4e-9 relative on digits and the tiny run's
    features, in a third of its time.
    """
    import scipy.optimize

    Xt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float64))
    n, d = Xt.shape
    k = int(y.max()) + 1
    width = 1 if k == 2 else k
    Y = torch.from_numpy(y[:, None].astype(np.float64) if width == 1 else np.eye(k)[y])
    lam, state = 1.0 / (C * n), {}

    def unpack(v):
        v = torch.from_numpy(v)
        return v[: d * width].reshape(d, width), v[d * width :]

    def fun(v):
        W, b = unpack(v)
        Z = Xt @ W + b
        if width == 1:
            P = torch.sigmoid(Z)
            losses = torch.nn.functional.softplus(Z[:, 0]) - Y[:, 0] * Z[:, 0]
        else:
            P = torch.softmax(Z, 1)
            losses = torch.logsumexp(Z, 1) - (Z * Y).sum(1)
        state["P"] = P
        G = (P - Y) / n
        grad = torch.cat([(Xt.T @ G + lam * W).ravel(), G.sum(0)])
        return float(losses.mean() + 0.5 * lam * (W * W).sum()), grad.numpy()

    def hessp(v, p):
        fun(v)
        P, (V, c) = state["P"], unpack(p)
        U = Xt @ V + c
        H = P * (1 - P) * U if width == 1 else P * U - P * (P * U).sum(1, keepdim=True)
        return torch.cat([(Xt.T @ H / n + lam * V).ravel(), H.sum(0) / n]).numpy()

    options = {"gtol": 1e-10, "maxiter": 1000}
    with np.errstate(all="ignore"):  # the Krylov subproblem may try a non-finite step and reject it
        found = scipy.optimize.minimize(
            fun, np.zeros(d * width + width), jac=True, hessp=hessp, method="trust-krylov", options=options
        )
    # trust-krylov may end saying a step cannot be predicted to improve: f is then flat to float64.
    assert found.success or np.abs(found.jac).max() < 1e-7, (found.message, np.abs(found.jac).max())
    return float(found.fun)


# -- shared by the reliability files: the CLI as a user runs it, snapshots, one error line ----------


def run(*args, env=None):
    """The timecat CLI in this process, as a user would run it (arguments made strings)."""
    from click.testing import CliRunner

    import cli

    return CliRunner().invoke(cli.main, [str(a) for a in args], env=env)


def tree(root: Path) -> dict[str, bytes | str | None]:
    """Every path under ``root``: bytes of files, a link's target, None for folders and FIFOs (a snapshot to compare,
    never reading through a link or blocking on a FIFO)."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        if path.is_symlink():
            out[str(path.relative_to(root))] = os.readlink(path)
        elif path.is_file():
            out[str(path.relative_to(root))] = path.read_bytes()
        else:
            out[str(path.relative_to(root))] = None
    return out


def one_error(result, *words: str) -> str:
    """The single ``Error:`` line of a failed command, checked for ``words`` and for the absence of a traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught error
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def copy(pipeline_run, tmp_path):
    """A private copy of the shared tiny pipeline's runs and cache, to damage."""
    import shutil

    runs, store = tmp_path / "runs", tmp_path / "features.zarr"
    shutil.copytree(pipeline_run["runs"], runs)
    shutil.copytree(pipeline_run["cache"], store)
    return {"data": pipeline_run["data"], "runs": runs, "cache": str(store), "tmp": tmp_path}


PROBE_SAME = ("members", "dim", "n_train", "n_eval", "precision", "holdout")


def assert_agreeing_probe(one: dict, two: dict) -> None:
    """The same probe to the solver's tolerance: the same C, top-1 within two eval rows, every fit converged to
    objectives within 2e-4 (each is within 1e-4 of the optimum). Not to the bit: processes and batch shapes
    round their products differently, and nothing promises otherwise on every CPU."""
    for key in PROBE_SAME:
        assert one[key] == two[key], (key, one[key], two[key])
    assert one["chosen"]["C"] == two["chosen"]["C"]
    assert abs(one["top1"] - two["top1"]) <= 2 * 100 / one["n_eval"] + 1e-9
    assert [t["C"] for t in one["search"]] == [t["C"] for t in two["search"]]
    for a, b in zip([*one["search"], one["chosen"]], [*two["search"], two["chosen"]], strict=True):
        assert a["fit"]["status"] == b["fit"]["status"] == "converged"
        assert a["fit"]["objective"] == pytest.approx(b["fit"]["objective"], rel=2e-4)
