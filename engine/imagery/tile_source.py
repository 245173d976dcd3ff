"""Database images assembled from XYZ tiles: a tile service (through its MBTiles cache), an MBTiles file or a
GeoPackage tile table.

EarthLoc-style mosaics: at each zoom, squares of ``span x span`` tiles (4x4 by default) whose top-left tiles
lie on a grid of stride ``span * (1 - overlap)`` (2 tiles: 50% overlap between neighbours). The grid is
global (row and column multiples of the stride), so a mosaic has the same (z, row, col), the same exact
bounds (engine.geo.xyz) and the same pixels whichever of the three kinds of source it comes from, and the
same as the file ``Z_ROW_COL`` of a mosaic folder (``XyzMosaicSource``). A mosaic is kept when at least
``min_coverage`` of its tiles exist (missing tiles, e.g. ocean, are black); its pixels are the tiles side
by side at their native size, resized as the mosaic-folder source resizes a file.

Which mosaics: those of the requested zooms that intersect the area (``SearchArea``: a bbox, or a point and
radius, distances geodesic); without an area (files only), every mosaic that holds a stored tile.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from PIL import Image
from pyproj import Geod

from ..errors import EmptyInputError, InputError
from ..geo.search_area import SearchArea
from ..geo.xyz import MAX_ZOOM, col_of_lon, mosaic_bounds_3857, mosaic_corners_lonlat, row_of_lat
from ..progress import CancelToken, ProgressFn, no_progress
from .base import TileSpec
from .tile_service import (
    DEFAULT_WORKERS,
    FetchReport,
    TileFetcher,
    TooManyTilesError,
    UrlTemplate,
    check_fetch_report,
    default_cache_path,
    is_url,
    missing_since,
)
from .tile_store import MBTiles, Tile, TileStore, open_tile_store
from .tile_template import parse_template

#: Most tiles one source may need before ``max_tiles`` must be raised (about 0.5-1 GB of JPEG tiles).
DEFAULT_MAX_TILES = 20_000
#: Share of a mosaic's tiles that must exist for it to be indexed.
DEFAULT_MIN_COVERAGE = 0.5
#: Average tile size assumed for download estimates before any tile is cached (bytes).
TYPICAL_TILE_BYTES = 25_000


def parse_zooms(text: str | Sequence[int] | None) -> list[int]:
    """``"9-11"`` -> [9, 10, 11]; ``"9,11"`` -> [9, 11]; ``"9-10,13"``; a list of ints as is."""
    if text is None:
        return []
    if not isinstance(text, str):
        zooms = [int(z) for z in text]
    else:
        zooms = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            m = re.fullmatch(r"(\d{1,2})(?:\s*-\s*(\d{1,2}))?", part)
            if m is None:
                raise InputError(f"--zooms {text!r}: expected zoom levels like 9-11 or 9,11")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise InputError(f"--zooms {text!r}: {lo}-{hi} is an empty range")
            zooms.extend(range(lo, hi + 1))
    bad = [z for z in zooms if not 0 <= z <= MAX_ZOOM]
    if bad:
        raise InputError(f"zoom {bad[0]} is outside 0..{MAX_ZOOM}")
    return sorted(set(zooms))


def area_bbox(area: SearchArea) -> tuple[float, float, float, float]:
    """(min_lon, min_lat, max_lon, max_lat) enclosing the area (a circle: by geodesic offsets)."""
    if area.bbox is not None:
        return area.bbox
    lat, lon = area.near  # type: ignore[misc]
    geod = Geod(ellps="WGS84")
    r = float(area.radius_km) * 1000.0  # type: ignore[arg-type]
    lats = [geod.fwd(lon, lat, az, r)[1] for az in (0.0, 180.0)]
    n, s = max(lats), min(lats)
    if n >= 89.9 or s <= -89.9:
        return (-180.0, max(s, -90.0), 180.0, min(n, 90.0))
    dlon = max(abs(geod.fwd(lon, la, 90.0, r)[0] - lon) for la in (s, lat, n))
    if dlon >= 180:
        return (-180.0, s, 180.0, n)
    w, e = lon - dlon, lon + dlon
    if w < -180:
        w += 360
    if e > 180:
        e -= 360
    return (w, s, e, n)


def _origins(lo: int, hi: int, span: int, stride: int, n: int) -> list[int]:
    """Grid origins (multiples of stride) of the mosaics whose tiles lo..hi (inclusive) they touch."""
    first = max(0, math.ceil((lo - span + 1) / stride) * stride)
    last = min(hi // stride * stride, n - span)
    return list(range(first, last + 1, stride)) if last >= first else []


def mosaics_in_area(area: SearchArea, z: int, span: int, stride: int) -> list[tuple[int, int, int]]:
    """(z, row, col) of the grid mosaics at zoom ``z`` that intersect ``area``, in (row, col) order."""
    w, s, e, n = area_bbox(area)
    size = 2**z
    if size < span:
        return []
    rows = _origins(row_of_lat(n, z), row_of_lat(s, z), span, stride, size)
    if w <= e:
        cols = _origins(col_of_lon(w, z), col_of_lon(e, z), span, stride, size)
    else:  # across the antimeridian: both ends of the grid (its last mosaic ends at 180 exactly)
        cols = _origins(col_of_lon(w, z), size - 1, span, stride, size)
        cols += [c for c in _origins(0, col_of_lon(e, z), span, stride, size) if c not in cols]
    cands = [(z, r, c) for r in rows for c in cols]
    if not cands:
        return []
    polys = [shapely.Polygon(mosaic_corners_lonlat(z, r, c, span)) for _, r, c in cands]
    keep = set(area.select(polys).tolist())
    return [m for i, m in enumerate(cands) if i in keep]


def mosaics_holding(
    present: set[tuple[int, int]], z: int, span: int, stride: int
) -> list[tuple[int, int, int]]:
    """(z, row, col) of every grid mosaic at zoom ``z`` that holds at least one of the ``present`` (x, y)."""
    size = 2**z
    found: set[tuple[int, int]] = set()
    for x, y in present:
        for r in _origins(y, y, span, stride, size):
            for c in _origins(x, x, span, stride, size):
                found.add((r, c))
    return [(z, r, c) for r, c in sorted(found)]


def mosaic_tiles(z: int, row: int, col: int, span: int) -> list[Tile]:
    return [(z, col + dx, row + dy) for dy in range(span) for dx in range(span)]


def mosaic_name(z: int, row: int, col: int) -> str:
    """File name of the mosaic in a mosaic folder, sorting like (z, row, col): ``ZZ_RRRRRRR_CCCCCCC.png``."""
    return f"{z:02d}_{row:07d}_{col:07d}.png"


def open_cache(template: UrlTemplate, path: str | os.PathLike[str]) -> MBTiles:
    """The MBTiles download cache of ``template`` at ``path`` (created if needed). A file that holds another
    service's tiles, or tiles Skyloc did not download, is refused: one cache, one tileset."""
    store = MBTiles(path, writable=True)
    key = store.metadata.get("skyloc_url_sha256")
    full = hashlib.sha256(template.template.encode()).hexdigest()
    try:
        if key is None and store.zooms():
            raise InputError(
                f"tile cache {store.path} already holds tiles that Skyloc did not download: name another "
                "--tile-cache (an MBTiles file to index is given as a SOURCE, not as the cache)"
            )
        if key is not None and key != full:
            raise InputError(
                f"tile cache {store.path} holds the tiles of another service "
                f"({store.metadata.get('skyloc_url', '?')}): name another --tile-cache"
            )
    except InputError:
        store.close()
        raise
    if key is None:
        store.set_metadata(
            {
                "name": f"Skyloc cache of {template.host}",
                "type": "baselayer",
                "version": "1",
                "description": f"tiles of {template.redacted} downloaded by Skyloc",
                "skyloc_url": template.redacted,
                "skyloc_url_sha256": full,
            }
        )
    return store


