"""The Embeddings map tool: a real mouse release on the canvas -> embedding + heatmap layer."""

from __future__ import annotations

from conftest import SAMPLE, bar_texts, wait_for
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsPointXY,
    QgsProject,
    QgsRasterLayer,
)
from qgis.gui import QgsMapMouseEvent
from qgis.PyQt.QtCore import QEvent, QPoint, Qt

TARGET = QgsPointXY(488500.0, 5207000.0)  # a lake shore of the sample, EPSG:26914


def click(canvas, tool, point_canvas_crs: QgsPointXY, button=Qt.MouseButton.LeftButton) -> None:
    pixel = canvas.getCoordinateTransform().transform(point_canvas_crs)
    event = QgsMapMouseEvent(
        canvas, QEvent.Type.MouseButtonRelease, QPoint(round(pixel.x()), round(pixel.y())), button
    )
    tool.canvasReleaseEvent(event)


def test_click_gives_heatmap_layer(plugin, qgis_canvas, qgis_iface, clean_project, engine_settings):
    raster = QgsRasterLayer(str(SAMPLE / "naip_2018.tif"), "naip_2018")
    assert raster.isValid()
    clean_project.addMapLayer(raster)
    mercator = QgsCoordinateReferenceSystem("EPSG:3857")  # the canvas is not in the raster's CRS
    qgis_canvas.setDestinationCrs(mercator)
    to_canvas = QgsCoordinateTransform(raster.crs(), mercator, QgsProject.instance())
    qgis_canvas.setExtent(to_canvas.transformBoundingBox(raster.extent()))
    qgis_canvas.setLayers([raster])

    plugin.tool_action.trigger()  # the toolbar button activates the tool
    tool = plugin.map_tool
    assert qgis_canvas.mapTool() is tool
    tool.last_task = None  # whatever an earlier test's clicks left there
    click(qgis_canvas, tool, QgsPointXY(0, 0), Qt.MouseButton.RightButton)  # ignored
    assert tool.last_task is None
    click(qgis_canvas, tool, to_canvas.transform(TARGET))
    task = wait_for(tool.last_task)
    assert task.ok, task.error_text

    # the point reached the engine in the raster's CRS, where it was clicked (within a few canvas pixels)
    tolerance = 3 * qgis_canvas.mapUnitsPerPixel()
    assert abs(task.at[0] - TARGET.x()) < tolerance and abs(task.at[1] - TARGET.y()) < tolerance
    assert plugin.dock.embeddings.embedding.toPlainText().startswith("model ")
    assert "112-d" in plugin.dock.embeddings.embedding.toPlainText()

    heat = task.heatmap_layer
    assert heat is not None and heat.id() in QgsProject.instance().mapLayers()
    assert heat.crs() == raster.crs()
    assert heat.extent().toString(1) == raster.extent().toString(1)
    assert heat.renderer().type() == "singlebandpseudocolor"
    assert 0 < heat.renderer().opacity() < 1
    order = [n.layerId() for n in QgsProject.instance().layerTreeRoot().findLayers()]
    assert order.index(heat.id()) == order.index(raster.id()) - 1  # just above the raster
    plugin.tool_action.trigger()
    assert qgis_canvas.mapTool() is not tool


def test_click_outside_any_raster_is_a_message(
    plugin, qgis_canvas, qgis_iface, clean_project, engine_settings
):
    from qgis.core import Qgis

    qgis_canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    qgis_canvas.setLayers([])
    tool = plugin.map_tool
    tool.last_task = None
    click(qgis_canvas, tool, qgis_canvas.extent().center())
    assert tool.last_task is None
    errors = bar_texts(qgis_iface, Qgis.MessageLevel.Critical)
    assert any("no raster layer under the clicked point" in m for m in errors), errors
