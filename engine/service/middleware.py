"""ASGI middlewares and JSON helpers: body size limits before reading, and the last-line 500 handler."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
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


async def send_json(send, status: int, content: dict[str, Any]) -> None:
    body = json.dumps(content).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------------------ middlewares


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 when a body is (or declares itself) larger than the limit for its path; read no further."""

    def __init__(self, app, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

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
        state = {"received": 0, "exceeded": False, "started": False}

        async def limited_receive():
            msg = await receive()
            if msg["type"] == "http.request":
                state["received"] += len(msg.get("body", b""))
                if state["received"] > limit:
                    state["exceeded"] = True
                    raise _BodyTooLarge(message)
            return msg

        async def guarded_send(msg):
            if state["exceeded"]:
                return  # whatever the app makes of the interrupted body, the answer is 413
            if msg["type"] == "http.response.start":
                state["started"] = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state["exceeded"]:
                raise
        if state["exceeded"] and not state["started"]:
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
