"""Every refused input in one place: hostile files, damaged stores, full disks, planted symlinks, races.

Each case asserts the message a user sees and that nothing already written was lost.
Full-disk and read-only cases mount a small tmpfs, so they need root; elsewhere they are skipped.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_cifar10, make_fashion_root, run, tree
from test_probe import blob_cache

import cache
import cli
from pipeline import options
from pipeline.configs import ExtractConfig, PrepareConfig, PretrainConfig, ProbeConfig
from pipeline.core.errors import TimecatError
from pipeline.data.prepare import prepare
from pipeline.data.splits import beton_path, manifest_path
from pipeline.features.extract import extract
from pipeline.members import checkpoints
from pipeline.probe import results
from pipeline.probe.run import probe
from pipeline.train.pretrain import pretrain


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A small tmpfs at ``path`` (root only): a disk that fills up, or refuses writes."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode:
        pytest.skip("this machine cannot mount a tmpfs")
    try:
        if read_only:
            yield lambda: subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        else:
            yield None
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# -- 0. Severe defects ------------------------------------------------------------------------


class Payload:
    """A pickle whose loading would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_a_cifar_pickle_that_would_run_a_command_runs_nothing(tmp_path, kind):
    root, marker = tmp_path / "data", tmp_path / "pwned"
    if kind == "cifar10":
        make_cifar10(root)
        target = root / "cifar10/cifar-10-batches-py/data_batch_2"
    else:
        base = root / "cifar100/cifar-100-python"
        base.mkdir(parents=True)
        data = np.zeros((4, 3072), np.uint8)
        for name, n in (("train", 4), ("test", 4)):
            (base / name).write_bytes(pickle.dumps({b"data": data[:n], b"fine_labels": [0, 1, 0, 1]}))
        (base / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"a", b"b"]}))
        target = base / "train"
    target.write_bytes(pickle.dumps({b"data": Payload(marker), b"labels": [0]}))
    with pytest.raises(TimecatError, match=r"not a CIFAR python pickle \(it names posix.system"):
        prepare(PrepareConfig(kind, root))
    assert not marker.exists()  # nothing ran
    assert not list((root / kind).glob("*.beton")) and not list((root / kind).glob("*.json"))


def test_a_member_mixed_across_checkpoints_is_refused_by_probe_and_verify(copy):
    # extract --overwrite stopped after the train split: run0's train features come from run1's weights.
    shutil.copy(copy["runs"] / "run1/checkpoint.pt", copy["runs"] / "run0/checkpoint.pt")
    config = ExtractConfig("digits", ("run0",), splits=("train",), overwrite=True)
    extract(config, copy["data"], copy["runs"], copy["cache"])
    with pytest.raises(TimecatError, match=r"member run0's arrays come from different checkpoints.*--overwrite"):
        probe(ProbeConfig("digits", ("run0", "run2")), copy["cache"])
    rows = {(r["dataset"], r["split"], r["member"]): r for r in cache.open(copy["cache"]).verify()}
    for split in ("train", "test"):
        assert any("different checkpoints" in p for p in rows[("digits", split, "run0")]["problems"])
    assert rows[("digits", "train", "run2")]["ok"]
    record = probe(ProbeConfig("digits", ("run2",)), copy["cache"])  # the others are untouched
    shas = record["member_provenance"]["run2"]["checkpoint_sha256_by_array"]
    assert sorted(shas) == ["digits/test", "digits/train"] and len(set(shas.values())) == 1


def test_labels_damaged_inside_the_store_are_refused_then_rewritten_by_extract(copy):
    before = probe(ProbeConfig("digits", ("run1",)), copy["cache"])
    store = cache.open(copy["cache"], mode="a")
    labels = store.group["digits/test/labels"]
    labels[:] = np.roll(labels[:], 1)  # same values, wrong rows: every recorded hash still matches
    with pytest.raises(TimecatError, match="labels of digits/test do not match their recorded sha256"):
        probe(ProbeConfig("digits", ("run1",)), copy["cache"])
    assert not next(r for r in cache.open(copy["cache"]).verify() if (r["dataset"], r["split"]) == ("digits", "test"))[
        "ok"
    ]
    extract(ExtractConfig("digits", ("run1",)), copy["data"], copy["runs"], copy["cache"])
    assert probe(ProbeConfig("digits", ("run1",)), copy["cache"])["top1"] == before["top1"]


