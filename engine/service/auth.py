"""The service token: generated when none is given, kept in a file only the user can read.

Every request carries ``Authorization: Bearer <token>``; the comparison is constant-time
(:func:`hmac.compare_digest`). The check is an ASGI middleware in front of everything (the OpenAPI schema
and unknown paths included), so no endpoint can forget it.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import stat
from pathlib import Path

from ..errors import InputError

TOKEN_BYTES = 32  # secrets.token_urlsafe(32): 43 characters, 256 bits


def generate_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def write_token_file(path: str | os.PathLike[str], token: str) -> Path:
    """Write ``token`` to ``path`` with mode 0600 from the start (never briefly world-readable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        if hasattr(os, "fchmod"):  # POSIX: in case the file system widened it
            os.fchmod(fd, 0o600)
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token in an existing file, refused if other users can read or write it."""
    path = Path(path)
    try:
        st = path.stat()
        text = path.read_text().strip()
    except OSError as exc:
        raise InputError(f"token file {path}: {exc.strerror}") from exc
    if os.name == "posix" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InputError(
            f"token file {path} is readable or writable by other users (mode {stat.filemode(st.st_mode)}); "
            f"run `chmod 600 {path}`"
        )
    if len(text) < 16 or any(c.isspace() for c in text):
        raise InputError(f"token file {path}: expected one token of at least 16 characters")
    return text


def bearer_token(header: bytes) -> bytes:
    """The credentials of an ``Authorization: Bearer <token>`` header, b"" for any other scheme.

    RFC 7235: the scheme is case-insensitive (``bearer``, ``BEARER``) and is followed by one or more spaces.
    """
    scheme, _, rest = header.partition(b" ")
    if scheme.lower() != b"bearer":
        return b""
    return rest.lstrip(b" ").rstrip(b" \t")


class TokenMiddleware:
    """401 ``{"code": "unauthorized"}`` unless the request carries the token; nothing else is read first."""

    def __init__(self, app, token: str) -> None:
        self.app = app
        self.expected = token.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
                break
        # constant-time on the token itself; an empty or foreign-scheme credential never matches
        if hmac.compare_digest(bearer_token(given), self.expected) and self.expected:
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # websockets: none are served
            await send({"type": "websocket.close", "code": 1008})
            return
        message = (
            "missing token: send the header 'Authorization: Bearer <token>' (the token is in the file "
            "`skyloc serve` printed)"
            if not given
            else "wrong token"
        )
        body = json.dumps({"code": "unauthorized", "message": message}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
