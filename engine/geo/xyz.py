"""Exact Web-Mercator (EPSG:3857) XYZ tile geometry.

Tile edges come from the closed-form formulas of the slippy-map scheme, never from interpolating latitude
linearly: ``lon = col / 2^z * 360 - 180`` and ``lat = atan(sinh(pi * (1 - 2 * row / 2^z)))``. A mosaic
``(z, row, col, span)`` is the square of ``span x span`` tiles whose top-left tile is ``(row, col)``: it
spans tile edges ``col .. col + span`` and ``row .. row + span``.

Columns are not wrapped: a mosaic that runs past column ``2^z`` (the antimeridian) gets longitudes above
180, i.e. an unwrapped, continuous extent rather than a world-spanning one.
"""

from __future__ import annotations

import math
import re
from pathlib import PurePath

#: WGS84 / Web-Mercator sphere radius (metres).
EARTH_RADIUS = 6378137.0
#: Half the Web-Mercator world width (metres): x and y run from -ORIGIN_SHIFT to +ORIGIN_SHIFT.
ORIGIN_SHIFT = math.pi * EARTH_RADIUS
#: Highest zoom accepted when parsing names (beyond it 2^z tiles are sub-millimetre).
MAX_ZOOM = 30
#: Web Mercator's latitude limit (the square world).
MAX_LAT_3857 = 85.05112878

_NAME_RE = re.compile(r"(?:^|[_\-.])(\d{1,2})_(\d+)_(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)


def tile_lon(col: float, z: int) -> float:
    """Longitude (degrees) of the west edge of tile column ``col`` at zoom ``z``."""
    return col / 2**z * 360.0 - 180.0


def tile_lat(row: float, z: int) -> float:
    """Latitude (degrees) of the north edge of tile row ``row`` at zoom ``z``."""
    return math.degrees(math.atan(math.sinh(math.pi * (1.0 - 2.0 * row / 2**z))))


def tile_x(col: float, z: int) -> float:
    """EPSG:3857 x (metres) of the west edge of tile column ``col``."""
    return col / 2**z * 2.0 * ORIGIN_SHIFT - ORIGIN_SHIFT


def tile_y(row: float, z: int) -> float:
    """EPSG:3857 y (metres) of the north edge of tile row ``row``."""
    return ORIGIN_SHIFT - row / 2**z * 2.0 * ORIGIN_SHIFT


def mosaic_bounds_lonlat(z: int, row: int, col: int, span: int = 4) -> tuple[float, float, float, float]:
    """``(lon_min, lat_min, lon_max, lat_max)`` of the ``span x span`` mosaic with top-left tile (row, col)."""
    return (tile_lon(col, z), tile_lat(row + span, z), tile_lon(col + span, z), tile_lat(row, z))


def mosaic_bounds_3857(z: int, row: int, col: int, span: int = 4) -> tuple[float, float, float, float]:
    """``(minx, miny, maxx, maxy)`` in EPSG:3857 metres, exact, of the same mosaic."""
    return (tile_x(col, z), tile_y(row + span, z), tile_x(col + span, z), tile_y(row, z))


def mosaic_corners_lonlat(z: int, row: int, col: int, span: int = 4) -> tuple[tuple[float, float], ...]:
    """The 4 corners as (lon, lat), order upper-left, upper-right, lower-right, lower-left."""
    w, s, e, n = mosaic_bounds_lonlat(z, row, col, span)
    return ((w, n), (e, n), (e, s), (w, s))


def parse_xyz_name(name: str | PurePath) -> tuple[int, int, int] | None:
    """``(z, row, col)`` from a file name ending ``Z_ROW_COL.jpg|jpeg|png``, else None.

    Accepts a bare name or a path (only the last component is read), with or without a prefix separated
    by ``_``, ``-`` or ``.``: ``cand_14_4726_0344.jpg``, ``surrounding_14_4726_0344.jpg``,
    ``12_1302_0186.png``. The zoom must be at most MAX_ZOOM and rows and columns inside its ``2^z`` grid,
    so that a camera name such as ``DSC_12_3456_7890.jpg`` (column 7890 at zoom 12) is not taken for a tile.
    """
    match = _NAME_RE.search(PurePath(name).name)
    if match is None:
        return None
    z, row, col = (int(g) for g in match.groups())
    if z > MAX_ZOOM or row >= 2**z or col >= 2**z:
        return None
    return z, row, col


def col_of_lon(lon: float, z: int) -> int:
    """The column of the zoom-``z`` tile holding longitude ``lon`` (clamped to the grid)."""
    return min(2**z - 1, max(0, math.floor((lon + 180.0) / 360.0 * 2**z)))


def row_of_lat(lat: float, z: int) -> int:
    """The row of the zoom-``z`` tile holding latitude ``lat`` (clamped to Web Mercator's range)."""
    lat = max(-MAX_LAT_3857, min(MAX_LAT_3857, lat))
    y = (1.0 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2.0 * 2**z
    return min(2**z - 1, max(0, math.floor(y)))