class TileMosaicSource:
    """Mosaics of ``span x span`` XYZ tiles from a tile service, an MBTiles file or a GeoPackage tile table.

    ``source``: an ``http(s)://`` URL template, or the path of a ``.mbtiles``/``.gpkg`` file. For a service
    ``zooms`` and ``area`` are required; for a file they default to every stored zoom and every stored tile.
    Construction validates everything and plans the tiles (no download): bad templates, schemes, a tile
    count over ``max_tiles``, files of another tiling are refused here. :meth:`prepare` downloads (services).
    """

    kind = "tiles"

    def __init__(
        self,
        source: str,
        *,
        zooms: Sequence[int] | str | None = None,
        area: SearchArea | None = None,
        span: int = 4,
        overlap: float = 0.5,
        min_coverage: float = DEFAULT_MIN_COVERAGE,
        max_tiles: int = DEFAULT_MAX_TILES,
        tile_cache: str | os.PathLike[str] | None = None,
        attribution: str | None = None,
        subdomains: Sequence[str] | None = None,
        workers: int = DEFAULT_WORKERS,
        fetcher_options: dict[str, Any] | None = None,
        retry_missing: bool = False,
    ) -> None:
        if span < 1 or span > 64:
            raise InputError(f"--span must be 1..64, got {span}")
        if not 0 <= overlap < 1:
            raise InputError(f"overlap must be in [0, 1), got {overlap}")
        if not 0 < min_coverage <= 1:
            raise InputError(f"min_coverage must be in (0, 1], got {min_coverage}")
        if max_tiles < 1:
            raise InputError(f"--max-tiles must be >= 1, got {max_tiles}")
        self.span = span
        self.stride = max(1, round(span * (1 - overlap)))
        self.min_coverage = min_coverage
        self.max_tiles = max_tiles
        self.area = area
        self.retry_missing = retry_missing  # services: ask again the tiles recorded missing
        self.template: UrlTemplate | None = None
        self.fetcher: TileFetcher | None = None
        self.report: FetchReport | None = None
        self._prepared = False
        self._specs: list[TileSpec] | None = None
        zoom_list = parse_zooms(zooms)
        if is_url(source):
            self.template = parse_template(source, subdomains)
            if not zoom_list:
                raise InputError(
                    f"tile service {self.template.redacted}: give the zoom levels to index (--zooms 9-11)"
                )
            self.template.check_zooms(zoom_list)  # a WMTS layer: the zooms its matrix set offers
            if area is None:
                raise InputError(
                    f"tile service {self.template.redacted}: give the area to index (--bbox MIN_LON,MIN_LAT,"
                    "MAX_LON,MAX_LAT, or --near LAT,LON --radius-km R)"
                )
            self.path = self.template.redacted
            cache = Path(tile_cache) if tile_cache else default_cache_path(self.template)
            if cache.suffix.lower() != ".mbtiles":
                raise InputError(
                    f"--tile-cache {cache}: the tile cache is an MBTiles file: name it *.mbtiles"
                )
            self.zooms = zoom_list
            self.candidates = self._plan_mosaics()
            self._check_cap()  # before the cache file is even created
            self.store: TileStore = open_cache(self.template, cache)
            self.fetcher = TileFetcher(
                self.template,
                self.store,
                workers=workers,
                retry_missing=retry_missing,
                **(fetcher_options or {}),
            )
        else:
            self.store = open_tile_store(source)
            self.path = os.path.abspath(source)
            stored = self.store.zooms()
            if not stored:
                raise EmptyInputError(f"{source} holds no tile")
            absent = [z for z in zoom_list if z not in stored]
            if absent:
                raise InputError(
                    f"{source} has no tiles at zoom {absent[0]} (stored zooms: {', '.join(map(str, stored))})"
                )
            self.zooms = zoom_list or stored
            self.candidates = self._plan_mosaics()
            self._check_cap()
        self.attribution = attribution or self.store.attribution
        if not self.candidates:
            raise EmptyInputError(
                f"{self.path}: no {span}x{span} mosaic at zoom {_zrange(self.zooms)}"
                + (f" {area.describe()}" if area else "")
            )

    # ------------------------------------------------------------------------------------- planning

    def _check_cap(self) -> None:
        self.tiles_needed = sorted({t for m in self.candidates for t in mosaic_tiles(*m, self.span)})
        if self.template is not None and len(self.tiles_needed) > self.max_tiles:
            raise TooManyTilesError(
                f"{self.template.redacted}: {len(self.candidates):,} mosaics at zoom {_zrange(self.zooms)} "
                f"{self.area.describe() if self.area else ''} need {len(self.tiles_needed):,} tiles, over the "
                f"cap of {self.max_tiles:,}: shrink the area, drop the finest zoom, or raise --max-tiles "
                f"(about {len(self.tiles_needed) * TYPICAL_TILE_BYTES / 2**20:,.0f} MB to download)"
            )

    def _plan_mosaics(self) -> list[tuple[int, int, int]]:
        out: list[tuple[int, int, int]] = []
        for z in self.zooms:
            if self.area is not None:
                out += mosaics_in_area(self.area, z, self.span, self.stride)
            else:
                out += mosaics_holding(self.store.present(z), z, self.span, self.stride)
        return out

    def plan(self) -> dict[str, Any]:
        """What indexing this source involves, before anything is downloaded (for the plugin's dialog)."""
        cached = missing = 0
        sizes: list[int] = []
        for z in self.zooms:
            have = self.store.present(z)
            gone = set()  # records that still hold: older ones (or all, retry_missing) are asked again
            if isinstance(self.store, MBTiles) and self.template:
                gone = self.store.missing(z, since=missing_since(self.retry_missing))
            for t in (t for t in self.tiles_needed if t[0] == z):
                cached += (t[1], t[2]) in have
                missing += (t[1], t[2]) in gone
        if self.template is not None and cached:
            with self.store._lock:
                row = self.store.conn.execute("SELECT AVG(LENGTH(tile_data)) FROM tiles").fetchone()
            sizes = [int(row[0] or TYPICAL_TILE_BYTES)]
        per_tile = sizes[0] if sizes else TYPICAL_TILE_BYTES
        to_fetch = len(self.tiles_needed) - cached - missing if self.template else 0
        return {
            **self.describe(),
            "mosaics": len(self.candidates),
            "tiles_needed": len(self.tiles_needed),
            "tiles_cached": cached,
            "tiles_known_missing": missing,
            "tiles_to_download": to_fetch,
            "estimated_download_bytes": int(to_fetch * per_tile),
            "max_tiles": self.max_tiles,
        }

    def describe(self) -> dict[str, Any]:
        """The manifest's record of this source."""
        d: dict[str, Any] = {
            "kind": "tile_service" if self.template else Path(self.store.path).suffix.lower().lstrip("."),
            "zooms": list(self.zooms),
            "span": self.span,
            "stride": self.stride,
            "min_coverage": self.min_coverage,
            "attribution": self.attribution,
            "area": self.area.describe() if self.area else None,
        }
        if self.template is not None:
            d["url"] = self.template.redacted
            d["cache"] = os.path.abspath(self.store.path)
            if "{s}" in self.template.template:  # footprints fetch finer tiles from the same hosts
                d["subdomains"] = list(self.template.subdomains)
        else:
            d["file"] = os.path.abspath(self.store.path)
            if getattr(self.store, "table", None):
                d["table"] = self.store.table  # type: ignore[attr-defined]
        if self.report is not None:
            r = self.report
            d["download"] = {
                "needed": r.needed,
                "cached_before": r.cached,
                "downloaded": r.downloaded,
                "missing": r.missing + r.known_missing,
                "bytes": r.bytes,
            }
        return d

    # ------------------------------------------------------------------------------------ downloading

    def prepare(self, progress: ProgressFn = no_progress, cancel: CancelToken | None = None) -> None:
        """Download (through the cache) every tile the mosaics need; files: nothing to do."""
        if self._prepared:
            return
        if self.fetcher is not None and self.template is not None:
            assert isinstance(self.store, MBTiles)
            self.report = self.fetcher.fetch(self.tiles_needed, progress=progress, cancel=cancel)
            self.store.update_extent()
            if self.attribution:
                self.store.set_metadata({"attribution": self.attribution})
            check_fetch_report(self.report, self.template, Path(self.store.path))
        self._prepared = True

    # ---------------------------------------------------------------------------------------- tiles

    def specs(self) -> list[TileSpec]:
        if self._specs is None:
            self.prepare()
            self.store.refresh()
            need = math.ceil(self.min_coverage * self.span * self.span - 1e-9)
            specs = []
            self.skipped: list[tuple[tuple[int, int, int], int]] = []
            for z, row, col in self.candidates:
                have = self.store.present(z)
                n = sum((x, y) in have for _, x, y in mosaic_tiles(z, row, col, self.span))
                if n >= need:
                    specs.append(self._spec(z, row, col))
                else:
                    self.skipped.append(((z, row, col), n))
            if not specs:
                raise EmptyInputError(
                    f"{self.path}: none of the {len(self.candidates)} mosaics has {self.min_coverage:.0%} of its "
                    f"tiles (the service answered 'no tile' for {self._missing_count()} of them)"
                )
            self._specs = specs
        return list(self._specs)

    def _missing_count(self) -> int:
        return (self.report.missing + self.report.known_missing) if self.report else 0

    def _spec(self, z: int, row: int, col: int) -> TileSpec:
        corners = mosaic_corners_lonlat(z, row, col, self.span)
        return TileSpec(
            source=os.path.abspath(self.store.path),
            kind=self.kind,
            scale=self.span,
            zoom=z,
            window=None,
            crs="EPSG:3857",
            bounds=mosaic_bounds_3857(z, row, col, self.span),
            corners_lonlat=corners,
            footprint_lonlat=(*corners, corners[0]),
            xyz=(z, row, col),
        )

    def mosaic(self, spec: TileSpec) -> np.ndarray:
        """The mosaic at full resolution: (span * tile, span * tile, 3) uint8, missing tiles black."""
        z, row, col = spec.xyz  # type: ignore[misc]
        n = spec.scale
        tiles: dict[tuple[int, int], np.ndarray] = {}
        for dy in range(n):  # asked of the store itself: another source may have filled a shared cache
            for dx in range(n):
                rgb = self.store.read(z, col + dx, row + dy)
                if rgb is not None:
                    tiles[(dy, dx)] = rgb
        side = next(iter(tiles.values())).shape[0] if tiles else 256
        out = np.zeros((n * side, n * side, 3), np.uint8)
        for (dy, dx), rgb in tiles.items():
            if rgb.shape[:2] != (side, side):
                rgb = np.asarray(Image.fromarray(rgb).resize((side, side), Image.Resampling.BILINEAR))
            out[dy * side : (dy + 1) * side, dx * side : (dx + 1) * side] = rgb
        return out

    def read(self, spec: TileSpec, size: int) -> np.ndarray:
        """As XyzMosaicSource.read: area-aware Lanczos when shrinking, bilinear when growing."""
        if spec.kind != self.kind or spec.xyz is None:
            raise InputError(f"tile spec of {spec.source} does not belong to {self.path}")
        rgb = self.mosaic(spec)
        h, w = rgb.shape[:2]
        if (h, w) == (size, size):
            return rgb
        resample = Image.Resampling.LANCZOS if size < min(h, w) else Image.Resampling.BILINEAR
        return np.asarray(Image.fromarray(rgb).resize((size, size), resample), dtype=np.uint8)

    def write_mosaic_folder(self, folder: str | os.PathLike[str]) -> list[Path]:
        """Write every mosaic as ``mosaic_name()`` PNG into ``folder`` (an equivalent mosaic-folder source)."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for spec in self.specs():
            p = out / mosaic_name(*spec.xyz)  # type: ignore[misc]
            Image.fromarray(self.mosaic(spec)).save(p)
            paths.append(p)
        return paths

    def close(self) -> None:
        if self.fetcher is not None:
            self.fetcher.close()
        self.store.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["fetcher"] = None  # workers elsewhere read the cache, they never download
        return state

    def __enter__(self) -> TileMosaicSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _zrange(zooms: Sequence[int]) -> str:
    return ",".join(map(str, zooms))


def is_tile_source(path: str) -> bool:
    """True for what TileMosaicSource reads: a URL, an ``.mbtiles``, or a ``.gpkg`` holding a tile table in
    EPSG:3857. A GeoPackage raster in another CRS is not: GDAL reads it as any raster (GeoTiffSource)."""
    if is_url(path):
        return True
    p = Path(path)
    if p.suffix.lower() == ".mbtiles":
        return True
    if p.suffix.lower() == ".gpkg" and p.is_file():
        return _gpkg_has_tiles(p)
    return False


def _gpkg_has_tiles(path: Path) -> bool:
    import sqlite3

    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            row = conn.execute(
                "SELECT COUNT(*) FROM gpkg_contents c JOIN gpkg_tile_matrix_set m ON c.table_name = m.table_name "
                "LEFT JOIN gpkg_spatial_ref_sys s ON s.srs_id = m.srs_id WHERE c.data_type = 'tiles' AND "
                "(s.organization_coordsys_id IN (3857, 900913) OR m.srs_id IN (3857, 900913))"
            ).fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return False
    return bool(row and row[0])


# ------------------------------------------------------------------------------ helpers for api.index


def tile_source_options(
    sources: Sequence[str],
    zooms: Sequence[int] | str | None,
    area: SearchArea | None,
    max_tiles: int,
    tile_cache: str | None,
    attribution: str | None,
    subdomains: Sequence[str] | None,
    retry_missing: bool = False,
) -> dict[str, Any]:
    """The options every tile source of an index gets; refuses options that no source can use."""
    tiled = [s for s in sources if is_tile_source(s)]
    services = [s for s in tiled if is_url(s)]
    given = {
        "--zooms": zooms not in (None, "", []),
        "--bbox/--near": area is not None,
        "--attribution": bool(attribution),
    }
    if not tiled and any(given.values()):
        used = ", ".join(k for k, v in given.items() if v)
        raise InputError(
            f"{used} apply to tile services, MBTiles and GeoPackage tiles; none of the sources is one"
        )
    if tile_cache and not services:
        raise InputError("--tile-cache is the download cache of a tile service (URL); no source is one")
    if tile_cache and len(services) > 1:
        raise InputError(
            "--tile-cache names the cache of ONE tile service; with several services leave it out "
            "(each gets its own file in the default cache folder)"
        )
    if retry_missing and not services:
        raise InputError(
            "--retry-missing asks a tile service (URL) again for its missing tiles; no source is one"
        )
    if max_tiles < 1:
        raise InputError(f"--max-tiles must be >= 1, got {max_tiles}")
    return {
        "zooms": parse_zooms(zooms),
        "area": area,
        "max_tiles": max_tiles,
        "tile_cache": tile_cache,
        "attribution": attribution,
        "subdomains": tuple(subdomains) if subdomains else None,
        "retry_missing": bool(retry_missing),
    }


def prepare_tile_sources(
    sources: Sequence[Any], progress: ProgressFn = no_progress, cancel: CancelToken | None = None
) -> ProgressFn:
    """Download what the tile services among ``sources`` need; returns the progress for what follows.

    When something is to be downloaded, downloads take the first half of the bar and the build the second.
    """
    services = [s for s in sources if isinstance(s, TileMosaicSource) and s.template is not None]
    to_fetch = [s.plan()["tiles_to_download"] for s in services]
    if sum(to_fetch) == 0:
        for s in services:
            s.prepare(no_progress, cancel)
        return progress
    total, done = sum(to_fetch), 0
    for s, n in zip(services, to_fetch, strict=True):
        start = done

        def sub(f: float, m: str, start: int = start, n: int = n) -> None:
            progress(0.5 * (start + f * n) / total, m)

        s.prepare(sub, cancel)
        done += n
    return lambda f, m: progress(0.5 + 0.5 * f, m)


def tile_build_params(sources: Sequence[Any]) -> dict[str, Any]:
    """What the tile sources add to an index's build parameters (and to its resume fingerprint)."""
    tiled = [s for s in sources if isinstance(s, TileMosaicSource)]
    if not tiled:
        return {}
    keys = ("kind", "url", "file", "table", "zooms", "span", "stride", "min_coverage", "area", "attribution")
    return {"tile_sources": [{k: v for k, v in s.describe().items() if k in keys} for s in tiled]}


