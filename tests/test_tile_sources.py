"""Tile services, MBTiles and GeoPackage tiles as index sources: a real HTTP server on loopback, real
sqlite files, the real encoder. No mocks.

The server serves Web-Mercator tiles cut on the fly from the bundled NAIP sample (zooms 14-15: 46 tiles
hold data, the others are 404s as a service answers outside its coverage).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from imagery import SAMPLE
from tile_server import Behaviour, TileServer, cut_tiles, lonlat_bounds, write_mbtiles

from engine import api
from engine.cli import main as cli_main
from engine.errors import CancelledError, EmptyInputError, InputError
from engine.footprint.coregister import CoregParams
from engine.geo.search_area import SearchArea
from engine.geo.xyz import mosaic_bounds_3857, mosaic_corners_lonlat
from engine.imagery import TileMosaicSource, open_source
from engine.imagery.tile_service import (
    DEFAULT_WORKERS,
    USER_AGENT,
    TileServiceError,
    TooManyTilesError,
    UrlTemplate,
    quadkey,
    redact,
)
from engine.imagery.tile_source import mosaics_in_area, parse_zooms
from engine.imagery.tile_store import decode_tile
from engine.progress import CancelToken
from engine.retrieval.index_store import open_index
from engine.vector_io import read_layer

ZOOMS = [14, 15]
INPUT = 224  # encoder input side: small and fast, as the other index tests


@pytest.fixture(scope="module")
def tiles():
    return cut_tiles(SAMPLE / "naip_2018.tif", ZOOMS)


@pytest.fixture(scope="module")
def bbox():
    return lonlat_bounds(SAMPLE / "naip_2018.tif")


@pytest.fixture
def server(tiles):
    with TileServer(tiles) as srv:
        yield srv


def build(sources, out, area=None, **kw):
    return api.index([str(s) for s in sources], str(out), input_size=INPUT, area=area, **kw)


def descriptors(index_dir: Path) -> np.ndarray:
    idx = open_index(index_dir)
    return idx.faiss.reconstruct_n(0, idx.faiss.ntotal)


def cached_tiles(cache: Path) -> dict[tuple[int, int, int], bytes]:
    conn = sqlite3.connect(cache)
    rows = conn.execute("SELECT zoom_level, tile_column, tile_row, tile_data FROM tiles").fetchall()
    conn.close()
    return {(z, x, 2**z - 1 - r): bytes(d) for z, x, r, d in rows}  # TMS rows back to XYZ


def assert_cache_valid(cache: Path, tiles) -> None:
    """Every cached tile is a real tile of the server, byte for byte (so never an HTML page)."""
    held = cached_tiles(cache)
    assert held, "nothing cached"
    for key, data in held.items():
        assert tiles[key] == data
        decode_tile(data)


# ------------------------------------------------------------------------------------------- templates


def test_url_templates() -> None:
    t = UrlTemplate.parse("https://tiles.example.org/{z}/{x}/{y}.jpg")
    assert t.url(3, 5, 2) == "https://tiles.example.org/3/5/2.jpg"
    assert UrlTemplate.parse("http://h/{z}/{x}/{-y}.png").url(3, 5, 2) == "http://h/3/5/5.png"
    assert quadkey(3, 3, 5) == "213"  # the Bing Maps documentation's example
    assert UrlTemplate.parse("https://h/a/{q}.jpeg").url(3, 3, 5) == "https://h/a/213.jpeg"
    sub = UrlTemplate.parse("https://{s}.h.org/{z}/{x}/{y}.png", ("a", "b"))
    assert {sub.url(1, 0, 0), sub.url(1, 1, 0)} == {"https://a.h.org/1/0/0.png", "https://b.h.org/1/1/0.png"}
    sw = UrlTemplate.parse("https://{switch:t0,t1,t2}.h.org/{z}/{x}/{y}.png")
    assert sw.url(2, 1, 1) == "https://t2.h.org/2/1/1.png"
    # a QGIS XYZ layer source, percent-encoded as QGIS stores it
    qgis = "type=xyz&url=https://h.org/%7Bz%7D/%7Bx%7D/%7By%7D.png&zmax=19&zmin=0"
    assert UrlTemplate.parse(qgis).url(4, 1, 2) == "https://h.org/4/1/2.png"
    assert (
        redact("https://h/{z}/{x}/{y}.png?api_key=SECRET&style=x")
        == "https://h/{z}/{x}/{y}.png?api_key=***&style=x"
    )


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("https://tiles.example.org/tile.jpg", "no {z}/{x}/{y}"),
        ("https://tiles.example.org/{z}/{x}.jpg", "no {z}/{x}/{y}"),
        ("file:///tmp/{z}/{x}/{y}.jpg", "only http:// and https://"),
        ("ftp://h/{z}/{x}/{y}.jpg", "only http:// and https://"),
        ("https://h/{z}/{x}/{y}.jpg?key={apikey}", "unknown placeholder {apikey}"),
        ("https://user:pw@h/{z}/{x}/{y}.jpg", "passwords"),
    ],
)
def test_bad_templates_are_refused_before_anything(tmp_path: Path, url: str, says: str) -> None:
    with pytest.raises(InputError, match=says.replace("{", r"\{").replace("}", r"\}").replace("/", ".")):
        build(
            [url],
            tmp_path / "idx",
            SearchArea(bbox=(0, 0, 1, 1)),
            zooms="9",
            tile_cache=str(tmp_path / "c.mbtiles"),
        )
    assert not (tmp_path / "c.mbtiles").exists() and not list(tmp_path.iterdir())


def test_zooms_parsing() -> None:
    assert parse_zooms("9-11") == [9, 10, 11]
    assert parse_zooms("9,11") == [9, 11]
    assert parse_zooms("13, 9-10") == [9, 10, 13]
    for bad in ("9-", "a", "11-9", "31"):
        with pytest.raises(InputError):
            parse_zooms(bad)


def test_mosaic_grid_is_global_with_half_overlap(bbox) -> None:
    """Mosaics lie on a grid of stride span/2 (50% overlap), whatever the area: ids do not depend on it."""
    area = SearchArea(bbox=bbox)
    ms = mosaics_in_area(area, 15, 4, 2)
    assert ms and all(r % 2 == 0 and c % 2 == 0 for _, r, c in ms)
    rows, cols = sorted({r for _, r, _ in ms}), sorted({c for _, _, c in ms})
    assert np.all(np.diff(rows) == 2) and np.all(np.diff(cols) == 2)
    # a smaller area inside gives a subset of the same mosaics
    w, s, e, n = bbox
    inner = SearchArea(bbox=(w + (e - w) / 3, s + (n - s) / 3, e - (e - w) / 3, n - (n - s) / 3))
    assert set(mosaics_in_area(inner, 15, 4, 2)) < set(ms)
    near = SearchArea(near=((s + n) / 2, (w + e) / 2), radius_km=0.5)
    assert set(mosaics_in_area(near, 15, 4, 2)) <= set(ms)


# -------------------------------------------------------------------------------------- index by URL


def test_index_by_url(tmp_path: Path, server: TileServer, tiles, bbox) -> None:
    cache = tmp_path / "cache.mbtiles"
    manifest = build(
        [server.url],
        tmp_path / "idx",
        SearchArea(bbox=bbox),
        zooms="14-15",
        tile_cache=str(cache),
        attribution="NAIP 2018, USDA (public domain)",
    )
    # every tile asked once, with Skyloc's User-Agent, over reused connections
    assert max(Counter_(server.log).values()) == 1
    assert server.agents == {USER_AGENT} and "Skyloc/" in USER_AGENT
    assert server.connections < len(server.log) / 2
    assert_cache_valid(cache, tiles)
    assert len(cached_tiles(cache)) == len(tiles)  # all that exist, 404s recorded apart
    meta = dict(sqlite3.connect(cache).execute("SELECT name, value FROM metadata").fetchall())
    assert meta["format"] == "jpg" and meta["attribution"].startswith("NAIP") and meta["minzoom"] == "14"

    (record,) = manifest["sources"]
    assert record["kind"] == "tile_service" and record["url"] == server.url and record["zooms"] == ZOOMS
    assert record["attribution"] == "NAIP 2018, USDA (public domain)"
    assert record["download"]["missing"] > 0 and record["download"]["downloaded"] == len(tiles)
    idx = open_index(tmp_path / "idx")
    t = idx.tiles
    assert set(t.kind) == {"tiles"} and set(t.source) == {str(cache.resolve())}
    assert set(t.zoom) == set(ZOOMS)
    for i in range(len(t)):  # exact XYZ bounds, and a footprint that is the formula's
        z = int(t.zoom[i])
        x0, y0 = t.native_bounds[i][0], t.native_bounds[i][3]
        col = round((x0 + 20037508.342789244) / (40075016.68557849 / 2**z))
        row = round((20037508.342789244 - y0) / (40075016.68557849 / 2**z))
        np.testing.assert_allclose(t.native_bounds[i], mosaic_bounds_3857(z, row, col, 4), atol=1e-6)
        np.testing.assert_allclose(
            np.array(t.footprints[i].exterior.coords)[:4], mosaic_corners_lonlat(z, row, col, 4), atol=1e-9
        )

    # a re-run (another index) downloads nothing
    before = len(server.log)
    build([server.url], tmp_path / "idx2", SearchArea(bbox=bbox), zooms="14-15", tile_cache=str(cache))
    assert len(server.log) == before


def Counter_(log):  # noqa: N802 - request count per path
    from collections import Counter

    return Counter(p for p, _ in log)


def write_gpkg_tiles(path: Path, tiles) -> Path:
    """A GeoPackage raster tile table in GoogleMapsCompatible, written with sqlite3 from the same tiles."""
    half = 20037508.342789244
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE gpkg_spatial_ref_sys (srs_name TEXT, srs_id INTEGER PRIMARY KEY, organization TEXT,
            organization_coordsys_id INTEGER, definition TEXT, description TEXT);
        CREATE TABLE gpkg_contents (table_name TEXT PRIMARY KEY, data_type TEXT, identifier TEXT,
            description TEXT, last_change TEXT, min_x REAL, min_y REAL, max_x REAL, max_y REAL, srs_id INTEGER);
        CREATE TABLE gpkg_tile_matrix_set (table_name TEXT PRIMARY KEY, srs_id INTEGER, min_x REAL, min_y REAL,
            max_x REAL, max_y REAL);
        CREATE TABLE gpkg_tile_matrix (table_name TEXT, zoom_level INTEGER, matrix_width INTEGER,
            matrix_height INTEGER, tile_width INTEGER, tile_height INTEGER, pixel_x_size REAL, pixel_y_size REAL);
        CREATE TABLE naip (id INTEGER PRIMARY KEY, zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER,
            tile_data BLOB);
        """
    )
    conn.execute(
        "INSERT INTO gpkg_spatial_ref_sys VALUES ('WGS 84 / Pseudo-Mercator', 3857, 'EPSG', 3857, '', '')"
    )
    conn.execute(
        "INSERT INTO gpkg_contents VALUES ('naip', 'tiles', 'naip', 'NAIP via GeoPackage', '', ?, ?, ?, ?, 3857)",
        (-half, -half, half, half),
    )
    conn.execute(
        "INSERT INTO gpkg_tile_matrix_set VALUES ('naip', 3857, ?, ?, ?, ?)", (-half, -half, half, half)
    )
    for z in ZOOMS:
        conn.execute(
            "INSERT INTO gpkg_tile_matrix VALUES ('naip', ?, ?, ?, 256, 256, ?, ?)",
            (z, 2**z, 2**z, 2 * half / 2**z / 256, 2 * half / 2**z / 256),
        )
    conn.executemany(
        "INSERT INTO naip (zoom_level, tile_column, tile_row, tile_data) VALUES (?, ?, ?, ?)",
        [(z, x, y, d) for (z, x, y), d in tiles.items()],
    )
    conn.commit()
    conn.close()
    return path


