"""Ground views (engine.imagery.views) read from XYZ tiles: an MBTiles file (a tile service's cache, or
the user's) or a GeoPackage tile table.

A view is read at the zoom it needs: the coarsest stored zoom whose pixels are at least as fine as the
view's finest pixel (never finer than needed, never coarser than what is stored when a finer zoom exists),
falling back to a coarser zoom when the window would need more than MAX_CHUNK_SIDE pixels a side. Tiles
are decoded once and kept (LRU) across the views of one photo's iterations.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Sequence

import cv2
import numpy as np

from ..errors import InputError
from ..geo.homography import local_scale
from ..geo.xyz import ORIGIN_SHIFT, col_of_lon, row_of_lat, tile_x, tile_y
from .tile_store import TileStore, open_tile_store
from .views import MAX_CHUNK_SIDE, Ground

#: Decoded tiles kept in memory by one TileStoreGround (256 tiles of 256 px: about 50 MB).
TILE_CACHE = 256


def _tile_size_m(z: int) -> float:
    return 2.0 * ORIGIN_SHIFT / 2**z


class TileStoreGround(Ground):
    """The imagery of a tile store as a Ground in EPSG:3857, at the zoom each view needs."""

    def __init__(
        self,
        store: TileStore | str | os.PathLike[str],
        zooms: Sequence[int] | None = None,
        name: str | None = None,
    ) -> None:
        self.store = store if isinstance(store, TileStore) else open_tile_store(store)
        self.name = name or self.store.path
        self.crs = "EPSG:3857"
        stored = self.store.zooms()
        self.zooms = sorted(z for z in (zooms or stored) if z in stored)
        if not self.zooms:
            raise InputError(f"{self.name}: no tiles to match against")
        self.tile_px = self.store.tile_size()
        boxes = []
        for z in self.zooms:
            present = self.store.present(z)
            if present:
                xs, ys = zip(*present, strict=True)
                boxes.append(
                    (tile_x(min(xs), z), tile_y(max(ys) + 1, z), tile_x(max(xs) + 1, z), tile_y(min(ys), z))
                )
        if not boxes:
            raise InputError(f"{self.name}: no tiles to match against")
        b = np.array(boxes)
        self.bounds = (float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max()))
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray | None] = OrderedDict()

    def pixel_size(self, z: int) -> float:
        return _tile_size_m(z) / self.tile_px

    def zoom_for(self, res: float) -> int:
        """The coarsest stored zoom with pixels no larger than ``res`` metres (else the finest stored)."""
        fine_enough = [z for z in self.zooms if self.pixel_size(z) <= res * 1.0001]
        return min(fine_enough) if fine_enough else max(self.zooms)

    def _tile(self, z: int, x: int, y: int) -> np.ndarray | None:
        key = (z, x, y)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        rgb = self.store.read(z, x, y) if (x, y) in self.store.present(z) else None
        if rgb is not None and rgb.shape[:2] != (self.tile_px, self.tile_px):
            rgb = cv2.resize(rgb, (self.tile_px, self.tile_px), interpolation=cv2.INTER_AREA)
        self._cache[key] = rgb
        while len(self._cache) > TILE_CACHE:
            self._cache.popitem(last=False)
        return rgb

    def _range(self, z: int, minx: float, miny: float, maxx: float, maxy: float) -> tuple[int, int, int, int]:
        size, n = _tile_size_m(z), 2**z
        x0 = min(n - 1, max(0, math.floor((minx + ORIGIN_SHIFT) / size)))
        x1 = min(n - 1, max(0, math.ceil((maxx + ORIGIN_SHIFT) / size) - 1))
        y0 = min(n - 1, max(0, math.floor((ORIGIN_SHIFT - maxy) / size)))
        y1 = min(n - 1, max(0, math.ceil((ORIGIN_SHIFT - miny) / size) - 1))
        return x0, y0, x1, y1

    def _chunk(self, to_crs: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        box = self._view_box(to_crs, shape)
        if box is None:
            return np.empty(0), np.empty(0), np.eye(3)
        minx, miny, maxx, maxy = box
        scales = local_scale(to_crs, shape)
        res = float(np.nanmin(scales)) if np.isfinite(scales).any() else self.pixel_size(self.zooms[0])
        z = self.zoom_for(res)
        x0, y0, x1, y1 = self._range(z, minx, miny, maxx, maxy)
        while max(x1 - x0 + 1, y1 - y0 + 1) * self.tile_px > MAX_CHUNK_SIDE:
            coarser = [c for c in self.zooms if c < z]
            if not coarser:
                break
            z = max(coarser)
            x0, y0, x1, y1 = self._range(z, minx, miny, maxx, maxy)
        nx, ny, t = x1 - x0 + 1, y1 - y0 + 1, self.tile_px
        step = max(
            1, math.ceil(max(nx, ny) * t / MAX_CHUNK_SIDE)
        )  # tiles shrunk to t/step pixels when needed
        tp = max(1, t // step)
        rgb = np.zeros((ny * tp, nx * tp, 3), np.uint8)
        valid = np.zeros((ny * tp, nx * tp), bool)
        present = self.store.present(z)
        for y in range(y0, y1 + 1):
            for x in range(x0, x1 + 1):
                if (x, y) not in present:
                    continue
                tile = self._tile(z, x, y)
                if tile is None:
                    continue
                if tp != t:
                    tile = cv2.resize(tile, (tp, tp), interpolation=cv2.INTER_AREA)
                r, c = (y - y0) * tp, (x - x0) * tp
                rgb[r : r + tp, c : c + tp] = tile
                valid[r : r + tp, c : c + tp] = True
        if not valid.any():
            return np.empty(0), np.empty(0), np.eye(3)
        px = _tile_size_m(z) / tp
        chunk_to_crs = np.array([[px, 0.0, tile_x(x0, z)], [0.0, -px, tile_y(y0, z)], [0.0, 0.0, 1.0]])
        return rgb, valid, chunk_to_crs

    def close(self) -> None:
        self.store.close()
        self._cache.clear()


def tile_range(bbox_lonlat: tuple[float, float, float, float], z: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), inclusive, of the tiles at zoom ``z`` that intersect a lon/lat box."""
    w, s, e, n = bbox_lonlat
    return col_of_lon(w, z), row_of_lat(n, z), col_of_lon(e, z), row_of_lat(s, z)


