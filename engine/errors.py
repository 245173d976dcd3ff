"""Errors a user can meet, each with a stable code, a CLI exit code and an HTTP status.

The CLI prints ``message`` and exits with ``exit_code``; the HTTP service (later) answers ``http_status``
with ``{"code": code, "message": message}``. Never let a raw traceback reach a user for these.
"""

from __future__ import annotations


class SkylocError(Exception):
    code = "error"
    exit_code = 1
    http_status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InputError(SkylocError):
    """Unreadable, corrupt or unusable input (not an image, raster without CRS, bad parameter)."""

    code = "bad_input"
    exit_code = 3
    http_status = 422


class EmptyInputError(InputError):
    code = "empty_input"


class NoCRSError(InputError):
    code = "no_crs"


class ImageTooLargeError(InputError):
    code = "too_large"
    http_status = 413


class WeightsError(InputError):
    """A checkpoint that cannot be loaded into the architecture it claims to be for."""

    code = "bad_weights"


class IndexNotFoundError(SkylocError):
    code = "index_not_found"
    exit_code = 3
    http_status = 404


class ModelMismatchError(SkylocError):
    code = "model_mismatch"
    exit_code = 4
    http_status = 409


class OutsideAreaError(SkylocError):
    """The requested search area holds no indexed tile, or a point lies outside a raster."""

    code = "outside_area"
    exit_code = 5
    http_status = 422


class CancelledError(SkylocError):
    code = "cancelled"
    exit_code = 130
    http_status = 409