def test_service_mbtiles_gpkg_and_folder_give_the_same_index(
    tmp_path: Path, server: TileServer, tiles, bbox
) -> None:
    area = SearchArea(bbox=bbox)
    build([server.url], tmp_path / "by_url", area, zooms=ZOOMS, tile_cache=str(tmp_path / "c.mbtiles"))
    mbt = write_mbtiles(tmp_path / "naip.mbtiles", tiles, {"attribution": "USDA NAIP"})
    m = build([mbt], tmp_path / "by_mbtiles", area)
    assert m["sources"][0]["kind"] == "mbtiles" and m["sources"][0]["attribution"] == "USDA NAIP"
    gpkg = write_gpkg_tiles(tmp_path / "naip.gpkg", tiles)
    g = build([gpkg], tmp_path / "by_gpkg", area, zooms="14-15")
    assert g["sources"][0]["kind"] == "gpkg" and g["sources"][0]["attribution"] == "NAIP via GeoPackage"
    with open_source(mbt, tile_options={"area": area}) as src:
        src.write_mosaic_folder(tmp_path / "folder")
    build([tmp_path / "folder"], tmp_path / "by_folder")

    ref = open_index(tmp_path / "by_url")
    ref_desc = descriptors(tmp_path / "by_url")
    assert len(ref.tiles) >= 8
    for name in ("by_mbtiles", "by_gpkg", "by_folder"):
        other = open_index(tmp_path / name)
        assert len(other.tiles) == len(ref.tiles), name
        np.testing.assert_allclose(other.tiles.native_bounds, ref.tiles.native_bounds, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(other.tiles.zoom, ref.tiles.zoom)
        for a, b in zip(other.tiles.footprints, ref.tiles.footprints, strict=True):
            assert a.equals_exact(b, 1e-9)
        np.testing.assert_allclose(descriptors(tmp_path / name), ref_desc, atol=1e-5)


# ---------------------------------------------------------------------------------- a difficult server


def paths_of(server: TileServer, tiles, k: int, offset: int = 0) -> set[str]:
    keys = sorted(tiles)[offset : offset + k]
    return {server.path(*key) for key in keys}


def test_slow_rate_limited_dropping_server_completes(tmp_path: Path, tiles, bbox) -> None:
    behaviour = Behaviour(delay_s=0.02)
    with TileServer(tiles, behaviour) as srv:
        behaviour.rate_limited = paths_of(srv, tiles, 6)
        behaviour.dropped = paths_of(srv, tiles, 4, offset=10)
        behaviour.no_content = {srv.path(15, 0, 0)} | paths_of(srv, tiles, 1, offset=20)
        cache = tmp_path / "c.mbtiles"
        src = TileMosaicSource(srv.url, zooms=ZOOMS, area=SearchArea(bbox=bbox), tile_cache=cache)
        src.prepare()
        statuses = [s for _, s in srv.log]
        assert statuses.count(429) == 6 and statuses.count(0) == 4  # each answered again after a retry
        assert src.report.failed == 0 and src.report.downloaded == len(tiles) - 1
        assert src.report.missing > 0
        assert len(src.specs()) > 0
        src.close()
    held = cached_tiles(cache)
    assert len(held) == len(tiles) - 1  # the 204 tile is not cached, and not fetched again:
    missing = sqlite3.connect(cache).execute("SELECT COUNT(*) FROM skyloc_missing").fetchone()[0]
    assert missing == src.report.missing
    assert_cache_valid(cache, tiles)


def test_html_error_page_stops_the_build_and_is_never_cached(tmp_path: Path, tiles, bbox) -> None:
    behaviour = Behaviour()
    cache = tmp_path / "c.mbtiles"
    with TileServer(tiles, behaviour) as srv:
        html = behaviour.html = paths_of(srv, tiles, 3, offset=5)
        with pytest.raises(
            TileServiceError, match="3 of .* tiles could not be downloaded.*not an image tile"
        ):
            build([srv.url], tmp_path / "idx", SearchArea(bbox=bbox), zooms=ZOOMS, tile_cache=str(cache))
        assert not (tmp_path / "idx").exists() and not (tmp_path / "idx.partial").exists()
        assert_cache_valid(cache, tiles)
        assert len(cached_tiles(cache)) == len(tiles) - 3
        # the service is fixed: the re-run asks only for the 3 tiles it lacks
        behaviour.html = set()
        before = len(srv.log)
        build([srv.url], tmp_path / "idx", SearchArea(bbox=bbox), zooms=ZOOMS, tile_cache=str(cache))
        assert sorted(p for p, _ in srv.log[before:]) == sorted(html)
    assert len(cached_tiles(cache)) == len(tiles)


def test_server_errors_that_persist_stop_with_a_clear_error(tmp_path: Path, tiles, bbox) -> None:
    behaviour = Behaviour()
    with TileServer(tiles, behaviour) as srv:
        behaviour.server_error_always = paths_of(srv, tiles, 2)
        src = TileMosaicSource(
            srv.url,
            zooms=ZOOMS,
            area=SearchArea(bbox=bbox),
            tile_cache=tmp_path / "c.mbtiles",
            fetcher_options={"backoff": 0.01, "retries": 2},
        )
        with pytest.raises(TileServiceError, match="2 of .* could not be downloaded.*(503|retries)"):
            src.prepare()
        src.close()


def test_interrupted_download_resumes_without_fetching_twice(tmp_path: Path, tiles, bbox) -> None:
    cache = tmp_path / "c.mbtiles"
    area = SearchArea(bbox=bbox)
    with TileServer(tiles, Behaviour(delay_s=0.01)) as srv:
        token = CancelToken()

        def progress(fraction: float, message: str) -> None:
            if message.startswith("tiles:") and int(message.split()[1]) >= 40:
                token.cancel()

        with pytest.raises(CancelledError):
            build(
                [srv.url],
                tmp_path / "idx",
                area,
                zooms=ZOOMS,
                tile_cache=str(cache),
                progress=progress,
                cancel=token,
            )
        assert not (tmp_path / "idx").exists()
        done_first = len(srv.log)
        assert 40 <= done_first < 200
        assert_cache_valid(cache, tiles)

        # an exception raised by the progress callback (a killed QGIS task) is as safe
        def boom(fraction: float, message: str) -> None:
            if message.startswith("tiles:") and int(message.split()[1]) >= 30:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            build([srv.url], tmp_path / "idx", area, zooms=ZOOMS, tile_cache=str(cache), progress=boom)
        build([srv.url], tmp_path / "idx", area, zooms=ZOOMS, tile_cache=str(cache))
        per_path = Counter_(srv.log)
        assert max(per_path.values()) == 1, [p for p, n in per_path.items() if n > 1]
    assert len(cached_tiles(cache)) == len(tiles)


def test_killed_build_resumes_fetching_only_what_was_in_flight(tmp_path: Path, tiles, bbox) -> None:
    """``skyloc index URL`` killed (SIGKILL, no cleanup) in the middle of its downloads: the cache is a
    valid MBTiles holding only real tiles, and the re-run asks again for none of the tiles it holds: at
    most the few that were on the wire when the process died (one per download worker)."""
    import subprocess
    import sys
    import time

    cache = tmp_path / "c.mbtiles"
    lon0, lat0, lon1, lat1 = bbox
    with TileServer(tiles, Behaviour(delay_s=0.25)) as srv:
        args = [sys.executable, "-m", "engine.cli", "index", srv.url, "--out", str(tmp_path / "idx")]
        args += ["--zooms", "14,15", "--bbox", f"{lon0},{lat0},{lon1},{lat1}", "--tile-cache", str(cache)]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        served = lambda: sum(status == 200 for _, status in srv.log)  # noqa: E731 (the area has 404s too)
        while served() < 8 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        assert 8 <= served() < len(tiles), "the download was not caught half-way"
        assert not (tmp_path / "idx").exists()
        assert_cache_valid(cache, tiles)
        held = {srv.path(*key) for key in cached_tiles(cache)}
        first = [p for p, _ in srv.log]
        srv.behaviour.delay_s = 0.0
        build([srv.url], tmp_path / "idx", SearchArea(bbox=bbox), zooms=ZOOMS, tile_cache=str(cache))
        again = [p for p, _ in srv.log[len(first) :]]
        assert not set(again) & held  # nothing the cache holds is fetched twice
        refetched = set(again) & set(first)
        assert len(refetched) <= DEFAULT_WORKERS, refetched  # only tiles in flight at the kill
    assert len(cached_tiles(cache)) == len(tiles)


def test_unreachable_host_fails_fast_before_any_index(tmp_path: Path, bbox) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{{z}}/{{x}}/{{y}}.png"
    with pytest.raises(TileServiceError, match="cannot be used"):
        build(
            [url], tmp_path / "idx", SearchArea(bbox=bbox), zooms="15", tile_cache=str(tmp_path / "c.mbtiles")
        )
    assert not (tmp_path / "idx").exists() and not (tmp_path / "idx.partial").exists()


def test_tile_cap(tmp_path: Path, server: TileServer) -> None:
    big = SearchArea(bbox=(-100.0, 46.0, -98.0, 48.0))
    with pytest.raises(TooManyTilesError, match="raise --max-tiles"):
        build([server.url], tmp_path / "idx", big, zooms="15", tile_cache=str(tmp_path / "c.mbtiles"))
    assert server.log == [] and not (tmp_path / "c.mbtiles").exists()
    src = TileMosaicSource(
        server.url, zooms="15", area=big, max_tiles=100_000, tile_cache=tmp_path / "c.mbtiles"
    )
    plan = src.plan()
    assert plan["tiles_to_download"] == plan["tiles_needed"] > 20_000 and server.log == []
    assert plan["estimated_download_bytes"] > 0
    src.close()


# -------------------------------------------------------------------------------------------- bad files


def test_bad_mbtiles_and_gpkg(tmp_path: Path, tiles) -> None:
    one = dict(list(tiles.items())[:4])
    no_meta = write_mbtiles(tmp_path / "no_meta.mbtiles", one)
    sqlite3.connect(no_meta).execute("DROP TABLE metadata").connection.commit()
    with pytest.raises(InputError, match="metadata"):
        open_source(no_meta)
    with pytest.raises(InputError, match="not imagery"):
        open_source(write_mbtiles(tmp_path / "vector.mbtiles", one, {"format": "pbf"}))
    with pytest.raises(InputError, match="tiling scheme"):
        open_source(write_mbtiles(tmp_path / "quad.mbtiles", one, {"scheme": "quadtree"}))
    with pytest.raises(InputError, match="Web Mercator"):
        open_source(write_mbtiles(tmp_path / "utm.mbtiles", one, {"crs": "EPSG:32614"}))
    (tmp_path / "text.mbtiles").write_text("hello")
    with pytest.raises(InputError, match="not an MBTiles"):
        open_source(tmp_path / "text.mbtiles")
    with pytest.raises(InputError, match="no such MBTiles"):
        open_source(tmp_path / "absent.mbtiles")
    with pytest.raises(InputError, match="no tiles at zoom 9"):
        TileMosaicSource(str(write_mbtiles(tmp_path / "ok.mbtiles", one)), zooms="9")
    # a GeoPackage of tiles in UTM (GDAL's default tiling for a UTM raster): refused, clearly
    import rasterio

    with rasterio.open(SAMPLE / "naip_2018.tif") as src:
        profile = {**src.profile, "driver": "GPKG", "count": 3, "dtype": "uint8"}
        profile.pop("blockxsize", None), profile.pop("blockysize", None), profile.pop("tiled", None)
        profile.pop("interleave", None), profile.pop("compress", None), profile.pop("photometric", None)
        with rasterio.open(tmp_path / "utm.gpkg", "w", **profile) as dst:
            dst.write(src.read((1, 2, 3)))
    with pytest.raises(InputError, match="GoogleMapsCompatible"):
        TileMosaicSource(str(tmp_path / "utm.gpkg"))
    with open_source(tmp_path / "utm.gpkg") as utm:  # GDAL reads it as any raster, in its own CRS
        assert utm.kind == "geotiff" and utm.crs == "EPSG:26914"
    # a tile cache that is somebody else's MBTiles is not written into
    with pytest.raises(InputError, match="did not download"):
        TileMosaicSource(
            "http://127.0.0.1:9/{z}/{x}/{y}.png",
            zooms="15",
            area=SearchArea(bbox=(-99.15, 47.01, -99.14, 47.02)),
            tile_cache=tmp_path / "ok.mbtiles",
        )


def test_tile_options_need_a_tile_source(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="none of the sources"):
        build([SAMPLE / "naip_2018.tif"], tmp_path / "idx", zooms="9")
    with pytest.raises(InputError, match="give the zoom levels"):
        build(["https://h/{z}/{x}/{y}.png"], tmp_path / "idx", SearchArea(bbox=(0, 0, 1, 1)))
    with pytest.raises(InputError, match="give the area"):
        build(["https://h/{z}/{x}/{y}.png"], tmp_path / "idx", zooms="9")
    with pytest.raises(InputError, match="ONE tile service"):
        build(
            ["https://h/{z}/{x}/{y}.png", "https://g/{z}/{x}/{y}.png"],
            tmp_path / "idx",
            SearchArea(bbox=(0, 0, 1, 1)),
            zooms="9",
            tile_cache=str(tmp_path / "c.mbtiles"),
        )
    with pytest.raises(EmptyInputError):
        TileMosaicSource(str(write_mbtiles(tmp_path / "empty.mbtiles", {})))


def test_mbtiles_cache_survives_pickling(tmp_path: Path, server: TileServer, bbox) -> None:
    import pickle

    src = TileMosaicSource(
        server.url, zooms="15", area=SearchArea(bbox=bbox), tile_cache=tmp_path / "c.mbtiles"
    )
    specs = src.specs()
    copy = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(copy.read(specs[0], 64), src.read(specs[0], 64))
    assert copy.fetcher is None
    src.close()
    copy.close()


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_index_by_url_and_exit_codes(tmp_path: Path, server: TileServer, bbox, capsys) -> None:
    w, s, e, n = bbox
    common = [
        "--zooms",
        "15",
        "--tile-cache",
        str(tmp_path / "c.mbtiles"),
        "--input-size",
        str(INPUT),
        "--quiet",
    ]
    rc = cli_main(
        [
            "index",
            server.url,
            "--out",
            str(tmp_path / "plan"),
            "--bbox",
            f"{w},{s},{e},{n}",
            "--plan",
            *common,
        ]
    )
    plan = json.loads(capsys.readouterr().out)
    assert rc == 0 and plan[0]["tiles_to_download"] == plan[0]["tiles_needed"] > 0 and server.log == []
    assert not (tmp_path / "plan").exists()
    rc = cli_main(
        [
            "index",
            server.url,
            "--out",
            str(tmp_path / "idx"),
            "--near",
            f"{(s + n) / 2},{(w + e) / 2}",
            "--radius-km",
            "1",
            *common,
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "tiles" in out and (tmp_path / "idx" / "manifest.json").exists()
    # bad input: exit 3 with a message, nothing written
    assert (
        cli_main(
            [
                "index",
                "ftp://h/{z}/{x}/{y}.png",
                "--out",
                str(tmp_path / "x"),
                "--bbox",
                "0,0,1,1",
                "--zooms",
                "9",
            ]
        )
        == 3
    )
    assert "only http:// and https://" in capsys.readouterr().err
    assert (
        cli_main(
            [
                "index",
                server.url,
                "--out",
                str(tmp_path / "x"),
                "--bbox",
                "-100,46,-98,48",
                "--zooms",
                "14",
                "--max-tiles",
                "50",
            ]
        )
        == 3
    )
    assert "--max-tiles" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------- service


def test_service_index_from_url_and_mbtiles(tmp_path: Path, server: TileServer, tiles, bbox) -> None:
    import sys

    from engine.client import ServiceError, SkylocClient, launch

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    write_mbtiles(root / "naip.mbtiles", tiles)
    write_mbtiles(outside / "naip.mbtiles", tiles)
    env = {**__import__("os").environ, "SKYLOC_TILE_CACHE": str(tmp_path / "engine_cache")}
    eng = launch([sys.executable, "-m", "engine.cli", "serve"], roots=[str(root)], env=env)
    try:
        with SkylocClient(eng.url, token_file=eng.token_file) as c:
            area = {"bbox": list(bbox), "zooms": [15]}
            (plan,) = c.index_plan([server.url], **area)
            assert plan["tiles_to_download"] == plan["tiles_needed"] > 0 and server.log == []
            job = c.wait(c.index([server.url], "by_url", input_size=INPUT, attribution="USDA NAIP", **area))
            assert job.state == "succeeded", job
            (rec,) = job.summary["sources"]
            assert rec["kind"] == "tile_service" and rec["attribution"] == "USDA NAIP"
            assert rec["cache"].startswith(str(tmp_path / "engine_cache"))
            job = c.wait(c.index(["naip.mbtiles"], "by_file", input_size=INPUT, **area))
            assert job.state == "succeeded" and job.summary["counts"]["tiles"] > 0

            def code(fn) -> tuple[int | None, str]:
                with pytest.raises(ServiceError) as info:
                    fn()
                return info.value.status, info.value.code

            assert code(lambda: c.index(["ftp://h/{z}/{x}/{y}.png"], "x", **area)) == (422, "bad_input")
            assert code(lambda: c.index(["https://h/tile.png"], "x", **area)) == (422, "bad_input")
            big = {"bbox": [-100.0, 46.0, -98.0, 48.0], "zooms": [15]}
            assert code(lambda: c.index([server.url], "x", **big)) == (413, "too_many_tiles")
            assert code(lambda: c.index([str(outside / "naip.mbtiles")], "x", **area))[0] == 403
            cache_out = str(outside / "c.mbtiles")
            assert code(lambda: c.index([server.url], "x", tile_cache=cache_out, **area))[0] == 403
            assert not (root / "x").exists() and not (outside / "c.mbtiles").exists()
    finally:
        assert eng.stop() == 0


# ------------------------------------------------------------------------------------------ footprints


@pytest.fixture(scope="module")
def tiles_2009():
    return cut_tiles(SAMPLE / "naip_2009.tif", [15, 16])


def photo_error_m(fp, meta) -> float:
    """Largest distance (EPSG:3857 metres) between the ground square's true corners and the estimate's."""
    from pyproj import Transformer

    s, q = 400.0, 60.0
    square_in_photo = np.array([(0, s - q), (0, q), (s, 0), (s, s)])  # see test_footprint.py
    to_3857 = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)
    truth = np.column_stack(to_3857.transform(*np.array(meta["ground_corners_lonlat"]).T))
    from engine.geo.homography import apply_h

    assert fp.crs == "EPSG:3857"
    return float(np.hypot(*(apply_h(np.array(fp.h), square_in_photo) - truth).T).max())


def test_footprints_read_the_ground_through_the_tiles(tmp_path: Path, tiles_2009) -> None:
    """localize --footprint on an index built from a tile service, and footprint --against an MBTiles: the
    ground comes from the tiles (the cache), at the zoom each view needs, and the photo is placed."""
    from engine.imagery.tile_views import TileStoreGround

    meta = json.loads((SAMPLE / "photo_2009_oblique.json").read_text())
    photo = SAMPLE / "photo_2009_oblique.jpg"
    area = SearchArea(bbox=lonlat_bounds(SAMPLE / "naip_2009.tif"))
    cache = tmp_path / "c.mbtiles"
    with TileServer(tiles_2009) as srv:
        build([srv.url], tmp_path / "idx", area, zooms="15-16", tile_cache=str(cache))
        n_requests = len(srv.log)
        fps = api.localize_footprints(
            [str(photo)],
            str(tmp_path / "idx"),
            out=str(tmp_path / "fp.gpkg"),
            top_k=2,
            params=CoregParams(matcher="sift"),
        )
        assert len(srv.log) == n_requests  # footprints read the cache, they download nothing
    (fp,) = fps
    assert fp.status == "localized", fp.reason
    assert photo_error_m(fp, meta) < 10.0

    # the zoom a view reads: the coarsest stored zoom at least as fine as the view's pixels
    ground = TileStoreGround(cache)
    assert ground.zooms == [15, 16]
    assert ground.zoom_for(ground.pixel_size(16) * 1.5) == 16 and ground.zoom_for(ground.pixel_size(15)) == 15
    assert ground.zoom_for(0.1) == 16  # finer than anything stored: the finest
    ground.close()

    mbt = write_mbtiles(tmp_path / "naip09.mbtiles", tiles_2009)
    lon, lat = np.array(meta["ground_corners_lonlat"]).T  # the photo's neighbourhood (fewer windows)
    box = f"{lon.min() - 0.005},{lat.min() - 0.003},{lon.max() + 0.005},{lat.max() + 0.003}"
    rc = cli_main(
        [
            "footprint",
            str(photo),
            "--against",
            str(mbt),
            "--zooms",
            "16",
            "--bbox",
            box,
            "--out",
            str(tmp_path / "fp2.gpkg"),
            "--top-k",
            "2",
            "--matcher",
            "sift",
            "--quiet",
        ]
    )
    assert rc == 0
    _, cols = read_layer(tmp_path / "fp2.gpkg")
    assert list(cols["status"]) == ["localized"]


# ----------------------------------------------------------------------------------- embed over tiles


def test_render_extent_and_embed_through_a_service(
    tmp_path: Path, server: TileServer, tiles, bbox, capsys
) -> None:
    import rasterio

    from engine.geo.xyz import tile_x, tile_y
    from engine.imagery.tile_source import render_tiles

    w, s, e, n = bbox
    area = SearchArea(bbox=(w - 0.01, s - 0.01, e + 0.01, n + 0.01))  # reaches into 404 tiles
    out = tmp_path / "extent.tif"
    info = render_tiles(server.url, out, zoom=15, area=area, tile_cache=tmp_path / "c.mbtiles")
    x0, y0, x1, y1 = info["tiles"]
    with rasterio.open(out) as ds:
        assert ds.crs.to_epsg() == 3857 and (ds.width, ds.height) == (
            (x1 - x0 + 1) * 256,
            (y1 - y0 + 1) * 256,
        )
        np.testing.assert_allclose(
            ds.bounds, (tile_x(x0, 15), tile_y(y1 + 1, 15), tile_x(x1 + 1, 15), tile_y(y0, 15))
        )
        key = next(k for k in sorted(tiles) if k[0] == 15)
        col, row = (key[1] - x0) * 256, (key[2] - y0) * 256
        window = rasterio.windows.Window(col, row, 256, 256)
        np.testing.assert_array_equal(np.moveaxis(ds.read(window=window), 0, -1), decode_tile(tiles[key])[0])
        mask = ds.dataset_mask()
        assert 0 < (mask > 0).mean() < 1  # 404 tiles are masked out
    with pytest.raises(InputError, match="ONE zoom"):
        render_tiles(server.url, tmp_path / "x.tif", zoom="14-15", area=area)
    before = len(server.log)
    rc = cli_main(
        [
            "embed",
            server.url,
            "--zooms",
            "15",
            "--bbox",
            f"{w},{s},{e},{n}",
            "--tile-cache",
            str(tmp_path / "c.mbtiles"),
            "--at",
            f"{(w + e) / 2},{(s + n) / 2}",
            "--crs",
            "EPSG:4326",
            "--quiet",
        ]
    )
    assert rc == 0 and len(server.log) == before  # the cache served every tile
    result = json.loads(capsys.readouterr().out)
    assert len(result["points"]) == 1 and result["dim"] > 0


def test_sources_sharing_one_cache_fetch_each_tile_once(
    tmp_path: Path, server: TileServer, tiles, bbox
) -> None:
    """Two sources of one service over overlapping areas, planned before either downloads: the second
    asks only for what the first did not fetch, and reads the first one's tiles (no black mosaics)."""
    cache = tmp_path / "c.mbtiles"
    w, s, e, n = bbox
    a = TileMosaicSource(server.url, zooms=[15], area=SearchArea(bbox=bbox), tile_cache=cache)
    b = TileMosaicSource(
        server.url, zooms=[15], area=SearchArea(bbox=(w, s, (w + e) / 2, n)), tile_cache=cache
    )
    a.plan(), b.plan()  # both read the (empty) cache
    a.prepare()
    b.prepare()
    assert max(Counter_(server.log).values()) == 1 and b.report.downloaded == 0
    for spec in b.specs():
        np.testing.assert_array_equal(b.mosaic(spec), a.mosaic(spec))
        assert b.mosaic(spec).any()
    a.close(), b.close()


def test_iss_photos_localize_as_well_through_a_tile_service(shared_data, tmp_path: Path) -> None:
    """Issue 14's end-to-end check on real imagery: the pooled ISS mosaics cut into their 128-px XYZ tiles,
    served on loopback, indexed through the service; the 23 photos with a true place in the pool are
    found as often as with the mosaic-folder index (bench/tile_service_iss.py, run as is)."""
    import re
    import subprocess
    import sys

    out = tmp_path / "result.txt"
    bench = Path(__file__).resolve().parents[1] / "bench" / "tile_service_iss.py"
    run = subprocess.run(
        [sys.executable, str(bench), "--work", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {}
    for line in out.read_text().splitlines():
        m = re.match(r"(mosaic folder|tile service)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", line)
        if m:
            rows[m.group(1)] = [float(v) for v in m.groups()[3:6]]
    folder, service = rows["mosaic folder"], rows["tile service"]
    # the same pixels (the pool's 128-px blocks served as lossless tiles): the same recall at 1, 5 and 10
    # (with the blocks resized to 256-px JPEG tiles, Lite1 ranked 2 of the 23 photos lower at R@1)
    assert service == folder, (service, folder)


# ------------------------------------------------------------------------------- missing tiles re-asked


def one_missing(tiles, z: int = 15):
    """A tile holding data in the middle of the sample (the server will first answer 404 for it), the
    tiles served without it, and a lon/lat bbox of the 3x3 tiles around it (``k=1``: of it alone)."""
    import math

    keys = sorted(k for k in tiles if k[0] == z)
    key = keys[len(keys) // 2]
    _, x, y = key

    def lon(i: int) -> float:
        return i / 2**z * 360.0 - 180.0

    def lat(j: int) -> float:
        return math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * j / 2**z))))

    def box(k: int) -> tuple[float, float, float, float]:
        eps = 1e-7  # inside the tile edges
        return (lon(x - k) + eps, lat(y + 1 + k) + eps, lon(x + 1 + k) - eps, lat(y - k) - eps)

    return key, {k: v for k, v in tiles.items() if k != key}, box


def missing_rows(cache: Path) -> list[tuple]:
    conn = sqlite3.connect(cache)
    rows = conn.execute(
        "SELECT zoom_level, tile_column, tile_row, reason, recorded FROM skyloc_missing"
    ).fetchall()
    conn.close()
    return rows


def test_missing_tile_is_asked_again_with_retry_missing(tmp_path: Path, tiles) -> None:
    import time

    key, served, box = one_missing(tiles)
    z, x, y = key
    area = SearchArea(bbox=box(1))
    cache = tmp_path / "c.mbtiles"
    common = dict(zooms=[z], span=1, tile_cache=str(cache))
    with TileServer(served) as srv:
        build([srv.url], tmp_path / "a", area, **common)
        path = srv.path(*key)
        assert srv.served(404)[path] == 1
        rows = {r[:3]: r[3:] for r in missing_rows(cache)}
        reason, recorded = rows[(z, x, 2**z - 1 - y)]  # TMS row
        assert reason == "HTTP 404" and time.time() - 600 < recorded <= time.time()
        n = len(srv.log)
        build([srv.url], tmp_path / "b", area, **common)
        assert len(srv.log) == n  # a recent record: not asked again
        (plan,) = api.plan_index([srv.url], area=area, **common)
        assert plan["tiles_known_missing"] == len(rows) and plan["tiles_to_download"] == 0
        (plan,) = api.plan_index([srv.url], area=area, retry_missing=True, **common)
        assert plan["tiles_known_missing"] == 0 and plan["tiles_to_download"] == len(rows)

        srv.tiles = {**served, key: tiles[key]}  # the service now has the tile
        w, s, e, n_ = box(1)
        rc = cli_main(
            ["index", srv.url, "--out", str(tmp_path / "c"), "--bbox", f"{w},{s},{e},{n_}", "--zooms", str(z)]
            + [
                "--span",
                "1",
                "--tile-cache",
                str(cache),
                "--input-size",
                str(INPUT),
                "--retry-missing",
                "--quiet",
            ]
        )
        assert rc == 0 and srv.served(200)[path] == 1
        assert len(srv.log) == n + len(rows)  # every missing record asked again, once
    assert (z, x, 2**z - 1 - y) not in {r[:3] for r in missing_rows(cache)}
    bounds = mosaic_bounds_3857(z, y, x, 1)
    before, after = open_index(tmp_path / "a").tiles, open_index(tmp_path / "c").tiles
    assert len(after) == len(before) + 1
    assert not any(np.allclose(b, bounds) for b in before.native_bounds)
    assert any(np.allclose(b, bounds) for b in after.native_bounds)  # the index gains the mosaic


def test_old_missing_records_are_asked_again(tmp_path: Path, tiles) -> None:
    key, served, box = one_missing(tiles)
    cache = tmp_path / "c.mbtiles"

    def fetch():
        src = TileMosaicSource(
            srv.url, zooms=[key[0]], area=SearchArea(bbox=box(0)), span=1, tile_cache=cache
        )
        src.prepare()
        src.close()
        return src.report

    def age(sql: str) -> None:
        conn = sqlite3.connect(cache)
        conn.execute(sql)
        conn.commit()
        conn.close()

    with TileServer(served) as srv:
        assert fetch().missing == 1 and len(srv.log) == 1
        assert fetch().known_missing == 1 and len(srv.log) == 1
        age("UPDATE skyloc_missing SET recorded = recorded - 31 * 86400")  # recorded 31 days ago
        r = fetch()
        assert r.missing == 1 and len(srv.log) == 2  # asked again (still missing: recorded anew)
        assert fetch().known_missing == 1 and len(srv.log) == 2
        age("ALTER TABLE skyloc_missing DROP COLUMN recorded")  # a cache of an older Skyloc
        assert fetch().missing == 1 and len(srv.log) == 3  # its records have no time: old
        ((*_, recorded),) = missing_rows(cache)
        assert recorded is not None


def test_an_area_across_the_antimeridian_plans_both_sides():
    """Fiji (lon 177E to 178W) at zoom 8: the mosaics at both ends of the grid, none wrapping round (the
    grid's last mosaic ends at 180 exactly), and the same mosaics as two areas, one each side, together."""
    z, n = 8, 2**8
    across = mosaics_in_area(SearchArea(bbox=(177.0, -19.0, -178.0, -16.0)), z, 4, 2)
    east = mosaics_in_area(SearchArea(bbox=(177.0, -19.0, 180.0, -16.0)), z, 4, 2)
    west = mosaics_in_area(SearchArea(bbox=(-180.0, -19.0, -178.0, -16.0)), z, 4, 2)
    assert across and sorted(across) == sorted(set(east) | set(west))
    cols = {c for _, _, c in across}
    assert max(cols) == n - 4 and min(cols) == 0  # both ends of the grid
    assert all(c + 4 <= n for c in cols)
    # a circle around a point near 180 crosses it as well
    near = mosaics_in_area(SearchArea(near=(-17.7, 179.9), radius_km=60), z, 4, 2)
    assert {c for _, _, c in near} >= {0, n - 4}