@pytest.mark.parametrize(("protocol", "value"), [("logreg", np.inf), ("bn-linear", np.inf), ("logreg", np.nan)])
def test_an_inf_feature_is_refused_then_rewritten_by_extract(copy, protocol, value):
    store = cache.open(copy["cache"], mode="a")
    store.group["digits/train/features/run1"][5, 3] = value  # NaN-only scans let inf through
    config = ProbeConfig("digits", ("run1",), protocol=protocol, wd_grid=(1e-4,))
    with pytest.raises(TimecatError, match=r"member run1 holds non-finite \(NaN or inf\) values in digits/train"):
        probe(config, copy["cache"])
    problems = [
        r["problems"]
        for r in cache.open(copy["cache"]).verify()
        if (r["dataset"], r["split"], r["member"]) == ("digits", "train", "run1")
    ]
    assert problems == [["member run1 has unwritten, unreadable or non-finite rows from row 0"]]
    assert {
        r["state"] for r in extract(ExtractConfig("digits", ("run1",)), copy["data"], copy["runs"], copy["cache"])
    } == {"kept"}  # a rerun does not scan every value of a large cache ...
    summary = extract(ExtractConfig("digits", ("run1",), repair=True), copy["data"], copy["runs"], copy["cache"])
    assert {(r["split"], r["state"]) for r in summary} == {("train", "written"), ("test", "kept")}  # ... --repair does
    assert all(r["ok"] for r in cache.open(copy["cache"]).verify())


def test_deleted_and_garbled_chunks_are_rewritten_by_extract(copy):
    original = cache.open(copy["cache"]).features("digits", "train", ["run2"])[0]
    chunks = sorted((Path(copy["cache"]) / "digits/train/features/run2/c").rglob("*"))
    chunks = [c for c in chunks if c.is_file()]
    chunks[0].unlink()  # a deleted chunk: the probe says to rerun extract, which used to answer 'kept'
    with pytest.raises(TimecatError, match="missing 1 of its .* chunks: rerun `timecat extract`"):
        probe(ProbeConfig("digits", ("run2",)), copy["cache"])
    extract(ExtractConfig("digits", ("run2",)), copy["data"], copy["runs"], copy["cache"])
    np.testing.assert_array_equal(cache.open(copy["cache"]).features("digits", "train", ["run2"])[0], original)
    chunk = next(c for c in (Path(copy["cache"]) / "digits/test/features/run2/c").rglob("*") if c.is_file())
    chunk.write_bytes(b"\x00garbage" * 8)  # a garbled zstd chunk
    with pytest.raises(TimecatError, match=r"has an unreadable chunk in rows .*rerun `timecat extract --repair`"):
        probe(ProbeConfig("digits", ("run2",)), copy["cache"])
    extract(ExtractConfig("digits", ("run2",), repair=True), copy["data"], copy["runs"], copy["cache"])
    assert all(r["ok"] for r in cache.open(copy["cache"]).verify())


def test_verify_reads_each_arrays_own_metadata(copy):
    root = Path(copy["cache"])
    (root / "digits/test/features/run0/zarr.json").write_text("{garbage")  # consolidated metadata still says fine
    store = cache.open(copy["cache"], mode="a")  # a new array, half written when its process was killed
    writer = store.create_features("digits", "test", "late", 4, {"dataset_fingerprint": "x"})
    writer.append(np.zeros((1, 4), np.float32))  # (not consolidated: as after a kill)
    rows = {(r["split"], r["member"]): r for r in cache.open(copy["cache"]).verify() if r["dataset"] == "digits"}
    assert "array metadata unreadable" in rows[("test", "run0")]["problems"][0]
    assert "member late is 'writing', not 'complete'" in rows[("test", "late")]["problems"][0]
    assert rows[("test", "run1")]["ok"] and rows[("train", "run0")]["ok"]
    out = run("cache", "verify", copy["cache"])
    assert out.exit_code == 1 and "array metadata unreadable" in out.output and out.exception.code == 1


def _extract_member(path: str, name: str) -> str:
    """One of several extractions of a new split: write its labels, then one member."""
    store = cache.open(path, mode="a")
    store.write_labels("toy", "train", np.arange(40) % 4, "fp", ["a", "b", "c", "d"], "digits")
    with store.lock("toy", "train", name):
        writer = store.create_features("toy", "train", name, 3, {"dataset_fingerprint": "fp"})
        writer.append(np.ones((40, 3), np.float32))
        writer.close()
        store.finish_features("toy", "train", name)
    return name


