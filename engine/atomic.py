"""Atomic file and folder writes: the final path holds the previous good version or the new one, never half."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str], suffix: str = "", durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success rename it over ``final``, on error delete it.

    The temporary name keeps ``suffix`` (e.g. ".gpkg") because some writers (GDAL) pick a driver from it.
    ``durable``: fsync the file before the rename and the folder after it (an index survives a power cut
    as the old or the new file; a write error such as ENOSPC surfaces here, not in a destructor).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    os.unlink(tmp)  # writers such as GDAL refuse to overwrite an existing (empty) file
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if durable:
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise
    if durable:
        with contextlib.suppress(OSError):  # not every platform/filesystem can fsync a directory
            dir_fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (mkstemp's 0600 is too private for
    outputs users share, and inconsistent with the other files of a folder)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read the umask by setting it (and putting it back at once)
    os.umask(mask)
    return 0o666 & ~mask


def replace_dir(staged: Path, final: Path) -> None:
    """Swap a fully written folder into place; the old one is removed only after the new one is there."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
