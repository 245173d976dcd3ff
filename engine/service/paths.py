"""Every path a request names must resolve inside the folders the service was given.

Paths are resolved with :func:`os.path.realpath` (every symlink followed, ``..`` applied after the
symlinks) before the check, and the resolved path is what the engine then opens, so neither ``../`` nor
a symlink planted inside a root reaches a file outside. Relative paths are taken relative to the first
root. Folders given as inputs (photo folders, XYZ mosaic folders) are checked entry by entry, because a
folder inside a root may hold symlinks to files outside it.

Limitation (documented in the README): a local user who can replace a folder inside a root by a symlink
between the check and the open could still redirect that open; the roots are meant to be the user's own
folders, the service runs as that user, and the token keeps other users' processes out.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import InputError
from .errors import ForbiddenPathError

#: A folder input with more entries than this is refused (the per-entry check walks it).
MAX_FOLDER_ENTRIES = 200_000


def _inside(path: str, root: str) -> bool:
    return path == root or os.path.commonpath([path, root]) == root


class PathPolicy:
    """``roots``: readable and writable; ``read_only_roots``: readable only (the upload folder)."""

    def __init__(self, roots: Sequence[str | os.PathLike[str]], read_only_roots: Iterable[str] = ()):
        if not roots:
            raise ValueError("the service needs at least one root folder")
        self.roots = [os.path.realpath(r) for r in roots]
        self.read_only_roots = [os.path.realpath(r) for r in read_only_roots]
        for root in self.roots:
            if not os.path.isdir(root):
                raise InputError(f"root folder {root} does not exist")

    def describe(self) -> str:
        return ", ".join(self.roots)

    def allowed(self, real: str, *, write: bool = False) -> bool:
        roots = self.roots if write else [*self.roots, *self.read_only_roots]
        return any(_inside(real, r) for r in roots)

    def resolve(self, path: str, *, write: bool = False, what: str = "path") -> Path:
        """The real path of ``path`` if it lies inside the roots, else ForbiddenPathError (403)."""
        if not isinstance(path, str) or not path.strip():
            raise InputError(f"{what}: empty path")
        if "\x00" in path:
            raise InputError(f"{what}: a path cannot contain NUL characters")
        joined = path if os.path.isabs(path) else os.path.join(self.roots[0], path)
        try:
            real = os.path.realpath(joined)
        except (OSError, ValueError) as exc:
            raise InputError(f"{what} {path!r}: {exc}") from exc
        if not self.allowed(real, write=write):
            raise ForbiddenPathError(
                f"{what} {path!r} resolves to {real}, outside the folders this service may "
                + ("write" if write else "read")
                + f" ({self.describe()})"
            )
        return Path(real)

    def resolve_input(self, path: str, *, what: str = "input") -> Path:
        """An existing input; a folder is checked entry by entry (no symlink out of the roots)."""
        real = self.resolve(path, what=what)
        if not real.exists():
            raise InputError(f"{what} {path!r}: no such file or folder")
        if real.is_dir():
            self.check_folder(real, what=what)
        return real

    def check_folder(self, folder: Path, *, what: str = "input") -> None:
        """Every entry of ``folder`` must resolve inside the roots.

        Only the folder's own entries: the engine reads photo folders and XYZ mosaic folders one level deep.
        """
        try:
            with os.scandir(folder) as it:
                for count, entry in enumerate(it):
                    if count >= MAX_FOLDER_ENTRIES:
                        raise InputError(f"{what} {folder}: more than {MAX_FOLDER_ENTRIES:,} entries")
                    real = os.path.realpath(entry.path) if entry.is_symlink() else entry.path
                    if not self.allowed(real):
                        raise ForbiddenPathError(
                            f"{what} {folder}: {entry.name} is a symlink to {real}, outside the folders "
                            f"this service may read ({self.describe()})"
                        )
        except OSError as exc:
            raise InputError(f"{what} {folder}: cannot list it ({exc.strerror})") from exc
