"""Imagery sources: every read of imagery goes through this package (GeoTIFF windows at several scales, Web-Mercator XYZ mosaics, photos, views for coregistration)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from .base import TileSource, TileSpec
from .geotiff import GeoTiffSource
from .mosaic_folder import DEFAULT_SPAN, Span, XyzMosaicSource

__all__ = ["GeoTiffSource", "TileSource", "TileSpec", "XyzMosaicSource", "open_source"]


def open_source(
    path: str | Path,
    *,
    tile_sizes: Sequence[int] = (256, 512),
    overlap: float = 0.5,
    bands: Sequence[int] | None = None,
    span: Span = DEFAULT_SPAN,
    exclude: str | Sequence[str] | None = None,
    recursive: bool = False,
) -> TileSource:
    """The tile source for ``path``: a folder of XYZ mosaics, or a georeferenced raster file.

    Options that do not apply to the kind found are ignored (``tile_sizes``/``overlap``/``bands`` for a
    folder, ``span``/``exclude``/``recursive`` for a raster).
    """
    p = Path(path)
    if p.is_dir():
        return XyzMosaicSource(p, span=span, exclude=exclude, recursive=recursive)
    if p.is_file():
        return GeoTiffSource(p, tile_sizes=tile_sizes, overlap=overlap, bands=bands)
    raise InputError(f"{path}: no such file or folder")
