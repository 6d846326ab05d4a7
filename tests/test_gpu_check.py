"""`make gpu-check`'s script at toy sizes on the CPU: every part runs and reports figures, none an error."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "benchmarks"))
import gpu_check


def errors(report, path=""):
    """Paths of every part that recorded an error."""
    if isinstance(report, dict):
        found = [path] if "error" in report else []
        return found + [e for k, v in report.items() for e in errors(v, f"{path}/{k}")]
    return []


def test_the_gpu_check_runs_every_part_at_toy_sizes(tmp_path):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--smoke", "--out", str(out), "--workdir", str(tmp_path / "work")]) == 0
    report = json.loads(out.read_text())
    assert errors(report) == ["/probe/one_fit_backends/cuml"] or errors(report) == []
    assert report["gpu_tests"]["returncode"] == 0 and "collected" in report["gpu_tests"]["summary"]
    for name in ("imagenet_cat4", "inat18_cat4"):
        probe = report["probe"][name]
        assert probe["wall_s"] > 0 and len(probe["search"]) == 8 and probe["evaluations"] > 0
        assert probe["refit"]["status"] == "converged" and probe["refit"]["gap_estimate"] <= 1e-5
        assert list(probe["refit"]["phases"]) == (["bf16", "fp32"] if probe["precision"] == "bf16" else ["fp32"])
        assert probe["top1_synthetic"] > 100 / probe["shape"]["classes"]  # learnt: above chance
    assert report["probe"]["one_fit_backends"]["torch"]["status"] == "converged"  # it ran, to its gap, timed
    assert report["extraction"]["on_device_img_per_s"] > 0 and report["extraction"]["ffcv"]["img_per_s"] > 0
    assert all(report["training"][f"{r}px"]["img_per_s"] > 0 for r in (24, 32))
