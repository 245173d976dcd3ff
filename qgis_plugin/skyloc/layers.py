"""Result layers: candidate footprints by rank, photo footprints by status, georeferenced photos, heatmaps."""

from __future__ import annotations

import os
from collections.abc import Iterable

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsCoordinateTransform,
    QgsFillSymbol,
    QgsLayerTreeGroup,
    QgsMapLayer,
    QgsProject,
    QgsProviderRegistry,
    QgsRasterLayer,
    QgsRectangle,
    QgsRendererCategory,
    QgsVectorLayer,
)

from .client import ServiceError

GROUP_NAME = "Skyloc results"
HEATMAP_OPACITY = 0.65
#: Outline colours of candidates by rank (1 = best), then grey.
RANK_COLOURS = ["#d7191c", "#fdae61", "#ffd92f", "#abdda4", "#2b83ba"]
STATUS_COLOURS = {"localized": "#1a9641", "rejected": "#fdae61", "error": "#7f7f7f"}


def raster_file(layer: QgsMapLayer) -> str:
    """The file behind a raster layer, or ServiceError ``raster_unusable`` saying why there is none."""
    if not isinstance(layer, QgsRasterLayer) or not layer.isValid():
        raise ServiceError(None, "raster_unusable", f"layer {layer.name()!r} is not a valid raster layer")
    provider = layer.providerType()
    path = ""
    if provider == "gdal":
        path = QgsProviderRegistry.instance().decodeUri("gdal", layer.source()).get("path", "")
    if not path or not os.path.isfile(path):
        raise ServiceError(
            None,
            "raster_unusable",
            f"layer {layer.name()!r} is not a raster file the engine can read (provider {provider}: "
            "the engine reads GeoTIFF and other GDAL files; save the layer as a GeoTIFF first)",
        )
    if not layer.crs().isValid():
        raise ServiceError(None, "no_crs", f"layer {layer.name()!r} has no coordinate reference system")
    return path


def _group():
    root = QgsProject.instance().layerTreeRoot()
    group = root.findGroup(GROUP_NAME)
    return group if group is not None else root.insertGroup(0, GROUP_NAME)


def run_group(name: str) -> QgsLayerTreeGroup:
    """A new group on top of the layer tree for the layers of one run (named after the run)."""
    root = QgsProject.instance().layerTreeRoot()
    unique, n = name, 2
    while root.findGroup(unique) is not None:
        unique, n = f"{name} ({n})", n + 1
    return root.insertGroup(0, unique)


def add_layer(
    layer: QgsMapLayer, above: QgsMapLayer | None = None, group: QgsLayerTreeGroup | None = None
) -> QgsMapLayer:
    """Add ``layer`` to the project: just above ``above`` in the layer tree, else on top of ``group``
    (default: the "Skyloc results" group)."""
    if not layer.isValid():
        raise ServiceError(None, "bad_output", f"QGIS cannot open {layer.source()}")
    project = QgsProject.instance()
    project.addMapLayer(layer, False)
    node = None if above is None else project.layerTreeRoot().findLayer(above.id())
    if node is not None:
        parent = node.parent()
        parent.insertLayer(parent.children().index(node), layer)
    else:
        (group if group is not None else _group()).insertLayer(0, layer)
    return layer


def _outline(colour: str, width: float) -> QgsFillSymbol:
    return QgsFillSymbol.createSimple(
        {"color": "0,0,0,0", "outline_color": colour, "outline_width": str(width), "style": "no"}
    )


def style_candidates(layer: QgsVectorLayer) -> None:
    """Outlines by rank: rank 1 thick red, then orange, yellow, green, blue, grey."""
    idx = layer.fields().indexOf("rank")
    if idx < 0:
        return
    ranks = sorted({int(r) for r in layer.uniqueValues(idx) if r is not None})
    cats = []
    for r in ranks:
        colour = RANK_COLOURS[r - 1] if 1 <= r <= len(RANK_COLOURS) else "#969696"
        cats.append(QgsRendererCategory(r, _outline(colour, 1.2 if r == 1 else 0.6), f"rank {r}"))
    layer.setRenderer(QgsCategorizedSymbolRenderer("rank", cats))


def style_footprints(layer: QgsVectorLayer) -> None:
    """Outlines by status: localized green, rejected orange, error grey."""
    if layer.fields().indexOf("status") < 0:
        return
    cats = [QgsRendererCategory(s, _outline(c, 1.0), s) for s, c in STATUS_COLOURS.items()]
    layer.setRenderer(QgsCategorizedSymbolRenderer("status", cats))


def add_candidates(path: str, name: str = "Skyloc candidates", group=None) -> QgsVectorLayer:
    layer = QgsVectorLayer(path, name, "ogr")
    style_candidates(layer)
    add_layer(layer, group=group)
    return layer


def add_footprints(path: str, name: str = "Skyloc footprints", group=None) -> QgsVectorLayer:
    layer = QgsVectorLayer(path, name, "ogr")
    style_footprints(layer)
    add_layer(layer, group=group)
    return layer


def add_photo_raster(path: str, group=None) -> QgsRasterLayer:
    """A georeferenced photo (RGB + alpha COG written by the engine)."""
    layer = QgsRasterLayer(path, os.path.splitext(os.path.basename(path))[0], "gdal")
    add_layer(layer, group=group)
    return layer


def add_heatmap(path: str, style: str | None = None, above: QgsMapLayer | None = None) -> QgsRasterLayer:
    """The heatmap with the engine's pseudocolour style, semi-transparent, just above ``above``."""
    name = "Skyloc heatmap " + os.path.splitext(os.path.basename(path))[0]
    layer = QgsRasterLayer(path, name, "gdal")
    if style and os.path.isfile(style):
        layer.loadNamedStyle(style)
    renderer = layer.renderer()
    if renderer is not None and renderer.opacity() >= 1.0:
        renderer.setOpacity(HEATMAP_OPACITY)
    add_layer(layer, above=above)
    return layer


def zoom_to(canvas, layers: Iterable[QgsMapLayer]) -> None:
    """Zoom the canvas to the layers' combined extent (in the canvas CRS)."""
    dest = canvas.mapSettings().destinationCrs()
    extent = QgsRectangle()
    extent.setMinimal()
    for layer in layers:
        if layer is None or not layer.isValid() or layer.extent().isEmpty():
            continue
        tr = QgsCoordinateTransform(layer.crs(), dest, QgsProject.instance())
        try:
            extent.combineExtentWith(tr.transformBoundingBox(layer.extent()))
        except Exception:  # noqa: S112 - a layer that cannot be transformed is just not zoomed to
            continue
    if extent.isEmpty() or not extent.isFinite():
        return
    extent.scale(1.2)
    canvas.setExtent(extent)
    canvas.refresh()


def zoom_to_feature(canvas, layer: QgsVectorLayer, fid: int) -> bool:
    """Select feature ``fid`` of ``layer`` and zoom the canvas to it; False when it has no geometry."""
    feature = layer.getFeature(fid)
    geom = feature.geometry() if feature.isValid() else None
    layer.selectByIds([fid])
    if geom is None or geom.isEmpty():
        return False
    tr = QgsCoordinateTransform(layer.crs(), canvas.mapSettings().destinationCrs(), QgsProject.instance())
    box = tr.transformBoundingBox(geom.boundingBox())
    box.scale(1.5)
    canvas.setExtent(box)
    canvas.refresh()
    return True
