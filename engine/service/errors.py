"""Errors the service itself raises (the engine's own are in ``engine.errors``).

They subclass :class:`engine.errors.SkylocError`, so one handler answers every error the same way:
``http_status`` with ``{"code": code, "message": message}``.
"""

from __future__ import annotations

from ..errors import SkylocError


class ServiceError(SkylocError):
    exit_code = 1


class UnauthorizedError(ServiceError):
    code = "unauthorized"
    http_status = 401


class ForbiddenPathError(ServiceError):
    code = "forbidden_path"
    http_status = 403


class NotFoundError(ServiceError):
    code = "not_found"
    http_status = 404


class JobNotFoundError(NotFoundError):
    code = "job_not_found"


class ConflictError(ServiceError):
    """Another queued or running job writes the same output."""

    code = "output_in_use"
    http_status = 409


class UploadTooLargeError(ServiceError):
    """Same code as ``engine.errors.ImageTooLargeError``: the client reacts to both alike."""

    code = "too_large"
    http_status = 413


class BusyError(ServiceError):
    code = "busy"
    http_status = 503
