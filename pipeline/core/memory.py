"""A process's own peak memory, for the records that report it (torch-free, so a test can start it cheaply)."""

from __future__ import annotations

import resource


def peak_rss_mib() -> float:
    """This process's peak resident memory, MiB.

    Linux's VmHWM, because getrusage's ru_maxrss survives exec: a probe started
    from a large process (a notebook, a benchmark) would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # macOS and others
