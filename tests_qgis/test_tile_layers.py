"""Raster layers of every provider as index sources (issue 14, plugin side): XYZ, MBTiles/GeoPackage, WMS."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest
from conftest import SAMPLE
from qgis.core import QgsCoordinateReferenceSystem, QgsRasterLayer, QgsRectangle
from qgis.PyQt.QtCore import Qt

XYZ = "type=xyz&url=https://tiles.example.org/s2/%7Bz%7D/%7Bx%7D/%7By%7D.jpg&zmax=14&zmin=2"


def test_xyz_layer_gives_its_template_zooms_and_credit(skyloc_pkg):
    from skyloc.tile_layers import layer_source

    layer = QgsRasterLayer(XYZ, "Sentinel-2 cloudless", "wms")
    assert layer.isValid()
    layer.setAttribution("Sentinel-2 cloudless by EOX")
    src = layer_source(layer)
    assert src.kind == "xyz" and src.is_service
    assert src.source == "https://tiles.example.org/s2/{z}/{x}/{y}.jpg"  # decoded, as the engine wants it
    assert (src.zmin, src.zmax) == (2, 14)
    assert src.attribution == "Sentinel-2 cloudless by EOX"


def test_file_layers_are_files_and_tile_databases(skyloc_pkg, tmp_path):
    from skyloc.tile_layers import layer_source

    tif = layer_source(QgsRasterLayer(str(SAMPLE / "naip_2018.tif"), "naip"))
    assert tif.kind == "file" and tif.source == str(SAMPLE / "naip_2018.tif")
    # an MBTiles file as GDAL opens it (one 256-px PNG tile at z0 is enough for a valid layer)
    path = tmp_path / "one.mbtiles"
    _one_tile_mbtiles(path)
    layer = QgsRasterLayer(str(path), "one")
    assert layer.isValid(), layer.error().summary()
    src = layer_source(layer)
    assert src.kind == "tiles" and src.source == str(path) and not src.is_service


def test_layers_that_cannot_be_indexed_say_what_to_do(skyloc_pkg):
    from skyloc.tile_layers import layer_source

    wms = QgsRasterLayer(
        "crs=EPSG:4326&format=image/png&layers=a&styles=&url=https://wms.example.org/wms", "a wms", "wms"
    )
    with pytest.raises(ValueError, match="WMS layer.*XYZ") as err:
        layer_source(wms)
    assert "GeoTIFF" in str(err.value)
    local = QgsRasterLayer(
        "type=xyz&url=file:///tmp/tiles/%7Bz%7D/%7Bx%7D/%7By%7D.png&zmax=5&zmin=0", "local", "wms"
    )
    with pytest.raises(ValueError, match="not an http"):
        layer_source(local)


def test_extent_lonlat_from_a_projected_map(skyloc_pkg):
    from skyloc.tile_layers import extent_lonlat

    utm = QgsCoordinateReferenceSystem("EPSG:26914")
    rect = QgsRectangle(500000, 5200000, 510000, 5210000)  # 10 km square in North Dakota
    lon0, lat0, lon1, lat1 = extent_lonlat(rect, utm)
    assert -99.01 < lon0 < -98.99 < lon1 < -98.85 and 46.9 < lat0 < lat1 < 47.1
    assert (lat1 - lat0) * 111.2 == pytest.approx(9.0, abs=1.2)
    world = extent_lonlat(QgsRectangle(-2e7, -3e7, 2e7, 3e7), QgsCoordinateReferenceSystem("EPSG:3857"))
    assert world[1] == pytest.approx(-85.0511, abs=1e-3) and world[3] == pytest.approx(85.0511, abs=1e-3)


def test_parse_zooms(skyloc_pkg):
    from skyloc.tile_layers import parse_zooms

    assert parse_zooms("9-11") == [9, 10, 11]
    assert parse_zooms("12, 10") == [10, 12]
    for bad in ("", "a", "11-9", "23"):
        with pytest.raises(ValueError, match="zoom"):
            parse_zooms(bad)


def _one_tile_mbtiles(path) -> None:
    from qgis.PyQt.QtCore import QBuffer, QByteArray, QIODevice
    from qgis.PyQt.QtGui import QColor, QImage

    img = QImage(256, 256, QImage.Format.Format_RGB32)
    img.fill(QColor(40, 120, 60))
    data = QByteArray()
    buf = QBuffer(data)
    buf.open(QIODevice.OpenModeFlag.WriteOnly)
    img.save(buf, "PNG")
    con = sqlite3.connect(path)
    con.executescript(
        "CREATE TABLE metadata (name text, value text);"
        "CREATE TABLE tiles (zoom_level integer, tile_column integer, tile_row integer, tile_data blob);"
    )
    lat = math.degrees(math.atan(math.sinh(math.pi)))
    meta = {
        "name": "one",
        "format": "png",
        "minzoom": "0",
        "maxzoom": "0",
        "bounds": f"-180,-{lat},180,{lat}",
    }
    con.executemany("INSERT INTO metadata VALUES (?, ?)", meta.items())
    con.execute("INSERT INTO tiles VALUES (0, 0, 0, ?)", (bytes(data),))
    con.commit()
    con.close()


def test_mbtiles_written_by_qgis_is_indexed_on_the_xyz_grid(qgis_processing, clean_project, tmp_path):
    """QGIS's own "Generate XYZ tiles (MBTiles)" from the sample raster, indexed by the engine (its CLI, as
    users run it): every mosaic of the index lies exactly on the XYZ grid of its zoom, its footprint is the
    XYZ formula's, and the mosaics are exactly the 4x4 squares of the global stride-2 grid that hold at
    least half of their tiles in the file (engine/imagery/tile_source.py)."""
    import json
    import subprocess

    import processing
    from conftest import ENGINE
    from qgis.core import QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsVectorLayer

    if not ENGINE.exists():
        pytest.skip(f"no engine at {ENGINE}: run `make venv` first")
    raster = QgsRasterLayer(str(SAMPLE / "naip_2018.tif"), "naip_2018")
    clean_project.addMapLayer(raster)
    merc = QgsCoordinateReferenceSystem("EPSG:3857")
    clean_project.setCrs(merc)  # the algorithm reads the extent in the project's CRS
    extent = QgsCoordinateTransform(raster.crs(), merc, clean_project).transformBoundingBox(raster.extent())
    out = tmp_path / "naip.mbtiles"
    processing.run(
        "qgis:tilesxyzmbtiles",
        {
            "EXTENT": f"{extent.xMinimum()},{extent.xMaximum()},{extent.yMinimum()},{extent.yMaximum()} [EPSG:3857]",
            "ZOOM_MIN": 13,
            "ZOOM_MAX": 14,
            "TILE_FORMAT": 1,  # JPG
            "OUTPUT_FILE": str(out),
        },
    )
    con = sqlite3.connect(out)
    stored = {
        (z, x, (1 << z) - 1 - y)
        for z, x, y in con.execute("SELECT zoom_level, tile_column, tile_row FROM tiles")
    }
    con.close()
    assert {z for z, _, _ in stored} == {13, 14}

    index = tmp_path / "index"
    run = subprocess.run(
        [str(ENGINE), "index", str(out), "--out", str(index), "--quiet"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["counts"]["tiles"] > 0
    tiles = QgsVectorLayer(f"{index / 'tiles.gpkg'}|layername=tiles", "tiles", "ogr")
    assert tiles.isValid() and tiles.featureCount() == manifest["counts"]["tiles"]
    half = 20037508.342789244
    indexed: set[tuple[int, int, int]] = set()
    for f in tiles.getFeatures():
        z = f["zoom"]
        size = 2 * half / (1 << z)
        col, row = (f["minx"] + half) / size, (half - f["maxy"]) / size
        span_x, span_y = (f["maxx"] - f["minx"]) / size, (f["maxy"] - f["miny"]) / size
        for v in (col, row, span_x, span_y):
            assert abs(v - round(v)) < 1e-6, (z, col, row, span_x, span_y)  # on the grid, whole tiles
        inside = {
            (z, round(col) + i, round(row) + j) for i in range(round(span_x)) for j in range(round(span_y))
        }
        assert round(span_x) == round(span_y) == 4
        assert len(inside & stored) >= 8, f"mosaic z{z} row {row} col {col} holds too few tiles QGIS wrote"
        indexed.add((z, round(row), round(col)))
        # its footprint (EPSG:4326) is the XYZ formula's box of those tiles
        lon0 = f["minx"] / half * 180
        lat1 = math.degrees(math.atan(math.sinh(f["maxy"] / half * math.pi)))
        box = f.geometry().boundingBox()
        assert box.xMinimum() == pytest.approx(lon0, abs=1e-9) and box.yMaximum() == pytest.approx(
            lat1, abs=1e-9
        )
    expected = set()
    for z, x, y in stored:
        for row in (y - y % 2, y - y % 2 - 2):
            for col in (x - x % 2, x - x % 2 - 2):
                block = {(z, col + i, row + j) for i in range(4) for j in range(4)}
                if len(block & stored) >= 8:
                    expected.add((z, row, col))
    assert indexed == expected and expected


@pytest.fixture
def tile_server(qgis_processing, tmp_path):
    """A real z/x/y PNG folder written by QGIS ("Generate XYZ tiles (Directory)") from the sample raster,
    served over HTTP on loopback; ``server.paths`` lists the engine's requests (its User-Agent names
    Skyloc; QGIS drawing the layer on the canvas asks too)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    import processing
    from qgis.core import QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsProject

    project = QgsProject.instance()
    raster = QgsRasterLayer(str(SAMPLE / "naip_2018.tif"), "naip_2018")
    project.addMapLayer(raster)
    merc = QgsCoordinateReferenceSystem("EPSG:3857")
    project.setCrs(merc)
    extent = QgsCoordinateTransform(raster.crs(), merc, project).transformBoundingBox(raster.extent())
    folder = tmp_path / "xyz"
    processing.run(
        "qgis:tilesxyzdirectory",
        {
            "EXTENT": f"{extent.xMinimum()},{extent.xMaximum()},{extent.yMinimum()},{extent.yMaximum()}",
            "ZOOM_MIN": 14,
            "ZOOM_MAX": 14,
            "TILE_FORMAT": 0,  # PNG
            "OUTPUT_DIRECTORY": str(folder),
        },
    )
    project.removeMapLayer(raster.id())
    paths: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.headers.get("User-Agent", "").startswith("Skyloc/"):
                paths.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.paths = paths
    server.extent = extent
    yield server
    server.shutdown()
    server.server_close()