# ------------------------------------------------------------------------ an extent as one GeoTIFF


def plan_extent(
    source: str,
    *,
    zoom: int | str | Sequence[int],
    area: SearchArea | None = None,
    max_tiles: int = DEFAULT_MAX_TILES,
    subdomains: Sequence[str] | None = None,
) -> dict[str, Any]:
    """What :func:`render_tiles` would render, checked without fetching or writing anything: the zoom
    (exactly one), an area for a service, the tile count against ``max_tiles``, a file's stored zoom.
    Returns ``{"zoom", "tiles": [x0, y0, x1, y1], "count"}``; raises what render_tiles would."""
    from .tile_views import tile_range

    zooms = parse_zooms(zoom if not isinstance(zoom, int) else [zoom])
    if len(zooms) != 1:
        raise InputError(f"an extent is rendered at ONE zoom level, got {zooms or 'none'} (--zooms 15)")
    z = zooms[0]
    if not is_tile_source(source):
        raise InputError(f"{source}: not a tile service URL, MBTiles or GeoPackage of tiles")
    template = parse_template(source, subdomains) if is_url(source) else None
    if template is not None:
        template.check_zooms([z])
    if template is not None and area is None:
        raise InputError(f"{template.redacted}: give the extent (--bbox, or --near and --radius-km)")
    if max_tiles < 1:
        raise InputError(f"--max-tiles must be >= 1, got {max_tiles}")
    if area is not None:
        w, s, e, n = area_bbox(area)
        if w > e:
            raise InputError("an extent crossing the antimeridian cannot be rendered as one GeoTIFF")
    if template is None:
        store = open_tile_store(source)
        try:
            if z not in store.zooms():
                raise InputError(f"{source} has no tiles at zoom {z} (stored: {store.zooms()})")
            if area is None:
                xs, ys = zip(*store.present(z), strict=True)
                box = (min(xs), min(ys), max(xs), max(ys))
        finally:
            store.close()
    if area is not None:
        box = tile_range((w, s, e, n), z)
    count = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
    if count > max_tiles:
        raise TooManyTilesError(
            f"{template.redacted if template else source}: the extent needs {count:,} tiles at zoom {z}, over "
            f"the cap of {max_tiles:,}: shrink it, use a coarser zoom, or raise --max-tiles"
        )
    return {"zoom": z, "tiles": list(box), "count": count}


