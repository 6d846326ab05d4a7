"""timecat's feature cache: a Zarr store of frozen members' features.

This package imports numpy, zarr and numcodecs only, so a notebook can open a
cache without torch or the rest of timecat. Modules: ``layout`` (where
everything lives), ``provenance`` (what each array records), ``checks`` (the
invariants), ``reader`` (``Cache``), ``writer`` (``WritableCache``), ``rows``
(chunk-aligned row writers), ``locks``, ``opening`` (``open``)::

    import cache
    c = cache.open("demo/features.zarr")
    X, y = c.features("fashion-mnist", "test", ["run3", "run4"])
"""

from cache.errors import CacheError
from cache.layout import FORMAT_VERSION, Compression
from cache.opening import open
from cache.reader import Cache
from cache.rows import BackgroundWriter, FeatureWriter
from cache.writer import WritableCache

__all__ = [
    "FORMAT_VERSION",
    "BackgroundWriter",
    "Cache",
    "CacheError",
    "Compression",
    "FeatureWriter",
    "WritableCache",
    "open",
]