def test_dock_indexes_an_xyz_layer_over_the_map_extent(
    plugin, engine_settings, tile_server, qgis_canvas, clean_project
):
    """The analyst's way: an XYZ layer on the map, zooms typed, Build index: the plan is shown in words
    before any tile is fetched, the index is built from the service with its credit line, and a second
    build fetches nothing (the engine's cache)."""
    import json

    from conftest import wait_for
    from qgis.core import QgsCoordinateReferenceSystem

    port = tile_server.server_address[1]
    layer = QgsRasterLayer(
        f"type=xyz&url=http://127.0.0.1:{port}/%7Bz%7D/%7Bx%7D/%7By%7D.png&zmax=14&zmin=10", "naip xyz", "wms"
    )
    assert layer.isValid()
    layer.setAttribution("NAIP (USDA), public domain")
    clean_project.addMapLayer(layer)
    qgis_canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    qgis_canvas.setExtent(tile_server.extent)
    dock = plugin.dock.localize
    dock.refresh_rasters()
    dock.rasters.deselectAllOptions()
    dock.rasters.setItemCheckState(dock.rasters.findData(layer.id()), Qt.CheckState.Checked)
    dock.mosaics.setFilePath("")
    asked: list[str] = []
    dock.confirm_download = lambda text: asked.append(text) or False
    dock.zooms.setText("")
    assert dock.build_index() is None  # no zooms: said, nothing asked
    dock.zooms.setText("15")
    assert dock.build_index() is None and not asked  # the layer serves 10-14
    dock.zooms.setText("14")
    assert dock.build_index() is None  # declined after seeing the plan
    assert len(asked) == 1 and "naip xyz" in asked[0] and "to download" in asked[0] and "MB" in asked[0]
    assert tile_server.paths == []  # a plan downloads nothing

    dock.confirm_download = lambda text: asked.append(text) or True
    task = wait_for(dock.build_index(), timeout=600)
    assert task.ok, task.error
    manifest = json.loads((Path(task.out) / "manifest.json").read_text())
    service = manifest["sources"][0]
    assert service["kind"] == "tile_service" and service["zooms"] == [14]
    assert service["attribution"] == "NAIP (USDA), public domain"
    assert manifest["counts"]["tiles"] > 0
    fetched = list(tile_server.paths)
    assert fetched and len(fetched) == len(set(fetched))  # each tile once
    tiles = dock.index.filePath()
    assert tiles == task.out
    tiles_layer = dock.add_tiles()
    assert tiles_layer.attribution() == "NAIP (USDA), public domain"

    task = wait_for(dock.build_index(), timeout=600)  # again: everything from the cache
    assert task.ok, task.error
    assert tile_server.paths == fetched
    assert "0 to download" in asked[-1] or " 0 to download" in asked[-1]
