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
    server = _xyz_server(SAMPLE / "naip_2018.tif", 14, tmp_path / "xyz")
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def tile_server_2009(qgis_processing, tmp_path):
    """As ``tile_server``, from the raster the sample photo was cut from (naip_2009), at zoom 15."""
    server = _xyz_server(SAMPLE / "naip_2009.tif", 15, tmp_path / "xyz2009")
    yield server
    server.shutdown()
    server.server_close()


def _xyz_server(raster_path: Path, zoom: int, folder: Path):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    import processing
    from qgis.core import QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsProject

    project = QgsProject.instance()
    raster = QgsRasterLayer(str(raster_path), raster_path.stem)
    project.addMapLayer(raster)
    merc = QgsCoordinateReferenceSystem("EPSG:3857")
    project.setCrs(merc)
    extent = QgsCoordinateTransform(raster.crs(), merc, project).transformBoundingBox(raster.extent())
    processing.run(
        "qgis:tilesxyzdirectory",
        {
            "EXTENT": f"{extent.xMinimum()},{extent.xMaximum()},{extent.yMinimum()},{extent.yMaximum()}",
            "ZOOM_MIN": zoom,
            "ZOOM_MAX": zoom,
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
    return server


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

    # a drawn (or typed) area instead of the map extent: the plan covers that box only
    from qgis.core import QgsRectangle

    e = tile_server.extent
    quarter = QgsRectangle(e.xMinimum(), e.yMinimum(), e.center().x(), e.center().y())
    dock.tile_area.setOutputExtentFromUser(quarter, QgsCoordinateReferenceSystem("EPSG:3857"))
    dock.confirm_download = lambda text: asked.append(text) or False
    assert dock.build_index() is None
    assert "Index the chosen area (lon " in asked[-1], asked[-1]
    whole = int(asked[-2].split(" mosaics at zooms")[0].rsplit(" ", 1)[-1])
    part = int(asked[-1].split(" mosaics at zooms")[0].rsplit(" ", 1)[-1])
    assert 0 < part < whole, asked[-2:]
    dock.tile_area.clear()  # empty again: the map extent
    assert dock.build_index() is None and "Index the current map extent (lon " in asked[-1]
    # said by a grey placeholder, not by a null text that QGIS draws selected (as if something were chosen)
    from qgis.PyQt.QtWidgets import QLineEdit

    shown = dock.tile_area.findChild(QLineEdit, "mCondensedLineEdit")
    assert shown.displayText() == "" and shown.placeholderText() == "map extent"
    assert not shown.hasSelectedText()


def _wmts_capabilities(base: str, zooms=range(0, 19)) -> str:
    """WMTS 1.0 capabilities: one layer "naip" in GoogleMapsCompatible, RESTful tiles ``base/z/x/y.png``."""
    matrices = "".join(
        f"<TileMatrix><ows:Identifier>{z}</ows:Identifier><ScaleDenominator>{559082264.0287178 / 2**z!r}"
        "</ScaleDenominator><TopLeftCorner>-20037508.3427892 20037508.3427892</TopLeftCorner>"
        "<TileWidth>256</TileWidth><TileHeight>256</TileHeight>"
        f"<MatrixWidth>{2**z}</MatrixWidth><MatrixHeight>{2**z}</MatrixHeight></TileMatrix>"
        for z in zooms
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<Capabilities xmlns="http://www.opengis.net/wmts/1.0" xmlns:ows="http://www.opengis.net/ows/1.1" '
        'xmlns:xlink="http://www.w3.org/1999/xlink" version="1.0.0">'
        "<ows:ServiceIdentification><ows:Title>naip</ows:Title></ows:ServiceIdentification><Contents>"
        "<Layer><ows:Title>NAIP</ows:Title><ows:Identifier>naip</ows:Identifier>"
        "<ows:WGS84BoundingBox><ows:LowerCorner>-180 -85</ows:LowerCorner>"
        "<ows:UpperCorner>180 85</ows:UpperCorner></ows:WGS84BoundingBox>"
        '<Style isDefault="true"><ows:Identifier>default</ows:Identifier></Style><Format>image/png</Format>'
        "<TileMatrixSetLink><TileMatrixSet>GoogleMapsCompatible</TileMatrixSet></TileMatrixSetLink>"
        f'<ResourceURL format="image/png" resourceType="tile" template="{base}/{{TileMatrix}}/{{TileCol}}/'
        '{TileRow}.png"/></Layer>'
        "<TileMatrixSet><ows:Identifier>GoogleMapsCompatible</ows:Identifier>"
        f"<ows:SupportedCRS>urn:ogc:def:crs:EPSG::3857</ows:SupportedCRS>{matrices}</TileMatrixSet>"
        "</Contents></Capabilities>"
    )


def _wmts_layer(base: str, name: str) -> QgsRasterLayer:
    source = (
        "contextualWMSLegend=0&crs=EPSG:3857&dpiMode=7&format=image/png&layers=naip&styles=default&"
        f"tileMatrixSet=GoogleMapsCompatible&url={base}/WMTSCapabilities.xml"
    )
    return QgsRasterLayer(source, name, "wms")


def test_wmts_layer_becomes_an_engine_source_and_plain_wms_is_refused(skyloc_pkg, tmp_path):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from skyloc.tile_layers import layer_source

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        (tmp_path / "WMTSCapabilities.xml").write_text(_wmts_capabilities(base))
        layer = _wmts_layer(base, "naip wmts")
        assert layer.isValid(), layer.error().summary()  # QGIS read the loopback capabilities
        layer.setAttribution("NAIP (USDA)")
        src = layer_source(layer)
        assert src.kind == "wmts" and src.is_service and src.attribution == "NAIP (USDA)"
        assert src.source == (
            f"wmts:{base}/WMTSCapabilities.xml#layer=naip&style=default&tileMatrixSet=GoogleMapsCompatible"
            "&format=image/png"
        )
    finally:
        server.shutdown()
        server.server_close()
    wms = QgsRasterLayer(
        "crs=EPSG:3857&format=image/png&layers=a&styles=&url=http://127.0.0.1:9/wms", "plain wms", "wms"
    )
    with pytest.raises(ValueError, match="is a WMS layer.*WMTS layer or an XYZ layer.*GeoTIFF"):
        layer_source(wms)
    login = _wmts_layer("http://127.0.0.1:9", "with login")
    login = QgsRasterLayer(login.source() + "&username=me&password=secret", "with login", "wms")
    with pytest.raises(ValueError, match="needs a login"):
        layer_source(login)


def test_dock_indexes_a_wmts_layer_over_the_map_extent(
    plugin, engine_settings, tile_server, qgis_canvas, clean_project
):
    """A WMTS layer (GoogleMapsCompatible, RESTful tiles) goes the XYZ layer's way: zooms typed, the plan
    in words before any tile is fetched, the index built through the engine's WMTS reading; a zoom the
    matrix set does not offer is refused by the engine's plan, before any download."""
    import json

    from conftest import wait_for
    from qgis.core import QgsCoordinateReferenceSystem

    base = f"http://127.0.0.1:{tile_server.server_address[1]}"
    folder = Path(tile_server.RequestHandlerClass.keywords["directory"])
    (folder / "WMTSCapabilities.xml").write_text(_wmts_capabilities(base, zooms=range(0, 15)))
    layer = _wmts_layer(base, "naip wmts")
    assert layer.isValid(), layer.error().summary()
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
    dock.zooms.setText("15")
    assert dock.build_index() is None and not asked  # the matrix set stops at 14: the engine said so
    dock.zooms.setText("14")
    assert dock.build_index() is None  # declined after seeing the plan
    assert len(asked) == 1 and "naip wmts" in asked[0] and "to download" in asked[0]
    assert tile_server.paths == ["/WMTSCapabilities.xml"]  # a plan reads the capabilities (once), no tile

    dock.confirm_download = lambda text: asked.append(text) or True
    task = wait_for(dock.build_index(), timeout=600)
    assert task.ok, task.error
    manifest = json.loads((Path(task.out) / "manifest.json").read_text())
    service = manifest["sources"][0]
    assert service["kind"] == "tile_service" and service["zooms"] == [14]
    assert service["url"].startswith(f"wmts:{base}/WMTSCapabilities.xml#layer=naip")
    assert service["attribution"] == "NAIP (USDA), public domain"
    assert manifest["counts"]["tiles"] > 0
    fetched = [p for p in tile_server.paths if p.endswith(".png")]
    assert fetched and len(fetched) == len(set(fetched)) and all(p.startswith("/14/") for p in fetched)


# ------------------------------------------------ reading tile layers: match, heatmap, click (issue 14)


def test_map_zoom_is_the_web_mercator_zoom_of_the_map_scale(skyloc_pkg, tmp_path):
    from qgis.core import QgsMapSettings
    from qgis.PyQt.QtCore import QSize
    from skyloc.tile_layers import ZOOM0_RES, canvas_zoom, layer_source, tile_file_zooms

    settings = QgsMapSettings()
    settings.setOutputSize(QSize(800, 600))
    settings.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    for z in (3, 12, 15):
        res = ZOOM0_RES / 2**z * 1.2  # 20% coarser than zoom z's pixel: still z
        settings.setExtent(QgsRectangle(-1e5, 5.9e6, -1e5 + 800 * res, 5.9e6 + 600 * res))
        assert canvas_zoom(settings) == z
        assert canvas_zoom(settings, zmin=z + 2) == z + 2 and canvas_zoom(settings, zmax=z - 1) == z - 1
    # a map in UTM: its metres per pixel as EPSG:3857 has them (1/cos(lat) larger at 47 N)
    settings.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:26914"))
    res = ZOOM0_RES / 2**14 * 0.68  # ground metres of a zoom-14 pixel at 47 N
    settings.setExtent(QgsRectangle(488000, 5206000, 488000 + 800 * res, 5206000 + 600 * res))
    assert canvas_zoom(settings) == 14
    # an MBTiles file says which zooms it holds
    path = tmp_path / "one.mbtiles"
    _one_tile_mbtiles(path)
    assert tile_file_zooms(str(path)) == (0, 0)
    assert (
        layer_source(QgsRasterLayer(str(path), "one")).zmin,
        tile_file_zooms(str(tmp_path / "no.gpkg")),
    ) == (
        0,
        (None, None),
    )


def _xyz_layer(server, name: str, zmin: int, zmax: int) -> QgsRasterLayer:
    port = server.server_address[1]
    layer = QgsRasterLayer(
        f"type=xyz&url=http://127.0.0.1:{port}/%7Bz%7D/%7Bx%7D/%7By%7D.png&zmax={zmax}&zmin={zmin}",
        name,
        "wms",
    )
    assert layer.isValid()
    return layer


def test_dock_matches_a_photo_on_an_xyz_layer(
    plugin, engine_settings, tile_server_2009, qgis_canvas, clean_project, photo_folder
):
    """'Match on a raster layer' with an XYZ layer: the zoom of the map (within the layer's zooms), the
    map extent; the engine's plan is shown before anything is fetched (declined: nothing fetched); the
    photo is placed from tiles of that zoom only; a second run fetches nothing and asks nothing."""
    from conftest import PHOTO, wait_for
    from skyloc.tile_layers import layer_source

    server = tile_server_2009
    layer = _xyz_layer(server, "naip 2009 xyz", 15, 15)
    clean_project.addMapLayer(layer)
    qgis_canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    qgis_canvas.setExtent(server.extent)
    panel = plugin.dock.localize
    panel.photo_list.clear()
    panel.add_photos([str(photo_folder / PHOTO.name)])
    panel.index.setFilePath("")
    panel.against.setLayer(layer)
    panel.tile_area.clear()
    panel.matcher.setCurrentIndex(panel.matcher.findText("sift"))
    panel.top_k.setValue(1)
    asked: list[str] = []
    panel.confirm_download = lambda text: asked.append(text) or False
    try:
        panel.zooms.setText("16")
        assert panel.run() is None and not asked  # the layer serves zoom 15 only: said, nothing asked
        panel.zooms.setText("")  # the map's zoom (clamped to the layer's)
        assert panel.run() is None  # declined after seeing the plan
        assert len(asked) == 1 and "naip 2009 xyz" in asked[0] and " at zooms 15, " in asked[0], asked
        assert "Match the photos on the current map extent (lon " in asked[0]
        assert server.paths == []  # a plan downloads nothing

        panel.confirm_download = lambda text: asked.append(text) or True
        task = wait_for(panel.run(), timeout=600)
        assert task.ok, task.error_text
        assert task.outcome.startswith("1 of 1 photo placed"), task.outcome
        assert task.job.params["against"] == layer_source(layer).source
        assert task.job.params["zooms"] == [15] and task.job.params.get("bands") is None
        fetched = list(server.paths)
        assert fetched and len(fetched) == len(set(fetched)), fetched  # each tile once
        zooms = [int(p.split("/")[1]) for p in fetched]
        # only the chosen zoom: the matching may fetch finer views on demand, but never past the layer's
        # zmax (15 here), which the dock passes as max_fetch_zoom
        assert set(zooms) == {15}, zooms
        assert task.job.params["max_fetch_zoom"] == 15
        assert len(asked) == 2

        again = wait_for(panel.run(), timeout=600)
        assert again.ok, again.error_text
        assert server.paths == fetched  # everything from the engine's cache
        assert len(asked) == 2  # nothing to download: nothing asked
    finally:
        del panel.confirm_download
        panel.against.setLayer(None)
        panel.matcher.setCurrentIndex(0)
        panel.top_k.setValue(5)


def test_click_and_heatmap_from_location_on_an_xyz_layer(
    plugin, engine_settings, tile_server, qgis_canvas, clean_project
):
    """The map tool on an XYZ layer: read at the map's zoom over the map extent; a click that would
    download more than the tool's threshold asks first (declined: nothing fetched); the heatmap, in
    EPSG:3857 over the map extent, names the layer and the clicked point. The heatmap tab's "from location"
    on the same layer reads the same tiles (from the cache)."""
    from conftest import wait_for
    from qgis.core import QgsCoordinateTransform, QgsProject

    layer = _xyz_layer(tile_server, "naip xyz", 14, 14)
    clean_project.addMapLayer(layer)
    merc = QgsCoordinateReferenceSystem("EPSG:3857")
    qgis_canvas.setDestinationCrs(merc)
    qgis_canvas.setExtent(tile_server.extent)
    qgis_canvas.setLayers([layer])
    centre = tile_server.extent.center()
    tool = plugin.map_tool
    asked: list[str] = []
    tool.confirm_download = lambda text: asked.append(text) or False
    tool.ASK_OVER = 0  # any download asks
    try:
        assert tool.heatmap_at(centre) is None  # declined
        assert len(asked) == 1 and "Compute the heatmap over the current map extent (lon " in asked[0], asked
        assert "naip xyz: zoom 14, " in asked[0] and " to download" in asked[0]
        assert tile_server.paths == []
        del tool.ASK_OVER  # the default: a few tiles go ahead without asking
        task = wait_for(tool.heatmap_at(centre), timeout=300)
        assert task.ok, task.error_text
        assert len(asked) == 1
    finally:
        tool.__dict__.pop("ASK_OVER", None)
        del tool.confirm_download
        tool.last_task = None
    fetched = list(tile_server.paths)
    assert fetched and all(p.startswith("/14/") for p in fetched), fetched
    heat = task.heatmap_layer
    x, y = task.at
    assert heat.name() == f"Skyloc heatmap naip xyz @ {x:.0f}, {y:.0f}"
    assert heat.crs().authid() == "EPSG:3857"
    tile = 2 * 20037508.342789244 / 2**14
    assert qgis_canvas.extent().buffered(tile).contains(heat.extent()), (heat.extent(), qgis_canvas.extent())
    assert heat.extent().contains(centre)
    assert task.embedding["points"][0]["vector"] is not None

    panel = plugin.dock.embeddings
    panel.raster.setLayer(layer)
    lonlat = QgsCoordinateTransform(merc, QgsCoordinateReferenceSystem("EPSG:4326"), QgsProject.instance())
    p = lonlat.transform(centre)
    panel.lat.setValue(p.y())
    panel.lon.setValue(p.x())
    panel.confirm_download = lambda text: asked.append(text) or False
    try:
        loc = wait_for(panel.heatmap_from_location(), timeout=300)
    finally:
        del panel.confirm_download
    assert loc.ok, loc.error_text
    assert len(asked) == 1 and tile_server.paths == fetched  # the same tiles, from the cache
    assert loc.heatmap_layer.crs().authid() == "EPSG:3857"
    assert loc.heatmap_layer.name().startswith("Skyloc heatmap naip xyz @ lat ")
    assert qgis_canvas.extent().buffered(tile).contains(loc.heatmap_layer.extent())


def test_processing_reads_an_xyz_layer_at_a_zoom_over_an_area(
    plugin, engine_settings, tile_server_2009, clean_project, photo_folder, tmp_path
):
    """The Processing algorithms take a tile layer: ZOOM (advanced) and the area (EXTENT, the search area,
    or around the points) say which tiles; a service without them is refused in words before anything is
    fetched; the download is said in the log."""
    import processing
    from qgis.core import (
        QgsCoordinateTransform,
        QgsFeature,
        QgsGeometry,
        QgsPointXY,
        QgsProcessingException,
        QgsProcessingFeedback,
        QgsProject,
        QgsVectorLayer,
    )

    class Log(QgsProcessingFeedback):
        def __init__(self) -> None:
            super().__init__()
            self.infos: list[str] = []

        def pushInfo(self, info: str) -> None:  # noqa: N802 (QGIS API)
            self.infos.append(info)
            super().pushInfo(info)

    server = tile_server_2009
    layer = _xyz_layer(server, "naip 2009 xyz", 15, 15)
    clean_project.addMapLayer(layer)
    e = server.extent
    extent = f"{e.xMinimum()},{e.xMaximum()},{e.yMinimum()},{e.yMaximum()} [EPSG:3857]"
    centre = e.center()
    base = {
        "RASTER": layer,
        "POINT": f"{centre.x()},{centre.y()} [EPSG:3857]",
        "OUTPUT": str(tmp_path / "h.tif"),
    }
    with pytest.raises(QgsProcessingException, match="tile service: give the zoom level"):
        processing.run("skyloc:heatmapatpoint", base)
    with pytest.raises(QgsProcessingException, match="tile service: give the area"):
        processing.run("skyloc:heatmapatpoint", {**base, "ZOOM": 15})
    with pytest.raises(QgsProcessingException, match="serves zooms 15-15, not ZOOM 16"):
        processing.run("skyloc:heatmapatpoint", {**base, "ZOOM": 16, "EXTENT": extent})
    assert server.paths == []

    log = Log()
    result = processing.run("skyloc:heatmapatpoint", {**base, "ZOOM": 15, "EXTENT": extent}, feedback=log)
    heat = QgsRasterLayer(result["OUTPUT"], "heat")
    assert heat.isValid() and heat.crs().authid() == "EPSG:3857"
    tile = 2 * 20037508.342789244 / 2**15
    assert e.buffered(tile).contains(heat.extent()) and heat.extent().contains(centre)
    del heat  # a GDAL layer outliving the test (the refusals' tracebacks hold this frame) crashes the exit
    assert any(m.startswith("naip 2009 xyz: zoom 15, ") and " to download" in m for m in log.infos), log.infos
    fetched = list(server.paths)
    assert fetched and all(p.startswith("/15/") for p in fetched)

    # embeddings: around the points (no EXTENT), from the cache
    lonlat = QgsCoordinateTransform(
        QgsCoordinateReferenceSystem("EPSG:3857"),
        QgsCoordinateReferenceSystem("EPSG:4326"),
        QgsProject.instance(),
    ).transform(centre)
    points = QgsVectorLayer("Point?crs=EPSG:4326&field=name:string", "pts", "memory")
    feats = []
    for name, (lon, lat) in {
        "centre": (lonlat.x(), lonlat.y()),
        "beside": (lonlat.x() + 0.002, lonlat.y()),
    }.items():
        f = QgsFeature(points.fields())
        f.setAttributes([name])
        f.setGeometry(QgsGeometry.fromPointXY(QgsPointXY(lon, lat)))
        feats.append(f)
    points.dataProvider().addFeatures(feats)
    emb = processing.run(
        "skyloc:embeddingsatpoints",
        {"RASTER": layer, "INPUT": points, "ZOOM": 15, "OUTPUT": str(tmp_path / "emb.gpkg")},
    )
    rows = {f["name"]: f for f in QgsVectorLayer(emb["OUTPUT"], "emb", "ogr").getFeatures()}
    assert set(rows) == {"centre", "beside"} and all(r["emb_dim"] and r["emb_dim"] > 0 for r in rows.values())
    assert server.paths == fetched  # the points lie within the area already fetched

    # footprints against the layer: ZOOM and the search area (a box)
    with pytest.raises(QgsProcessingException, match="tile service: give the search area"):
        processing.run(
            "skyloc:localizephotos",
            {"PHOTOS": str(photo_folder), "AGAINST": layer, "ZOOM": 15, "OUTPUT": str(tmp_path / "fp.gpkg")},
        )
    fp = processing.run(
        "skyloc:localizephotos",
        {
            "PHOTOS": str(photo_folder),
            "AGAINST": layer,
            "ZOOM": 15,
            "EXTENT": extent,
            "TOP_K": 1,
            "MATCHER": 1,  # sift
            "OUTPUT": str(tmp_path / "fp.gpkg"),
        },
    )
    assert fp["LOCALIZED"] == 1, fp


def test_heatmap_on_an_mbtiles_layer_reads_it_at_the_map_zoom(
    plugin, engine_settings, qgis_processing, qgis_canvas, clean_project, work_dir
):
    """An MBTiles layer (QGIS's own "Generate XYZ tiles (MBTiles)", inside the engine's folders) in the
    heatmap tab: read in place at the map's zoom (within the zooms it holds) over the map extent, nothing
    asked (nothing to download)."""
    import processing
    from conftest import wait_for
    from qgis.core import QgsCoordinateTransform

    raster = QgsRasterLayer(str(SAMPLE / "naip_2018.tif"), "naip_2018")
    clean_project.addMapLayer(raster)
    merc = QgsCoordinateReferenceSystem("EPSG:3857")
    clean_project.setCrs(merc)
    extent = QgsCoordinateTransform(raster.crs(), merc, clean_project).transformBoundingBox(raster.extent())
    out = work_dir / "naip_z13_14.mbtiles"
    out.unlink(missing_ok=True)
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
    clean_project.removeMapLayer(raster.id())
    layer = QgsRasterLayer(str(out), "naip mbtiles")
    assert layer.isValid()
    clean_project.addMapLayer(layer)
    qgis_canvas.setDestinationCrs(merc)
    c = extent.center()
    # zoomed in (the test canvas is a few dozen pixels wide): finer than the file's finest zoom
    qgis_canvas.setExtent(QgsRectangle(c.x() - 20, c.y() - 20, c.x() + 20, c.y() + 20))
    qgis_canvas.setLayers([layer])
    panel = plugin.dock.embeddings
    panel.raster.setLayer(layer)
    centre = QgsCoordinateTransform(merc, QgsCoordinateReferenceSystem("EPSG:4326"), clean_project).transform(
        extent.center()
    )
    panel.lat.setValue(centre.y())
    panel.lon.setValue(centre.x())
    asked: list[str] = []
    panel.confirm_download = lambda text: asked.append(text) or False
    try:
        task = wait_for(panel.heatmap_from_location(), timeout=300)
    finally:
        del panel.confirm_download
    assert task.ok, task.error_text
    assert not asked
    assert task.job.params["raster"] == str(out) and task.job.params["zoom"] == 14  # clamped to its finest
    assert task.job.params.get("bands") is None
    heat = task.heatmap_layer
    assert heat.crs().authid() == "EPSG:3857" and heat.name().startswith("Skyloc heatmap naip mbtiles @ lat ")
    tile = 2 * 20037508.342789244 / 2**14
    assert qgis_canvas.extent().buffered(tile).contains(heat.extent())
