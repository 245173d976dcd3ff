"""ASGI middlewares and JSON helpers: body size and time limits, and the last-line 500 handler."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from typing import Any

from starlette.requests import ClientDisconnect

log = logging.getLogger("skyloc.service")

INTERNAL_MESSAGE = "internal error (a bug: the server log has the details, please report it)"


# ------------------------------------------------------------------------------------------ JSON helpers


def plain(obj: Any) -> Any:
    """JSON-safe copy: dataclasses, numpy scalars/arrays, paths, tuples; NaN/inf become null."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return plain(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [plain(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy scalar or array
        return plain(obj.tolist())
    return str(obj)


def error_body(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


async def send_json(send, status: int, content: dict[str, Any], *, close: bool = False) -> None:
    body = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------------------ middlewares


#: Longest pause between two pieces of a request body (seconds), and longest time to receive one body.
BODY_IDLE_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 300.0


class _BodyTooLarge(Exception):
    pass


class _BodyTooSlow(Exception):
    pass


class BodyLimitMiddleware:
    """413 when a body is (or declares itself) larger than the limit for its path; read no further.

    408 ``timeout`` (and the connection closed) when the body pauses longer than ``idle_timeout`` or takes
    longer than ``total_timeout`` in all: a client that trickles a body holds no connection for long.
    """

    def __init__(
        self,
        app,
        limit_for: Callable[[str], int],
        idle_timeout: float = BODY_IDLE_TIMEOUT_S,
        total_timeout: float = BODY_TIMEOUT_S,
    ) -> None:
        self.app = app
        self.limit_for = limit_for
        self.idle_timeout = idle_timeout
        self.total_timeout = total_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        message = f"request body over the limit of {limit:,} bytes"
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                await send_json(send, 400, error_body("bad_request", "invalid Content-Length"))
                return
            if too_big:
                await send_json(send, 413, error_body("too_large", message))
                return
        state = {"received": 0, "exceeded": False, "started": False, "body_done": False, "slow": False}
        deadline = time.monotonic() + self.total_timeout

        async def limited_receive():
            if state["body_done"]:  # after the body: only a disconnect can come, wait as long as it takes
                return await receive()
            wait = min(self.idle_timeout, deadline - time.monotonic())
            try:
                msg = await asyncio.wait_for(receive(), timeout=max(0.0, wait))
            except asyncio.TimeoutError:
                state["slow"] = True
                raise _BodyTooSlow() from None
            if msg["type"] != "http.request" or not msg.get("more_body", False):
                state["body_done"] = True
            if msg["type"] == "http.request":
                state["received"] += len(msg.get("body", b""))
                if state["received"] > limit:
                    state["exceeded"] = True
                    raise _BodyTooLarge(message)
            return msg

        async def guarded_send(msg):
            if state["exceeded"] or state["slow"]:
                return  # whatever the app makes of the interrupted body, the answer is 413 / 408
            if msg["type"] == "http.response.start":
                state["started"] = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not (state["exceeded"] or state["slow"]):
                raise
        if state["slow"] and not state["started"]:
            slow = f"the request body did not arrive in time (pauses over {self.idle_timeout:g} s, or over "
            slow += f"{self.total_timeout:g} s in all)"
            await send_json(send, 408, error_body("timeout", slow), close=True)
        elif state["exceeded"] and not state["started"]:
            await send_json(send, 413, error_body("too_large", message))


class CatchAllMiddleware:
    """The last line: an unexpected exception is logged and answered 500 ``internal_error``, no traceback."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            log.info("client went away during %s %s", scope.get("method"), scope.get("path"))
        except Exception:
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                with contextlib.suppress(Exception):
                    await send_json(send, 500, error_body("internal_error", INTERNAL_MESSAGE))