def render_geotiff(
    store: TileStore, z: int, tiles: tuple[int, int, int, int], path: str | os.PathLike[str], tag: str
) -> tuple[int, int]:
    """Write the tiles ``(x0, y0, x1, y1)`` of zoom ``z`` side by side as an RGB GeoTIFF in EPSG:3857 (its
    transform from the exact XYZ formulas; missing tiles masked). Returns (width, height)."""
    import rasterio
    from rasterio.transform import from_origin

    from ..output_guard import TIFF_TAG

    x0, y0, x1, y1 = tiles
    t = store.tile_size()
    width, height = (x1 - x0 + 1) * t, (y1 - y0 + 1) * t
    px = _tile_size_m(z) / t
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:3857",
        "transform": from_origin(tile_x(x0, z), tile_y(y0, z), px, px),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "photometric": "RGB",
        "BIGTIFF": "IF_SAFER",
    }
    present = store.present(z)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        mask = np.zeros((height, width), np.uint8)
        for y in range(y0, y1 + 1):
            for x in range(x0, x1 + 1):
                rgb = store.read(z, x, y) if (x, y) in present else None
                if rgb is None:
                    continue
                if rgb.shape[:2] != (t, t):
                    rgb = cv2.resize(rgb, (t, t), interpolation=cv2.INTER_AREA)
                win = rasterio.windows.Window((x - x0) * t, (y - y0) * t, t, t)
                dst.write(np.moveaxis(rgb, -1, 0), window=win)
                mask[(y - y0) * t : (y - y0 + 1) * t, (x - x0) * t : (x - x0 + 1) * t] = 255
        dst.write_mask(mask)
        dst.update_tags(**{TIFF_TAG: tag, "xyz_zoom": str(z), "xyz_tiles": f"{x0},{y0},{x1},{y1}"})
    return width, height
