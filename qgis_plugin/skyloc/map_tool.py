"""Map tools: click on a raster -> embedding + similarity heatmap; pick the search area's point (with the
radius drawn as a circle)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsDistanceArea,
    QgsGeometry,
    QgsPointXY,
    QgsProject,
    QgsRasterLayer,
    QgsWkbTypes,
)
from qgis.gui import QgsMapMouseEvent, QgsMapTool, QgsMapToolEmitPoint, QgsRubberBand
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QColor, QCursor

from .client import ServiceError
from .layers import HeatmapSlot, is_heatmap, raster_file, rgb_bands
from .messages import report_error
from .tasks import HeatmapTask, start_task
from .tile_layers import ask_download, engine_source, tile_extent_options


class HeatmapMapTool(QgsMapTool):
    """Left click: the raster under the point (the active layer first, else the topmost visible raster)
    gets an ``/embed`` at the point and a ``/heatmap`` job; the heatmap layer lands just above it.

    ``on_embedding(dict)`` receives the engine's embedding answer; ``last_task`` is the latest task.
    ``model()`` names the model, or gives ``{"model", "weights", "sha256"}`` (the dock's fields). The bands
    read as red, green, blue are the layer's own (its renderer's), as in the dock.

    A tile layer (XYZ, WMTS, MBTiles, GeoPackage) is read at the zoom of the map's scale over the map
    extent; a click that would download more than ``ASK_OVER`` tiles asks first (:meth:`confirm_download`).
    """

    #: tiles a click downloads without asking
    ASK_OVER = 64

    def __init__(
        self,
        canvas,
        iface=None,
        model: Callable[[], str | dict[str, Any] | None] | None = None,
        on_embedding: Callable[[dict[str, Any]], None] | None = None,
        slot: HeatmapSlot | None = None,
    ) -> None:
        super().__init__(canvas)
        self.iface = iface
        self.slot = slot if slot is not None else HeatmapSlot()
        self.model = model or (lambda: None)
        self.on_embedding = on_embedding
        self.last_task: HeatmapTask | None = None
        self.setCursor(QCursor(Qt.CursorShape.CrossCursor))

    def raster_at(self, point: QgsPointXY) -> QgsRasterLayer | None:
        """The raster layer to use at ``point`` (canvas CRS)."""
        canvas = self.canvas()
        dest = canvas.mapSettings().destinationCrs()
        candidates = []
        active = self.iface.activeLayer() if self.iface is not None else None
        if isinstance(active, QgsRasterLayer):
            candidates.append(active)
        candidates += [lyr for lyr in canvas.layers() if isinstance(lyr, QgsRasterLayer)]
        for layer in candidates:
            if not layer.isValid() or is_heatmap(layer):
                continue
            try:
                tr = QgsCoordinateTransform(dest, layer.crs(), QgsProject.instance())
                if layer.extent().contains(tr.transform(point)):
                    return layer
            except Exception:  # noqa: S112 - a point that does not transform is not on this layer
                continue
        return None

    def canvasReleaseEvent(self, e: QgsMapMouseEvent) -> None:  # noqa: N802 (QGIS API)
        if e.button() != Qt.MouseButton.LeftButton:
            return
        self.heatmap_at(e.mapPoint())

    def heatmap_at(self, point: QgsPointXY) -> HeatmapTask | None:
        """Start the embedding + heatmap task for a point in the canvas CRS (None: error reported)."""
        try:
            layer = self.raster_at(point)
            if layer is None:
                raise ServiceError(
                    None, "raster_unusable", "there is no raster layer under the clicked point: click on one"
                )
            src = engine_source(layer)
            path = raster_file(layer) if src.kind == "file" else src.source
            settings = self.canvas().mapSettings()
            dest = settings.destinationCrs()
            xy = QgsCoordinateTransform(dest, layer.crs(), QgsProject.instance()).transform(point)
            chosen = self.model()
            tiles = (
                tile_extent_options(src, layer, settings, self.confirm_download, ask_over=self.ASK_OVER)
                if src.kind != "file"
                else {}
            )
        except Exception as exc:
            report_error(exc, self.iface)
            return None
        if tiles is None:  # the user declined the download
            return None
        options = chosen if isinstance(chosen, dict) else {"model": chosen}
        task = HeatmapTask(
            path,
            layer=layer,
            at=[xy.x(), xy.y()],
            tiles=tiles,
            bands=rgb_bands(layer, options.get("model")) if src.kind == "file" else None,
            iface=self.iface,
            on_embedding=self.on_embedding,
            slot=self.slot,
            **options,
        )
        task.retry = lambda: self.heatmap_at(point)
        self.last_task = task
        start_task(task)
        return task

    def confirm_download(self, text: str) -> bool:
        """Ask before a click fetches many tiles (tests replace this with their own answer)."""
        return ask_download(self.canvas(), text)


WGS84 = QgsCoordinateReferenceSystem("EPSG:4326")
#: Vertices of the drawn search circle.
CIRCLE_VERTICES = 96


def circle_lonlat(lat: float, lon: float, radius_km: float, n: int = CIRCLE_VERTICES) -> list[QgsPointXY]:
    """The geodesic circle of ``radius_km`` around (lat, lon) on the WGS84 ellipsoid, as lon/lat points."""
    da = QgsDistanceArea()
    da.setEllipsoid("WGS84")
    centre = QgsPointXY(lon, lat)
    ring = [da.computeSpheroidProject(centre, radius_km * 1000.0, 2 * math.pi * k / n) for k in range(n)]
    return ring + ring[:1]


class SearchAreaBand:
    """The search area on the map: a cross at the point and the radius circle (rubber bands that stay
    until :meth:`hide`, redrawn when the canvas changes its CRS)."""

    COLOUR = QColor(230, 60, 30)

    def __init__(self, canvas) -> None:
        self.canvas = canvas
        self.point = QgsRubberBand(canvas, QgsWkbTypes.GeometryType.PointGeometry)
        self.point.setIcon(QgsRubberBand.IconType.ICON_CROSS)
        self.point.setIconSize(14)
        self.point.setWidth(2)
        self.point.setColor(self.COLOUR)
        self.circle = QgsRubberBand(canvas, QgsWkbTypes.GeometryType.PolygonGeometry)
        self.circle.setStrokeColor(self.COLOUR)
        self.circle.setFillColor(QColor(230, 60, 30, 30))
        self.circle.setWidth(2)
        self.shown: tuple[float, float, float] | None = None
        canvas.destinationCrsChanged.connect(self._redraw)

    def show(self, lat: float, lon: float, radius_km: float) -> None:
        """Draw the point (lat, lon) and its ``radius_km`` circle in the canvas CRS."""
        self.shown = (lat, lon, radius_km)
        tr = QgsCoordinateTransform(WGS84, self.canvas.mapSettings().destinationCrs(), QgsProject.instance())
        centre = QgsGeometry.fromPointXY(QgsPointXY(lon, lat))
        centre.transform(tr)
        self.point.setToGeometry(centre, None)
        ring = QgsGeometry.fromPolygonXY([circle_lonlat(lat, lon, radius_km)])
        try:
            ring.transform(tr)
        except Exception:  # noqa: BLE001 - a circle beyond the canvas CRS's area: the point alone
            ring = QgsGeometry()
        self.circle.setToGeometry(ring, None)
        self.point.show()
        self.circle.show()

    def hide(self) -> None:
        self.shown = None
        self.point.reset(QgsWkbTypes.GeometryType.PointGeometry)
        self.circle.reset(QgsWkbTypes.GeometryType.PolygonGeometry)

    def _redraw(self) -> None:
        if self.shown is not None:
            self.show(*self.shown)

    def remove(self) -> None:
        """Take the rubber bands off the canvas for good (the dock goes away)."""
        self.hide()
        for band in (self.point, self.circle):
            self.canvas.scene().removeItem(band)


class PickPointTool(QgsMapToolEmitPoint):
    """One click on the map: ``picked(lat, lon)`` (WGS84), then the previous map tool comes back. The
    point and circle stay drawn by the caller's :class:`SearchAreaBand`."""

    def __init__(self, canvas, picked: Callable[[float, float], None]) -> None:
        super().__init__(canvas)
        self.picked = picked
        self.previous = canvas.mapTool()
        self.setCursor(QCursor(Qt.CursorShape.CrossCursor))
        self.canvasClicked.connect(self._clicked)

    def _clicked(self, point: QgsPointXY, button) -> None:
        if button != Qt.MouseButton.LeftButton:
            return
        canvas = self.canvas()
        tr = QgsCoordinateTransform(canvas.mapSettings().destinationCrs(), WGS84, QgsProject.instance())
        p = tr.transform(point)
        self.picked(p.y(), p.x())
        if self.previous is not None and self.previous is not self:
            canvas.setMapTool(self.previous)
        else:
            canvas.unsetMapTool(self)
