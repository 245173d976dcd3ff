"""Errors a user can meet, each with a stable code, a CLI exit code and an HTTP status.

The CLI prints ``message`` and exits with ``exit_code``; the HTTP service (later) answers ``http_status``
with ``{"code": code, "message": message}``. Never let a raw traceback reach a user for these.
"""

from __future__ import annotations

import contextlib
import errno
import re
from collections.abc import Iterator


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


class OutputExistsError(SkylocError):
    """An output would replace an input of the same action, or a file Skyloc did not write."""

    code = "output_exists"
    exit_code = 3
    http_status = 409


class DiskFullError(SkylocError):
    """The disk (or quota) filled while writing: nothing half-written is left, the input is not at fault."""

    code = "no_space"
    exit_code = 3
    http_status = 507


class OutputLockedError(SkylocError):
    """Another running Skyloc process writes the same output."""

    code = "output_locked"
    exit_code = 3
    http_status = 409


#: errno values that mean "the machine ran out of room", not "the program is wrong"
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


def from_os_error(exc: OSError, what: str) -> SkylocError | None:
    """The user-facing error for an OSError met while doing ``what`` (None: not a user-side cause).

    Disk full / quota -> DiskFullError; a name too long, a missing file, no permission -> InputError.
    """
    short_write = exc.errno is None and re.fullmatch(r"\d+ requested and \d+ written", str(exc))  # numpy
    if exc.errno in _NO_SPACE or short_write or "No space left on device" in str(exc):
        return DiskFullError(f"no space left on device while {what}; nothing was left half-written")
    if exc.errno == errno.ENAMETOOLONG:
        return InputError(f"file name too long while {what} ({len(str(exc.filename or ''))} characters)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return InputError(f"permission denied while {what}: {exc.filename or exc}")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
        return InputError(f"{exc.strerror or exc} while {what}: {exc.filename or ''}".rstrip(": "))
    return None


@contextlib.contextmanager
def os_errors_as_user_errors(what: str) -> Iterator[None]:
    """Re-raise OSErrors with a user-side cause (disk full, name too long ...) as SkylocErrors."""
    try:
        yield
    except OSError as exc:
        mapped = from_os_error(exc, what)
        if mapped is None:
            raise
        raise mapped from exc
