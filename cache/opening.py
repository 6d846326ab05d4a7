"""Opening a cache: a path or fsspec URL in, a reader (or, to add arrays, a writer) out."""

from __future__ import annotations

import contextlib
import os

import zarr

from cache import checks, layout, locks
from cache.errors import CacheError, elsewhere, shown
from cache.reader import Cache, consolidated_metadata
from cache.writer import WritableCache

# fsspec URL schemes and the package that serves each (for the error when it is missing).
FSSPEC_DRIVERS = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "hf": "huggingface_hub"}


def open(  # noqa: A001
    path: str, mode: str = "r", storage_options: dict | None = None, use_consolidated: bool | None = None
) -> Cache | WritableCache:
    """Open the cache at ``path`` (a local path or any fsspec URL zarr accepts).

    ``mode`` is ``"r"`` to read (a ``Cache``), ``"a"`` to read and add arrays (a
    ``WritableCache``; the store is created if absent).
    ``use_consolidated=False`` reads every array's own metadata (``verify`` does).
    """
    if mode not in ("r", "a"):
        raise CacheError(f"unknown mode {mode!r}; choose 'r' or 'a'")
    path = str(path)
    if mode == "a":
        _check_writable(path)
    try:
        with consolidated_metadata():
            group = _open_group(path, mode, storage_options, use_consolidated)
    except FileNotFoundError:
        raise CacheError(
            f"no feature cache at {shown(path)}: run `timecat extract` first, or name another ({elsewhere('cache')})"
        ) from None
    except ImportError as e:  # fsspec or its driver for the URL's scheme
        scheme = path.split("://", 1)[0]
        package = FSSPEC_DRIVERS.get(scheme, "fsspec and the driver for " + scheme)
        raise CacheError(f"{path}: reading {scheme}:// caches needs {package} (pip install {package}): {e}") from None
    except PermissionError as e:
        raise CacheError(f"cache {path} cannot be read ({e.strerror}): check its permissions") from None
    except (ValueError, TypeError, KeyError) as e:  # a root zarr.json that is not metadata
        raise CacheError(f"{path} is not a readable zarr store ({type(e).__name__}: {e})") from None
    version = group.attrs.get("format_version")
    if version != layout.FORMAT_VERSION:
        raise CacheError(f"{path} is not a timecat cache of format {layout.FORMAT_VERSION} (found {version!r})")
    return (WritableCache if mode == "a" else Cache)(group, path, mode)


def _open_group(path: str, mode: str, storage_options, use_consolidated) -> zarr.Group:
    if mode == "r":
        return zarr.open_group(store=path, mode="r", storage_options=storage_options, use_consolidated=use_consolidated)
    # Concurrent first extractions each created the store: the loser failed with ContainsGroupError.
    # Creating (or adopting) it under one lock makes it as safe as creating a split (writer._split_lock).
    try:
        _check_adoptable(path, storage_options)  # before the lock folder is made beside someone else's store
    except CacheError:
        # Another timecat process may be creating the store under the lock right now (zarr's temporary files
        # look foreign): only a path with timecat's lock folder beside it waits for the lock and looks again.
        if not _has_lock_folder(path):
            raise
    with _store_lock(path):
        _check_adoptable(path, storage_options)  # again, now that no other process can be creating it
        # Writers never trust consolidated metadata: it may be stale.
        group = zarr.open_group(store=path, mode="a", use_consolidated=False, storage_options=storage_options)
        group.attrs.setdefault("format_version", layout.FORMAT_VERSION)
    return group


def _has_lock_folder(path: str) -> bool:
    local = path.removeprefix("file://").rstrip("/")
    return "://" not in local and os.path.isdir(f"{local}.locks")


def _check_adoptable(path: str, storage_options) -> None:
    """Refuse, before writing anything, to make a timecat cache of a store or folder that holds anything else.

    ``cache ls`` says "not a timecat cache" of such a store; ``extract`` used to rewrite its
    root metadata and add groups to it. Only a new path, an empty folder or an empty group is adopted.
    """
    try:
        group = zarr.open_group(store=path, mode="r", use_consolidated=False, storage_options=storage_options)
    except FileNotFoundError:  # no zarr group there: a new path, or a folder of other files
        local = path.removeprefix("file://")
        entries = sorted(os.listdir(local)) if "://" not in local and os.path.isdir(local) else []
    else:
        if "format_version" in group.attrs:
            return  # a timecat cache (open() checks its version)
        entries = checks.children(group, "") or sorted(dict(group.attrs))  # the store's listing, zarr or not
    if entries:
        shown_entries = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise CacheError(
            f"{path} is not a timecat cache (no format_version; it holds {shown_entries}): refusing to write "
            "into it; give a new or empty --cache path"
        )


@contextlib.contextmanager
def _store_lock(path: str):
    """Wait for the lock that serialises creating the store itself (local stores only), beside it."""
    if layout.is_remote(path):
        yield
        return
    root = path.removeprefix("file://").rstrip("/")
    with contextlib.ExitStack() as held:
        # No flock on this filesystem: the split and member locks that every write takes next say so.
        with contextlib.suppress(locks.UnsupportedError):
            held.enter_context(locks.hold(os.path.join(f"{root}.locks", ".store.lock"), wait=True))
        yield


def _check_writable(path: str) -> None:
    """Refuse, before any work, a cache that writes cannot reach or keep."""
    if path.startswith("memory://"):
        raise CacheError(f"{path}: a memory:// cache keeps nothing once the process ends; give a path or a URL")
    if layout.is_remote(path):
        return  # remote stores report their own permission errors
    local = path.removeprefix("file://")
    existing = local
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing.rstrip("/")) or "."
    if not os.access(existing or ".", os.W_OK):
        raise CacheError(
            f"cache {path} is not writable ({existing} refuses writes): check its permissions or use another --cache"
        )
