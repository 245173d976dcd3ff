"""The ground a photo is matched against: georeferenced imagery that can be resampled into any frame.

Views are what coregistration reads from any imagery source; the footprint estimator never matches a photo against a raster as stored: it asks for a *view*, an image
whose pixels map to the ground through a homography ``to_crs`` (view pixel -> ground CRS coordinates). The
first view is the retrieved candidate's extent, north up; later ones are the ground warped into the
photo's own frame through the current estimate (EarthMatch's iteration). A view is read straight from the
source at the resolution it needs (decimated reads, never the whole raster), so an 80,000-pixel-wide
GeoTIFF costs the same as a 512-pixel candidate.

Pixel convention: GDAL's, see ``engine.geo.homography``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from rasterio.windows import Window

from ..errors import InputError
from ..geo.crs import crs_label
from ..geo.homography import (
    affine_matrix,
    apply_h,
    cv_matrix,
    frame_outline,
    local_scale,
    scaling,
    translation,
)
from .geotiff import GeoTiffSource
from .photos import DEFAULT_MAX_PIXELS, read_image

#: Longest side of an intermediate read; beyond it the read is decimated further (a degenerate estimate
#: can ask for a view of half a continent: it gets a coarse one, not an out-of-memory error).
MAX_CHUNK_SIDE = 4096
#: Decoded mosaic images kept in memory by a MosaicGround (a photo's candidates share their neighbours).
IMAGE_CACHE = 48


@dataclass
class GroundView:
    """Ground pixels in some frame: ``rgb`` (H, W, 3) uint8, ``valid`` (H, W) bool, and where they are."""

    rgb: np.ndarray
    valid: np.ndarray
    to_crs: np.ndarray  # 3x3: view pixel (GDAL convention) -> ground CRS coordinates

    @property
    def valid_fraction(self) -> float:
        return float(self.valid.mean()) if self.valid.size else 0.0


class Ground(ABC):
    """Imagery in one CRS that can be read through any view homography."""

    crs: str
    bounds: tuple[float, float, float, float]  # (minx, miny, maxx, maxy) in ``crs``
    name: str

    @abstractmethod
    def _chunk(self, to_crs: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """An axis-aligned read covering the view: (rgb, valid, chunk pixel -> CRS 3x3), or empty arrays."""

    def view(self, to_crs: np.ndarray, shape: tuple[int, int]) -> GroundView:
        """The ground resampled so that view pixel p shows CRS point ``to_crs @ p`` (bilinear)."""
        rows, cols = shape
        rgb, valid, chunk_to_crs = self._chunk(to_crs, shape)
        if rgb.size == 0:
            return GroundView(np.zeros((rows, cols, 3), np.uint8), np.zeros((rows, cols), bool), to_crs)
        m = cv_matrix(np.linalg.inv(chunk_to_crs) @ to_crs)
        flags = cv2.WARP_INVERSE_MAP
        out = cv2.warpPerspective(rgb, m, (cols, rows), flags=cv2.INTER_LINEAR | flags, borderValue=0)
        ok = cv2.warpPerspective(
            valid.astype(np.uint8), m, (cols, rows), flags=cv2.INTER_NEAREST | flags, borderValue=0
        )
        return GroundView(out, ok.astype(bool), to_crs)

    def _view_box(
        self, to_crs: np.ndarray, shape: tuple[int, int]
    ) -> tuple[float, float, float, float] | None:
        """The ground box (CRS units) a view frame covers, clipped to this ground's bounds; None when the
        view is degenerate (a point at infinity) or misses the ground."""
        border = apply_h(to_crs, frame_outline(shape))
        if not np.all(np.isfinite(border)):
            return None
        minx, miny = np.maximum(border.min(0), self.bounds[:2])
        maxx, maxy = np.minimum(border.max(0), self.bounds[2:])
        if maxx <= minx or maxy <= miny:
            return None
        return float(minx), float(miny), float(maxx), float(maxy)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles (if any)."""


def _decimation(target_px_per_view_px: np.ndarray) -> float:
    """Source pixels per read pixel: the finest the view needs, never finer than the source itself."""
    finite = target_px_per_view_px[np.isfinite(target_px_per_view_px)]
    return max(1.0, float(finite.min()) if finite.size else 1.0)


