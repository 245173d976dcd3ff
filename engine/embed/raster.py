"""A georeferenced raster opened for embeddings: coordinates in any CRS to pixels, boundless pixel reads.

Points go through pyproj (any CRS -> the raster's CRS) and the raster's affine transform, never a linear map
in degrees; on a geographic raster, longitudes wrap (a raster spanning 179.8..180.25 holds lon -179.9).
Reads outside the raster return zeros flagged invalid, so windows with context can hang over the edges. A
file that fails while its pixels are read (truncated, corrupt) is an InputError naming it, not a crash.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pyproj import CRS, Transformer
from pyproj.exceptions import CRSError
from rasterio.enums import MaskFlags
from rasterio.windows import Window

from ..errors import InputError, OutsideAreaError
from ..imagery.geotiff import GeoTiffSource, raster_errors

#: Pixels of the largest box :meth:`EmbedRaster.valid_at` reads at once.
MASK_READ_PIXELS = 1 << 22


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
        cols, rows = self._wrapped_pixels(np.asarray(xs, np.float64), np.asarray(ys, np.float64))
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

    def _lon_period(self) -> float | None:
        """360 in the raster's angular unit when its x axis is a longitude, else None."""
        if not self.crs.is_geographic:
            return None
        unit = (self.crs.axis_info[0].unit_name or "").lower() if self.crs.axis_info else "degree"
        if "degree" in unit:
            return 360.0
        if "grad" in unit or "gon" in unit:
            return 400.0
        if "radian" in unit:
            return 2 * np.pi
        return None

    def _wrapped_pixels(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel positions of points in the raster's CRS; a longitude off the raster by a turn is wrapped.

        Why: pyproj (and users) give longitudes in -180..180, while a raster across the antimeridian can
        span e.g. 179.8..180.25; the same place is lon +- 360.
        """
        inv = ~self.transform
        with np.errstate(invalid="ignore"):  # a point pyproj could not transform is inf: outside, said later
            cols, rows = (np.asarray(v, np.float64) for v in inv @ (xs, ys))
            period = self._lon_period()
            if period is None:
                return cols, rows
            for turn in (period, -period):
                off = ~((cols >= 0) & (rows >= 0) & (cols <= self.width) & (rows <= self.height))
                if not off.any():
                    break
                c2, r2 = (np.asarray(v, np.float64) for v in inv @ (xs[off] + turn, ys[off]))
                inside = (c2 >= 0) & (r2 >= 0) & (c2 <= self.width) & (r2 <= self.height)
                idx = np.flatnonzero(off)[inside]
                cols[idx], rows[idx] = c2[inside], r2[inside]
        return cols, rows

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
            with raster_errors(self.path, "reading pixels"):
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
            with raster_errors(self.path, "reading pixels"):
                part = ds.read(list(bands), window=win).astype(np.float32)
                masks = ds.read_masks(list(bands), window=win)
            data[:, r0 - row0 : r1 - row0, c0 - col0 : c1 - col0] = part
            valid[r0 - row0 : r1 - row0, c0 - col0 : c1 - col0] = np.all(masks > 0, axis=0) & np.all(
                np.isfinite(part), axis=0
            )
        return data, valid

    def valid_at(self, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Validity of the raster pixels under fractional positions; False off the raster.

        Valid: at least one RGB band unmasked (nodata value, alpha, mask band) and, for floating-point
        rasters, finite in all of them (a NaN hole is nodata even where no nodata value is declared). A
        position on the right or bottom edge (col == width) belongs to the last pixel.
        """
        cols, rows = np.asarray(cols, np.float64), np.asarray(rows, np.float64)
        ci = np.floor(np.where(cols == self.width, self.width - 1, cols)).astype(np.int64)
        ri = np.floor(np.where(rows == self.height, self.height - 1, rows)).astype(np.int64)
        inside = (ci >= 0) & (ri >= 0) & (ci < self.width) & (ri < self.height)
        out = np.zeros(cols.shape, bool)
        idx = np.flatnonzero(inside.ravel())
        if len(idx) == 0:
            return out
        ci, ri = ci.ravel()[idx], ri.ravel()[idx]
        # bands of rows read one at a time, each at most MASK_READ_PIXELS: points spread over a huge raster
        # (or a coarse heatmap strip) never read the whole box around them at once
        span = int(ci.max() - ci.min()) + 1
        band = (ri - ri.min()) // max(1, MASK_READ_PIXELS // span)
        order = np.argsort(band, kind="stable")
        cuts = np.flatnonzero(np.diff(band[order])) + 1
        flat = out.ravel()
        for part in np.split(order, cuts):
            flat[idx[part]] = self._valid_box(ci[part], ri[part])
        return flat.reshape(cols.shape)

    def all_valid(self) -> bool:
        """True when no pixel can be nodata: no nodata value, mask or alpha, and integer bands (no NaN)."""
        ds = self.source.dataset
        bands = list(self.source.rgb_bands)
        return all(ds.mask_flag_enums[b - 1] == [MaskFlags.all_valid] for b in bands) and not any(
            np.issubdtype(np.dtype(ds.dtypes[b - 1]), np.floating) for b in bands
        )

    def valid_grid(self, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """:meth:`valid_at` on the separable grid ``rows x cols`` (1-D positions): (len(rows), len(cols)).

        Why: a heatmap strip samples the raster on an axis-aligned grid, so the pixel indices are computed
        once per axis and the mask is read as row boxes (or single rows, for an output coarser than the
        raster: reading only the rows sampled keeps the cost proportional to the output), instead of
        sorting and splitting every point of the strip. A raster that cannot hold nodata reads nothing.
        """
        cols, rows = np.asarray(cols, np.float64), np.asarray(rows, np.float64)
        ci = np.floor(np.where(cols == self.width, self.width - 1, cols)).astype(np.int64)
        ri = np.floor(np.where(rows == self.height, self.height - 1, rows)).astype(np.int64)
        in_c = np.flatnonzero((ci >= 0) & (ci < self.width))
        in_r = np.flatnonzero((ri >= 0) & (ri < self.height))
        out = np.zeros((len(rows), len(cols)), bool)
        if len(in_c) == 0 or len(in_r) == 0:
            return out
        if self.all_valid():
            out[np.ix_(in_r, in_c)] = True
            return out
        c0, c1 = int(ci[in_c].min()), int(ci[in_c].max()) + 1
        need = np.unique(ri[in_r])
        per_read = max(1, MASK_READ_PIXELS // (c1 - c0))
        start = 0
        while start < len(need):  # runs of raster rows: a box when dense, one row at a time when sparse
            stop = start + 1
            while (
                stop < len(need) and need[stop] - need[start] < per_read and need[stop] - need[stop - 1] <= 2
            ):
                stop += 1
            r0, r1 = int(need[start]), int(need[stop - 1]) + 1
            box = self._mask_box(r0, r1, c0, c1)  # (r1 - r0, c1 - c0)
            sel = in_r[(ri[in_r] >= r0) & (ri[in_r] < r1)]
            out[np.ix_(sel, in_c)] = box[np.ix_(ri[sel] - r0, ci[in_c] - c0)]
            start = stop
        return out

    def _mask_box(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Validity of the raster pixels [r0, r1) x [c0, c1), as :meth:`valid_at` defines it."""
        ds = self.source.dataset
        bands = list(self.source.rgb_bands)
        win = Window(c0, r0, c1 - c0, r1 - r0)
        with raster_errors(self.path, "reading the nodata mask"):
            valid = np.any(ds.read_masks(bands, window=win) > 0, axis=0)
            if any(np.issubdtype(np.dtype(ds.dtypes[b - 1]), np.floating) for b in bands):
                valid &= np.all(np.isfinite(ds.read(bands, window=win)), axis=0)
        return valid

    def _valid_box(self, ci: np.ndarray, ri: np.ndarray) -> np.ndarray:
        """Validity of pixels (ci, ri) inside the raster, read from the box around them (split if large)."""
        c0, c1 = int(ci.min()), int(ci.max()) + 1
        r0, r1 = int(ri.min()), int(ri.max()) + 1
        if (c1 - c0) * (r1 - r0) > MASK_READ_PIXELS and len(ci) > 1:  # far apart along a row: halves
            order = np.argsort(ci, kind="stable")
            half = len(ci) // 2
            out = np.empty(len(ci), bool)
            out[order[:half]] = self._valid_box(ci[order[:half]], ri[order[:half]])
            out[order[half:]] = self._valid_box(ci[order[half:]], ri[order[half:]])
            return out
        return self._mask_box(r0, r1, c0, c1)[ri - r0, ci - c0]
