"""Result layers: candidate footprints by rank, photo footprints by status, georeferenced photos, heatmaps."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsColorRampShader,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsFillSymbol,
    QgsGeometry,
    QgsLayerTreeGroup,
    QgsMapLayer,
    QgsMarkerSymbol,
    QgsPointXY,
    QgsProject,
    QgsProviderRegistry,
    QgsRasterLayer,
    QgsRasterShader,
    QgsRectangle,
    QgsRendererCategory,
    QgsSingleBandPseudoColorRenderer,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QColor

from .client import ServiceError

GROUP_NAME = "Skyloc results"
HEATMAP_OPACITY = 0.65
#: The fixed range of the heatmap colour ramp: cosine similarity 0 (unrelated) .. 1 (the same). The engine's
#: values span -1..1 in principle; in practice nearly all pixels fall in 0..1 (sample NAIP 2018: 5th..95th
#: percentile -0.09..0.37 to a click, 0.07..0.38 to a photo) and a negative cosine means "unlike" as much as
#: 0 does, so values below 0 take the lowest colour. A fixed range keeps a flat heatmap looking flat.
HEATMAP_RANGE = (0.0, 1.0)
#: The engine's viridis-like stops (engine/embed/heatmap_io.py RAMP), low to high.
HEATMAP_RAMP = ("#440154", "#3b528b", "#21918c", "#5ec962", "#fde725")
HEATMAP_PREFIX = "Skyloc heatmap"
#: Custom layer properties: a heatmap of the plugin (its real min, max), the clicked-points layer.
HEATMAP_PROP = "skyloc/heatmap"
POINTS_PROP = "skyloc/clicked_points"
POINTS_NAME = "Skyloc clicked points"
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


def renderer_bands(layer: QgsMapLayer | None) -> list[int] | None:
    """The bands a raster layer's style shows as red, green, blue (a multiband colour renderer), e.g.
    [3, 2, 1] for a B2,B3,B4 raster shown as 3,2,1; None for other renderers (single band, paletted)."""
    if not isinstance(layer, QgsRasterLayer) or layer.renderer() is None:
        return None
    r = layer.renderer()
    if r.type() != "multibandcolor":
        return None
    bands = [r.redBand(), r.greenBand(), r.blueBand()]
    return bands if all(b > 0 for b in bands) else None


def rgb_bands(layer: QgsMapLayer | None, model: str | None = None) -> list[int] | None:
    """The bands an RGB model reads from ``layer``: its renderer's red, green, blue (None: the engine's own
    rule); None for GAIR, which reads its 10 Sentinel-2 bands by name or count, never 3 display bands."""
    if (model or "default").strip().lower() == "gair":
        return None
    return renderer_bands(layer)


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


def is_heatmap(layer: QgsMapLayer | None) -> bool:
    """A heatmap layer of the plugin (never a raster to click on or to index)."""
    return layer is not None and (
        bool(layer.customProperty(HEATMAP_PROP)) or layer.name().startswith(HEATMAP_PREFIX)
    )


def _number(v: float, geographic: bool) -> str:
    return f"{v:.5f}" if geographic else f"{v:.0f}"


def heatmap_name(raster: str, query: str) -> str:
    """``Skyloc heatmap naip_2018 @ 488500, 5207000`` (a click), ``… ~ photo.jpg``, ``… @ lat 47.02, lon …``."""
    return f"{HEATMAP_PREFIX} {raster} {query}".rstrip()


def point_query(x: float, y: float, crs: QgsCoordinateReferenceSystem | None) -> str:
    """The clicked coordinate for a heatmap's name, in the raster's CRS (``@ 488500, 5207000``)."""
    geographic = crs is not None and crs.isValid() and crs.isGeographic()
    return f"@ {_number(x, geographic)}, {_number(y, geographic)}"


def style_heatmap(
    layer: QgsRasterLayer, lo: float | None = None, hi: float | None = None, query: str = ""
) -> QgsRasterLayer:
    """Pseudocolour over the fixed cosine range :data:`HEATMAP_RANGE` (not stretched to the data), semi-
    transparent; the real min/max go into the layer's metadata abstract (and custom properties)."""
    vmin, vmax = HEATMAP_RANGE
    n = len(HEATMAP_RAMP) - 1
    items = []
    for k, colour in enumerate(HEATMAP_RAMP):
        v = vmin + (vmax - vmin) * k / n
        label = f"{v:.2f}" + (" or less (unlike)" if k == 0 else " (the same)" if k == n else "")
        items.append(QgsColorRampShader.ColorRampItem(v, QColor(colour), label))
    ramp = QgsColorRampShader(vmin, vmax)
    ramp.setColorRampType(QgsColorRampShader.Type.Interpolated)
    ramp.setColorRampItemList(items)
    ramp.setClip(False)  # below 0: the lowest colour, not transparent
    shader = QgsRasterShader()
    shader.setRasterShaderFunction(ramp)
    renderer = QgsSingleBandPseudoColorRenderer(layer.dataProvider(), 1, shader)
    renderer.setClassificationMin(vmin)
    renderer.setClassificationMax(vmax)
    renderer.setOpacity(HEATMAP_OPACITY)
    layer.setRenderer(renderer)
    real = ""
    if lo is not None and hi is not None:
        real = f"; this heatmap's values: {lo:.3f} to {hi:.3f}"
        layer.setCustomProperty(HEATMAP_PROP + "_min", float(lo))
        layer.setCustomProperty(HEATMAP_PROP + "_max", float(hi))
    layer.setCustomProperty(HEATMAP_PROP, True)
    meta = layer.metadata()
    meta.setTitle(layer.name())
    meta.setAbstract(
        f"Skyloc similarity heatmap{(' ' + query) if query else ''}: cosine similarity of the embedding of "
        f"every pixel to the query, colours over the fixed range {vmin:g} to {vmax:g} (below {vmin:g}: the "
        f"lowest colour){real}."
    )
    layer.setMetadata(meta)
    return layer


