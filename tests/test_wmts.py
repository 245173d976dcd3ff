"""WMTS layers as index sources: a real WMTS server on loopback (capabilities + RESTful and KVP tiles, cut
from the bundled NAIP sample), the real parser, downloader, cache and encoder. No mocks.

An index built through WMTS (KVP, matrix identifiers like ``EPSG:3857:15``) equals the index built from the
XYZ URL of the same tiles; a RESTful layer renders the same GeoTIFF; matrix sets that are not the
Web-Mercator quadtree, unreachable services and documents that are not capabilities are refused before
anything is written (CLI: exit 3).
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pytest
import rasterio
from imagery import SAMPLE
from tile_server import HTML_PAGE, Tiles, TileServer, cut_tiles, lonlat_bounds

from engine import api
from engine.cli import main as cli_main
from engine.errors import InputError
from engine.geo.search_area import SearchArea
from engine.imagery.tile_service import USER_AGENT, TileServiceError, is_url
from engine.imagery.tile_source import TileMosaicSource, is_tile_source
from engine.imagery.tile_template import parse_template
from engine.imagery.wmts import SCALE0, WmtsTemplate, is_wmts
from engine.retrieval.index_store import open_index

ZOOM = 15
INPUT = 224
R = 20037508.342789244
CAPS_PATH = "/wmts/1.0.0/WMTSCapabilities.xml"


def tile_matrix_set(
    name: str, kind: str = "quad", ids: str = "{z}", zooms=range(0, 19), size: int = 256
) -> str:
    """A TileMatrixSet: ``quad`` (the 3857 quadtree), ``4326`` (the WGS84 two-tile-wide pyramid) or
    ``shifted`` (3857, the top-left corner 1 km off)."""
    crs = {"quad": "urn:ogc:def:crs:EPSG::3857", "shifted": "EPSG:3857", "4326": "urn:ogc:def:crs:EPSG::4326"}
    out = [
        f"<TileMatrixSet><ows:Identifier>{name}</ows:Identifier><ows:SupportedCRS>{crs[kind]}</ows:SupportedCRS>"
    ]
    for z in zooms:
        if kind == "4326":
            scale, corner, mw, mh = 279541132.0143589 / 2**z, "90 -180", 2 ** (z + 1), 2**z
        else:
            scale, mw, mh = SCALE0 * 256 / size / 2**z, 2**z, 2**z
            corner = f"{-R + (1000 if kind == 'shifted' else 0)!r} {R!r}"
        out.append(
            f"<TileMatrix><ows:Identifier>{ids.format(z=z)}</ows:Identifier><ScaleDenominator>{scale!r}"
            f"</ScaleDenominator><TopLeftCorner>{corner}</TopLeftCorner><TileWidth>{size}</TileWidth>"
            f"<TileHeight>{size}</TileHeight><MatrixWidth>{mw}</MatrixWidth><MatrixHeight>{mh}</MatrixHeight>"
            "</TileMatrix>"
        )
    return "".join(out) + "</TileMatrixSet>"


def capabilities(base: str, *, sets: dict[str, str], rest: bool, kvp: bool, layer: str = "naip") -> bytes:
    """A WMTS 1.0 capabilities document: one layer linked to ``sets`` (name -> TileMatrixSet XML)."""
    ops = ""
    if kvp:
        ops = (
            '<ows:OperationsMetadata><ows:Operation name="GetTile"><ows:DCP><ows:HTTP>'
            f'<ows:Get xlink:href="{base}/kvp?"><ows:Constraint name="GetEncoding"><ows:AllowedValues>'
            "<ows:Value>KVP</ows:Value></ows:AllowedValues></ows:Constraint></ows:Get>"
            "</ows:HTTP></ows:DCP></ows:Operation></ows:OperationsMetadata>"
        )
    resource = (
        f'<ResourceURL format="image/jpeg" resourceType="tile" template="{base}/rest/{layer}/{{Style}}/'
        '{TileMatrixSet}/{TileMatrix}/{TileRow}/{TileCol}.jpg"/>'
        if rest
        else ""
    )
    links = "".join(
        f"<TileMatrixSetLink><TileMatrixSet>{n}</TileMatrixSet></TileMatrixSetLink>" for n in sets
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<Capabilities xmlns="http://www.opengis.net/wmts/1.0" xmlns:ows="http://www.opengis.net/ows/1.1" '
        'xmlns:xlink="http://www.w3.org/1999/xlink" version="1.0.0">'
        f"<ows:ServiceIdentification><ows:Title>test</ows:Title></ows:ServiceIdentification>{ops}<Contents>"
        f"<Layer><ows:Title>NAIP</ows:Title><ows:Identifier>{layer}</ows:Identifier>"
        '<Style isDefault="true"><ows:Identifier>default</ows:Identifier></Style>'
        "<Style><ows:Identifier>infrared</ows:Identifier></Style>"
        f"<Format>image/jpeg</Format><Format>image/png</Format>{links}{resource}</Layer>"
        + "".join(sets.values())
        + "</Contents></Capabilities>"
    ).encode()


class WmtsServer:
    """Serves documents by path (``docs``: path -> (status, body, type)), RESTful tiles at
    ``/rest/LAYER/STYLE/SET/MATRIX/ROW/COL.jpg`` and KVP GetTile at ``/kvp?...``; ``ids`` maps a matrix
    identifier to its zoom. Logs every request (path and query) and User-Agent."""

    def __init__(self, tiles: Tiles, ids: str = "{z}") -> None:
        self.tiles = tiles
        self.zoom_of = {ids.format(z=z): z for z in range(0, 25)}
        self.docs: dict[str, tuple[int, bytes, str]] = {}
        self.log: list[str] = []
        self.agents: set[str] = set()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                server.answer(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def answer(self, h: BaseHTTPRequestHandler) -> None:
        with self.lock:
            self.log.append(h.path)
            self.agents.add(h.headers.get("User-Agent", ""))
        parts = urlsplit(h.path)
        q = {k.upper(): v for k, v in parse_qsl(parts.query)}
        if parts.path in self.docs and q.get("REQUEST") != "GetTile":  # /kvp: its GetCapabilities
            return self.send(h, *self.docs[parts.path])
        key = None
        if parts.path == "/kvp" and q.get("REQUEST") == "GetTile" and q.get("FORMAT") == "image/jpeg":
            key = (q.get("TILEMATRIX", ""), q.get("TILEROW", ""), q.get("TILECOL", ""))
        elif parts.path.startswith("/rest/naip/default/GoogleMapsCompatible/"):
            key = tuple(parts.path[len("/rest/naip/default/GoogleMapsCompatible/") : -len(".jpg")].split("/"))
        data = None
        if key is not None and len(key) == 3 and key[0] in self.zoom_of:
            data = self.tiles.get((self.zoom_of[key[0]], int(key[2]), int(key[1])))
        if data is None:
            return self.send(h, 404, b"no tile", "text/plain")
        return self.send(h, 200, data, "image/jpeg")

    def send(self, h: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def tile_requests(self) -> list[str]:
        with self.lock:
            return [p for p in self.log if "GetTile" in p or p.startswith("/rest/")]

    def __enter__(self) -> WmtsServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def tiles():
    return cut_tiles(SAMPLE / "naip_2018.tif", [ZOOM])


@pytest.fixture(scope="module")
def area():
    return SearchArea(bbox=lonlat_bounds(SAMPLE / "naip_2018.tif"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


QUAD = {"GoogleMapsCompatible": tile_matrix_set("GoogleMapsCompatible")}


# ------------------------------------------------------------------------------------- capabilities


def test_capabilities_resolve_to_tile_urls(tiles) -> None:
    epsg = {"EPSG:3857": tile_matrix_set("EPSG:3857", ids="EPSG:3857:{z}", zooms=range(2, 19))}
    with WmtsServer(tiles, ids="EPSG:3857:{z}") as srv:
        srv.docs[CAPS_PATH] = (200, capabilities(srv.base, sets=QUAD, rest=True, kvp=True), "text/xml")
        srv.docs["/kvp"] = (200, capabilities(srv.base, sets=epsg, rest=False, kvp=True), "application/xml")
        caps = srv.base + CAPS_PATH
        qgis = (
            "contextualWMSLegend=0&crs=EPSG:3857&dpiMode=7&format=image/jpeg&layers=naip&styles=default&"
            f"tileMatrixSet=GoogleMapsCompatible&url={caps}"
        )
        assert is_wmts(qgis) and is_url(qgis) and is_tile_source(qgis) and is_wmts("wmts:" + caps)
        assert not is_wmts(srv.base + "/{z}/{x}/{y}.png") and not is_wmts("type=xyz&url=http://h/{z}/{x}/{y}")
        rest = parse_template(qgis)
        assert isinstance(rest, WmtsTemplate) and rest.zooms == list(range(19)) and rest.host == "127.0.0.1"
        assert rest.url(15, 3, 7) == f"{srv.base}/rest/naip/default/GoogleMapsCompatible/15/7/3.jpg"
        # the same layer, style, matrix set and format given the other way: the same cache key
        same = parse_template(f"wmts:{caps}#layer=naip")
        assert same.key == rest.key and same.template == rest.template
        assert rest.template.startswith("wmts:http") and "tileMatrixSet=GoogleMapsCompatible" in rest.template
        assert parse_template(f"wmts:{caps}#style=infrared").key != rest.key
        assert parse_template(f"wmts:{caps}#format=image/png").url(1, 0, 0).startswith(srv.base + "/kvp?")

        # KVP only, identifiers "EPSG:3857:z", zooms 2-18; the service address gets GetCapabilities appended
        kvp = parse_template(f"wmts:{srv.base}/kvp")
        url = kvp.url(15, 3, 7)
        q = dict(parse_qsl(urlsplit(url).query))
        assert q["TILEMATRIX"] == "EPSG:3857:15" and (q["TILEROW"], q["TILECOL"]) == ("7", "3")
        assert q["LAYER"] == "naip" and q["TILEMATRIXSET"] == "EPSG:3857" and q["FORMAT"] == "image/jpeg"
        assert q["REQUEST"] == "GetTile" and q["SERVICE"] == "WMTS" and q["STYLE"] == "default"
        with pytest.raises(InputError, match=r"has no zoom 1: it offers zooms 2-18"):
            kvp.check_zooms([1, 5])
        with pytest.raises(InputError, match="has no layer 'roads': it offers 'naip'"):
            parse_template(f"wmts:{caps}#layer=roads")
        with pytest.raises(InputError, match="no style 'night'"):
            parse_template(f"wmts:{caps}#style=night")
        with pytest.raises(InputError, match="cannot log in"):
            parse_template(qgis + "&username=me&password=secret")
        # 512-px tiles on the same quadtree (scales halved) are read too
        big = {"GoogleMapsCompatible": tile_matrix_set("GoogleMapsCompatible", size=512)}
        srv.docs["/512.xml"] = (200, capabilities(srv.base, sets=big, rest=True, kvp=False), "text/xml")
        assert parse_template(f"wmts:{srv.base}/512.xml").tile_size == 512
        # one fetch of each capabilities document for all of the above
        assert srv.log.count(CAPS_PATH) == 1 and srv.agents == {USER_AGENT}


# ------------------------------------------------------------------------------- the same index as XYZ


def test_index_through_wmts_equals_index_from_xyz(tmp_path: Path, tiles, area) -> None:
    with TileServer(tiles) as xyz:
        ref = api.index(
            [xyz.url], str(tmp_path / "by_xyz"), input_size=INPUT, area=area, zooms=[ZOOM],
            tile_cache=str(tmp_path / "xyz.mbtiles"),
        )  # fmt: skip
    with WmtsServer(tiles, ids="EPSG:3857:{z}") as srv:
        sets = {"EPSG:3857": tile_matrix_set("EPSG:3857", ids="EPSG:3857:{z}", zooms=range(0, 20))}
        srv.docs["/kvp"] = (200, capabilities(srv.base, sets=sets, rest=False, kvp=True), "text/xml")
        source = (
            "contextualWMSLegend=0&crs=EPSG:3857&dpiMode=7&format=image/jpeg&layers=naip&styles=&"
            f"tileMatrixSet=EPSG:3857&url={srv.base}/kvp"
        )
        manifest = api.index(
            [source], str(tmp_path / "by_wmts"), input_size=INPUT, area=area, zooms=[ZOOM],
            tile_cache=str(tmp_path / "wmts.mbtiles"), attribution="USDA NAIP",
        )  # fmt: skip
        asked = srv.tile_requests()
        assert asked and all("TILEMATRIX=EPSG:3857:15&" in p for p in asked)
        assert len(asked) == len(set(asked)) and srv.agents == {USER_AGENT}
    (record,) = manifest["sources"]
    assert record["kind"] == "tile_service" and record["url"].startswith(f"wmts:{srv.base}/kvp#layer=naip")
    assert record["download"]["downloaded"] == ref["sources"][0]["download"]["downloaded"] > 0
    a, b = open_index(tmp_path / "by_xyz"), open_index(tmp_path / "by_wmts")
    assert len(a.tiles) == len(b.tiles) >= 2
    np.testing.assert_array_equal(a.tiles.zoom, b.tiles.zoom)
    np.testing.assert_allclose(a.tiles.native_bounds, b.tiles.native_bounds, rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        b.faiss.reconstruct_n(0, b.faiss.ntotal), a.faiss.reconstruct_n(0, a.faiss.ntotal), atol=1e-5
    )


def test_rest_layer_renders_the_same_geotiff_as_xyz(tmp_path: Path, tiles, area) -> None:
    with TileServer(tiles) as xyz:
        api.render_tiles(
            xyz.url, tmp_path / "xyz.tif", zoom=ZOOM, area=area, tile_cache=str(tmp_path / "x.mbtiles")
        )
    with WmtsServer(tiles) as srv:
        srv.docs[CAPS_PATH] = (200, capabilities(srv.base, sets=QUAD, rest=True, kvp=False), "text/xml")
        source = f"wmts:{srv.base}{CAPS_PATH}#layer=naip&tileMatrixSet=GoogleMapsCompatible"
        api.render_tiles(
            source, tmp_path / "wmts.tif", zoom=ZOOM, area=area, tile_cache=str(tmp_path / "w.mbtiles")
        )
        assert srv.tile_requests() and all(p.startswith("/rest/naip/default/") for p in srv.tile_requests())
    with rasterio.open(tmp_path / "xyz.tif") as a, rasterio.open(tmp_path / "wmts.tif") as b:
        assert a.transform == b.transform and a.crs == b.crs
        np.testing.assert_array_equal(a.read(), b.read())


# ------------------------------------------------------------------------------------------- refusals


def test_matrix_sets_that_are_not_the_quadtree_are_refused(tmp_path: Path, tiles, area) -> None:
    wgs84 = {"WGS84": tile_matrix_set("WGS84", "4326")}
    shifted = {"Shifted": tile_matrix_set("Shifted", "shifted")}
    with WmtsServer(tiles) as srv:
        srv.docs["/only4326.xml"] = (
            200,
            capabilities(srv.base, sets=wgs84 | shifted, rest=True, kvp=True),
            "text/xml",
        )
        srv.docs["/both.xml"] = (
            200,
            capabilities(srv.base, sets=wgs84 | QUAD, rest=True, kvp=True),
            "text/xml",
        )

        def index(source: str, zooms=(ZOOM,)) -> None:
            api.index([source], str(tmp_path / "idx"), input_size=INPUT, area=area, zooms=list(zooms),
                      tile_cache=str(tmp_path / "c.mbtiles"))  # fmt: skip

        with pytest.raises(
            InputError,
            match=r"'WGS84' is not the Web-Mercator quadtree.*CRS is urn:ogc:def:crs:EPSG::4326.*none of them",
        ):
            index(f"wmts:{srv.base}/only4326.xml")
        with pytest.raises(InputError, match=r"'Shifted' is not the Web-Mercator.*top-left corner"):
            index(f"wmts:{srv.base}/only4326.xml#tileMatrixSet=Shifted")
        with pytest.raises(
            InputError, match=r"'WGS84' is not the Web-Mercator.*use tileMatrixSet=GoogleMapsCompatible"
        ):
            index(f"wmts:{srv.base}/both.xml#tileMatrixSet=WGS84")
        with pytest.raises(InputError, match=r"has no zoom 19: it offers zooms 0-18"):
            index(f"wmts:{srv.base}/both.xml", zooms=(15, 19))
        assert srv.tile_requests() == []
    assert not (tmp_path / "idx").exists() and not (tmp_path / "c.mbtiles").exists()


def test_unreachable_and_broken_capabilities_exit_3(tmp_path: Path, tiles, capsys) -> None:
    def cli(source: str) -> int:
        return cli_main(
            ["index", source, "--out", str(tmp_path / "idx"), "--bbox", "-93.3,44.9,-93.2,45.0", "--zooms", "15",
             "--tile-cache", str(tmp_path / "c.mbtiles"), "--quiet"]
        )  # fmt: skip

    assert cli(f"wmts:http://127.0.0.1:{free_port()}/WMTSCapabilities.xml") == 3
    assert "cannot be reached" in capsys.readouterr().err
    with WmtsServer(tiles) as srv:
        srv.docs["/html.xml"] = (200, HTML_PAGE, "text/html")
        srv.docs["/wms.xml"] = (200, b'<WMS_Capabilities version="1.3.0"/>', "text/xml")
        assert cli(f"wmts:{srv.base}/html.xml") == 3
        assert "is an HTML page" in capsys.readouterr().err
        srv.docs["/text.xml"] = (200, b"tiles: see https://example.org {z}/{x}/{y}", "text/plain")
        assert cli(f"wmts:{srv.base}/text.xml") == 3
        assert "is not XML" in capsys.readouterr().err
        assert cli(f"wmts:{srv.base}/gone.xml") == 3
        assert "answered HTTP 404" in capsys.readouterr().err
        assert cli(f"wmts:{srv.base}/wms.xml") == 3
        assert "is a WMS service, not WMTS" in capsys.readouterr().err
        assert srv.tile_requests() == []
    assert not (tmp_path / "idx").exists() and not (tmp_path / "c.mbtiles").exists()
    with pytest.raises(TileServiceError, match="cannot be reached"):
        TileMosaicSource(
            f"wmts:http://127.0.0.1:{free_port()}/x.xml", zooms=[15], area=SearchArea(bbox=(0, 0, 1, 1))
        )


def test_service_plans_a_wmts_layer_and_honours_no_tile_urls(tmp_path: Path, tiles, area) -> None:
    import os
    import sys

    from engine.client import ServiceError, SkylocClient, launch

    def code(fn) -> tuple[int | None, str]:
        with pytest.raises(ServiceError) as info:
            fn()
        return info.value.status, info.value.code

    root = tmp_path / "root"
    root.mkdir()
    serve = [sys.executable, "-m", "engine.cli", "serve"]
    env = {**os.environ, "SKYLOC_TILE_CACHE": str(tmp_path / "engine_cache")}
    box = {"bbox": list(area.bbox), "zooms": [ZOOM]}
    with WmtsServer(tiles) as srv:
        srv.docs[CAPS_PATH] = (200, capabilities(srv.base, sets=QUAD, rest=True, kvp=True), "text/xml")
        srv.docs["/4326.xml"] = (
            200,
            capabilities(srv.base, sets={"WGS84": tile_matrix_set("WGS84", "4326")}, rest=True, kvp=True),
            "text/xml",
        )
        source = (
            "contextualWMSLegend=0&crs=EPSG:3857&dpiMode=7&format=image/jpeg&layers=naip&styles=default&"
            f"tileMatrixSet=GoogleMapsCompatible&url={srv.base}{CAPS_PATH}"
        )
        eng = launch(serve, roots=[str(root)], env=env)
        try:
            with SkylocClient(eng.url, token_file=eng.token_file) as c:
                (plan,) = c.index_plan([source], **box)
                assert plan["kind"] == "tile_service" and plan["url"].startswith("wmts:")
                assert plan["tiles_to_download"] == plan["tiles_needed"] > 0
                assert code(lambda: c.index([f"wmts:{srv.base}/4326.xml"], "x", **box)) == (422, "bad_input")
                assert code(lambda: c.index_plan([source], bbox=box["bbox"], zooms=[19])) == (
                    422,
                    "bad_input",
                )
        finally:
            assert eng.stop() == 0
        asked = len(srv.log)
        eng = launch(serve, roots=[str(root)], env=env, extra_args=["--no-tile-urls"])
        try:
            with SkylocClient(eng.url, token_file=eng.token_file) as c:
                assert code(lambda: c.index_plan([source], **box)) == (422, "bad_input")
        finally:
            assert eng.stop() == 0
        assert srv.tile_requests() == [] and len(srv.log) == asked  # not even the capabilities
    assert not (root / "x").exists()
