"""Raster layers of any provider as index sources: files, XYZ tile services, MBTiles and GeoPackage tiles.

The engine indexes a file (GeoTIFF, MBTiles, GeoPackage tile table) in place, and an XYZ service by its URL
template over a box in degrees at chosen zooms (engine/imagery/tile_source.py). This module turns a QGIS
layer into what the engine takes, with the words an analyst needs when a layer cannot be used (a WMS layer
has no tiles to fetch; a WMTS layer's tile matrix is not always Web Mercator).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsMapLayer,
    QgsProject,
    QgsProviderRegistry,
    QgsRasterLayer,
    QgsRectangle,
)

#: File kinds the engine reads as tile databases (and GDAL shows as ordinary raster layers).
TILE_FILE_SUFFIXES = (".mbtiles", ".gpkg")


@dataclass(frozen=True)
class LayerSource:
    """What the engine indexes for one layer: ``source`` is a file path or an XYZ URL template."""

    layer_name: str
    source: str
    kind: str  # "file" (GeoTIFF & co.), "tiles" (MBTiles/GeoPackage file), "xyz" (tile service)
    attribution: str = ""
    zmin: int | None = None
    zmax: int | None = None

    @property
    def is_service(self) -> bool:
        return self.kind == "xyz"


def layer_source(layer: QgsMapLayer) -> LayerSource:
    """The index source behind a raster layer; ValueError saying why when the layer cannot be indexed."""
    if not isinstance(layer, QgsRasterLayer):
        raise ValueError(f"layer {layer.name()!r} is not a raster layer")
    provider = layer.providerType()
    wms = QgsProviderRegistry.instance().decodeUri("wms", layer.source()) if provider == "wms" else {}
    is_xyz = str(wms.get("type", "")).lower() == "xyz"
    if provider == "wms" and not is_xyz:  # said first: an unreachable WMS is also an invalid layer
        what = "WMTS" if "tileMatrixSet" in wms else "WMS"
        raise ValueError(
            f"layer {layer.name()!r} is a {what} layer: Skyloc indexes XYZ tile services, MBTiles, "
            "GeoPackage and raster files. Add the service as an XYZ layer (Browser > XYZ Tiles) if it has "
            "an XYZ address, or save the area as a GeoTIFF (Export > Save As...) first"
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
        kind = "tiles" if path.lower().endswith(TILE_FILE_SUFFIXES) else "file"
        return LayerSource(layer.name(), path, kind, attribution)
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
