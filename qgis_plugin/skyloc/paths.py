"""Paths between QGIS and the engine, which reads and writes only inside its root folders.

Photos outside the roots are uploaded (the engine keeps uploads in a private folder it may read); outputs
asked outside the roots are written by the engine into the results folder and copied to where they were
asked (:class:`StagedOutput`). Rasters and indexes are read in place: they must lie inside the roots.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

from .client import ServiceError, SkylocClient
from .engine_link import inside

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")


def engine_roots(client: SkylocClient) -> list[str]:
    """The folders the engine may read and write."""
    return list(client.version().get("roots") or [])


@contextlib.contextmanager
def engine_photos(
    client: SkylocClient,
    photos: Sequence[str],
    roots: Sequence[str],
    origins: dict[str, str] | None = None,
) -> Iterator[list[str]]:
    """Photos (files or folders) as paths the engine can read: files outside its roots are uploaded for
    the time of the ``with`` block (and deleted from the engine after it). ``origins`` (if given) gets
    the user's file of every upload: ``{engine path: original path}``."""
    out: list[str] = []
    uploads: list[str] = []
    try:
        for given in photos:
            path = os.path.expanduser(given)
            if inside(path, list(roots)):
                out.append(path)
                continue
            if os.path.isdir(path):
                files = sorted(
                    os.path.join(path, f)
                    for f in os.listdir(path)
                    if f.lower().endswith(PHOTO_SUFFIXES) and os.path.isfile(os.path.join(path, f))
                )
                if not files:
                    raise ServiceError(None, "empty_input", f"folder {path} holds no photo")
            elif os.path.isfile(path):
                files = [path]
            else:
                raise ServiceError(None, "bad_input", f"photo {path}: no such file or folder")
            for f in files:
                up = client.upload(f)
                uploads.append(up.id)
                out.append(up.path)
                if origins is not None:
                    origins[up.path] = f
        yield out
    finally:
        for upload_id in uploads:
            with contextlib.suppress(ServiceError):
                client.delete_upload(upload_id)


def require_inside(path: str, roots: Sequence[str], what: str = "input") -> str:
    """``path`` if the engine may read it; else ServiceError ``forbidden_path`` saying where it may read."""
    if not inside(path, list(roots)):
        raise ServiceError(
            403, "forbidden_path", f"{what} {path} lies outside the engine's folders ({', '.join(roots)})"
        )
    return path


class StagedOutput:
    """An output file: the engine writes ``engine_path``; :meth:`finish` copies it to ``dest`` if needed.

    Sidecars written beside the main file with the same stem (Shapefile parts, a heatmap's ``.qml``) are
    copied too; folders the engine writes beside it (a footprint batch's ``_georef/``) stay where they are.
    """

    def __init__(self, dest: str, roots: Sequence[str], work_dir: str) -> None:
        self.dest = os.path.abspath(os.path.expanduser(dest))
        if inside(os.path.dirname(self.dest), list(roots)):
            self.folder = None
            self.engine_path = self.dest
        else:
            os.makedirs(work_dir, exist_ok=True)
            self.folder = tempfile.mkdtemp(prefix="staged-", dir=work_dir)
            self.engine_path = os.path.join(self.folder, os.path.basename(self.dest))

    def finish(self) -> str:
        """Copy the engine's files to ``dest`` (no-op when it wrote there itself); ``dest``."""
        if self.folder is None:
            return self.dest
        stem = os.path.splitext(os.path.basename(self.engine_path))[0]
        dest_stem = os.path.splitext(self.dest)[0]
        os.makedirs(os.path.dirname(self.dest), exist_ok=True)
        for name in os.listdir(self.folder):
            src = os.path.join(self.folder, name)
            base, ext = os.path.splitext(name)
            if os.path.isfile(src) and base == stem:
                shutil.copyfile(src, dest_stem + ext)
        return self.dest

    def discard(self) -> None:
        """Remove the staging folder (after a failure)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
