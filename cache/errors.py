"""The one exception type the cache raises for bad input or a broken store."""


class CacheError(Exception):
    """A cache request that cannot be served; the message names the fix."""
