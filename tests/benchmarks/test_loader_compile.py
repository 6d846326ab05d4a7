"""Benchmark: the first batch of a second, identical FFCV loader, with pipeline.data.jit_memo against FFCV's own
compilation (numba compiles every loader's generated functions anew).

One process builds a train loader (timecat's seeded crop, 64 px) and an eval loader (FFCV's centre crop) on a
prepared tiny Fashion-MNIST, 2 loader threads, and times each loader's construction plus first batch: once
with FFCV's ``Compiler.compile`` (a fresh numba compilation per loader) and once with the memo, each after a
warm-up loader of the same pipeline. Run with `make bench`; figures go to
tests/benchmarks/last_run_loader_compile.json.

Figures, 2026-12-07, Xeon-AMX (2 vCPUs; avx512f, avx512_bf16, amx_bf16), no GPU, two runs: a second train
loader built and read to its first batch (including the 0.5 s its thread takes to stop) in 2.59-2.83 s with
FFCV's compilation against 0.65-0.69 s with the memo (4.0-4.1x); an eval loader 2.21-2.29 s against
0.81-0.82 s (2.7-2.8x). The test suite, which builds a few hundred loaders, went from 698 s to 499 s in
one run each on the same machine.
"""

import json
import time
from pathlib import Path

from conftest import make_fashion_root

from pipeline.configs import PrepareConfig, PretrainConfig
from pipeline.data.prepare import prepare
from pipeline.data.splits import beton_path, read_manifest
from pipeline.train.pretrain import make_preprocess


def _first_batch_seconds(kind: str, beton, pre) -> float:
    from pipeline.data.loaders import eval_loader, one_epoch, train_loader

    started = time.perf_counter()
    loader = eval_loader(beton, pre, 64, 2) if kind == "eval" else train_loader(beton, pre, 64, 0, 2)[0]
    with one_epoch(loader) as epoch:
        next(epoch)
    return time.perf_counter() - started


def test_a_second_loader_skips_numbas_compilation(tmp_path, monkeypatch):
    from ffcv.pipeline.compiler import Compiler

    import pipeline.data.loaders  # noqa: F401  installs the memo
    from pipeline.data import jit_memo

    data = make_fashion_root(tmp_path / "data", n_train=640, n_test=64)
    prepare(PrepareConfig("fashion-mnist", data))
    manifest = read_manifest(data, "fashion-mnist", "train")
    pre = make_preprocess(PretrainConfig("x", "fashion-mnist", 0, 1, resolution=64), manifest)
    beton = beton_path(data, "fashion-mnist", "train")
    memo = Compiler.__dict__["compile"]
    figures = {}
    for kind in ("train", "eval"):
        monkeypatch.setattr(Compiler, "compile", memo.__func__.original)
        _first_batch_seconds(kind, beton, pre)  # warm-up: imports, the reader, the OS cache
        ffcv = _first_batch_seconds(kind, beton, pre)
        monkeypatch.setattr(Compiler, "compile", memo)
        _first_batch_seconds(kind, beton, pre)  # the memo's one compilation
        before = dict(jit_memo.COUNTS)
        memoized = _first_batch_seconds(kind, beton, pre)
        assert jit_memo.COUNTS["compiled"] == before["compiled"]  # nothing compiled the second time
        figures[kind] = {"ffcv_s": round(ffcv, 3), "memo_s": round(memoized, 3), "speedup": round(ffcv / memoized, 1)}
    print(json.dumps(figures))
    (Path(__file__).parent / "last_run_loader_compile.json").write_text(json.dumps(figures, indent=1) + "\n")
    assert figures["train"]["speedup"] > 3
