"""What the machine was doing while a bench timed something (shared by the benches)."""

from __future__ import annotations

import numpy as np


def cpu_times() -> np.ndarray | None:
    """The machine's CPU time counters (/proc/stat's "cpu" line, in ticks), None where there is none."""
    try:
        with open("/proc/stat") as fh:
            return np.array([int(v) for v in fh.readline().split()[1:9]], dtype=np.int64)
    except (OSError, ValueError):
        return None


def steal_share(before: np.ndarray | None, after: np.ndarray | None) -> float | None:
    """Share of the machine's CPU time that the hypervisor gave to other guests between two cpu_times()
    (``steal``): on a shared virtual machine the same code runs slower when it is high."""
    if before is None or after is None:
        return None
    d = after - before
    return float(d[7] / d.sum()) if d.sum() > 0 else 0.0


def percent(share: float | None) -> str:
    """A :func:`steal_share` as the benches print it ("-" where it was not measured)."""
    return "-" if share is None else f"{100 * share:.1f} %"
