"""Imagery sources: every read of imagery goes through this package (GeoTIFF windows at several scales, Web-Mercator XYZ mosaics, photos, views for coregistration)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError
from .base import TileSource, TileSpec
from .geotiff import GeoTiffSource
from .mosaic_folder import DEFAULT_SPAN, Span, XyzMosaicSource
from .tile_source import TileMosaicSource, is_tile_source

__all__ = ["GeoTiffSource", "TileMosaicSource", "TileSource", "TileSpec", "XyzMosaicSource", "open_source"]


def open_source(
    path: str | Path,
    *,
    tile_sizes: Sequence[int] = (256, 512),
    overlap: float = 0.5,
    bands: Sequence[int] | None = None,
    span: Span = DEFAULT_SPAN,
    exclude: str | Sequence[str] | None = None,
    recursive: bool = False,
    tile_options: dict[str, Any] | None = None,
) -> TileSource:
    """The tile source for ``path``: an XYZ tile service URL template, an MBTiles file or a GeoPackage of
    raster tiles (TileMosaicSource, with ``tile_options``: zooms, area, max_tiles, tile_cache, attribution
    ...), a folder of XYZ mosaics, or a georeferenced raster file.

    Options that do not apply to the kind found are ignored (``tile_sizes``/``overlap``/``bands`` for a
    folder, ``span``/``exclude``/``recursive`` for a raster).
    """
    if is_tile_source(str(path)):
        n = span if isinstance(span, int) else DEFAULT_SPAN
        return TileMosaicSource(str(path), span=n, overlap=overlap, **(tile_options or {}))
    p = Path(path)
    if p.is_dir():
        return XyzMosaicSource(p, span=span, exclude=exclude, recursive=recursive)
    if p.is_file():
        return GeoTiffSource(p, tile_sizes=tile_sizes, overlap=overlap, bands=bands)
    raise InputError(f"{path}: no such file or folder")