def test_concurrent_extracts_of_a_new_split_never_race(tmp_path, monkeypatch):
    # Unlocked, a second extraction found the first's labels created but not yet written, wrote them again,
    # and while its overwrite had removed them the first failed ("write the labels ... before any member's
    # features", or KeyError: "rows"): a few percent of random trials. Both windows are held open here
    # (pauses in zarr's array creation and directory removal), so that without the split's lock the
    # first extraction fails every time; with it, the second waits and finds the labels whole.
    import time

    import zarr

    context = multiprocessing.get_context("fork")
    created, removed, outcomes = context.Event(), context.Event(), context.Queue()
    real_create, real_delete = zarr.Group.create_array, zarr.storage.LocalStore.delete_dir

    def create_then_hold(self, name, *args, **kwargs):
        array = real_create(self, name, *args, **kwargs)
        if name == "toy/train/labels" and not created.is_set():  # the first creator: made, not yet written
            created.set()
            removed.wait(1.5)  # until another process removes them (under the lock, none does)
        return array

    async def delete_then_hold(self, prefix):
        existed = (self.root / prefix / "zarr.json").is_file()
        await real_delete(self, prefix)
        if existed and prefix == "toy/train/labels":  # an overwrite: no labels until it writes them anew
            removed.set()
            time.sleep(1.0)

    monkeypatch.setattr(zarr.Group, "create_array", create_then_hold)
    monkeypatch.setattr(zarr.storage.LocalStore, "delete_dir", delete_then_hold)
    path = str(tmp_path / "c.zarr")
    cache.open(path, mode="a")

    def extraction(name: str, after=None):
        if after is not None:
            after.wait(30)  # starts once the first has created the labels
        try:
            outcomes.put(_extract_member(path, name))
        except Exception as e:
            outcomes.put(f"{name}: {type(e).__name__}: {e}")

    processes = [
        context.Process(target=extraction, args=("m0",)),
        context.Process(target=extraction, args=("m1", created)),
    ]
    for process in processes:
        process.start()
    done = sorted(outcomes.get(timeout=60) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    assert created.is_set() and done == ["m0", "m1"], done
    assert cache.open(path).members("toy", "train", complete_only=True) == ["m0", "m1"]


def test_a_failed_resume_keeps_the_log_and_a_torn_last_line_is_tolerated(tmp_path, monkeypatch):
    data = make_fashion_root(tmp_path / "data", n_train=256, n_test=64)
    prepare(PrepareConfig("fashion-mnist", data))
    runs = tmp_path / "runs"
    config = PretrainConfig("m", "fashion-mnist", 0, steps=8, batch_size=64, log_every=2, checkpoint_every=4)
    pretrain(config, data, runs)
    ckpt, log = runs / "m/checkpoint.pt", runs / "m/log.jsonl"
    payload = checkpoints.load(ckpt)
    checkpoints.save(ckpt, {**payload, "complete": False, "step": 4})  # as if stopped at step 4 ...
    with open(log, "a") as f:
        f.write('{"step": 5, "lo')  # ... by a kill in the middle of a log line
    before = log.read_bytes()
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(TimecatError, match="--tensorboard needs the tensorboard package"):
        pretrain(PretrainConfig(**{**config.__dict__, "tensorboard": True}), data, runs)
    monkeypatch.undo()
    assert log.read_bytes() == before  # the failed resume emptied it before
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps(
            {
                "dataset": "fashion-mnist",
                "batch_size": 64,  # the member's own: status compares recipes, and 128 would be another
                "members": [{"name": "m", "group": "Cat1", "seed": 0, "steps": 8, "arch": "small-resnet"}],
            }
        )
    )
    status = run("status", plan, "--runs", runs, "--json")
    assert status.exit_code == 0 and json.loads(status.stdout)[0]["state"] == "stopped"
    result = pretrain(config, data, runs)  # resumes past the torn line
    assert result["step"] == 8
    steps = [json.loads(line).get("step") for line in log.read_text().splitlines()]
    assert steps == [2, 4, 4, 6, 8, 8]  # logged, resume, logged again, end; no torn line