class RasterGround(Ground):
    """A georeferenced raster (GeoTIFF, VRT, anything GDAL opens), read window by window."""

    def __init__(self, path: str | Path, bands: Sequence[int] | None = None) -> None:
        self.name = str(path)
        self.source = GeoTiffSource(path, tile_sizes=(64,), bands=bands)
        ds = self.source.dataset
        self.crs = self.source.crs
        self.bounds = tuple(float(v) for v in ds.bounds)  # type: ignore[assignment]
        self.transform = affine_matrix(ds.transform)
        self.width, self.height = ds.width, ds.height

    def _chunk(self, to_crs: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        view_to_px = np.linalg.inv(self.transform) @ to_crs
        border = apply_h(view_to_px, frame_outline(shape))
        if not np.all(np.isfinite(border)):
            return np.empty(0), np.empty(0), np.eye(3)
        c0, r0 = np.floor(border.min(0)).astype(int) - 1
        c1, r1 = np.ceil(border.max(0)).astype(int) + 1
        c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(c1, self.width), min(r1, self.height)
        if c1 <= c0 or r1 <= r0:
            return np.empty(0), np.empty(0), np.eye(3)
        step = _decimation(local_scale(view_to_px, shape))
        step = max(step, (c1 - c0) / MAX_CHUNK_SIDE, (r1 - r0) / MAX_CHUNK_SIDE)
        out_w, out_h = max(1, round((c1 - c0) / step)), max(1, round((r1 - r0) / step))
        rgb, valid = self.source.read_window(Window(c0, r0, c1 - c0, r1 - r0), (out_h, out_w))
        chunk_to_px = translation(c0, r0) @ scaling((c1 - c0) / out_w, (r1 - r0) / out_h)
        return rgb, valid, self.transform @ chunk_to_px

    def close(self) -> None:
        self.source.close()


@dataclass(frozen=True)
class MosaicImage:
    """One image file covering ``bounds`` (minx, miny, maxx, maxy) exactly, north up (an XYZ mosaic)."""

    path: str
    bounds: tuple[float, float, float, float]


class MosaicGround(Ground):
    """Many north-up images in one CRS (XYZ mosaics in EPSG:3857), finest on top where they overlap."""

    def __init__(
        self,
        images: Sequence[MosaicImage],
        crs: str = "EPSG:3857",
        name: str = "mosaic",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if not images:
            raise InputError(f"{name}: no imagery to match against")
        self.images = list(images)
        self.crs = crs_label(crs)
        self.name = name
        self.max_pixels = max_pixels
        b = np.array([im.bounds for im in self.images], dtype=float)
        self.bounds = (float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max()))
        self._boxes = b
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._res: dict[str, float] = {}

    def _image(self, path: str) -> np.ndarray:
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        rgb = read_image(path, max_pixels=self.max_pixels)
        self._cache[path] = rgb
        while len(self._cache) > IMAGE_CACHE:
            self._cache.popitem(last=False)
        return rgb

    def _resolution(self, im: MosaicImage) -> float:
        if im.path not in self._res:
            h, w = self._image(im.path).shape[:2]
            self._res[im.path] = math.sqrt(
                (im.bounds[2] - im.bounds[0]) / w * (im.bounds[3] - im.bounds[1]) / h
            )
        return self._res[im.path]

    def _chunk(self, to_crs: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        box = self._view_box(to_crs, shape)
        if box is None:
            return np.empty(0), np.empty(0), np.eye(3)
        minx, miny, maxx, maxy = box
        hits = np.flatnonzero(
            (self._boxes[:, 0] < maxx)
            & (self._boxes[:, 2] > minx)
            & (self._boxes[:, 1] < maxy)
            & (self._boxes[:, 3] > miny)
        )
        if hits.size == 0:
            return np.empty(0), np.empty(0), np.eye(3)
        images = sorted((self.images[i] for i in hits), key=self._resolution, reverse=True)  # finest last
        finest = self._resolution(images[-1])
        res = max(finest, float(np.nanmin(local_scale(to_crs, shape))))
        res = max(res, (maxx - minx) / MAX_CHUNK_SIDE, (maxy - miny) / MAX_CHUNK_SIDE)
        out_w, out_h = max(1, math.ceil((maxx - minx) / res)), max(1, math.ceil((maxy - miny) / res))
        chunk_to_crs = np.array([[res, 0.0, minx], [0.0, -res, maxy], [0.0, 0.0, 1.0]])
        rgb = np.zeros((out_h, out_w, 3), np.uint8)
        valid = np.zeros((out_h, out_w), np.uint8)
        for im in images:
            pixels = self._image(im.path)
            h, w = pixels.shape[:2]
            bx0, by0, bx1, by1 = im.bounds
            im_to_crs = np.array([[(bx1 - bx0) / w, 0, bx0], [0, -(by1 - by0) / h, by1], [0, 0, 1.0]])
            shrink = res / self._resolution(im)
            if shrink > 1.5:  # pre-filter: bilinear warping alone would alias a much finer image
                nw, nh = max(1, round(w / shrink)), max(1, round(h / shrink))
                pixels = cv2.resize(pixels, (nw, nh), interpolation=cv2.INTER_AREA)
                im_to_crs = im_to_crs @ scaling(w / nw, h / nh)
                h, w = nh, nw
            m = cv_matrix(np.linalg.inv(im_to_crs) @ chunk_to_crs)[:2]
            flags = cv2.WARP_INVERSE_MAP
            part = cv2.warpAffine(pixels, m, (out_w, out_h), flags=cv2.INTER_LINEAR | flags, borderValue=0)
            ok = cv2.warpAffine(
                np.ones((h, w), np.uint8), m, (out_w, out_h), flags=cv2.INTER_NEAREST | flags, borderValue=0
            ).astype(bool)
            rgb[ok] = part[ok]
            valid[ok] = 1
        return rgb, valid.astype(bool), chunk_to_crs
