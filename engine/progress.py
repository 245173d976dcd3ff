"""Progress reporting and cooperative cancellation shared by CLI, service and plugin."""

from __future__ import annotations

import threading
from collections.abc import Callable

from .errors import CancelledError

#: ``progress(fraction in [0, 1], message)``
ProgressFn = Callable[[float, str], None]


def no_progress(fraction: float, message: str) -> None:  # noqa: ARG001
    """Default progress sink: report nothing."""


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
