"""Raster layers of any provider as index sources: files, XYZ and WMTS tile services, MBTiles and GeoPackage
tiles.

The engine indexes a file (GeoTIFF, MBTiles, GeoPackage tile table) in place, and an XYZ service by its URL
template (a WMTS layer by ``wmts:CAPABILITIES#layer=...``) over a box in degrees at chosen zooms
(engine/imagery/tile_source.py, wmts.py). This module turns a QGIS layer into what the engine takes, with the
words an analyst needs when a layer cannot be used (a WMS layer has no tiles to fetch; the engine says when
a WMTS layer's tile matrix set is not the Web-Mercator quadtree).
"""

from __future__ import annotations

import math
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlencode

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsMapLayer,
    QgsMapSettings,
    QgsProject,
    QgsProviderRegistry,
    QgsRasterLayer,
    QgsRectangle,
)

#: File kinds the engine reads as tile databases (and GDAL shows as ordinary raster layers).
TILE_FILE_SUFFIXES = (".mbtiles", ".gpkg")


@dataclass(frozen=True)
class LayerSource:
    """What the engine indexes for one layer: ``source`` is a file path, an XYZ URL template or a WMTS
    layer (``wmts:CAPABILITIES_URL#layer=...&style=...&tileMatrixSet=...&format=...``)."""

    layer_name: str
    source: str
    kind: str  # "file" (GeoTIFF & co.), "tiles" (MBTiles/GeoPackage file), "xyz"/"wmts" (tile service)
    attribution: str = ""
    zmin: int | None = None
    zmax: int | None = None

    @property
    def is_service(self) -> bool:
        return self.kind in ("xyz", "wmts")


def layer_source(layer: QgsMapLayer) -> LayerSource:
    """The index source behind a raster layer; ValueError saying why when the layer cannot be indexed."""
    if not isinstance(layer, QgsRasterLayer):
        raise ValueError(f"layer {layer.name()!r} is not a raster layer")
    provider = layer.providerType()
    wms = QgsProviderRegistry.instance().decodeUri("wms", layer.source()) if provider == "wms" else {}
    is_xyz = str(wms.get("type", "")).lower() == "xyz"
    if provider == "wms" and not is_xyz and wms.get("tileMatrixSet"):
        # said before validity: the engine reads the capabilities itself and says what is wrong
        return _wmts_source(layer, wms)
    if provider == "wms" and not is_xyz:  # said first: an unreachable WMS is also an invalid layer
        raise ValueError(
            f"layer {layer.name()!r} is a WMS layer: Skyloc indexes XYZ and WMTS tile services, MBTiles, "
            "GeoPackage and raster files. Add the service as a WMTS layer or an XYZ layer (Browser > XYZ "
            "Tiles) if it has one, or save the area as a GeoTIFF (Export > Save As...) first"
        )
    if not layer.isValid():
        raise ValueError(f"layer {layer.name()!r} is not a valid raster layer")
    attribution = _attribution(layer)
    if provider == "gdal":
        path = QgsProviderRegistry.instance().decodeUri("gdal", layer.source()).get("path", "")
        if not path or not os.path.isfile(path):
            raise ValueError(
                f"layer {layer.name()!r}: its file {path or layer.source()!r} is not on this computer"
            )
        if path.lower().endswith(TILE_FILE_SUFFIXES):
            return LayerSource(layer.name(), path, "tiles", attribution, *tile_file_zooms(path))
        return LayerSource(layer.name(), path, "file", attribution)
    if is_xyz:
        url = str(wms.get("url", ""))
        if not url.lower().startswith(("http://", "https://")):
            # a local z/x/y folder or file:// template: the engine fetches over http(s) only
            raise ValueError(
                f"layer {layer.name()!r}: XYZ template {url!r} is not an http(s) address; "
                "serve the folder over http or index its mosaics as a folder"
            )
        return LayerSource(
            layer.name(), url, "xyz", attribution, _int(wms.get("zmin")), _int(wms.get("zmax"))
        )
    raise ValueError(
        f"layer {layer.name()!r} (provider {provider}) cannot be indexed: save it as a GeoTIFF first"
    )


def wmts_engine_source(wms: dict) -> str:
    """The engine's form of a QGIS WMTS layer source (decoded by the "wms" provider):
    ``wmts:CAPABILITIES_URL#layer=...&style=...&tileMatrixSet=...&format=...``."""

    def first(key: str) -> str:
        value = wms.get(key) or ""
        if isinstance(value, (list, tuple)):
            value = value[0] if value else ""
        return str(value).strip()

    choices = {
        "layer": first("layers"),
        "style": first("styles"),
        "tileMatrixSet": first("tileMatrixSet"),
        "format": first("format"),
    }
    query = urlencode({k: v for k, v in choices.items() if v}, safe=":/")
    return f"wmts:{first('url')}" + (f"#{query}" if query else "")


