"""Which files an action may write over: never an input of the action, never a file Skyloc did not write.

Every writer (CLI, API, service) asks :func:`check_output` before any work starts, and the writers re-ask it
just before they rename their temporary file into place. The rule:

* an output that is (the same file as) an input of the same action is refused, ``overwrite`` or not;
* a missing output is written;
* an existing file that Skyloc wrote is replaced (atomically, by the writer);
* any other existing file is refused unless the user said ``overwrite``.

"Skyloc wrote it" is read from the file itself where its format has a place for it: the ``SKYLOC_OUTPUT``
tag of a GeoTIFF, the description of a GeoPackage layer (a GeoPackage output only adds or replaces its own
layer, see :func:`engine.vector_io.write_polygons`), a comment in a ``.qml`` style, a key of a JSON file.
Formats without such a place (QGIS ``.points``, ``.npy``, Shapefiles) carry the sha256 of the content
Skyloc wrote in an extended attribute (``user.skyloc.sha256``): a file edited since (say, GCPs refined by
hand in the Georeferencer) no longer matches and is treated as the user's. Where the filesystem keeps no
extended attributes such files are always treated as the user's (refused without ``overwrite``): the safe
side.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from .errors import InputError, OutputExistsError

#: GeoTIFF tag that marks a raster written by Skyloc (value: what it is, e.g. "heatmap", "georeferenced photo")
TIFF_TAG = "SKYLOC_OUTPUT"
#: Start of the description of every GeoPackage layer Skyloc writes
GPKG_DESCRIPTION = "Skyloc"
#: Comment line inside every .qml style Skyloc writes
QML_MARK = "<!-- skyloc-output -->"
#: Top-level key of every JSON file Skyloc writes as an output
JSON_KEY = "skyloc_output"
XATTR = "user.skyloc.sha256"
SHAPEFILE_PARTS = (".shp", ".shx", ".dbf", ".prj", ".cpg")


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when both names reach the same file (hard links, symlinks, ``..``, relative paths)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare the names, lexically and resolved
        norm = os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))
        return norm or os.path.realpath(a) == os.path.realpath(b)


def _parts(path: Path) -> list[Path]:
    """Every file a written output consists of (a Shapefile is several)."""
    if path.suffix.lower() == ".shp":
        return [path.with_suffix(ext) for ext in SHAPEFILE_PARTS]
    return [path]


def check_output(
    path: str | os.PathLike[str],
    *,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    overwrite: bool = False,
    layer: str | None = None,
    what: str = "output",
) -> Path:
    """Refuse ``path`` as an output when the rule above says so; return it as a Path.

    ``layer``: for a GeoPackage, the layer the action writes (other layers of the file are kept).
    """
    out = Path(path)
    if not str(path).strip():
        raise InputError(f"{what}: empty file name")
    for part in _parts(out):
        for given in inputs:
            if given is not None and os.path.lexists(given) and same_file(part, given):
                raise OutputExistsError(
                    f"{what} {out} is an input of this action: it will not be written over (choose another "
                    "file name)"
                )
    if out.is_dir():
        raise OutputExistsError(f"{what} {out} is a folder: give a file name")
    existing = [p for p in _parts(out) if os.path.lexists(p)]
    if not existing or overwrite:
        return out
    if out.suffix.lower() == ".gpkg" and layer is not None:
        if gpkg_layer_replaceable(out, layer):
            return out
        raise OutputExistsError(
            f"{what} {out} already has a layer '{layer}' that Skyloc did not write: it will not be replaced "
            "(choose another file, or add --overwrite)"
        )
    if all(is_skyloc_output(p) for p in existing if p.suffix.lower() not in (".prj", ".cpg", ".shx", ".dbf")):
        return out
    raise OutputExistsError(
        f"{what} {out} exists and was not written by Skyloc (or was changed since): it will not be replaced "
        "(choose another file name, or add --overwrite)"
    )


def is_skyloc_output(path: str | os.PathLike[str]) -> bool:
    """Whether the existing file ``path`` is a Skyloc output, unchanged since Skyloc wrote it."""
    p = Path(path)
    if not p.is_file() or p.is_symlink():
        return False
    suffix = p.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            return _tiff_is_ours(p)
        if suffix == ".qml":
            with open(p, encoding="utf-8", errors="replace") as fh:
                return QML_MARK in fh.read(1 << 20)
        if suffix == ".json":
            if p.stat().st_size > 256 << 20:
                return False
            data = json.loads(p.read_text(encoding="utf-8"))
            return isinstance(data, dict) and JSON_KEY in data
        if suffix == ".gpkg":
            return _gpkg_all_layers_ours(p)
    except (OSError, ValueError, sqlite3.Error):
        return False
    return _xattr_matches(p)


def _tiff_is_ours(path: Path) -> bool:
    import rasterio

    try:
        with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"), rasterio.open(path) as ds:
            return TIFF_TAG in ds.tags()
    except Exception:  # rasterio's own errors for files that are not rasters
        return False


def _gpkg_descriptions(path: Path) -> dict[str, str]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT table_name, description FROM gpkg_contents").fetchall()
    finally:
        con.close()
    return {str(name): str(desc or "") for name, desc in rows}


def is_geopackage(path: str | os.PathLike[str]) -> bool:
    """A readable GeoPackage (whose other layers an output must keep)."""
    try:
        _gpkg_descriptions(Path(path))
    except (sqlite3.Error, OSError):
        return False
    return True


def _gpkg_all_layers_ours(path: Path) -> bool:
    layers = _gpkg_descriptions(path)
    return bool(layers) and all(d.startswith(GPKG_DESCRIPTION) for d in layers.values())


def gpkg_layer_replaceable(path: str | os.PathLike[str], layer: str) -> bool:
    """A GeoPackage may receive ``layer`` if it lacks that layer or the layer is Skyloc's."""
    try:
        layers = _gpkg_descriptions(Path(path))
    except sqlite3.Error:
        return False  # not a GeoPackage (or a corrupt one): not ours to touch
    return layer not in layers or layers[layer].startswith(GPKG_DESCRIPTION)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _xattr_matches(path: Path) -> bool:
    getx = getattr(os, "getxattr", None)
    if getx is None:
        return False
    try:
        recorded = getx(path, XATTR).decode()
    except OSError:
        return False
    return recorded == _sha256(path)


def mark_written(path: str | os.PathLike[str]) -> None:
    """Record that Skyloc wrote ``path`` as it is now (for formats without an in-file mark). Best effort."""
    setx = getattr(os, "setxattr", None)
    if setx is None:
        return
    with contextlib.suppress(OSError):
        setx(path, XATTR, _sha256(Path(path)).encode())