def render_tiles(
    source: str,
    out: str | os.PathLike[str],
    *,
    zoom: int | str | Sequence[int],
    area: SearchArea | None = None,
    max_tiles: int = DEFAULT_MAX_TILES,
    tile_cache: str | os.PathLike[str] | None = None,
    subdomains: Sequence[str] | None = None,
    retry_missing: bool = False,
    overwrite: bool = False,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Write the tiles of ``source`` (URL template, MBTiles, GeoPackage) over ``area`` at one ``zoom`` as an
    RGB GeoTIFF in EPSG:3857 (exact XYZ transform, missing tiles masked): what ``embed``/``heatmap`` then
    read like any raster. A service's tiles are fetched once, through its cache (``tile_cache``; tiles
    recorded missing are asked again when the record is old, or always with ``retry_missing``)."""
    from ..atomic import atomic_path
    from ..output_guard import check_output
    from .tile_views import render_geotiff

    plan = plan_extent(source, zoom=zoom, area=area, max_tiles=max_tiles, subdomains=subdomains)
    z, box, count = plan["zoom"], tuple(plan["tiles"]), plan["count"]
    template = parse_template(source, subdomains) if is_url(source) else None
    if retry_missing and template is None:
        raise InputError("--retry-missing asks a tile service (URL) again for its missing tiles")
    store: TileStore
    check_output(out, inputs=[source if template is None else None], overwrite=overwrite, what="GeoTIFF")
    if template is not None:
        cache = Path(tile_cache) if tile_cache else default_cache_path(template)
        store = open_cache(template, cache)
        fetcher = TileFetcher(template, store, retry_missing=retry_missing)
        try:
            tiles = [(z, x, y) for y in range(box[1], box[3] + 1) for x in range(box[0], box[2] + 1)]
            report = fetcher.fetch(tiles, progress=lambda f, m: progress(0.9 * f, m), cancel=cancel)
            check_fetch_report(report, template, cache)
        except BaseException:
            store.close()
            raise
        finally:
            fetcher.close()
    else:
        store = open_tile_store(source)
    try:
        progress(0.9, f"writing {count} tiles at zoom {z} as one GeoTIFF")
        with atomic_path(out, suffix=".tif") as tmp:
            width, height = render_geotiff(store, z, box, tmp, "tiles rendered as a GeoTIFF")
    finally:
        store.close()
    progress(1.0, f"{out}: {width}x{height} pixels, EPSG:3857, zoom {z}")
    return {
        "out": str(out),
        "zoom": z,
        "tiles": list(box),
        "width": width,
        "height": height,
        "crs": "EPSG:3857",
    }
