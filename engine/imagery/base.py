"""What a database tile is, whatever imagery it comes from.

Corner order everywhere in Skyloc: upper-left, upper-right, lower-right, lower-left of the image
(clockwise from the top-left pixel corner), as (lon, lat) in EPSG:4326 degrees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

CORNER_ORDER = ("upper_left", "upper_right", "lower_right", "lower_left")


@dataclass(frozen=True)
class TileSpec:
    """One database tile, before it gets an id in an index.

    ``bounds`` and ``crs`` are the tile's exact extent in the source's native CRS (for a GeoTIFF window:
    the window's bounds through the raster's affine transform; for XYZ: EPSG:3857 metres from z/x/y).
    ``corners_lonlat`` are the 4 image corners in EPSG:4326 through pyproj (order: CORNER_ORDER).
    ``footprint_lonlat`` is the ring with edges densified, so that a UTM tile keeps its true shape in degrees.
    """

    source: str  # path of the file the pixels come from
    kind: str  # "geotiff" | "xyz"
    scale: int  # GeoTIFF: tile side in source pixels; XYZ: mosaic side in 256-px tiles (span)
    zoom: int | None  # XYZ zoom of the mosaic, None for a GeoTIFF
    window: tuple[int, int, int, int] | None  # GeoTIFF: (col_off, row_off, width, height); XYZ: None
    crs: str  # native CRS, "EPSG:xxxx" when it has one, else WKT
    bounds: tuple[float, float, float, float]  # (minx, miny, maxx, maxy) in ``crs``
    corners_lonlat: tuple[tuple[float, float], ...]  # 4 x (lon, lat), CORNER_ORDER
    footprint_lonlat: tuple[tuple[float, float], ...] = field(default=())  # closed ring (lon, lat)
    xyz: tuple[int, int, int] | None = None  # (z, row, col) of the top-left XYZ tile, for XYZ mosaics


class TileSource(Protocol):
    """A file (GeoTIFF) or folder (XYZ mosaics) that yields tiles and their pixels."""

    path: str

    def specs(self) -> list[TileSpec]:
        """All tiles this source contributes (cheap: no pixel is read)."""
        ...

    def read(self, spec: TileSpec, size: int) -> np.ndarray:
        """The tile's pixels as RGB uint8, shape (size, size, 3), north up."""
        ...

    def close(self) -> None: ...
