"""Web-Mercator XYZ tiles stored in one SQLite file: MBTiles (read and write, the download cache) and
GeoPackage raster tile tables (read).

Both are read with :mod:`sqlite3` straight from their tables, so the bytes of a tile are exactly what the
service sent (no re-encoding). Rows: MBTiles stores TMS rows (``tile_row = 2^z - 1 - y``, its
specification), a GeoPackage counts rows from the top of its tile matrix, as XYZ does. Only the
GoogleMapsCompatible tiling (EPSG:3857, the whole world in ``2^z x 2^z`` tiles at zoom ``z``) is accepted:
anything else is refused with a clear error, never silently misplaced.

The download cache (:class:`MBTiles` opened with ``writable=True``) also keeps a ``skyloc_missing`` table:
tiles the service answered 404/204/empty for, and when (``recorded``, Unix seconds), so that a re-run does
not ask for them again until the record is old (``missing(z, since=...)``; records of caches written before
the column existed have none and count as old).
"""

from __future__ import annotations

import io
import math
import os
import re
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import InputError, os_errors_as_user_errors
from ..geo.xyz import MAX_ZOOM, ORIGIN_SHIFT

#: Largest side of one tile accepted (a tile is 256 or 512 pixels; beyond this it is not a map tile).
MAX_TILE_SIDE = 4096
#: Largest tile body accepted (bytes).
MAX_TILE_BYTES = 16 * 2**20
#: MBTiles ``format`` values that are imagery (``pbf``/``mvt`` are vector tiles).
IMAGE_FORMATS = {"png", "jpg", "jpeg", "webp", "tif", "tiff", "gif", "bmp"}

Tile = tuple[int, int, int]  # (z, x, y), XYZ numbering: y = row from the north


class NotATileError(ValueError):
    """Bytes that are not a decodable image tile (an HTML error page, a truncated JPEG ...)."""


def decode_tile(data: bytes) -> tuple[np.ndarray, bool]:
    """``(rgb, empty)``: the tile as (H, W, 3) uint8, and whether it is fully transparent (no data).

    Raises NotATileError for anything that is not a complete image of at most MAX_TILE_SIDE per side.
    """
    if not data:
        raise NotATileError("empty body")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width > MAX_TILE_SIDE or img.height > MAX_TILE_SIDE:
                raise NotATileError(f"{img.width}x{img.height} pixels is not a map tile")
            img.load()
    except NotATileError:
        raise
    except UnidentifiedImageError:
        head = data[:60].decode("utf-8", "replace").replace("\n", " ").strip()
        raise NotATileError(f"not an image (starts with {head!r})") from None
    except Exception as exc:  # PIL's decoders raise OSError, SyntaxError, ValueError ...
        raise NotATileError(f"a truncated or corrupt image ({type(exc).__name__}: {exc})") from None
    empty = False
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        empty = not np.asarray(rgba)[:, :, 3].any()
        img = rgba
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return rgb, empty


