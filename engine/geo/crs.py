"""CRS labels and transforms to lon/lat through pyproj, with tile outlines that keep their true shape.

All lon/lat here are EPSG:4326 degrees in (lon, lat) order (``always_xy=True``), whatever the CRS's
official axis order.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from pyproj import CRS, Transformer

from ..errors import InputError

Bounds = tuple[float, float, float, float]
Ring = tuple[tuple[float, float], ...]


def _to_pyproj(crs: Any) -> CRS:
    """A pyproj CRS from a pyproj/rasterio CRS, an "EPSG:xxxx" string, WKT or PROJ string."""
    if isinstance(crs, CRS):
        return crs
    if hasattr(crs, "to_wkt"):  # rasterio.crs.CRS and friends
        return CRS.from_wkt(crs.to_wkt())
    return CRS.from_user_input(crs)


def crs_label(crs: Any) -> str:
    """``"AUTH:code"`` (e.g. ``"EPSG:32618"``) when the CRS has an authority code, else its WKT.

    The label is what TileSpec.crs and the output layers carry, and it round-trips through
    ``pyproj.CRS.from_user_input``.
    """
    pcrs = _to_pyproj(crs)
    authority = pcrs.to_authority()
    if authority is not None:
        return f"{authority[0]}:{authority[1]}"
    return pcrs.to_wkt()


@lru_cache(maxsize=64)
def _transformer_to_lonlat(label: str) -> Transformer:
    # Keyed by the label string (hashable, and equal for equal CRSs); pyproj >= 3.1 transformers are
    # thread-safe, so one cached instance can serve every thread.
    return Transformer.from_crs(CRS.from_user_input(label), CRS.from_epsg(4326), always_xy=True)


def to_lonlat(crs: Any, xs: Any, ys: Any) -> tuple[np.ndarray, np.ndarray]:
    """Transform native coordinates to (lon, lat) arrays in EPSG:4326 degrees (cached Transformer)."""
    transformer = _transformer_to_lonlat(crs_label(crs) if not isinstance(crs, str) else crs)
    lon, lat = transformer.transform(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float))
    return np.asarray(lon, dtype=float), np.asarray(lat, dtype=float)


def unwrap_lons(lons: Sequence[float] | np.ndarray) -> np.ndarray:
    """Remove +-360 jumps between consecutive longitudes, so a path across the antimeridian stays continuous.

    The first longitude is kept; later ones may leave [-180, 180] (e.g. 179.9 then 180.1 instead of -179.9).
    """
    lons = np.asarray(lons, dtype=float)
    if lons.size < 2:
        return lons.copy()
    steps = np.diff(lons)
    steps -= 360.0 * np.round(steps / 360.0)
    return np.concatenate([lons[:1], lons[0] + np.cumsum(steps)])


def crosses_antimeridian(ring: Sequence[tuple[float, float]]) -> bool:
    """True when a (lon, lat) ring, once unwrapped, reaches past +-180 degrees, i.e. straddles the antimeridian.

    Also true for a raw ring whose longitude span exceeds 180 degrees, the symptom of a ring that was
    transformed point by point across the antimeridian and not unwrapped.
    """
    lons = np.asarray([p[0] for p in ring], dtype=float)
    if lons.size == 0:
        return False
    if lons.max() - lons.min() > 180.0:
        return True
    return bool(lons.max() > 180.0 or lons.min() < -180.0)


def unwrap_ring(ring: Sequence[tuple[float, float]], what: str = "ring") -> Ring:
    """The ring with longitudes unwrapped (see unwrap_lons), so it never becomes a world-spanning polygon.

    A ring that crosses the antimeridian comes back with longitudes beyond +-180 on one side: a correct,
    small polygon in an unwrapped longitude frame. Splitting it into two parts at +-180 (for a layer in
    EPSG:4326) is the writer's job. A closed ring that does not close after unwrapping goes around a pole:
    no lon/lat polygon of it is honest, so that raises InputError naming ``what``.
    """
    pts = np.asarray(ring, dtype=float)
    lons = unwrap_lons(pts[:, 0])
    closed = len(pts) > 2 and np.allclose(pts[0], pts[-1])
    if closed and abs(lons[-1] - lons[0]) > 1e-9:
        raise InputError(f"{what} encloses a pole: its outline cannot be drawn as a lon/lat polygon")
    return tuple((float(x), float(y)) for x, y in zip(lons, pts[:, 1], strict=True))


def _corner_ring(geom: Bounds | Sequence[tuple[float, float]]) -> np.ndarray:
    """4 native corners (UL, UR, LR, LL) from bounds (minx, miny, maxx, maxy) or from 4 (x, y) corners."""
    if len(geom) == 4 and all(np.isscalar(v) for v in geom):
        minx, miny, maxx, maxy = (float(v) for v in geom)  # type: ignore[arg-type]
        return np.array([(minx, maxy), (maxx, maxy), (maxx, miny), (minx, miny)], dtype=float)
    corners = np.asarray(geom, dtype=float)
    if corners.shape == (5, 2) and np.allclose(corners[0], corners[-1]):
        corners = corners[:4]
    if corners.shape != (4, 2):
        raise ValueError(f"expected bounds or 4 (x, y) corners, got shape {corners.shape}")
    return corners


def densified_ring_lonlat(
    crs: Any,
    geom: Bounds | Sequence[tuple[float, float]],
    points_per_edge: int = 8,
    what: str = "tile",
) -> Ring:
    """The true outline in EPSG:4326 of a rectangle or quadrilateral given in ``crs``.

    ``geom`` is either bounds ``(minx, miny, maxx, maxy)`` or 4 corners in the order UL, UR, LR, LL. Each
    edge is cut into ``points_per_edge`` segments before the transform, so the curved edges of a UTM tile in
    degrees are followed. The result is a closed ring of ``4 * points_per_edge + 1`` (lon, lat) points in
    which vertex ``i * points_per_edge`` is corner ``i``.

    Antimeridian: a tile that straddles it would transform to longitudes near +180 and -180 and become a
    polygon spanning the whole world. The ring is unwrapped instead (see unwrap_ring; check it with
    crosses_antimeridian). Points that cannot be transformed (outside the CRS's domain) raise InputError.
    """
    if points_per_edge < 1:
        raise ValueError("points_per_edge must be >= 1")
    corners = _corner_ring(geom)
    t = np.arange(points_per_edge, dtype=float) / points_per_edge
    starts, ends = corners, np.roll(corners, -1, axis=0)
    pts = (starts[:, None, :] + (ends - starts)[:, None, :] * t[None, :, None]).reshape(-1, 2)
    pts = np.vstack([pts, pts[:1]])
    lon, lat = to_lonlat(crs, pts[:, 0], pts[:, 1])
    if not (np.all(np.isfinite(lon)) and np.all(np.isfinite(lat))):
        raise InputError(f"{what} lies (partly) outside the valid area of its CRS {crs_label(crs)!s:.80}")
    return unwrap_ring(list(zip(lon, lat, strict=True)), what=what)