def add_heatmap(
    path: str,
    style: str | None = None,
    above: QgsMapLayer | None = None,
    *,
    name: str | None = None,
    lo: float | None = None,
    hi: float | None = None,
    query: str = "",
    group: QgsLayerTreeGroup | None = None,
) -> QgsRasterLayer:
    """The heatmap, styled by :func:`style_heatmap`, just above ``above`` (the raster: below the vector
    results, which sit in groups on top). ``style`` (the engine's .qml, stretched to min..max) is not used:
    the fixed range replaces it."""
    del style
    name = name or f"{HEATMAP_PREFIX} " + os.path.splitext(os.path.basename(path))[0]
    layer = QgsRasterLayer(path, name, "gdal")
    if layer.isValid():
        style_heatmap(layer, lo, hi, query)
    add_layer(layer, above=above, group=group)
    return layer


class HeatmapSlot:
    """The latest heatmap layer: a new one replaces it unless ``keep()`` (the user pinned heatmaps)."""

    def __init__(self, keep=None) -> None:
        self.keep = keep or (lambda: False)
        self.layer_id: str | None = None

    def place(self, layer: QgsMapLayer) -> None:
        project = QgsProject.instance()
        old = self.layer_id
        if old and old != layer.id() and not self.keep() and project.mapLayer(old) is not None:
            project.removeMapLayer(old)
        self.layer_id = layer.id()


POINT_FIELDS = (
    ("raster", "String"),
    ("x", "Double"),
    ("y", "Double"),
    ("crs", "String"),
    ("model", "String"),
    ("dim", "Int"),
    ("embedding", "String"),
    ("heatmap", "String"),
    ("time", "String"),
)


def clicked_points_layer(crs: QgsCoordinateReferenceSystem) -> QgsVectorLayer:
    """The memory layer of clicked points (created on top of the layer tree on first use, in ``crs``): one
    point per click with its embedding as JSON; editable (move, delete, annotate) like any layer."""
    for layer in QgsProject.instance().mapLayers().values():
        if isinstance(layer, QgsVectorLayer) and layer.customProperty(POINTS_PROP):
            return layer
    fields = "&".join(f"field={n}:{'string(0)' if t == 'String' else t.lower()}" for n, t in POINT_FIELDS)
    uri = f"Point?crs={crs.authid() or 'EPSG:4326'}&{fields}"
    layer = QgsVectorLayer(uri, POINTS_NAME, "memory")
    if not crs.authid():
        layer.setCrs(crs)
    layer.setCustomProperty(POINTS_PROP, True)
    layer.renderer().setSymbol(
        QgsMarkerSymbol.createSimple(
            {
                "name": "cross2",
                "color": "255,255,255",
                "size": "4",
                "outline_color": "0,0,0",
                "outline_width": "0.6",
            }
        )
    )
    project = QgsProject.instance()
    project.addMapLayer(layer, False)
    project.layerTreeRoot().insertLayer(0, layer)
    return layer


