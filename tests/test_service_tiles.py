"""The HTTP service takes tile sources where the CLI does: ``POST /footprint`` against a tile URL template,
``POST /heatmap`` and ``POST /embed`` on a raster of tiles (one zoom over a bbox). A real engine on
loopback (``skyloc serve``), a real tile server on loopback cutting the bundled sample, the real encoder.
"""

from __future__ import annotations

import math
import os
import shutil
import sys

import numpy as np
import pytest
from imagery import SAMPLE
from tile_server import TileServer, cut_tiles, write_mbtiles

from engine.client import ServiceError, SkylocClient, launch

SERVE = [sys.executable, "-m", "engine.cli", "serve"]
PHOTO = SAMPLE / "photo_2009_oblique.jpg"


def lon_of(x: int, z: int) -> float:
    return x / 2**z * 360.0 - 180.0


def lat_of(y: int, z: int) -> float:
    return math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * y / 2**z))))


def code(fn, says: str = "") -> tuple[int | None, str]:
    with pytest.raises(ServiceError) as info:
        fn()
    assert says in str(info.value), info.value
    return info.value.status, info.value.code


@pytest.fixture(scope="module")
def tiles_2009():
    return cut_tiles(SAMPLE / "naip_2009.tif", [16])


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiles_2009):
    """One engine (tile URLs allowed) with a root holding the photo, a GeoTIFF and an MBTiles; and one
    outside folder holding another MBTiles."""
    base = tmp_path_factory.mktemp("service_tiles")
    root, outside = base / "root", base / "outside"
    root.mkdir(), outside.mkdir()
    shutil.copy(PHOTO, root / PHOTO.name)
    shutil.copy(SAMPLE / "naip_2009.tif", root / "naip.tif")
    write_mbtiles(outside / "naip.mbtiles", tiles_2009)
    (base / "tmp").mkdir()  # the engine's temporary folder: rendered extents must not stay there
    env = {**os.environ, "SKYLOC_TILE_CACHE": str(base / "engine_cache"), "TMPDIR": str(base / "tmp")}
    eng = launch(SERVE, roots=[str(root)], env=env)
    try:
        with TileServer(tiles_2009) as srv, SkylocClient(eng.url, token_file=eng.token_file) as c:
            yield c, srv, root, outside
    finally:
        assert eng.stop() == 0


def photo_box() -> list[float]:
    """The photo's neighbourhood (as test_tile_sources' footprint test: few windows)."""
    import json

    meta = json.loads((SAMPLE / "photo_2009_oblique.json").read_text())
    lon, lat = np.array(meta["ground_corners_lonlat"]).T
    return [lon.min() - 0.005, lat.min() - 0.003, lon.max() + 0.005, lat.max() + 0.003]


