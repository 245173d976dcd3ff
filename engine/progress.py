"""Progress reporting and cooperative cancellation shared by CLI, service and plugin."""

from __future__ import annotations

import threading
from collections.abc import Callable

from .errors import CancelledError

#: ``progress(fraction in [0, 1], message)``
ProgressFn = Callable[[float, str], None]


def no_progress(fraction: float, message: str) -> None:  # noqa: ARG001
    """Default progress sink: report nothing."""


def within(progress: ProgressFn, lo: float, hi: float) -> ProgressFn:
    """``progress`` for a part ``lo..hi`` of the work, never moving back (a retry restarts its passes)."""
    reached = [lo]

    def report(fraction: float, message: str) -> None:
        reached[0] = max(reached[0], lo + (hi - lo) * min(max(fraction, 0.0), 1.0))
        progress(reached[0], message)

    return report


class CancelToken:
    """Set from another thread (a service job, a QGIS task); long loops call :meth:`check`."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise CancelledError("cancelled by the user")
