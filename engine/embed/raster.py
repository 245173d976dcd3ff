"""A georeferenced raster opened for embeddings: coordinates in any CRS to pixels, boundless pixel reads.

Points go through pyproj (any CRS -> the raster's CRS) and the raster's affine transform, never a linear map
in degrees. Reads outside the raster return zeros flagged invalid, so windows with context can hang over
the edges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pyproj import CRS, Transformer
from pyproj.exceptions import CRSError
from rasterio.windows import Window

from ..errors import InputError, OutsideAreaError
from ..tiles.geotiff import GeoTiffSource


def parse_crs(text: str | None) -> CRS | None:
    """A CRS from 'EPSG:4326', '4326', a WKT or PROJ string; InputError when pyproj cannot read it."""
    if text is None or str(text).strip() == "":
        return None
    value = str(text).strip()
    try:
        return CRS.from_user_input(int(value) if value.isdigit() else value)
    except CRSError as exc:
        raise InputError(f"unknown CRS {text!r} (use e.g. EPSG:4326): {exc}") from exc


@dataclass(frozen=True)
class PixelPoints:
    """Points as the user gave them and as fractional pixel positions (col, row; 0 = left/top edge)."""

    xy: np.ndarray  # (N, 2) in the user's CRS
    crs: str  # the user's CRS (label)
    cols: np.ndarray  # (N,)
    rows: np.ndarray  # (N,)


class EmbedRaster:
    """Wraps :class:`GeoTiffSource` (CRS checks, RGB band choice, raster-wide stretch) for embedding work."""

    def __init__(self, path: str | Path, bands: Sequence[int] | None = None) -> None:
        self.source = GeoTiffSource(path, tile_sizes=(1,), bands=bands)  # tile sizes unused here
        self.path = self.source.path
        self.width, self.height = self.source.width, self.source.height
        self.transform = self.source.transform
        ds = self.source.dataset
        self.crs = CRS.from_user_input(ds.crs.to_wkt())
        self.crs_label = self.source.crs
        self.count = ds.count
        self.descriptions = tuple(ds.descriptions)

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> EmbedRaster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- coordinates ----------------------------------------------------------------------------------
    def to_pixels(self, xy: np.ndarray, crs: str | None = None) -> PixelPoints:
        """(N, 2) points (x, y; for geographic CRSs lon, lat) in ``crs`` (default the raster's) -> pixels.

        OutsideAreaError names the first point outside the raster, with the raster's bounds in both CRSs.
        """
        pts = np.atleast_2d(np.asarray(xy, dtype=np.float64))
        if pts.shape[1] != 2 or not np.all(np.isfinite(pts)):
            raise InputError(f"points must be finite (x, y) pairs, got shape {pts.shape}")
        user = parse_crs(crs) or self.crs
        if user == self.crs:
            xs, ys = pts[:, 0], pts[:, 1]
        else:
            tr = Transformer.from_crs(user, self.crs, always_xy=True)
            xs, ys = tr.transform(pts[:, 0], pts[:, 1], errcheck=False)
            xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        cols, rows = ~self.transform @ (xs, ys)
        cols, rows = np.asarray(cols, dtype=np.float64), np.asarray(rows, dtype=np.float64)
        outside = ~(np.isfinite(cols) & np.isfinite(rows))
        outside |= (cols < 0) | (rows < 0) | (cols > self.width) | (rows > self.height)
        label = user.to_string() if user.to_epsg() is None else f"EPSG:{user.to_epsg()}"
        if outside.any():
            i = int(np.argmax(outside))
            raise OutsideAreaError(
                f"point {i + 1} ({pts[i, 0]:.6f}, {pts[i, 1]:.6f} in {label}) lies outside {self.path}, whose "
                f"bounds are {self._bounds_text(user, label)}"
            )
        return PixelPoints(pts, label, cols, rows)

    def _bounds_text(self, user: CRS, label: str) -> str:
        left, bottom, right, top = self.bounds()
        text = (
            f"{left:.3f}, {bottom:.3f}, {right:.3f}, {top:.3f} (xmin, ymin, xmax, ymax) in {self.crs_label}"
        )
        if user != self.crs:
            tr = Transformer.from_crs(self.crs, user, always_xy=True)
            box = tr.transform_bounds(left, bottom, right, top, densify_pts=21)
            order = "lon, lat" if user.is_geographic else "x, y"
            text += (
                f", i.e. {box[0]:.6f}, {box[1]:.6f}, {box[2]:.6f}, {box[3]:.6f} in {label} (x, y = {order})"
            )
        return text

    def bounds(self) -> tuple[float, float, float, float]:
        t = self.transform
        xs = [
            t.c,
            t.c + t.a * self.width + t.b * self.height,
            t.c + t.a * self.width,
            t.c + t.b * self.height,
        ]
        ys = [
            t.f,
            t.f + t.d * self.width + t.e * self.height,
            t.f + t.d * self.width,
            t.f + t.e * self.height,
        ]
        return min(xs), min(ys), max(xs), max(ys)

    def pixels_to_lonlat(self, cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = self.transform @ (np.asarray(cols, np.float64), np.asarray(rows, np.float64))
        tr = Transformer.from_crs(self.crs, CRS.from_epsg(4326), always_xy=True)
        lon, lat = tr.transform(xs, ys)
        return np.asarray(lon), np.asarray(lat)

    # -- pixels ---------------------------------------------------------------------------------------
    def _clip(self, col0: int, row0: int, w: int, h: int) -> tuple[int, int, int, int] | None:
        c0, r0 = max(0, col0), max(0, row0)
        c1, r1 = min(self.width, col0 + w), min(self.height, row0 + h)
        return None if c1 <= c0 or r1 <= r0 else (c0, r0, c1, r1)

    def read_rgb(self, col0: int, row0: int, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
        """Native-resolution RGB window (h, w, 3) uint8 and its (h, w) validity; zeros/invalid off the raster."""
        rgb = np.zeros((h, w, 3), np.uint8)
        valid = np.zeros((h, w), bool)
        box = self._clip(col0, row0, w, h)
        if box is not None:
            c0, r0, c1, r1 = box
            part, ok = self.source.read_window(Window(c0, r0, c1 - c0, r1 - r0), (r1 - r0, c1 - c0))
            rgb[r0 - row0 : r1 - row0, c0 - col0 : c1 - col0] = part
            valid[r0 - row0 : r1 - row0, c0 - col0 : c1 - col0] = ok
        return rgb, valid

    def read_bands(
        self, bands: Sequence[int], col0: int, row0: int, w: int, h: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw values of 1-based ``bands`` (n, h, w) float32 and validity (valid in all bands)."""
        data = np.zeros((len(bands), h, w), np.float32)
        valid = np.zeros((h, w), bool)
        box = self._clip(col0, row0, w, h)
        if box is not None:
            c0, r0, c1, r1 = box
            ds = self.source.dataset
            win = Window(c0, r0, c1 - c0, r1 - r0)
            part = ds.read(list(bands), window=win).astype(np.float32)
            masks = ds.read_masks(list(bands), window=win)
            data[:, r0 - row0 : r1 - row0, c0 - col0 : c1 - col0] = part
            valid[r0 - row0 : r1 - row0, c0 - col0 : c1 - col0] = np.all(masks > 0, axis=0) & np.all(
                np.isfinite(part), axis=0
            )
        return data, valid

    def valid_at(self, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Validity (RGB bands' masks) of the raster pixels under fractional positions; False off the raster."""
        cols, rows = np.asarray(cols, np.float64), np.asarray(rows, np.float64)
        ci, ri = np.floor(cols).astype(np.int64), np.floor(rows).astype(np.int64)
        inside = (ci >= 0) & (ri >= 0) & (ci < self.width) & (ri < self.height)
        out = np.zeros(cols.shape, bool)
        if not inside.any():
            return out
        c0, c1 = int(ci[inside].min()), int(ci[inside].max()) + 1
        r0, r1 = int(ri[inside].min()), int(ri[inside].max()) + 1
        ds = self.source.dataset
        masks = ds.read_masks(list(self.source.rgb_bands), window=Window(c0, r0, c1 - c0, r1 - r0))
        valid = np.any(masks > 0, axis=0)
        out[inside] = valid[ri[inside] - r0, ci[inside] - c0]
        return out