def test_prepare_on_a_full_disk_fails_once_and_leaves_no_writer(tmp_path):
    disk = tmp_path / "disk"
    with tmpfs(disk, "3m"):
        data = make_fashion_root(disk / "data", n_train=2000, n_test=100)
        stale = data / "fashion-mnist/.train.beton.tmp-999999"  # left by a writer that died before
        stale.write_bytes(b"x" * 1000)
        out = subprocess.run(
            [sys.executable, "-m", "cli", "prepare", "fashion-mnist", "--data-root", str(data)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=Path(cli.__file__).parent,
        )
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert "no space left on the device while writing" in out.stderr
        assert not list((data / "fashion-mnist").glob(".*.tmp-*"))  # the stale one and its own
        assert not list((data / "fashion-mnist").glob("*.beton"))
        # FFCV's writer processes are forks of the command: none may outlive it.
        assert subprocess.run(["pgrep", "-f", str(data)], capture_output=True).stdout == b""


def test_symlinks_planted_in_shared_folders_are_never_written_through(copy, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    data, runs = copy["data"], copy["runs"]
    # A member's lock: refused, naming the link.
    (runs / "new").mkdir()
    (runs / "new/.lock").symlink_to(victim)
    with pytest.raises(TimecatError, match=r"new/.lock is a symbolic link: refusing to follow it"):
        pretrain(PretrainConfig("new", "fashion-mnist", 0, steps=2, batch_size=64), data, runs)
    # config.json and log.jsonl of a member being trained: replaced, not written through.
    (runs / "fresh").mkdir()
    for name in ("config.json", "log.jsonl"):
        (runs / "fresh" / name).symlink_to(victim)
    pretrain(PretrainConfig("fresh", "fashion-mnist", 0, steps=2, batch_size=64, log_every=1), data, runs)
    assert not (runs / "fresh/config.json").is_symlink() and not (runs / "fresh/log.jsonl").is_symlink()
    # The cache's member lock.
    locks = Path(f"{copy['cache']}.locks/digits/train")
    locks.mkdir(parents=True, exist_ok=True)
    (locks / "run0.lock").unlink(missing_ok=True)
    (locks / "run0.lock").symlink_to(victim)
    with pytest.raises(cache.CacheError, match="run0.lock is a symbolic link"):
        extract(ExtractConfig("digits", ("run0",)), data, runs, copy["cache"])
    # The results file, and a plot.
    out = tmp_path / "results"
    out.mkdir()
    (out / "probes.jsonl").symlink_to(victim)
    with pytest.raises(TimecatError, match="probes.jsonl is a symbolic link: refusing to follow it"):
        probe(ProbeConfig("digits", ("run1",)), copy["cache"], out)
    (out / "probes.jsonl").unlink()
    probe(ProbeConfig("digits", ("run1",)), copy["cache"], out)
    (out / "catn.png").symlink_to(victim)
    assert run("report", "--results", out).exit_code == 0
    assert not (out / "catn.png").is_symlink() and (out / "catn.png").read_bytes()[:4] == b"\x89PNG"
    assert victim.read_text() == "precious"


BAD_NAMES = [
    "bad\nname",
    "nul\x00byte",
    "../escape",
    "/tmp/absolute",
    ".hidden",
    "-dash",
    "tab\tname",
    "a b",
    "x" * 129,
    "a=b",
    "é",
]


def commands(name: str, work: Path) -> dict[str, list]:
    """Each command with ``name`` where it takes a name (and otherwise valid arguments)."""
    return {
        "prepare --name": ["prepare", "digits", "--name", name],
        "pretrain --name": ["pretrain", "--name", name, "--dataset", "digits", "--seed", 0, "--steps", 1],
        "pretrain --dataset": ["pretrain", "--name", "m", "--dataset", name, "--seed", 0, "--steps", 1],
        "extract --members": ["extract", "--members", name, "--dataset", "digits"],
        "extract --dataset": ["extract", "--members", "run0", "--dataset", name],
        "probe --members": ["probe", "--members", name, "--dataset", "digits"],
        "probe --dataset": ["probe", "--members", "run0", "--dataset", name],
        "probe --eval-split": ["probe", "--members", "run0", "--dataset", "digits", "--eval-split", name],
        "probe --from": ["probe", "--cat", 1, "--from", f"run0,{name}", "--dataset", "digits"],
        "plan --dataset": ["plan", "--dataset", name, "--cat", 2, "--total-steps", 10, "--out", work / "p.json"],
        "diversity --members": ["diversity", "--members", f"run0,{name}", "--dataset", "digits"],
        "diversity --dataset": ["diversity", "--members", "run0,run1", "--dataset", name],
        "diversity --split": ["diversity", "--members", "run0,run1", "--dataset", "digits", "--split", name],
        "export": ["export", name, "--out", work / "out.pth"],
    }


@pytest.mark.parametrize("where", sorted(commands("x", Path("."))))
def test_every_command_refuses_bad_names_before_touching_the_disk(tmp_path, where):
    work = tmp_path / "work"
    work.mkdir()
    env = {
        name: str(work / sub)
        for name, sub in (
            ("TIMECAT_DATA", "data"),
            ("TIMECAT_RUNS", "runs"),
            ("TIMECAT_CACHE", "features.zarr"),
            ("TIMECAT_RESULTS", "results"),
        )
    }
    before = tree(tmp_path)
    for name in BAD_NAMES:
        if where in ("extract --members", "export") and ("/" in name or "=" in name):
            continue  # there a '/' or '=' names a checkpoint file (path or name=path), by design
        out = CliRunner().invoke(cli.main, [str(a) for a in commands(name, work)[where]], env=env)
        assert out.exit_code in (1, 2), (name, out.output)
        assert out.exception is None or isinstance(out.exception, SystemExit), (name, out.exception)
        # (click itself takes a bare '-dash' argument for an option: a usage error, as good)
        assert "1 to 128 ASCII letters, digits" in out.output or (name[0] == "-" and out.exit_code == 2), out.output
        assert tree(tmp_path) == before, name  # no folder, lock or file made, here or above the work folder
        assert not Path("/tmp/absolute").exists()


def malformed(param: click.Parameter) -> list[str]:
    """Values a careless user types for an option of this type."""
    kind = param.type
    if isinstance(kind, click.Choice):
        return ["bogus", ""]
    if isinstance(kind, options.CommaList):
        return ["", ",", "a,a", "1,zz", "-1"]
    if isinstance(kind, click.types.IntParamType):
        return ["-1", "0", "x", "", "99999999999999999999"]
    if isinstance(kind, click.types.FloatParamType):
        return ["nan", "inf", "-1", "0", "x"]
    if isinstance(kind, click.types.StringParamType):
        return ["", "a,a", ",", "-1", "nan"]
    return []


# Enough for each command to reach its options' checks (nothing here exists, so no work starts).
BASE = {
    "prepare": ["fashion-mnist"],  # not found (the Debian copy is hidden): stops before work
    "pretrain": ["--name", "m", "--dataset", "digits", "--seed", "0", "--steps", "2"],
    "plan": ["--dataset", "digits", "--cat", "2", "--total-steps", "10"],
    "status": ["plan.json"],
    "extract": ["--members", "run0", "--dataset", "digits"],
    "probe": ["--members", "run0", "--dataset", "digits"],
    "results": [],
    "compare": ["a1", "b2"],
    "report": [],
    "export": ["run0", "--out", "x.pth"],
    "toy": ["--mixtures", "4", "--steps", "20"],  # a value the loop accepts runs the experiment: keep it small
    "diversity": ["--members", "run0,run1", "--dataset", "digits"],
    "dominoes": ["--steps", "1", "--seeds", "0"],
    "demo": ["--total-steps", "4"],
}


def flags(command: click.Command) -> list[tuple[str, click.Parameter]]:
    return [(p.opts[0], p) for p in command.params if isinstance(p, click.Option) and not p.is_flag]


def test_malformed_values_are_one_error_line_never_a_traceback(tmp_path, monkeypatch):
    import pipeline.data.datasets

    monkeypatch.setattr(pipeline.data.datasets, "DEBIAN_FASHION_MNIST", tmp_path / "none")  # demo, dominoes stop early
    monkeypatch.chdir(tmp_path)
    env = {
        "TIMECAT_DATA": str(tmp_path / "d"),
        "TIMECAT_RUNS": str(tmp_path / "r"),
        "TIMECAT_CACHE": str(tmp_path / "c.zarr"),
        "TIMECAT_RESULTS": str(tmp_path / "res"),
    }
    tried = 0
    for name, command in cli.main.commands.items():
        subcommands = command.commands.items() if isinstance(command, click.Group) else [(None, command)]
        for sub, leaf in subcommands:
            path = [name] + ([sub] if sub else [])
            base = BASE.get(name, [])
            for flag, param in flags(leaf):
                for value in malformed(param):
                    args = [*path, *[a for a in base], flag, value]
                    out = CliRunner().invoke(cli.main, args, env=env)
                    tried += 1
                    assert out.exception is None or isinstance(out.exception, SystemExit), (args, out.exception)
                    if out.exit_code != 0:
                        assert out.output.count("Error") >= 1 and "Traceback" not in out.output, (args, out.output)
    assert tried > 300


# -- 5. Shared filesystems ----------------------------------------------------------------------


def test_a_filesystem_without_locks_is_named(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    store = cache.open(str(tmp_path / "c.zarr"), mode="a")
    with (
        pytest.raises(cache.CacheError, match="does not support file locks.*NFSv4 with locking"),
        store.lock("d", "t", "m"),
    ):
        pass
    data = make_fashion_root(tmp_path / "data", n_train=64, n_test=16)
    monkeypatch.undo()
    prepare(PrepareConfig("fashion-mnist", data))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(TimecatError, match="does not support file locks"):
        pretrain(PretrainConfig("m", "fashion-mnist", 0, steps=1, batch_size=32), data, tmp_path / "runs")


# -- 8. The rest of the tracebacks ---------------------------------------------------------------


def test_read_only_folders_are_found_before_the_work_starts(copy, tmp_path):
    frozen = tmp_path / "frozen"
    with tmpfs(frozen, "8m", read_only=True) as freeze:
        shutil.copytree(copy["cache"], frozen / "features.zarr")
        (frozen / "results").mkdir()
        (frozen / "runs").mkdir()
        freeze()
        with pytest.raises(cache.CacheError, match="is not writable"):
            extract(ExtractConfig("digits", ("run0",)), copy["data"], copy["runs"], str(frozen / "features.zarr"))
        with pytest.raises(TimecatError, match="the results folder .* is not writable"):
            probe(ProbeConfig("digits", ("run0",)), copy["cache"], frozen / "results")
        with pytest.raises(TimecatError, match="cannot create the lock .* the folder is not writable"):
            pretrain(PretrainConfig("m", "fashion-mnist", 0, steps=1, batch_size=32), copy["data"], frozen / "runs")
        # Reading a read-only cache works.
        assert probe(ProbeConfig("digits", ("run0",)), str(frozen / "features.zarr"))["top1"] > 0


def test_a_full_disk_while_writing_a_checkpoint_labels_or_a_lock_says_so(tmp_path):
    disk = tmp_path / "disk"
    with tmpfs(disk, "2m"):
        with pytest.raises(TimecatError, match="no space left on the device while writing .*checkpoint.pt"):
            checkpoints.save(disk / "m/checkpoint.pt", {"model": {"w": torch.zeros(2_000_000)}})
        assert not list((disk / "m").iterdir())  # no torn file, no temporary (torch said 'unexpected pos')
        store = cache.open(str(disk / "c.zarr"), mode="a")
        with open(disk / "filler", "wb") as f, contextlib.suppress(OSError):
            f.write(b"\0" * 1_600_000)
        # 500,000 labels of 1,024 classes: 10 random bits each, about 625 KB however well they compress.
        classes = [f"c{i}" for i in range(1024)]
        labels = np.random.default_rng(0).integers(0, len(classes), 500_000)
        with pytest.raises(cache.CacheError, match="no space left on the device while writing the labels of d/train"):
            store.write_labels("d", "train", labels, "fp", classes)
        with pytest.raises(cache.CacheError, match="labels of d/train (are unreadable|do not match their recorded)"):
            cache.open(str(disk / "c.zarr")).labels("d", "train")  # unfinished labels are never read as good
        (row,) = cache.open(str(disk / "c.zarr")).verify()  # nor pass verify, with no member array yet
        assert row["member"] is None and not row["ok"] and "labels" in row["problems"][0]
        (disk / "filler").unlink()
        store.write_labels("d", "train", labels, "fp", classes)  # space freed: the same call completes them
        assert (cache.open(str(disk / "c.zarr")).labels("d", "train") == labels).all()
    with tmpfs(tmp_path / "few", "1m,nr_inodes=4"):  # a disk with no room for one more file
        with contextlib.suppress(OSError):
            for i in range(8):
                (tmp_path / "few" / f"f{i}").touch()
        full = pytest.raises(cache.CacheError, match="no space left on the device to create the lock")
        with full, cache.locks.hold(str(tmp_path / "few/x.lock")):
            pass


def test_cache_urls_need_their_driver_and_memory_caches_keep_nothing(tmp_path, pipeline_run):
    with pytest.raises(cache.CacheError, match=r"s3:// caches needs s3fs \(pip install s3fs\)"):
        cache.open("s3://bucket/features.zarr")
    with pytest.raises(cache.CacheError, match="a memory:// cache keeps nothing"):
        extract(ExtractConfig("digits", ("run0",)), pipeline_run["data"], pipeline_run["runs"], "memory://c")


def test_bad_dataset_folders_are_refused_before_anything_is_written(tmp_path):
    from conftest import make_imagefolder

    make_imagefolder(tmp_path / "train")
    make_imagefolder(tmp_path / "val")
    bad = os.fsencode(tmp_path / "train/cat") + b"/\xff\xfe.png"  # a file name that is not UTF-8
    shutil.copy(tmp_path / "train/cat/0.jpg", bad)
    config = PrepareConfig("imagefolder", tmp_path / "data", "pets", tmp_path / "train", tmp_path / "val")
    with pytest.raises(TimecatError, match=r"is not valid UTF-8.*rename it"):
        prepare(config)
    assert not (tmp_path / "data/pets").exists() or not list((tmp_path / "data/pets").iterdir())
    os.unlink(bad)
    for split in ("train", "val"):
        for name in ("dog", "fox"):
            shutil.rmtree(tmp_path / split / name)
    with pytest.raises(TimecatError, match=r"pets/train holds a single class \(cat\)"):
        prepare(config)


def test_bad_numbers_and_empty_lists_are_one_error_line(tmp_path):
    data = make_fashion_root(tmp_path / "data", n_train=64, n_test=16)
    env = {"TIMECAT_DATA": str(data), "TIMECAT_RUNS": str(tmp_path / "runs"), "TIMECAT_CACHE": str(tmp_path / "c")}
    base = ["pretrain", "--name", "m", "--dataset", "fashion-mnist", "--seed", "0", "--steps", "1"]
    cases = {
        (*base, "--resolution", "-8"): "resolution must be at least 8 px",
        (*base, "--lr", "-1"): "lr must be a finite positive number",
        (*base, "--lr", "nan"): "lr must be a finite positive number",
        # A declared bound (low=1), refused by click as pretrain's --batch-size is.
        ("extract", "--members", "run0", "--dataset", "fashion-mnist", "--batch-size", "0"): "range x>=1",
        ("probe", "--members", "", "--dataset", "fashion-mnist"): "are not names",
        ("extract", "--members", "a,a", "--dataset", "fashion-mnist"): "named twice",
        # The same name with two checkpoints passes the comma-list check; the stage refuses it.
        ("extract", "--members", "a=/x.pt,a=/y.pt", "--dataset", "fashion-mnist"): "a member is named twice",
        ("plan", "--dataset", "d", "--cat", "2", "--total-steps", "10", "--seeds", "1,a"): "['a'] are not integers",
        ("probe", "--members", "m", "--dataset", "d", "--wd-grid", "1e-3,zz"): "['zz'] are not positive numbers",
    }
    for args, message in cases.items():
        out = run(*args, env=env)
        assert out.exit_code in (1, 2) and message in out.output and out.output.count("Error:") == 1, (args, out.output)
        assert not isinstance(out.exception, Exception) or isinstance(out.exception, SystemExit)
    assert not (tmp_path / "runs").exists()  # nothing was trained or locked


def test_a_probe_fit_and_scored_on_one_split_is_refused_unless_asked_and_never_reported(tmp_path):
    path = blob_cache(tmp_path / "c.zarr")
    with pytest.raises(TimecatError, match="measures memorisation.*--allow-same-split"):
        ProbeConfig("toy", ("m",), eval_split="train")
    probe(ProbeConfig("toy", ("m",)), path, tmp_path / "r")
    probe(ProbeConfig("toy", ("m",), eval_split="train", allow_same_split=True), path, tmp_path / "r")
    from pipeline.report import tables

    table = tables.table(results.load(tmp_path / "r"))
    assert table["datasets"] == ["toy"] and table["rows"][0]["toy"]["count"] == 1


def test_damaged_files_are_one_error_line(copy, tmp_path):
    data, runs = copy["data"], copy["runs"]
    fresh = tmp_path / "fresh.zarr"
    beton, manifest = beton_path(data, "digits", "test"), manifest_path(data, "digits", "test")
    saved = {p: p.read_bytes() for p in (beton, manifest)}
    try:
        damaged = bytearray(saved[beton])
        damaged[0:64] = bytes(range(64))  # a garbled header of the same size: the manifest's size check passes
        beton.write_bytes(bytes(damaged))
        with pytest.raises(TimecatError, match=r"test.beton is damaged .*run `timecat prepare` again"):
            extract(ExtractConfig("digits", ("run0",)), data, runs, str(fresh))
        beton.write_bytes(saved[beton])
        from ffcv.reader import Reader

        reader = Reader(str(beton))
        damaged = bytearray(saved[beton])
        start = reader.metadata.ctypes.data - reader.metadata.ctypes.data  # metadata follows the header
        offset = saved[beton].find(reader.metadata[:1].tobytes())
        row = bytearray(reader.metadata[:1].tobytes())
        row[1:3] = (65535).to_bytes(2, "little")  # width 65535 px
        damaged[offset : offset + len(row)] = row
        beton.write_bytes(bytes(damaged))
        assert start == 0
        with pytest.raises(TimecatError, match=r"is damaged: its metadata names images up to 65535"):
            extract(ExtractConfig("digits", ("run0",)), data, runs, str(fresh))
        beton.write_bytes(saved[beton])
        for text, message in (("{not json", "not a readable manifest"), ('{"rows": 3}', "manifest lacks")):
            manifest.write_text(text)
            with pytest.raises(TimecatError, match=message):
                extract(ExtractConfig("digits", ("run0",)), data, runs, str(fresh))
    finally:
        for path, content in saved.items():
            path.write_bytes(content)
    payload = checkpoints.load(runs / "run0/checkpoint.pt")
    no_arch = {**payload, "member": {k: v for k, v in payload["member"].items() if k != "arch"}}
    for key, damaged in [(k, {n: v for n, v in payload.items() if n != k}) for k in ("num_classes", "member")] + [
        ("member.arch", no_arch)
    ]:
        torch.save(damaged, runs / "run0/checkpoint.pt")
        with pytest.raises(TimecatError, match=rf"not a timecat checkpoint \(it lacks \[.*{key}"):
            extract(ExtractConfig("digits", ("run0",)), data, runs, str(fresh))
    (runs / "run0/checkpoint.pt").write_bytes(b"garbage, not a pickle")
    with pytest.raises(TimecatError, match="checkpoint.pt: not a loadable checkpoint"):
        extract(ExtractConfig("digits", ("run0",)), data, runs, str(fresh))
    (Path(copy["cache"]) / "zarr.json").write_text("{broken")
    with pytest.raises(cache.CacheError, match="is not a readable zarr store"):
        cache.open(copy["cache"])


def test_a_checkpoint_carrying_code_runs_nothing_and_torchs_advice_is_not_passed_on(tmp_path, pipeline_run):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model_params": {"w": Payload(marker)}}, path)
    out = run(
        "extract",
        "--members",
        f"evil={path}",
        "--dataset",
        "digits",
        "--data-root",
        pipeline_run["data"],
        "--cache",
        tmp_path / "c.zarr",
    )
    assert out.exit_code == 1 and "not a loadable checkpoint" in out.output
    assert "weights_only" not in out.output and not marker.exists()


def test_garbage_metadata_is_repaired_by_extract_or_named(copy):
    root = Path(copy["cache"])
    (root / "digits/test/labels/zarr.json").write_text("{garbage")  # the consolidated copy still reads fine
    problems = [
        r["problems"] for r in cache.open(copy["cache"]).verify() if (r["dataset"], r["split"]) == ("digits", "test")
    ]
    assert all("the split's labels are missing or unreadable" in p[0] for p in problems)
    with pytest.raises(cache.CacheError, match="the metadata of the labels of digits/test is unreadable"):
        cache.open(copy["cache"], use_consolidated=False).labels("digits", "test")
    (root / "digits/test/features/run0/zarr.json").write_text("{garbage")
    with pytest.raises(cache.CacheError, match=r"metadata of member run0 in digits/test is unreadable.*--overwrite"):
        extract(ExtractConfig("digits", ("run0", "run1")), copy["data"], copy["runs"], copy["cache"])
    extract(ExtractConfig("digits", ("run0", "run1"), overwrite=True), copy["data"], copy["runs"], copy["cache"])
    assert all(r["ok"] for r in cache.open(copy["cache"]).verify())
    assert probe(ProbeConfig("digits", ("run0", "run1")), copy["cache"])["top1"] > 0


def test_results_on_a_filesystem_without_locks_and_writers_temporaries(tmp_path, monkeypatch):
    import errno
    import fcntl
    import socket

    from pipeline.core import files

    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.ENOLCK, "No locks")))
    with pytest.raises(TimecatError, match="probes.jsonl: this filesystem does not support file locks"):
        results.append(tmp_path, {"members": ["a"], "dataset": "d"})
    monkeypatch.undo()
    # Temporaries have unguessable names: a symlink planted at the old predictable one is never written through.
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / f".config.json.tmp-{os.getpid()}").symlink_to(victim)
    files.write_text(tmp_path / "config.json", "{}")
    assert victim.read_text() == "precious" and (tmp_path / "config.json").read_text() == "{}"
    # Stale temporaries: a dead writer's here is removed; another host's young one is kept (the folder is shared).
    out = tmp_path / "train.beton"
    dead = tmp_path / f".train.beton.tmp-{socket.gethostname()}-999999-abc"
    other = tmp_path / ".train.beton.tmp-othernode-123-abc"
    live = files.temporary(out)  # this process's own
    for path in (dead, other):
        path.write_bytes(b"x")
    assert files.remove_stale(out) == [dead] and other.exists() and live.exists()


def test_a_checkpoint_lacking_what_a_resume_reads_is_refused(tmp_path):
    data = make_fashion_root(tmp_path / "data", n_train=64, n_test=16)
    prepare(PrepareConfig("fashion-mnist", data))
    config = PretrainConfig("m", "fashion-mnist", 0, steps=2, batch_size=32)
    pretrain(config, data, tmp_path / "runs")
    ckpt = tmp_path / "runs/m/checkpoint.pt"
    payload = checkpoints.load(ckpt)
    torch.save({k: v for k, v in payload.items() if k not in ("complete", "optimizer")}, ckpt)
    with pytest.raises(TimecatError, match=r"not a timecat checkpoint \(it lacks \['complete'\]\)"):
        pretrain(config, data, tmp_path / "runs")
    torch.save({**{k: v for k, v in payload.items() if k != "optimizer"}, "complete": False}, ckpt)
    with pytest.raises(TimecatError, match=r"it lacks \['optimizer'\]"):
        pretrain(config, data, tmp_path / "runs")
