"""A real XYZ tile server on loopback for the tests and benches: tiles cut on the fly from a raster.

``cut_tiles`` warps a georeferenced raster into Web-Mercator 256-px tiles (rasterio's WarpedVRT, bilinear)
at the zooms asked; ``TileServer`` serves ``/tiles/{z}/{x}/{y}.jpg`` from such a dict over HTTP/1.1
(keep-alive) in a thread, logs every request, and can misbehave on purpose: slow answers, 429 before the
tile, dropped connections, HTML error pages instead of images, 204s.
"""

from __future__ import annotations

import contextlib
import io
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.enums import Resampling
from rasterio.transform import from_bounds
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds

from engine.geo.xyz import tile_x, tile_y

Tiles = dict[tuple[int, int, int], bytes]


def lonlat_bounds(path: str | Path) -> tuple[float, float, float, float]:
    with rasterio.open(path) as ds:
        return transform_bounds(ds.crs, "EPSG:4326", *ds.bounds, densify_pts=21)


def tile_range(bounds: tuple[float, float, float, float], z: int) -> tuple[range, range]:
    """Columns and rows of the tiles that intersect ``bounds`` (lon/lat) at zoom z."""
    import math

    w, s, e, n = bounds

    def col(lon: float) -> int:
        return int((lon + 180) / 360 * 2**z)

    def row(lat: float) -> int:
        return int((1 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2 * 2**z)

    return range(col(w), col(e) + 1), range(row(n), row(s) + 1)


def cut_tiles(
    path: str | Path,
    zooms: list[int],
    *,
    fmt: str = "JPEG",
    size: int = 256,
    min_valid: float = 0.02,
) -> Tiles:
    """``{(z, x, y): encoded tile}`` of the raster in EPSG:3857; tiles with almost no data are left out
    (the server answers 404 for them, as a real service does outside its coverage)."""
    tiles: Tiles = {}
    bounds = lonlat_bounds(path)
    with rasterio.open(path) as src:
        bands = (1, 2, 3) if src.count >= 3 else (1, 1, 1)
        for z in zooms:
            cols, rows = tile_range(bounds, z)
            for y in rows:
                for x in cols:
                    b = (tile_x(x, z), tile_y(y + 1, z), tile_x(x + 1, z), tile_y(y, z))
                    with WarpedVRT(
                        src,
                        crs="EPSG:3857",
                        transform=from_bounds(*b, size, size),
                        width=size,
                        height=size,
                        resampling=Resampling.bilinear,
                    ) as vrt:
                        rgb = np.moveaxis(vrt.read(bands), 0, -1)
                        mask = vrt.dataset_mask() > 0
                    if mask.mean() < min_valid:
                        continue
                    rgb[~mask] = 0
                    buf = io.BytesIO()
                    Image.fromarray(rgb.astype(np.uint8)).save(
                        buf, fmt, **({"quality": 90} if fmt == "JPEG" else {})
                    )
                    tiles[(z, x, y)] = buf.getvalue()
    return tiles


def write_mbtiles(path: Path, tiles: Tiles, metadata: dict[str, str] | None = None, tms: bool = True) -> Path:
    """An MBTiles file of ``tiles`` written with plain sqlite3 (TMS rows, as the specification says)."""
    import sqlite3

    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE metadata (name TEXT, value TEXT);"
        "CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_data BLOB);"
    )
    meta = {"name": "test", "format": "jpg", "type": "baselayer", "version": "1", **(metadata or {})}
    conn.executemany("INSERT INTO metadata VALUES (?, ?)", list(meta.items()))
    conn.executemany(
        "INSERT INTO tiles VALUES (?, ?, ?, ?)",
        [(z, x, (2**z - 1 - y) if tms else y, data) for (z, x, y), data in tiles.items()],
    )
    conn.commit()
    conn.close()
    return path


HTML_PAGE = b"<!DOCTYPE html><html><head><title>503 Service busy</title></head><body>Try later</body></html>"


@dataclass
class Behaviour:
    """How the server misbehaves. Sets hold request paths; counters count per path."""

    delay_s: float = 0.0
    rate_limited: set[str] = field(default_factory=set)  # 429 (Retry-After: 0) on the first request
    dropped: set[str] = field(default_factory=set)  # connection closed without an answer, first request
    html: set[str] = field(default_factory=set)  # always 200 text/html instead of the image
    no_content: set[str] = field(default_factory=set)  # always 204
    server_error_always: set[str] = field(default_factory=set)  # always 503


class TileServer:
    """Serves ``tiles`` at ``http://127.0.0.1:PORT/tiles/{z}/{x}/{y}.jpg`` until :meth:`stop`."""

    def __init__(self, tiles: Tiles, behaviour: Behaviour | None = None) -> None:
        self.tiles = tiles
        self.behaviour = behaviour or Behaviour()
        self.log: list[tuple[str, int]] = []
        self.agents: set[str] = set()
        self.connections = 0
        self._seen: Counter[str] = Counter()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def setup(self) -> None:
                super().setup()
                with server._lock:
                    server.connections += 1

            def do_GET(self) -> None:  # noqa: N802
                server._answer(self)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:  # clients hanging up: not news
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/tiles/{{z}}/{{x}}/{{y}}.jpg"

    def path(self, z: int, x: int, y: int) -> str:
        return f"/tiles/{z}/{x}/{y}.jpg"

    def _answer(self, h: BaseHTTPRequestHandler) -> None:
        b = self.behaviour
        with self._lock:
            self._seen[h.path] += 1
            nth = self._seen[h.path]
            self.agents.add(h.headers.get("User-Agent", ""))
        if b.delay_s:
            time.sleep(b.delay_s)
        m = re.fullmatch(r"/tiles/(\d+)/(\d+)/(\d+)\.jpg", h.path)
        if h.path in b.dropped and nth == 1:
            self._record(h.path, 0)
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
            return
        if h.path in b.rate_limited and nth == 1:
            return self._send(h, 429, b"slow down", "text/plain", {"Retry-After": "0"})
        if h.path in b.server_error_always:
            return self._send(h, 503, b"unavailable", "text/plain")
        if h.path in b.html:
            return self._send(h, 200, HTML_PAGE, "text/html")
        if h.path in b.no_content:
            return self._send(h, 204, b"", "image/jpeg")
        data = self.tiles.get(tuple(int(v) for v in m.groups())) if m else None  # type: ignore[arg-type]
        if data is None:
            return self._send(h, 404, b"no tile", "text/plain")
        return self._send(h, 200, data, "image/jpeg")

    def _send(self, h, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self._record(h.path, status)
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if body:
            h.wfile.write(body)

    def _record(self, path: str, status: int) -> None:
        with self._lock:
            self.log.append((path, status))

    def served(self, status: int = 200) -> Counter[str]:
        """How many times each path was answered ``status``."""
        with self._lock:
            return Counter(p for p, s in self.log if s == status)

    def start(self) -> TileServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> TileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
