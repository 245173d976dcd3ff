"""One writer per output: an advisory lock file beside the output, holding the owner's pid.

``fcntl.flock`` locks die with their process, so a crashed or killed run never leaves a stale lock behind;
the pid in the file is only there to tell the user who holds it. Where ``fcntl`` does not exist (Windows)
the lock is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputLockedError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def lock_path(out: str | os.PathLike[str]) -> Path:
    out = Path(out)
    return out.with_name(f".{out.name}.lock")


@contextlib.contextmanager
def output_lock(out: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the lock of ``out`` for the duration of the block, or raise OutputLockedError at once."""
    if fcntl is None:
        yield
        return
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputLockedError(
                f"{out} is being written by another Skyloc run (pid {holder}); wait for it to finish or "
                "choose another output"
            ) from None
        # the previous holder may have removed the file between our open and our lock: lock the live one
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
