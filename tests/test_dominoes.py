"""timecat dominoes: the spurious-feature data as designed, and the experiment end to end on small data."""

import json

import numpy as np
from click.testing import CliRunner
from conftest import make_fashion_root
from PIL import Image

import cli
from pipeline.data.datasets import DOMINO_DIGITS, SourceOptions, read_digits, read_dominoes


def _digit_agreement(split, data) -> float:
    """Share of images whose top digit (nearest class-mean template) matches the label."""
    digits = read_digits(data, SourceOptions(None, None, False))["train"]
    templates = []
    for c in DOMINO_DIGITS:
        mean = digits.images.pixels[digits.labels == c].mean(axis=0).astype(np.uint8)
        templates.append(np.asarray(Image.fromarray(mean).resize((28, 28), Image.BILINEAR), dtype=np.float64))
    tops = split.images.pixels[:, 0:28, 14:42].astype(np.float64)
    distance = np.stack([((tops - t) ** 2).sum(axis=(1, 2)) for t in templates], axis=1)
    return float(np.mean(distance.argmin(axis=1) == split.labels))


def test_the_digit_agrees_with_the_label_99_percent_in_the_mixture_and_half_in_the_balanced_set(tmp_path):
    data = make_fashion_root(tmp_path / "data", n_train=4000, n_test=400)
    options = SourceOptions(None, None, False)
    mixture, balanced = read_dominoes(data, options, 0.99), read_dominoes(data, options, 0.5)
    train = mixture["train"]
    assert train.images.pixels.shape[1:] == (56, 56) and train.classes == ("dress", "coat")
    assert 0.4 < train.labels.mean() < 0.6  # both items, as Fashion-MNIST has them
    assert _digit_agreement(train, data) > 0.97
    assert 0.4 < _digit_agreement(balanced["train"], data) < 0.6
    again = read_dominoes(data, options, 0.99)["train"]
    assert np.array_equal(again.images.pixels, train.images.pixels)  # the same images on every machine


def test_dominoes_command_runs_the_experiment_through_the_cache(tmp_path):
    data = make_fashion_root(tmp_path / "data", n_train=2000, n_test=400)
    args = ["dominoes", "--workdir", str(tmp_path / "w"), "--data-root", str(data), "--seeds", "0", "--steps", "40"]
    result = CliRunner().invoke(cli.main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["paper"] == {"direct": 97.0, "probe": 94.0, "gap": 3.0}
    assert len(summary["direct"]["runs"]) == len(summary["probe"]["runs"]) == 1
    assert summary["gap_ci95"] is None  # one seed gives no interval, and says so
    # The mixture CNN leans on the digit: its own head is much better where the digit agrees.
    head = summary["mixture_head"]
    assert head["mixture_test"]["mean"] > head["balanced_test"]["mean"] + 10, head
    records = (tmp_path / "w/results/probes.jsonl").read_text().splitlines()
    assert [json.loads(r)["members"] for r in records] == [["mixture0"]]  # an ordinary probe of the cache
    assert (tmp_path / "w/results/dominoes.png").stat().st_size > 10_000
    assert "no interval from one seed" in CliRunner().invoke(cli.main, args).output
