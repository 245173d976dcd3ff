"""uvicorn's HTTP/1.1 protocol with a deadline for a request's headers and a cap on idle connections.

uvicorn closes a keep-alive connection that stays silent after a response, but a connection that never
sends a complete request (a client that connects and waits, or a slowloris sending its headers a byte at a
time, each byte resetting uvicorn's keep-alive timer) was held forever: 1,100 of them used up the process's
file descriptors and locked the plugin out, without ever showing a token. Here:

- every connection must deliver a request's complete headers within ``header_timeout`` seconds of
  connecting, or of the previous response, however it trickles them; otherwise it is closed;
- at most ``max_idle`` connections may wait for headers at once: beyond that the longest-waiting one is
  closed, so no number of silent connections can exhaust the file descriptors.

A request whose headers are complete is the application's: the token is checked at once, and its body is
read under :class:`~engine.service.middleware.BodyLimitMiddleware`'s time limits.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any, ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("skyloc.service")

#: Seconds a client has to send a request's complete headers.
HEADER_TIMEOUT_S = 10.0
#: Connections that may wait for a request's headers at once.
MAX_IDLE_CONNECTIONS = 256


class GuardedH11Protocol(H11Protocol):
    """H11Protocol + a per-connection header deadline and a cap on connections waiting for headers."""

    header_timeout: ClassVar[float] = HEADER_TIMEOUT_S
    max_idle: ClassVar[int] = MAX_IDLE_CONNECTIONS
    #: connections waiting for headers, oldest first (one registry per configured subclass)
    waiting: ClassVar[OrderedDict[GuardedH11Protocol, None]] = OrderedDict()
    dropped: ClassVar[int] = 0

    _deadline: asyncio.TimerHandle | None = None
    _armed_cycle: Any = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._started()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm()  # the next request's headers are due within the timeout too
        super().on_response_complete()  # may start a pipelined request at once
        self._started()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # ---------------------------------------------------------------------------------------- deadline

    def _arm(self) -> None:
        self._disarm()
        self._armed_cycle = self.cycle
        self._deadline = self.loop.call_later(self.header_timeout, self._too_slow)
        waiting = type(self).waiting
        waiting[self] = None
        while len(waiting) > self.max_idle:
            oldest = next(iter(waiting))
            oldest._drop(f"more than {self.max_idle} connections waiting for a request")

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        type(self).waiting.pop(self, None)

    def _started(self) -> None:
        """Headers complete: uvicorn made a new request cycle."""
        if self._deadline is not None and self.cycle is not self._armed_cycle:
            self._disarm()

    def _too_slow(self) -> None:
        self._deadline = None
        self._drop(f"no complete request within {self.header_timeout:g} s")

    def _drop(self, why: str) -> None:
        self._disarm()
        type(self).dropped += 1
        log.debug("closing connection from %s: %s", self.client, why)
        if not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(
    header_timeout: float = HEADER_TIMEOUT_S, max_idle: int = MAX_IDLE_CONNECTIONS
) -> type[GuardedH11Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` with these limits and its own registry."""
    if header_timeout <= 0 or max_idle < 1:
        raise ValueError("header_timeout > 0 and max_idle >= 1")
    return type(
        "SkylocH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout": header_timeout, "max_idle": max_idle, "waiting": OrderedDict(), "dropped": 0},
    )
