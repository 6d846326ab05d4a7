"""The one place that shows progress and sets up logging.

Stages never print: they log through ``logging`` and wrap long loops in
``progress``. On a terminal that is a tqdm bar on stderr. When stderr is not a
terminal (``make demo > log``, a cluster job's log file) a bar would print
nothing useful, so the loop logs a line instead when it starts, every
``TIMECAT_PROGRESS_EVERY`` seconds (default 30) and when it ends: done/total,
rate and ETA. ``TQDM_DISABLE=1`` hides both. Under torchrun only rank 0 shows
progress and logs INFO, so K processes do not print K copies.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable

from tqdm.auto import tqdm
from tqdm.std import tqdm as plain_tqdm

LOG_EVERY_S = 30.0  # seconds between progress lines in a log (TIMECAT_PROGRESS_EVERY)
ABBREVIATED = {"img", "it", "iter"}  # units that stay as they are after a count: 60,000 img, 412 iter


class LogLines(plain_tqdm):
    """tqdm's counting and rates, written as log lines (start, every ``mininterval`` seconds, end), not a bar.

    tqdm calls ``display`` at most once per ``mininterval``; this logs the state there
    instead of redrawing a line, so a log file gets a few lines, not thousands of ``\r``.
    """

    def display(self, msg=None, pos=None, **kwargs):
        first, now = not hasattr(self, "_logged"), time.monotonic()
        if not first and self.n == self._logged:
            return True  # nothing new (a refresh for a postfix, or the close after the last update)
        if not first and msg != "" and now - self._at < self.mininterval:
            return True  # a refresh for a new postfix comes sooner than the interval: wait for it
        self._logged, self._at = self.n, now
        log = logging.getLogger("timecat.progress")
        units = self.unit if self.unit in ABBREVIATED else self.unit + "s"  # 4 steps, 60,000 img
        if first:
            of = plural(self.total, self.unit, units) if self.total else units
            log.info("%s: started (%s%s)", self.desc, of, f", from {self.n:,}" if self.n else "")
            return True
        count = self.total if self.total else self.n
        done = f"{self.n:,}" + (f"/{self.total:,}" if self.total else "") + f" {self.unit if count == 1 else units}"
        if self.total:
            done += f" ({100 * self.n / self.total:.0f}%)"
        elapsed = self.format_dict["elapsed"]
        rate = (self.n - self.initial) / max(elapsed, 1e-9)
        shown = f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"  # 18,100 img/s, not 1.81e+04
        line = f"{self.desc}: {done}, {shown} {self.unit}/s, elapsed {self.format_interval(elapsed)}"
        if self.total and rate > 0:
            line += f", ETA {self.format_interval((self.total - self.n) / rate)}"
        log.info(line + (f", {self.postfix}" if self.postfix else ""))
        return True


def progress(
    iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str = "it", initial: int = 0
) -> tqdm:
    """Progress of a long loop (use as an iterable, or call ``update``): a bar on a terminal, log lines otherwise."""
    if _rank() == 0 and not _hidden() and not _terminal():
        # The plain (not notebook) tqdm, writing nowhere: the lines go through logging, and closing
        # a bar would otherwise write a stray carriage return to stderr.
        return LogLines(
            iterable,
            total=total,
            initial=initial,
            desc=desc,
            unit=unit,
            mininterval=_log_every(),
            miniters=1,
            leave=False,
            file=_NOWHERE,
        )
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


class _Nowhere:
    """A file that drops what is written (tqdm's own writes; LogLines logs instead)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


_NOWHERE = _Nowhere()


def _log_every() -> float:
    """Seconds between progress lines in a log: TIMECAT_PROGRESS_EVERY, else 30; an unusable value is said once."""
    text = os.environ.get("TIMECAT_PROGRESS_EVERY")
    try:
        return LOG_EVERY_S if text is None else max(0.0, float(text))
    except ValueError:
        logging.getLogger("timecat.progress").warning(
            "TIMECAT_PROGRESS_EVERY=%r is not a number of seconds; using %g", text, LOG_EVERY_S
        )
        return LOG_EVERY_S


def _hidden() -> bool:
    return os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")


def _terminal() -> bool:
    return sys.stderr.isatty()


def _rank() -> int:
    # torchrun sets RANK before the process starts, so this works before init_process_group.
    return int(os.environ.get("RANK", "0"))


class _Stderr(logging.StreamHandler):
    """A handler that writes to ``sys.stderr`` as it is now, not as it was when logging was set up: a test
    runner or a notebook may swap it, and lines written to the old one are lost."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass  # StreamHandler.__init__ sets it; the property always answers the current sys.stderr


def configure_logging(verbose: bool) -> None:
    """Log INFO (or DEBUG with ``verbose``) from timecat to stderr, once per process."""
    logger = logging.getLogger("timecat")
    if not logger.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    level = logging.DEBUG if verbose else logging.INFO
    logger.setLevel(level if _rank() == 0 else max(level, logging.WARNING))


def plural(count: int, unit: str, many: str | None = None) -> str:
    """``1 member``, ``2 members``, ``1,000 steps``, ``3 batches`` (``many``): a count with its unit, in the
    plural unless the count is one."""
    return f"{count:,} " + (unit if count == 1 else many or unit + "s")


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``timecat`` namespace for module ``name``."""
    return logging.getLogger(f"timecat.{name.rsplit('.', 1)[-1]}")
