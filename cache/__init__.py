"""timecat's feature cache: a Zarr store of frozen members' features.

This package imports numpy, zarr and numcodecs only, so a notebook can open a
cache without torch or the rest of timecat::

    import cache
    c = cache.open("demo/features.zarr")
    X, y = c.features("fashion-mnist", "test", ["run3", "run4"])
"""

from cache.errors import CacheError
from cache.layout import FORMAT_VERSION, Compression
from cache.store import Cache, open
from cache.writer import BackgroundWriter, FeatureWriter

__all__ = ["FORMAT_VERSION", "BackgroundWriter", "Cache", "CacheError", "Compression", "FeatureWriter", "open"]
