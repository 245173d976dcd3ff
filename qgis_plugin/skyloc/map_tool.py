"""The Embeddings map tool: click on a raster layer -> embedding at that point + similarity heatmap layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qgis.core import (
    QgsCoordinateTransform,
    QgsPointXY,
    QgsProject,
    QgsRasterLayer,
)
from qgis.gui import QgsMapMouseEvent, QgsMapTool
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QCursor

from .client import ServiceError
from .layers import raster_file
from .messages import report_error
from .tasks import HeatmapTask, start_task


class HeatmapMapTool(QgsMapTool):
    """Left click: the raster under the point (the active layer first, else the topmost visible raster)
    gets an ``/embed`` at the point and a ``/heatmap`` job; the heatmap layer lands just above it.

    ``on_embedding(dict)`` receives the engine's embedding answer; ``last_task`` is the latest task.
    """

    def __init__(
        self,
        canvas,
        iface=None,
        model: Callable[[], str | None] | None = None,
        on_embedding: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        super().__init__(canvas)
        self.iface = iface
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
            if not layer.isValid() or layer.name().startswith("Skyloc heatmap"):
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
            path = raster_file(layer)
            dest = self.canvas().mapSettings().destinationCrs()
            xy = QgsCoordinateTransform(dest, layer.crs(), QgsProject.instance()).transform(point)
        except Exception as exc:
            report_error(exc, self.iface)
            return None
        task = HeatmapTask(
            path,
            layer=layer,
            at=[xy.x(), xy.y()],
            model=self.model(),
            iface=self.iface,
            on_embedding=self.on_embedding,
        )
        self.last_task = task
        start_task(task)
        return task
