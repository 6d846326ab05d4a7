"""Importing timecat changes nothing global that a notebook would notice; what loaders change is scoped."""

import subprocess
import sys
import warnings

CHECK = """
import sys, warnings
import ffcv, numba, numcodecs, sklearn, torch, zarr  # the libraries add filters of their own at import
filters, hook = list(warnings.filters), sys.unraisablehook
import cache, pipeline.data.loaders, pipeline.probe.run
assert warnings.filters == filters, "an import added a global warning filter"
assert sys.unraisablehook is hook, "an import replaced sys.unraisablehook"
print("clean")
"""


def test_imports_add_no_warning_filter_and_keep_the_unraisable_hook():
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True)
    assert result.returncode == 0 and "clean" in result.stdout, result.stderr[-2000:]


def test_zarrs_consolidated_metadata_warning_is_silenced_only_inside_the_cache(tmp_path):
    import cache

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = cache.open(str(tmp_path / "c.zarr"), mode="a")
        store.consolidate()
        cache.open(str(tmp_path / "c.zarr"))
    assert not [w for w in caught if "Consolidated metadata" in str(w.message)]
    assert not [f for f in warnings.filters if f[1] is not None and "Consolidated metadata" in f[1].pattern]


def test_building_a_loader_installs_the_numba_hook_once(monkeypatch):
    from pipeline.data import loaders

    monkeypatch.setattr(loaders, "_QUIETED", [])
    before = sys.unraisablehook
    monkeypatch.setattr(sys, "unraisablehook", before)
    loaders.quiet_numba_finalizers()
    loaders.quiet_numba_finalizers()
    assert sys.unraisablehook is not before and sys.unraisablehook.__qualname__.startswith("_drop_numba")
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", loaders._drop_numba_finalizer_noise(seen.append))

    class Unraisable:
        exc_value, exc_traceback = ValueError("other"), None

    sys.unraisablehook(Unraisable())
    assert len(seen) == 1  # any other unraisable exception reaches the previous hook
