"""Ground views (engine.imagery.views) read from XYZ tiles: an MBTiles file (a tile service's cache, or
the user's) or a GeoPackage tile table.

A view is read at the zoom it needs: the coarsest stored zoom whose pixels are at least as fine as the
view's finest pixel (never finer than needed, never coarser than what is stored when a finer zoom exists),
falling back to a coarser zoom when the window would need more than MAX_CHUNK_SIDE pixels a side. Tiles
are decoded once and kept (LRU) across the views of one photo's iterations. A tile absent at the zoom read
is filled from the nearest coarser zoom that holds it (upsampled), so a zoom cached over part of the area
only never leaves holes where coarser tiles exist.

When the tiles are a tile service's cache (``FinerTiles``), a view that needs finer pixels than the finest
indexed zoom has them fetched on demand, through the same cache and downloader as the index build, up to
``max_zoom`` and ``budget`` tiles per ground; beyond the budget (or when the service fails) what is stored
is read, and the log says so once. Tiles already cached, or recorded missing, are never asked again.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from ..errors import CancelledError, InputError
from ..geo.homography import local_scale
from ..geo.xyz import ORIGIN_SHIFT, col_of_lon, row_of_lat, tile_x, tile_y
from ..progress import CancelToken
from .tile_store import MBTiles, TileStore, open_tile_store
from .views import MAX_CHUNK_SIDE, Ground

log = logging.getLogger("skyloc.imagery")

#: Decoded tiles kept in memory by one TileStoreGround (256 tiles of 256 px: about 50 MB).
TILE_CACHE = 256
#: Finer zooms fetched on demand: at most this many zooms beyond the finest indexed one ...
FETCH_ZOOMS_BEYOND = 3
#: ... never beyond this for an XYZ template (a WMTS layer: its finest matrix) ...
MAX_FETCH_ZOOM_XYZ = 19
#: ... and at most this many tiles requested per ground.
DEFAULT_FETCH_BUDGET = 512


@dataclass
class FinerTiles:
    """How a TileStoreGround over a tile service's cache may fetch zooms finer than the index's.

    ``base``: the finest indexed zoom (zooms up to it are read as stored); ``max_zoom``: the finest zoom
    fetched; ``budget``: most tiles requested from the service by one ground. ``fetcher``: the service's
    TileFetcher writing into the ground's store, or ``open``, called on the first need, returning the
    writable cache and its fetcher (the ground then reads that store). ``reason``: why nothing is fetched
    (no fetcher): said once in the log when a view would have needed a finer zoom.
    """

    base: int
    max_zoom: int
    budget: int = DEFAULT_FETCH_BUDGET
    fetcher: object | None = None  # TileFetcher (typed loosely: tile_service is imported lazily)
    open: Callable[[], tuple[MBTiles, object]] | None = None
    reason: str | None = None
    cancel: CancelToken | None = None
    requested: int = 0  # tiles asked of the service so far
    asked: set[tuple[int, int, int]] = field(default_factory=set)
    said: bool = False  # the budget/reason message was logged
    said_failed: bool = False  # the tiles that failed were logged
    owns_fetcher: bool = False  # made by ``open``: closed with the ground

    @property
    def active(self) -> bool:
        return self.reason is None and (self.fetcher is not None or self.open is not None)

    def stop(self, message: str) -> None:
        """No more fetching for this ground; ``message`` logged (once)."""
        self.reason = message
        if not self.said:
            self.said = True
            log.warning("%s", message)


def _tile_size_m(z: int) -> float:
    return 2.0 * ORIGIN_SHIFT / 2**z


class TileStoreGround(Ground):
    """The imagery of a tile store as a Ground in EPSG:3857, at the zoom each view needs."""

    def __init__(
        self,
        store: TileStore | str | os.PathLike[str],
        zooms: Sequence[int] | None = None,
        name: str | None = None,
        finer: FinerTiles | None = None,
    ) -> None:
        self.store = store if isinstance(store, TileStore) else open_tile_store(store)
        self.finer = finer
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
        z = self._finer_zoom(res, box)
        if z is None:
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
                tile = self._tile(z, x, y) if (x, y) in present else None
                if tile is None:
                    tile = self._from_coarser(z, x, y)
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

    def _from_coarser(self, z: int, x: int, y: int) -> np.ndarray | None:
        """Tile (z, x, y) cut from the nearest coarser zoom that holds it (upsampled), or None."""
        for zc in (c for c in reversed(self.zooms) if c < z):
            k = 2 ** (z - zc)
            if (x // k, y // k) not in self.store.present(zc):
                continue
            parent = self._tile(zc, x // k, y // k)
            if parent is None:
                continue
            side = self.tile_px / k
            c0, r0 = (x % k) * side, (y % k) * side
            # the sub-square of the parent, resampled to a full tile (pixel centres kept in place)
            m = np.array([[1 / k, 0.0, c0 + 0.5 / k - 0.5], [0.0, 1 / k, r0 + 0.5 / k - 0.5]])
            return cv2.warpAffine(
                parent,
                m,
                (self.tile_px, self.tile_px),
                flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                borderMode=cv2.BORDER_REPLICATE,
            )
        return None

    # ------------------------------------------------------------------------ finer zooms, fetched

    def _finer_zoom(self, res: float, box: tuple[float, float, float, float]) -> int | None:
        """The zoom finer than the indexed ones that a view of ``res`` metres per pixel over ``box`` needs,
        once its tiles are in the cache (fetched now when needed and allowed); None: read the stored zooms."""
        f = self.finer
        if f is None or not (0 < res < math.inf):
            return None
        need = math.ceil(math.log2(2 * ORIGIN_SHIFT / (self.tile_px * res)) - 1e-4)
        if need <= f.base or need <= 0:
            return None  # the indexed zooms are fine enough
        if not f.active:
            if f.reason and not f.said:
                f.said = True
                log.warning(
                    "%s: the photo needs finer ground than zoom %d (about zoom %d); %s",
                    self.name,
                    f.base,
                    need,
                    f.reason,
                )
            return None
        z = min(need, f.max_zoom)
        while z > f.base:  # a zoom whose window fits in one read
            x0, y0, x1, y1 = self._range(z, *box)
            if max(x1 - x0 + 1, y1 - y0 + 1) * self.tile_px <= MAX_CHUNK_SIDE:
                break
            z -= 1
        if z <= f.base:
            return None
        x0, y0, x1, y1 = self._range(z, *box)
        tiles = [(z, x, y) for y in range(y0, y1 + 1) for x in range(x0, x1 + 1)]
        known = self._known_missing(z)
        todo = [t for t in tiles if t not in f.asked and (t[1], t[2]) not in known and self._worth_asking(*t)]
        if todo and self._ensure_fetcher():
            if z > f.max_zoom:  # the service, now read, offers less than assumed
                return self._finer_zoom(res, box)
            have = self.store.present(z)  # the cache (re)opened for writing may hold more
            todo = [t for t in todo if (t[1], t[2]) not in have]
            if f.requested + len(todo) > f.budget:
                f.stop(
                    f"{self.name}: finer tiles (zoom {z}) not fetched: the budget of {f.budget} tiles per "
                    f"ground is spent ({f.requested} requested); the stored zooms are read"
                )
            elif todo:
                self._fetch(z, todo)
        return z if self._complete(z, box) else None

    def _worth_asking(self, z: int, x: int, y: int) -> bool:
        """A tile under a stored coarser tile (not one of the ocean's, or outside the service's coverage)."""
        if (x, y) in self.store.present(z):
            return False
        for zc in (c for c in self.zooms if c < z):
            k = 2 ** (z - zc)
            if (x // k, y // k) in self.store.present(zc):
                return True
        return False

    def _known_missing(self, z: int) -> set[tuple[int, int]]:
        from .tile_service import missing_since

        if not isinstance(self.store, MBTiles):
            return set()
        retry = bool(getattr(self.finer.fetcher, "retry_missing", False))  # type: ignore[union-attr]
        try:
            return self.store.missing(z, since=missing_since(retry))
        except sqlite3.DatabaseError:  # not a Skyloc cache (no record of missing tiles)
            return set()

    def _complete(self, z: int, box: tuple[float, float, float, float]) -> bool:
        """Whether zoom ``z`` holds something in the view's window (the rest is filled from coarser zooms)."""
        x0, y0, x1, y1 = self._range(z, *box)
        have = self.store.present(z)
        return any((x, y) in have for y in range(y0, y1 + 1) for x in range(x0, x1 + 1))

    def _ensure_fetcher(self) -> bool:
        f = self.finer
        assert f is not None
        if f.fetcher is not None:
            return True
        try:
            store, f.fetcher = f.open()  # type: ignore[misc]
            f.owns_fetcher = True
        except CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a service that cannot be used: stored zooms, said once
            f.open = None
            f.stop(f"{self.name}: finer tiles not fetched ({exc}); the stored zooms are read")
            return False
        if store is not self.store:  # read (and write) the cache through the fetcher's connection
            old, self.store = self.store, store
            if old is not store:
                old.close()
        return True

    def _fetch(self, z: int, todo: list[tuple[int, int, int]]) -> None:
        from .tile_service import TileServiceError

        f = self.finer
        assert f is not None
        f.requested += len(todo)
        f.asked.update(todo)
        try:
            report = f.fetcher.fetch(todo, cancel=f.cancel)  # type: ignore[union-attr]
        except TileServiceError as exc:
            f.stop(f"{self.name}: finer tiles not fetched: {exc}; the stored zooms are read")
            return
        finally:
            self.store.refresh()
        if z not in self.zooms and self.store.present(z):
            self.zooms = sorted({*self.zooms, z})
        log.info(
            "%s: fetched %d tiles of zoom %d (%d missing, %d failed; %d of %d budget used)",
            self.name,
            report.downloaded,
            z,
            report.missing,
            report.failed,
            f.requested,
            f.budget,
        )
        if report.failed and not f.said_failed:
            f.said_failed = True
            log.warning(
                "%s: %d finer tiles (zoom %d) could not be fetched (e.g. %s); coarser tiles fill their place",
                self.name,
                report.failed,
                z,
                "; ".join(report.failures[:2]),
            )

    def close(self) -> None:
        if self.finer is not None and self.finer.owns_fetcher and self.finer.fetcher is not None:
            self.finer.fetcher.close()  # type: ignore[attr-defined]
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


def service_max_zoom(template: object, source: str | None = None) -> int:
    """The finest zoom a service offers, as far as known: a WMTS layer's finest matrix, a QGIS XYZ source's
    ``zmax``, else MAX_FETCH_ZOOM_XYZ."""
    zooms = getattr(template, "zooms", None)
    if zooms:
        return int(max(zooms))
    text = (source or "").strip()
    if text.startswith("type=xyz"):
        from urllib.parse import parse_qsl

        zmax = dict(parse_qsl(text, keep_blank_values=True)).get("zmax", "")
        if zmax.strip().isdigit():
            return min(int(zmax), MAX_FETCH_ZOOM_XYZ)
    return MAX_FETCH_ZOOM_XYZ


def finer_limit(base: int, service_max: int, max_fetch_zoom: int | None = None) -> int:
    """The finest zoom fetched: ``max_fetch_zoom`` (default: ``base`` + FETCH_ZOOMS_BEYOND), never above
    what the service offers."""
    want = base + FETCH_ZOOMS_BEYOND if max_fetch_zoom is None else int(max_fetch_zoom)
    return min(want, service_max)