def _wmts_source(layer: QgsRasterLayer, wms: dict) -> LayerSource:
    url = str(wms.get("url") or "")
    if not url.lower().startswith(("http://", "https://")):
        raise ValueError(f"layer {layer.name()!r}: WMTS address {url!r} is not an http(s) address")
    if any(wms.get(k) for k in ("username", "password", "authcfg")):
        raise ValueError(
            f"layer {layer.name()!r}: its WMTS service needs a login, which the engine cannot use; save the "
            "area as a GeoTIFF (Export > Save As...) first"
        )
    return LayerSource(layer.name(), wmts_engine_source(wms), "wmts", _attribution(layer))


def extent_lonlat(
    extent: QgsRectangle, crs: QgsCoordinateReferenceSystem
) -> tuple[float, float, float, float]:
    """A map extent as (min lon, min lat, max lon, max lat), densified so a projected extent's curved
    edges are inside; clamped to Web Mercator's latitude range (tiles exist only there)."""
    wgs84 = QgsCoordinateReferenceSystem("EPSG:4326")
    box = QgsRectangle(extent)
    if crs.isValid() and crs != wgs84:
        tr = QgsCoordinateTransform(crs, wgs84, QgsProject.instance())
        box = tr.transformBoundingBox(extent)
    lat_max = 85.05112878
    return (
        max(-180.0, box.xMinimum()),
        max(-lat_max, box.yMinimum()),
        min(180.0, box.xMaximum()),
        min(lat_max, box.yMaximum()),
    )


def parse_zooms(text: str) -> list[int]:
    """ "9-11" or "9,11" (or "12") as a sorted list of zoom levels 0..22; ValueError with an example."""
    out: set[int] = set()
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"zooms: {text!r} is not a list of zoom levels (e.g. 9-11 or 10,12)") from None
        if not 0 <= a <= b <= 22:
            raise ValueError(f"zooms: {part!r} is not a zoom range within 0..22 (e.g. 9-11)")
        out.update(range(a, b + 1))
    if not out:
        raise ValueError("zooms: give the zoom levels to index (e.g. 9-11)")
    return sorted(out)


def tile_file_zooms(path: str) -> tuple[int | None, int | None]:
    """The zoom levels an MBTiles file or a GeoPackage tile table holds (None, None when unknown)."""
    table = "tiles" if path.lower().endswith(".mbtiles") else "gpkg_tile_matrix"
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            lo, hi = con.execute(f"SELECT min(zoom_level), max(zoom_level) FROM {table}").fetchone()  # noqa: S608
        finally:
            con.close()
    except (sqlite3.Error, TypeError, ValueError):
        return None, None
    return _int(lo), _int(hi)


#: Web-Mercator metres per pixel of a 256-px tile at zoom 0.
ZOOM0_RES = 2 * math.pi * 6378137.0 / 256
MERCATOR = QgsCoordinateReferenceSystem("EPSG:3857")


def zoom_for_resolution(res: float, zmin: int | None = None, zmax: int | None = None) -> int:
    """The Web-Mercator zoom whose pixel is nearest ``res`` (metres of EPSG:3857), within zmin..zmax."""
    z = round(math.log2(ZOOM0_RES / res)) if res > 0 and math.isfinite(res) else 0
    z = max(0 if zmin is None else zmin, min(22 if zmax is None else zmax, z))
    return int(z)


def canvas_zoom(settings: QgsMapSettings, zmin: int | None = None, zmax: int | None = None) -> int:
    """The zoom of the map as shown: the Web-Mercator zoom whose pixel matches the map's units per pixel
    in EPSG:3857, clamped to the layer's zmin..zmax."""
    extent, crs = settings.visibleExtent(), settings.destinationCrs()
    width = max(1, settings.outputSize().width())
    if crs.isValid() and crs != MERCATOR:
        extent = QgsCoordinateTransform(crs, MERCATOR, QgsProject.instance()).transformBoundingBox(extent)
    return zoom_for_resolution(extent.width() / width, zmin, zmax)


def layer_area(layer: QgsRasterLayer, extent: QgsRectangle, crs: QgsCoordinateReferenceSystem) -> list[float]:
    """``extent`` (in ``crs``) within the layer's own extent, as [min lon, min lat, max lon, max lat];
    ValueError when the map shows no part of the layer."""
    box = QgsRectangle(extent)
    if crs.isValid() and layer.crs().isValid() and crs != layer.crs():
        box = QgsCoordinateTransform(crs, layer.crs(), QgsProject.instance()).transformBoundingBox(box)
    box = box.intersect(layer.extent())
    if box.isEmpty():
        raise ValueError(f"the map shows no part of layer {layer.name()!r}: pan or zoom to it first")
    return list(extent_lonlat(box, layer.crs()))


