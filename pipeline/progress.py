"""The one place that shows progress and sets up logging.

Stages never print: they log through ``logging`` and wrap long loops in
``progress``. Bars go to stderr; set ``TQDM_DISABLE=1`` to hide them. Under torchrun only
rank 0 draws bars and logs INFO, so K processes do not print K copies.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from tqdm.auto import tqdm


def progress(
    iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str = "it", initial: int = 0
) -> tqdm:
    """A progress bar for a long loop (use as an iterable, or call ``update``)."""
    quiet = _rank() != 0 or None  # None: tqdm's own default (and TQDM_DISABLE) decides
    return tqdm(
        iterable,
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        dynamic_ncols=True,
        leave=False,
        mininterval=1.0,
        disable=quiet,
    )


def _rank() -> int:
    # torchrun sets RANK before the process starts, so this works before init_process_group.
    return int(os.environ.get("RANK", "0"))


def configure_logging(verbose: bool) -> None:
    """Log INFO (or DEBUG with ``verbose``) from timecat to stderr, once per process."""
    logger = logging.getLogger("timecat")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    level = logging.DEBUG if verbose else logging.INFO
    logger.setLevel(level if _rank() == 0 else max(level, logging.WARNING))


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``timecat`` namespace for module ``name``."""
    return logging.getLogger(f"timecat.{name.rsplit('.', 1)[-1]}")
