"""Frozen members' penultimate features into the Zarr cache (``cache``).

- extract: the extraction stage (multi-GPU, resumable, verifiable).
- views: seeded augmented views of train images for the cached-views protocol.
"""