def image_format(data: bytes) -> str:
    """The MBTiles ``format`` name of tile bytes (png, jpg, webp ...)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    try:
        return (Image.open(io.BytesIO(data)).format or "png").lower().replace("jpeg", "jpg")
    except Exception:
        return "png"


def _uri(path: Path, mode: str) -> str:
    return path.resolve().as_uri() + f"?mode={mode}"


class TileStore:
    """A file of XYZ tiles in EPSG:3857 (base class of MBTiles and GeoPackage tile tables)."""

    kind = "tiles"
    path: str
    attribution: str | None = None
    tile_format: str | None = None

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._present: dict[int, set[tuple[int, int]]] = {}

    # sqlite connections cannot be pickled or shared freely: one per process, guarded by a lock
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_conn"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        raise NotImplementedError

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def zooms(self) -> list[int]:
        raise NotImplementedError

    def _query_present(self, z: int) -> Iterable[tuple[int, int]]:
        """(x, y) of every tile stored at zoom z."""
        raise NotImplementedError

    def _query_tile(self, z: int, x: int, y: int) -> bytes | None:
        raise NotImplementedError

    def present(self, z: int) -> set[tuple[int, int]]:
        """(x, y) of the tiles stored at zoom ``z`` (cached; call :meth:`refresh` after writing)."""
        if z not in self._present:
            with self._lock:
                self._present[z] = set(self._query_present(z))
        return self._present[z]

    def refresh(self) -> None:
        self._present.clear()

    def get(self, z: int, x: int, y: int) -> bytes | None:
        """The stored bytes of tile (z, x, y), or None."""
        with self._lock:
            return self._query_tile(z, x, y)

    def read(self, z: int, x: int, y: int) -> np.ndarray | None:
        """Tile (z, x, y) as RGB uint8, or None when it is not stored (or stored but not an image)."""
        data = self.get(z, x, y)
        if data is None:
            return None
        try:
            return decode_tile(bytes(data))[0]
        except NotATileError:
            return None

    def tile_size(self) -> int:
        """Pixel side of the tiles (from the first stored tile; 256 for an empty store)."""
        for z in self.zooms():
            for x, y in sorted(self.present(z))[:1]:
                rgb = self.read(z, x, y)
                if rgb is not None:
                    return int(rgb.shape[0])
        return 256

    def describe(self) -> dict:
        return {"kind": self.kind, "file": self.path, "attribution": self.attribution}

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _sqlite_errors(path: str, what: str):
    class _Ctx:
        def __enter__(self):
            return self

        def __exit__(self, et, exc, tb):
            if isinstance(exc, sqlite3.DatabaseError):
                raise InputError(f"{path}: {what}: {exc}") from exc
            return False

    return _Ctx()


# ------------------------------------------------------------------------------------------- MBTiles


MBTILES_SCHEMA = """
CREATE TABLE IF NOT EXISTS metadata (name TEXT, value TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS metadata_name ON metadata (name);
CREATE TABLE IF NOT EXISTS tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_data BLOB);
CREATE UNIQUE INDEX IF NOT EXISTS tile_index ON tiles (zoom_level, tile_column, tile_row);
CREATE TABLE IF NOT EXISTS skyloc_missing (
    zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, reason TEXT, recorded REAL,
    PRIMARY KEY (zoom_level, tile_column, tile_row)
);
"""


class MBTiles(TileStore):
    """An MBTiles file (https://github.com/mapbox/mbtiles-spec): raster tiles, TMS rows, a metadata table.

    ``writable=False`` (a user's file): it must exist, hold ``metadata`` and ``tiles``, raster tiles
    (``format`` not pbf/mvt) in the standard TMS scheme (a ``scheme`` of ``xyz`` is read unflipped; any
    other scheme or a CRS other than EPSG:3857 is refused). ``writable=True``: the download cache,
    created if needed.
    """

    def __init__(self, path: str | os.PathLike[str], *, writable: bool = False) -> None:
        super().__init__(path)
        self.writable = writable
        p = Path(path)
        if not writable and not p.is_file():
            raise InputError(f"{path}: no such MBTiles file")
        self.metadata: dict[str, str] = {}
        self.flip = True
        with _sqlite_errors(self.path, "not a readable MBTiles file"):
            self._check()

    def _connect(self) -> sqlite3.Connection:
        p = Path(self.path)
        if self.writable:
            with os_errors_as_user_errors(f"creating the tile cache {p}"):
                p.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(p), check_same_thread=False, timeout=30)
        else:
            conn = sqlite3.connect(_uri(p, "ro"), uri=True, check_same_thread=False)
        return conn

    def _tables(self) -> set[str]:
        rows = self.conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')").fetchall()
        return {r[0] for r in rows}

    def _check(self) -> None:
        p = Path(self.path)
        if self.writable and p.exists() and p.stat().st_size and not _is_sqlite(p):
            raise InputError(f"{p} exists and is not an MBTiles file: it will not be used as a tile cache")
        if not self.writable and not _is_sqlite(p):
            raise InputError(f"{p}: not an MBTiles file (not an SQLite database)")
        tables = self._tables()
        if self.writable:
            if tables and not {"metadata", "tiles"} <= tables:
                raise InputError(
                    f"{p} is an SQLite file but not an MBTiles tile cache: it will not be written"
                )
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.executescript(MBTILES_SCHEMA)
            columns = {r[1] for r in self.conn.execute("PRAGMA table_info(skyloc_missing)")}
            if "recorded" not in columns:  # a cache of an older Skyloc: its records have no time (old)
                self.conn.execute("ALTER TABLE skyloc_missing ADD COLUMN recorded REAL")
            self.conn.commit()
        else:
            if "tiles" not in tables:
                raise InputError(f"{p}: not an MBTiles file (no tiles table)")
            if "metadata" not in tables:
                raise InputError(
                    f"{p}: an MBTiles file needs a metadata table (name, format, ...): this one has none, "
                    "so its tiling scheme and format are unknown"
                )
        self.metadata = {str(k): str(v) for k, v in self.conn.execute("SELECT name, value FROM metadata")}
        if not self.writable and not self.metadata:
            raise InputError(f"{p}: the MBTiles metadata table is empty (no name, no format): refused")
        fmt = self.metadata.get("format", "").lower()
        if fmt and fmt not in IMAGE_FORMATS:
            raise InputError(f"{p}: MBTiles format {fmt!r} is not imagery (vector tiles cannot be indexed)")
        scheme = self.metadata.get("scheme", "tms").strip().lower()
        if scheme not in ("tms", "xyz"):
            raise InputError(
                f"{p}: MBTiles tiling scheme {scheme!r} is not supported (only tms, the standard)"
            )
        self.flip = scheme == "tms"
        for key in ("crs", "srs", "projection"):
            crs = self.metadata.get(key, "").strip().upper()
            if crs and crs not in ("EPSG:3857", "EPSG:900913", "3857", "900913"):
                raise InputError(
                    f"{p}: MBTiles {key} {crs} is not Web Mercator (EPSG:3857): only the XYZ tiling is supported"
                )
        self.attribution = self.metadata.get("attribution") or None
        self.tile_format = fmt or None

    def zooms(self) -> list[int]:
        with self._lock:
            rows = self.conn.execute("SELECT DISTINCT zoom_level FROM tiles ORDER BY zoom_level").fetchall()
        return [int(r[0]) for r in rows if 0 <= int(r[0]) <= MAX_ZOOM]

    def _row(self, z: int, y: int) -> int:
        return (2**z - 1 - y) if self.flip else y

    def _query_present(self, z: int) -> Iterable[tuple[int, int]]:
        for x, row in self.conn.execute("SELECT tile_column, tile_row FROM tiles WHERE zoom_level = ?", (z,)):
            yield int(x), self._row(z, int(row))

    def _query_tile(self, z: int, x: int, y: int) -> bytes | None:
        row = self.conn.execute(
            "SELECT tile_data FROM tiles WHERE zoom_level = ? AND tile_column = ? AND tile_row = ?",
            (z, x, self._row(z, y)),
        ).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    # --------------------------------------------------------------------------------- cache writing

    def missing(self, z: int, since: float | None = None) -> set[tuple[int, int]]:
        """(x, y) the service answered "no tile" for (404, 204, empty or fully transparent); ``since``
        (Unix seconds): only the records made since then (a record without a time is older than any)."""
        with self._lock:
            if since is None:
                query, args = "SELECT tile_column, tile_row FROM skyloc_missing WHERE zoom_level = ?", (z,)
            else:
                query = (
                    "SELECT tile_column, tile_row FROM skyloc_missing WHERE zoom_level = ? "
                    "AND recorded IS NOT NULL AND recorded >= ?"
                )
                args = (z, since)
            rows = self.conn.execute(query, args).fetchall()
        return {(int(x), self._row(z, int(r))) for x, r in rows}

    def put(self, z: int, x: int, y: int, data: bytes) -> None:
        """Store one tile (the caller has checked that it decodes) and commit."""
        with self._lock:
            self.conn.execute(
                "INSERT OR REPLACE INTO tiles (zoom_level, tile_column, tile_row, tile_data) VALUES (?, ?, ?, ?)",
                (z, x, self._row(z, y), sqlite3.Binary(data)),
            )
            self.conn.execute(  # a tile once missing that the service now has
                "DELETE FROM skyloc_missing WHERE zoom_level = ? AND tile_column = ? AND tile_row = ?",
                (z, x, self._row(z, y)),
            )
            if self.tile_format is None:
                self.tile_format = image_format(data)
                self.conn.execute(
                    "INSERT OR REPLACE INTO metadata (name, value) VALUES ('format', ?)", (self.tile_format,)
                )
            self.conn.commit()
        if z in self._present:
            self._present[z].add((x, y))

    def put_missing(self, z: int, x: int, y: int, reason: str) -> None:
        with self._lock:
            self.conn.execute(
                "INSERT OR REPLACE INTO skyloc_missing (zoom_level, tile_column, tile_row, reason, recorded) "
                "VALUES (?, ?, ?, ?, ?)",
                (z, x, self._row(z, y), reason[:200], time.time()),
            )
            self.conn.commit()

    def set_metadata(self, values: dict[str, str | None]) -> None:
        with self._lock:
            for k, v in values.items():
                if v is None:
                    continue
                self.conn.execute("INSERT OR REPLACE INTO metadata (name, value) VALUES (?, ?)", (k, str(v)))
                self.metadata[k] = str(v)
            self.conn.commit()

    def update_extent(self) -> None:
        """``bounds``/``minzoom``/``maxzoom``/``center`` metadata from what the cache holds."""
        zooms = self.zooms()
        if not zooms:
            return
        z = zooms[-1]
        xs, ys = zip(*self.present(z), strict=True) if self.present(z) else ((0,), (0,))
        from ..geo.xyz import tile_lat, tile_lon

        w, e = tile_lon(min(xs), z), tile_lon(max(xs) + 1, z)
        s, n = tile_lat(max(ys) + 1, z), tile_lat(min(ys), z)
        self.set_metadata(
            {
                "bounds": f"{w:.6f},{s:.6f},{e:.6f},{n:.6f}",
                "center": f"{(w + e) / 2:.6f},{(s + n) / 2:.6f},{zooms[0]}",
                "minzoom": str(zooms[0]),
                "maxzoom": str(zooms[-1]),
            }
        )

    def close(self) -> None:
        if self._conn is not None and self.writable:
            try:
                with self._lock:
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    self._conn.execute("PRAGMA journal_mode=DELETE")
            except sqlite3.DatabaseError:
                pass
        super().close()


def _is_sqlite(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


# ----------------------------------------------------------------------------------------- GeoPackage


class GpkgTiles(TileStore):
    """A GeoPackage raster tile table in the GoogleMapsCompatible tiling (EPSG:3857, ``2^z`` tiles a side).

    ``table``: which tile table (needed only when the file holds several).
    """

    def __init__(self, path: str | os.PathLike[str], table: str | None = None) -> None:
        super().__init__(path)
        p = Path(path)
        if not p.is_file():
            raise InputError(f"{path}: no such GeoPackage")
        if not _is_sqlite(p):
            raise InputError(f"{path}: not a GeoPackage (not an SQLite database)")
        self.table = table
        self._zoom_of: dict[int, int] = {}  # XYZ zoom -> the table's zoom_level
        with _sqlite_errors(self.path, "not a readable GeoPackage"):
            self._check()

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(_uri(Path(self.path), "ro"), uri=True, check_same_thread=False)

    def _check(self) -> None:
        c = self.conn
        names = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
        if "gpkg_contents" not in names:
            raise InputError(f"{self.path}: not a GeoPackage (no gpkg_contents table)")
        tables = [
            (r[0], r[1], r[2])
            for r in c.execute(
                "SELECT table_name, description, srs_id FROM gpkg_contents WHERE data_type = 'tiles'"
            )
        ]
        if not tables:
            raise InputError(f"{self.path}: this GeoPackage holds no raster tiles (only vector data?)")
        if self.table is None:
            if len(tables) > 1:
                raise InputError(
                    f"{self.path} holds {len(tables)} tile tables ({', '.join(t[0] for t in tables)}): "
                    "name one of them"
                )
            self.table = tables[0][0]
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_ .-]{0,200}", self.table):
            raise InputError(f"{self.path}: tile table name {self.table!r} is not supported")
        match = [t for t in tables if t[0] == self.table]
        if not match:
            raise InputError(f"{self.path}: no tile table {self.table!r} ({', '.join(t[0] for t in tables)})")
        _, description, _ = match[0]
        ms = c.execute(
            "SELECT srs_id, min_x, min_y, max_x, max_y FROM gpkg_tile_matrix_set WHERE table_name = ?",
            (self.table,),
        ).fetchone()
        if ms is None:
            raise InputError(f"{self.path}: tile table {self.table!r} has no tile matrix set")
        srs_id, *bounds = ms
        org = c.execute(
            "SELECT organization, organization_coordsys_id FROM gpkg_spatial_ref_sys WHERE srs_id = ?",
            (srs_id,),
        ).fetchone()
        epsg = int(org[1]) if org and str(org[0]).upper() == "EPSG" else srs_id
        world = (-ORIGIN_SHIFT, -ORIGIN_SHIFT, ORIGIN_SHIFT, ORIGIN_SHIFT)
        if epsg not in (3857, 900913) or any(abs(a - b) > 1.0 for a, b in zip(bounds, world, strict=True)):
            raise InputError(
                f"{self.path}: tile table {self.table!r} is not in the GoogleMapsCompatible tiling (EPSG:3857 "
                f"over the whole world; found EPSG:{epsg}, bounds {bounds}): only XYZ Web-Mercator tiles can "
                "be indexed; export the layer with QGIS's 'Generate XYZ tiles (MBTiles)' or as a GeoTIFF"
            )
        for zl, mw, mh, tw, th in c.execute(
            "SELECT zoom_level, matrix_width, matrix_height, tile_width, tile_height FROM gpkg_tile_matrix "
            "WHERE table_name = ?",
            (self.table,),
        ):
            z = int(round(math.log2(mw))) if mw > 0 else -1
            if mw != mh or z < 0 or 2**z != mw or tw != th:
                raise InputError(
                    f"{self.path}: zoom level {zl} of {self.table!r} is a {mw}x{mh} matrix of {tw}x{th} tiles, not "
                    "the GoogleMapsCompatible 2^z x 2^z square tiles"
                )
            self._zoom_of[z] = int(zl)
        if not self._zoom_of:
            raise InputError(f"{self.path}: tile table {self.table!r} has no zoom level")
        self.attribution = None
        if "gpkg_metadata" in names:
            row = c.execute(
                "SELECT metadata FROM gpkg_metadata WHERE md_scope = 'dataset' LIMIT 1"
            ).fetchone()
            self.attribution = row[0] if row and row[0] and len(row[0]) < 2000 else None
        if self.attribution is None and description:
            self.attribution = str(description)

    def zooms(self) -> list[int]:
        return sorted(z for z in self._zoom_of if z <= MAX_ZOOM)

    def _query_present(self, z: int) -> Iterable[tuple[int, int]]:
        zl = self._zoom_of.get(z)
        if zl is None:
            return []
        rows = self.conn.execute(
            f'SELECT tile_column, tile_row FROM "{self.table}" WHERE zoom_level = ?', (zl,)
        ).fetchall()
        return [(int(x), int(y)) for x, y in rows]

    def _query_tile(self, z: int, x: int, y: int) -> bytes | None:
        zl = self._zoom_of.get(z)
        if zl is None:
            return None
        row = self.conn.execute(
            f'SELECT tile_data FROM "{self.table}" WHERE zoom_level = ? AND tile_column = ? AND tile_row = ?',
            (zl, x, y),
        ).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def describe(self) -> dict:
        return {**super().describe(), "table": self.table}


def open_tile_store(path: str | os.PathLike[str]) -> TileStore:
    """The tile store for ``path``: ``.mbtiles`` -> MBTiles, ``.gpkg`` -> its raster tile table."""
    suffix = Path(path).suffix.lower()
    if suffix == ".mbtiles":
        return MBTiles(path)
    if suffix == ".gpkg":
        return GpkgTiles(path)
    raise InputError(f"{path}: not an MBTiles (.mbtiles) or GeoPackage (.gpkg) file")
