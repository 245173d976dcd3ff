"""Restricting retrieval to a search area: a point + radius (e.g. the station's nadir point) or a box.

Distances are geodesic: the tile outlines are projected to an azimuthal equidistant projection centred on
the point (distances from the centre are exact there), never compared in degrees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from pyproj import Transformer

from ..errors import InputError

EARTH_RADIUS_KM = 6371.0088


@dataclass(frozen=True)
class SearchArea:
    """Either ``near`` = (lat, lon) with ``radius_km``, or ``bbox`` = (min_lon, min_lat, max_lon, max_lat).

    A bbox with min_lon > max_lon crosses the antimeridian.
    """

    near: tuple[float, float] | None = None
    radius_km: float | None = None
    bbox: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        if (self.near is None) == (self.bbox is None):
            raise InputError("give a search area as a point + radius or as a bounding box, not both")
        if self.near is not None:
            lat, lon = self.near
            if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                raise InputError(
                    f"--near {lat},{lon}: expected LAT,LON in degrees (lat -90..90, lon -180..180)"
                )
            if self.radius_km is None or not (self.radius_km > 0):
                raise InputError("--near needs a positive --radius-km")
        if self.bbox is not None:
            x0, y0, x1, y1 = self.bbox
            if not (-90 <= y0 < y1 <= 90 and -180 <= x0 <= 180 and -180 <= x1 <= 180):
                raise InputError(f"--bbox {self.bbox}: expected MIN_LON,MIN_LAT,MAX_LON,MAX_LAT in degrees")

    def describe(self) -> str:
        if self.near is not None:
            return f"within {self.radius_km:g} km of lat {self.near[0]:g}, lon {self.near[1]:g}"
        return "inside bbox lon {:g}..{:g}, lat {:g}..{:g}".format(*self.bbox[::2], *self.bbox[1::2])

    def select(self, footprints: list[shapely.Polygon]) -> np.ndarray:
        """Indices of the footprints (EPSG:4326 lon/lat polygons) that intersect the area."""
        if not footprints:
            return np.zeros(0, dtype=np.int64)
        geoms = np.asarray(footprints, dtype=object)
        if self.bbox is not None:
            return np.flatnonzero(shapely.intersects(geoms, _bbox_geometry(self.bbox)))
        return _select_near(geoms, self.near, self.radius_km)


def _bbox_geometry(bbox: tuple[float, float, float, float]) -> shapely.Geometry:
    x0, y0, x1, y1 = bbox
    if x0 <= x1:
        return shapely.box(x0, y0, x1, y1)
    return shapely.MultiPolygon([shapely.box(x0, y0, 180, y1), shapely.box(-180, y0, x1, y1)])


def haversine_km(lat1, lon1, lat2, lon2):
    """Great-circle distance in km (vectorised)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dphi, dlmb = p2 - p1, np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dphi / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlmb / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0, 1)))


def _select_near(geoms: np.ndarray, near: tuple[float, float], radius_km: float) -> np.ndarray:
    lat, lon = near
    # Coarse pass, vectorised over all vertices: a tile whose nearest vertex is farther than the radius plus
    # the tile's own size (largest distance from its first vertex) cannot touch the circle.
    xy, owner = shapely.get_coordinates(shapely.get_exterior_ring(geoms), return_index=True)
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    to_point = haversine_km(lat, lon, xy[:, 1], xy[:, 0])
    first = starts[np.searchsorted(starts, np.arange(len(owner)), side="right") - 1]
    to_first = haversine_km(xy[first, 1], xy[first, 0], xy[:, 1], xy[:, 0])
    nearest = np.minimum.reduceat(to_point, starts)
    extent = np.maximum.reduceat(to_first, starts)
    candidates = owner[starts][nearest <= radius_km + extent]
    if candidates.size == 0:
        return candidates.astype(np.int64)
    aeqd = Transformer.from_crs(
        "EPSG:4326", f"+proj=aeqd +lat_0={lat} +lon_0={lon} +datum=WGS84 +units=m", always_xy=True
    )
    projected = shapely.transform(
        geoms[candidates], lambda pts: np.column_stack(aeqd.transform(pts[:, 0], pts[:, 1]))
    )
    dist_m = shapely.distance(projected, shapely.Point(0, 0))
    return candidates[dist_m <= radius_km * 1000.0].astype(np.int64)
