"""Footprints over a tile service read the ground at the zoom the estimate needs, through the cache: a photo
finer than the indexed zoom has the service's finer tiles fetched on demand (once: a rerun asks nothing),
within a zoom limit and a tile budget; switched off, nothing finer is asked. A real loopback tile server
(tests/tile_server.py) serving the bundled NAIP 2009 sample cut at zooms 14-16, the real encoder, SIFT.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from imagery import SAMPLE
from test_tile_sources import photo_error_m
from tile_server import TileServer, cut_tiles, lonlat_bounds, write_mbtiles

from engine import api
from engine.cli import main as cli_main
from engine.footprint.coregister import CoregParams
from engine.geo.search_area import SearchArea
from engine.geo.xyz import tile_x, tile_y
from engine.imagery.tile_views import FinerTiles, TileStoreGround, finer_limit, service_max_zoom
from engine.retrieval.index_store import open_index
from engine.vector_io import read_layer

PHOTO = SAMPLE / "photo_2009_oblique.jpg"
META = json.loads((SAMPLE / "photo_2009_oblique.json").read_text())
SIFT = CoregParams(matcher="sift")


@pytest.fixture(scope="module")
def tiles():
    return cut_tiles(SAMPLE / "naip_2009.tif", [14, 15, 16])


@pytest.fixture
def server(tiles):
    with TileServer(tiles) as srv:
        yield srv


def by_zoom(log) -> Counter[int]:
    return Counter(int(re.match(r"/tiles/(\d+)/", p).group(1)) for p, _ in log)  # type: ignore[union-attr]


def cached_zooms(cache: Path) -> Counter[int]:
    conn = sqlite3.connect(cache)
    rows = conn.execute("SELECT zoom_level FROM tiles").fetchall()
    conn.close()
    return Counter(int(r[0]) for r in rows)


def photo_box() -> str:
    lon, lat = np.array(META["ground_corners_lonlat"]).T  # the photo's neighbourhood (fewer windows)
    return f"{lon.min() - 0.005},{lat.min() - 0.003},{lon.max() + 0.005},{lat.max() + 0.003}"


def test_index_at_a_coarse_zoom_fetches_the_finer_zoom_once(
    tmp_path: Path, server: TileServer, caplog
) -> None:
    cache = tmp_path / "c.mbtiles"
    area = SearchArea(bbox=lonlat_bounds(SAMPLE / "naip_2009.tif"))
    api.index(
        [server.url], str(tmp_path / "idx"), input_size=224, area=area, zooms="14", tile_cache=str(cache)
    )
    assert set(by_zoom(server.log)) == {14} and set(cached_zooms(cache)) == {14}

    def run(name: str, **kw):
        n = len(server.log)
        (fp,) = api.localize_footprints(
            [str(PHOTO)],
            str(tmp_path / "idx"),
            out=str(tmp_path / f"{name}.gpkg"),
            top_k=2,
            params=SIFT,
            **kw,
        )
        return fp, by_zoom(server.log[n:])

    coarse, asked = run("off", fetch_finer=False)
    assert asked == Counter()  # switched off: nothing asked
    assert coarse.status == "localized", coarse.reason

    caplog.set_level(logging.INFO, logger="skyloc.imagery")
    fine, asked = run("on")
    assert fine.status == "localized", fine.reason
    assert asked and min(asked) > 14 and max(asked) <= 17  # finer zooms only, within base + 3
    assert set(cached_zooms(cache)) - {14}  # ... kept in the cache
    assert any("fetched" in r.getMessage() for r in caplog.records)
    err_coarse, err_fine = photo_error_m(coarse, META), photo_error_m(fine, META)
    print(
        f"index z14: worst corner error {err_coarse:.2f} m stored zoom only, {err_fine:.2f} m fetching finer"
    )
    assert err_fine <= err_coarse + 0.5 and err_fine < 3.0, (err_coarse, err_fine)

    again, asked = run("again")
    assert asked == Counter()  # a rerun asks nothing: cached, or recorded missing
    np.testing.assert_allclose(again.h, fine.h, atol=1e-6)

    # an index whose manifest hides a secret of the URL: nothing is fetched, and the log says why
    idx = open_index(tmp_path / "idx")
    idx.manifest["sources"][0]["url"] = server.url + "?api_key=***"
    caplog.clear()
    n = len(server.log)
    (fp,) = api.localize_footprints(
        [str(PHOTO)], idx, out=str(tmp_path / "secret.gpkg"), top_k=2, params=SIFT, max_fetch_zoom=17
    )
    assert len(server.log) == n and fp.status == "localized"
    assert any("***" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_against_url_fetches_finer_within_its_budget(tmp_path: Path, server: TileServer, caplog) -> None:
    cache = tmp_path / "c.mbtiles"
    args = ["footprint", str(PHOTO), "--against", server.url, "--zooms", "14", "--bbox", photo_box()]
    args += ["--tile-cache", str(cache), "--top-k", "2", "--matcher", "sift", "--quiet"]
    assert cli_main([*args, "--out", str(tmp_path / "off.gpkg"), "--no-fetch-finer"]) == 0
    assert set(by_zoom(server.log)) == {14}  # the indexed zoom only
    _, cols = read_layer(tmp_path / "off.gpkg")
    assert list(cols["status"]) == ["localized"]

    # a budget of 4 tiles: a view needs more, so none is asked; the photo is still placed (or rejected),
    # never an error, and the log says so once
    caplog.set_level(logging.INFO, logger="skyloc.imagery")
    n = len(server.log)
    (fp,) = api.footprint(
        [str(PHOTO)],
        server.url,
        out=str(tmp_path / "budget.gpkg"),
        zooms="14",
        area=SearchArea(bbox=tuple(float(v) for v in photo_box().split(","))),
        tile_cache=str(cache),
        top_k=2,
        params=SIFT,
        fetch_budget=4,
    )
    assert len(server.log) == n and fp.status in ("localized", "rejected")
    said = [r.getMessage() for r in caplog.records if "budget" in r.getMessage()]
    assert len(said) == 1 and r"budget of 4 tiles" in said[0]

    n = len(server.log)
    assert cli_main([*args, "--out", str(tmp_path / "on.gpkg")]) == 0
    asked = by_zoom(server.log[n:])
    assert asked and min(asked) > 14
    _, cols = read_layer(tmp_path / "on.gpkg")
    assert list(cols["status"]) == ["localized"]
    n = len(server.log)
    assert cli_main([*args, "--out", str(tmp_path / "on2.gpkg")]) == 0
    assert len(server.log) == n  # nothing twice


def test_a_zoom_cached_in_part_is_filled_from_coarser_tiles(tmp_path: Path, tiles) -> None:
    """A view read at a zoom held over part of it only: the rest comes from the coarser zoom, no hole."""
    z16 = {k: v for k, v in tiles.items() if k[0] == 16}
    x0 = min(x for _, x, _ in z16)
    part = {k: v for k, v in z16.items() if k[1] <= x0 + 2}  # the western columns only
    store = write_mbtiles(tmp_path / "t.mbtiles", {**{k: v for k, v in tiles.items() if k[0] == 14}, **part})
    ground = TileStoreGround(store)
    assert ground.zooms == [14, 16]
    y = sorted(y for _, _, y in part)[len(part) // 2]
    px = ground.pixel_size(16)
    left, top = tile_x(x0, 16), tile_y(y, 16)
    to_crs = np.array([[px, 0.0, left], [0.0, -px, top], [0.0, 0.0, 1.0]])
    view = ground.view(to_crs, (256, 256 * 8))  # 8 tiles wide: 3 at zoom 16, the rest from zoom 14
    cols_valid = view.valid.any(axis=0)
    assert cols_valid[: 3 * 256].all() and cols_valid[4 * 256 : 6 * 256].all()
    ground.close()

    # files are never fetched from; their reason is logged once when a view needs finer
    ground = TileStoreGround(store, finer=FinerTiles(base=16, max_zoom=16, reason="a file"))
    assert ground._finer_zoom(px / 4, ground.bounds) is None and ground.finer.said
    ground.close()


def test_zoom_limits() -> None:
    assert finer_limit(13, service_max_zoom(object())) == 16
    assert finer_limit(18, service_max_zoom(object())) == 19  # never past 19 for an XYZ template
    assert finer_limit(13, service_max_zoom(object(), "type=xyz&url=https://h/{z}/{x}/{y}&zmax=14")) == 14
    assert finer_limit(13, 20, max_fetch_zoom=15) == 15

    class Wmts:
        zooms = [0, 1, 2, 15]

    assert finer_limit(14, service_max_zoom(Wmts())) == 15