def tile_box(tiles, z: int) -> tuple[list[float], tuple[int, int, int, int]]:
    """A bbox (lon/lat, inset a hair) of exactly 2x2 tiles holding data at zoom ``z``, and those tiles."""
    xs = sorted({x for (zz, x, _) in tiles if zz == z})
    ys = sorted({y for (zz, _, y) in tiles if zz == z})
    x0, y0 = xs[len(xs) // 2 - 1], ys[len(ys) // 2 - 1]
    eps = 1e-7
    box = [lon_of(x0, z) + eps, lat_of(y0 + 2, z) + eps, lon_of(x0 + 2, z) - eps, lat_of(y0, z) - eps]
    return box, (x0, y0, x0 + 1, y0 + 1)


def test_footprint_against_a_tile_url(engine) -> None:
    from engine.vector_io import read_layer

    c, srv, root, _ = engine
    job = c.wait(
        c.footprint(
            [PHOTO.name],
            "fp.gpkg",
            against=srv.url,
            zooms=[16],
            bbox=photo_box(),
            top_k=2,
            matcher="sift",
            tile_cache="tiles.mbtiles",
        )
    )
    assert job.state == "succeeded", job
    assert job.summary["localized"] == 1, job.summary
    assert job.params["against"] == srv.url
    _, cols = read_layer(root / "fp.gpkg")
    assert list(cols["status"]) == ["localized"]
    assert (root / "tiles.mbtiles").is_file() and srv.log  # fetched through the named cache


def test_heatmap_and_embed_on_a_tile_url(engine, tiles_2009) -> None:
    import rasterio
    from pyproj import Transformer

    from engine.geo.xyz import tile_x, tile_y

    c, srv, root, _ = engine
    box, (x0, y0, x1, y1) = tile_box(tiles_2009, 16)
    centre = [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]
    job = c.wait(c.heatmap(srv.url, "heat.tif", at=centre, crs="EPSG:4326", zoom=16, bbox=box))
    assert job.state == "succeeded", job
    assert job.params["raster"] == srv.url
    with rasterio.open(root / "heat.tif") as ds:
        assert ds.crs.to_epsg() == 3857
        w, s = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(box[0], box[1])
        e, n = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(box[2], box[3])
        tol = 0.5  # metres: the bbox is inset a hair from the tile edges the extent is made of
        b = ds.bounds
        assert w - tol <= b.left < b.right <= e + tol and s - tol <= b.bottom < b.top <= n + tol
        np.testing.assert_allclose(
            b, (tile_x(x0, 16), tile_y(y1 + 1, 16), tile_x(x1 + 1, 16), tile_y(y0, 16)), atol=1.0
        )
        assert np.isfinite(ds.read(1, masked=True).compressed()).any()
    assert not list((root.parent / "tmp").glob("skyloc-tiles-*"))  # the rendered extent is removed

    before = len(srv.log)
    result = c.embed(srv.url, [centre], crs="EPSG:4326", zoom=16, bbox=box)
    assert len(srv.log) == before  # the engine's cache served every tile
    (point,) = result["points"]
    assert result["raster"] == srv.url and result["dim"] > 0 and point["vector"] is not None
    assert len(point["vector"]) == result["dim"]


def test_tile_sources_are_checked_before_a_job(engine) -> None:
    c, srv, root, outside = engine
    fp = {"photos": [PHOTO.name], "out": "x.gpkg"}
    box = photo_box()
    # a template of another scheme, a .mbtiles outside the roots, tile options with a GeoTIFF: refused
    for bad in ("ftp://h/{z}/{x}/{y}.png", "file:///tmp/{z}/{x}/{y}.png"):
        assert code(lambda bad=bad: c.footprint(**fp, against=bad, zooms=[16], bbox=box)) == (
            422,
            "bad_input",
        )
        assert code(lambda bad=bad: c.heatmap(bad, "h.tif", at=[0, 0], zoom=16, bbox=box))[0] == 422
    assert code(lambda: c.footprint(**fp, against=str(outside / "naip.mbtiles")))[0] == 403
    assert code(lambda: c.embed(str(outside / "naip.mbtiles"), [[0, 0]], zoom=16))[0] == 403
    assert code(lambda: c.footprint(**fp, against="naip.tif", zooms=[16]), "zooms: these apply") == (
        422,
        "bad_input",
    )
    assert code(lambda: c.footprint(**fp, against="naip.tif", bbox=box)) == (422, "bad_input")
    assert code(lambda: c.heatmap("naip.tif", "h.tif", at=[0, 0], zoom=16), "zoom: these apply") == (
        422,
        "bad_input",
    )
    assert code(lambda: c.embed("naip.tif", [[0, 0]], bbox=box)) == (422, "bad_input")
    # a URL raster needs its zoom and an area; the cache must be an .mbtiles the service may write
    assert code(lambda: c.heatmap(srv.url, "h.tif", at=[0, 0], bbox=box), "give zoom") == (422, "bad_input")
    assert code(lambda: c.embed(srv.url, [[0, 0]], zoom=16)) == (422, "bad_input")
    assert code(lambda: c.footprint(**fp, against=srv.url, bbox=box)) == (422, "bad_input")
    cache_out = str(outside / "c.mbtiles")
    assert (
        code(lambda: c.footprint(**fp, against=srv.url, zooms=[16], bbox=box, tile_cache=cache_out))[0] == 403
    )
    assert code(lambda: c.embed(srv.url, [[0, 0]], zoom=16, bbox=box, tile_cache="c.txt")) == (
        422,
        "bad_input",
    )
    assert not (root / "x.gpkg").exists() and not (root / "h.tif").exists()

    # an engine started with --no-tile-urls refuses a URL against
    eng = launch(SERVE, roots=[str(root)], extra_args=["--no-tile-urls"])
    try:
        with SkylocClient(eng.url, token_file=eng.token_file) as c2:
            assert code(lambda: c2.footprint(**fp, against=srv.url, zooms=[16], bbox=box)) == (
                422,
                "bad_input",
            )
            assert code(lambda: c2.heatmap(srv.url, "h.tif", at=[0, 0], zoom=16, bbox=box))[0] == 422
    finally:
        assert eng.stop() == 0


def test_mbtiles_inside_the_roots_is_read(engine, tiles_2009) -> None:
    c, _, root, _ = engine
    write_mbtiles(root / "in.mbtiles", tiles_2009)
    box, _ = tile_box(tiles_2009, 16)
    centre = [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]
    result = c.embed("in.mbtiles", [centre], crs="EPSG:4326", zoom=16, bbox=box)
    assert result["raster"] == str(root / "in.mbtiles") and result["points"][0]["vector"] is not None