def download_text(
    services: list,
    plan: list[dict],
    zooms: list[int],
    where: str = "the current map extent",
    bbox: list[float] | None = None,
    action: str = "Index",
    mosaics: bool = True,
) -> str:
    """What ``action`` (indexing, matching ...) with the tile layers over ``where`` will fetch, in words
    (from the engine's plan). ``mosaics``: say the plan's mosaics (what an index is made of); else the
    tiles alone (an extent read at one zoom)."""
    lines = []
    span = f"{zooms[0]}-{zooms[-1]}" if len(zooms) > 1 else f"{zooms[0]}"
    for i, s in enumerate(services):  # the plan lists the services in the order asked
        p = plan[i] if i < len(plan) else {}
        mb = (p.get("estimated_download_bytes") or 0) / 1e6
        what = f"{p.get('mosaics', '?')} mosaics at zooms {span}" if mosaics else f"zoom {span}"
        lines.append(
            f"{s.layer_name}: {what}, "
            f"{p.get('tiles_needed', '?')} tiles ({p.get('tiles_cached', 0)} already cached, "
            f"{p.get('tiles_to_download', '?')} to download, about {mb:.0f} MB)"
        )
    box = f" (lon {bbox[0]:.4f} to {bbox[2]:.4f}, lat {bbox[1]:.4f} to {bbox[3]:.4f})" if bbox else ""
    return "\n".join(lines) + f"\n\n{action} {where}{box}? Tiles are kept in the engine's cache."


def plan_download(
    services: list,
    zooms: list[int],
    bbox: list[float],
    confirm: Callable[[str], bool],
    where: str = "the current map extent",
    action: str = "Index",
    ask_over: int | None = None,
    extent_only: bool = False,
) -> bool:
    """The engine's plan for fetching the services' tiles at ``zooms`` over ``bbox``, shown through
    ``confirm(text)`` (False: declined): always when ``ask_over`` is None, else only when more than
    ``ask_over`` tiles are to be downloaded. ``extent_only``: the tiles of the box alone (a heatmap's or an
    embedding's extent at one zoom), not an index's overlapping mosaics. Zooms a layer does not serve and plans over the engine's cap
    are raised as sentences (ValueError / the engine's error)."""
    from .engine_link import EngineLink  # the engine's link: not needed to read layers

    for s in services:
        if s.zmax is not None and zooms[-1] > s.zmax or s.zmin is not None and zooms[0] < s.zmin:
            asked = ",".join(map(str, zooms))
            raise ValueError(f"layer {s.layer_name!r} serves zooms {s.zmin}-{s.zmax}, not {asked}")
    if not services:
        return True
    with EngineLink.instance().client() as client:
        exact = {"span": 1, "overlap": 0.0} if extent_only else {}
        plan = client.index_plan([s.source for s in services], zooms=zooms, bbox=bbox, **exact)
    to_fetch = sum(int(p.get("tiles_to_download") or 0) for p in plan)
    if ask_over is not None and to_fetch <= ask_over:
        return True
    return bool(confirm(download_text(services, plan, zooms, where, bbox, action, not extent_only)))


def ask_download(parent, text: str) -> bool:
    """The question before fetching tiles from a service: Ok or Cancel."""
    from qgis.PyQt.QtWidgets import QMessageBox

    answer = QMessageBox.question(
        parent,
        "Skyloc: download tiles",
        text,
        QMessageBox.StandardButton.Ok | QMessageBox.StandardButton.Cancel,
    )
    return answer == QMessageBox.StandardButton.Ok


def engine_source(layer: QgsMapLayer | None) -> LayerSource:
    """:func:`layer_source` for reading a layer (match, heatmap, embeddings): a layer that cannot be read
    is the engine's ``raster_unusable`` (said as "The raster cannot be used: ...")."""
    from .client import ServiceError

    if layer is None:
        raise ServiceError(None, "raster_unusable", "no raster layer chosen")
    try:
        return layer_source(layer)
    except ValueError as exc:
        raise ServiceError(None, "raster_unusable", str(exc)) from None


def tile_extent_options(
    src: LayerSource,
    layer: QgsRasterLayer,
    settings: QgsMapSettings,
    confirm: Callable[[str], bool],
    action: str = "Compute the heatmap over",
    ask_over: int | None = 64,
) -> dict | None:
    """``zoom`` and ``bbox`` for reading a tile layer (heatmap, embedding) as the map shows it: the zoom of
    the map's scale (within the layer's zooms), over the map extent. A service's tiles are planned first
    and, beyond ``ask_over`` tiles to download, asked through ``confirm`` (None: declined). {} for a raster
    file."""
    if src.kind == "file":
        return {}
    zoom = canvas_zoom(settings, src.zmin, src.zmax)
    bbox = layer_area(layer, settings.visibleExtent(), settings.destinationCrs())
    if src.is_service and not plan_download(
        [src], [zoom], bbox, confirm, "the current map extent", action, ask_over, extent_only=True
    ):
        return None
    return {"zoom": zoom, "bbox": bbox}


def _attribution(layer: QgsRasterLayer) -> str:
    """The layer's credit line: its attribution, else the rights of its metadata (as QGIS shows them)."""
    text = (layer.attribution() or "").strip()
    if not text:
        rights = layer.metadata().rights()
        text = "; ".join(r.strip() for r in rights if r.strip())
    return text


def _int(value: object) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None