def add_clicked_point(
    at: list[float], crs: QgsCoordinateReferenceSystem, raster: str, answer: dict | None, heatmap: str
) -> tuple[QgsVectorLayer, int]:
    """Add the clicked point (``at`` in ``crs``, the raster's) with its embedding; (layer, feature id)."""
    layer = clicked_points_layer(crs)
    point = QgsPointXY(at[0], at[1])
    if layer.crs() != crs:
        point = QgsCoordinateTransform(crs, layer.crs(), QgsProject.instance()).transform(point)
    p = (answer or {}).get("points", [{}])[0] if answer else {}
    vector = p.get("vector")
    feature = QgsFeature(layer.fields())
    feature.setGeometry(QgsGeometry.fromPointXY(point))
    values = {
        "raster": raster,
        "x": float(at[0]),
        "y": float(at[1]),
        "crs": crs.authid() or crs.toWkt()[:200],
        "model": (answer or {}).get("model_id"),
        "dim": len(vector) if vector else None,
        "embedding": json.dumps([round(v, 6) for v in vector]) if vector else None,
        "heatmap": heatmap,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for name, value in values.items():
        if value is not None:
            feature.setAttribute(name, value)
    ok, added = layer.dataProvider().addFeatures([feature])
    if not ok:
        raise ServiceError(
            None, "bad_output", f"cannot add the clicked point: {layer.dataProvider().lastError()}"
        )
    layer.updateExtents()
    layer.triggerRepaint()
    return layer, (added[0].id() if ok and added else -1)


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


# ---------------------------------------------------------------------------------- Georeferencer, index

#: What to do in QGIS's Georeferencer with the files :func:`georeferencer_files` prepares.
GEOREF_HOW = (
    "open {photo} in the Georeferencer (its Open Raster dialog starts on it; the Georeferencer loads "
    "{points} with it; else File > Load GCP Points), "
    "then choose Settings > Transformation Settings > Transformation type: Projective (the footprint is "
    "a homography: a linear/affine or polynomial fit is visibly off on oblique photos)"
)


def _same_file(a: str, b: str) -> bool:
    try:
        with open(a, "rb") as fa, open(b, "rb") as fb:
            return fa.read() == fb.read()
    except OSError:
        return False


def georeferencer_files(photo: str, points: str) -> tuple[str, str]:
    """Put the engine's GCPs where QGIS's Georeferencer finds them: ``<photo file name>.points`` beside
    the photo when its folder is writable (never replacing a different ``.points`` there: the user's own
    refined GCPs), else beside a copy of the photo in the results folder, where the engine wrote
    ``points`` (named ``<photo file name>.points``). Returns (the photo to open, its .points)."""
    if not points or not os.path.isfile(points):
        raise ServiceError(
            None, "bad_output", f"no Georeferencer points file for {photo} ({points or 'none'})"
        )
    beside = photo + ".points"
    writable = os.path.isfile(photo) and os.access(os.path.dirname(os.path.abspath(photo)), os.W_OK)
    if writable and (not os.path.exists(beside) or _same_file(points, beside)):
        shutil.copyfile(points, beside)
        return photo, beside
    copy = points[: -len(".points")] if points.endswith(".points") else points + ".photo"
    if not os.path.isfile(photo):
        if os.path.isfile(copy):  # copied before
            return copy, points
        raise ServiceError(None, "bad_input", f"the photo {photo} is no longer there to open")
    if not os.path.isfile(copy):
        shutil.copyfile(photo, copy)
    return copy, points


#: QGIS's Georeferencer (3.x) starts its "Open Raster" dialog here; a file path preselects that file.
GEOREF_DIR_KEY = "/Plugin-GeoReferencer/rasterdirectory"


def open_georeferencer(iface, photo: str | None = None) -> bool:
    """Open QGIS's own Georeferencer (True if the main window has it). With ``photo``: its "Open Raster"
    dialog comes up on that photo (QGIS has no Python call to load a raster into the Georeferencer; it
    loads ``<photo>.points`` by itself once the photo is opened)."""
    if photo:
        from qgis.core import QgsSettings

        QgsSettings().setValue(GEOREF_DIR_KEY, photo)
    if iface is None:
        return False
    from qgis.PyQt.QtCore import QTimer
    from qgis.PyQt.QtWidgets import QAction, QApplication

    for action in iface.mainWindow().findChildren(QAction):
        name = action.objectName()
        if name == "mActionShowGeoreferencer" or "georeferencer" in action.text().replace("&", "").lower():
            action.trigger()
            if photo:  # after this click returns: the dialog is modal
                opens = [
                    a
                    for w in QApplication.topLevelWidgets()
                    for a in w.findChildren(QAction, "mActionOpenRaster")
                    if a.isEnabled()
                ]
                if opens:
                    QTimer.singleShot(0, opens[0].trigger)
            return True
    return False


TILES_FILE = "tiles.gpkg"


def index_attribution(index: str) -> str:
    """The attribution texts of an index's imagery sources (its manifest), joined; "" when none."""
    try:
        with open(os.path.join(index, "manifest.json"), encoding="utf-8") as f:
            sources = json.load(f).get("sources") or []
    except (OSError, ValueError, AttributeError):
        return ""
    texts = [s.get("attribution") for s in sources if isinstance(s, dict) and s.get("attribution")]
    return "; ".join(dict.fromkeys(texts))


def add_index_tiles(index: str, group: QgsLayerTreeGroup | None = None) -> QgsVectorLayer:
    """The index's tile footprints (``tiles.gpkg``) as an outline layer on top of the layer tree."""
    path = os.path.join(index, TILES_FILE)
    if not os.path.isfile(path):
        raise ServiceError(None, "index_not_found", f"{index} is not a Skyloc index (no {TILES_FILE} in it)")
    name = f"Skyloc index tiles {os.path.basename(os.path.normpath(index))}"
    layer = QgsVectorLayer(path, name, "ogr")
    if layer.isValid():
        symbol = _outline("#3288bd", 0.3)
        layer.renderer().setSymbol(symbol)
        credits = index_attribution(index)
        if credits:  # the imagery provider's credit line, as the service asks (Layer Properties > Metadata)
            layer.setAttribution(credits)
    if group is None:
        project = QgsProject.instance()
        if layer.isValid():
            project.addMapLayer(layer, False)
            project.layerTreeRoot().insertLayer(0, layer)
            return layer
    return add_layer(layer, group=group)
