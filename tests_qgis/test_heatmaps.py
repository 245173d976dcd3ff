"""Heatmaps and clicked points (issue 13): one heatmap per click named after the raster and the point,
replaced by the next click unless pinned, a fixed colour range with the real min/max in the metadata, the
clicked point with its embedding in an editable memory layer, and the layer tree order."""

from __future__ import annotations

import json

from conftest import SAMPLE, wait_for
from qgis.core import QgsPointXY, QgsProject, QgsRasterLayer, QgsVectorLayer
from test_map_tool import click

SHORE = QgsPointXY(488500.0, 5207000.0)  # EPSG:26914, as in test_map_tool
FIELD = QgsPointXY(489200.0, 5206500.0)


def heatmaps() -> list:
    from skyloc.layers import is_heatmap

    return [lyr for lyr in QgsProject.instance().mapLayers().values() if is_heatmap(lyr)]


def test_clicks_replace_or_pin_heatmaps_and_record_points(
    plugin, qgis_canvas, qgis_iface, clean_project, engine_settings, tmp_path
):
    from skyloc.layers import HEATMAP_RANGE, POINTS_NAME, run_group

    raster = QgsRasterLayer(str(SAMPLE / "naip_2018.tif"), "naip_2018")
    clean_project.addMapLayer(raster)
    results = QgsVectorLayer("Polygon?crs=EPSG:4326", "footprints of an earlier run", "memory")
    clean_project.addMapLayer(results, False)
    run_group("Skyloc earlier run").addLayer(results)  # vector results on top, the raster below
    qgis_canvas.setDestinationCrs(raster.crs())
    qgis_canvas.setExtent(raster.extent())
    qgis_canvas.setLayers([raster])
    tool = plugin.map_tool
    plugin.dock.embeddings.keep_heatmaps.setChecked(False)

    click(qgis_canvas, tool, SHORE)
    first = wait_for(tool.last_task)
    assert first.ok, first.error_text
    heat1 = first.heatmap_layer
    name1 = heat1.name()
    x, y = first.at  # the clicked coordinate in the raster's CRS (within a canvas pixel of SHORE)
    assert abs(x - SHORE.x()) < 3 * qgis_canvas.mapUnitsPerPixel()
    assert heat1.name() == f"Skyloc heatmap naip_2018 @ {x:.0f}, {y:.0f}"  # raster name + coordinate

    # fixed colour range, not stretched; the real min/max in the metadata
    renderer = heat1.renderer()
    assert renderer.type() == "singlebandpseudocolor"
    assert (renderer.classificationMin(), renderer.classificationMax()) == HEATMAP_RANGE
    shader = renderer.shader().rasterShaderFunction()
    assert (shader.minimumValue(), shader.maximumValue()) == HEATMAP_RANGE
    lo, hi = heat1.customProperty("skyloc/heatmap_min"), heat1.customProperty("skyloc/heatmap_max")
    assert -1.0 <= lo < hi <= 1.0001
    assert f"{lo:.3f} to {hi:.3f}" in heat1.metadata().abstract()

    # the layer tree: clicked points and vector results on top, heatmap just above the raster
    order = [n.layerId() for n in QgsProject.instance().layerTreeRoot().findLayers()]
    assert order.index(heat1.id()) == order.index(raster.id()) - 1
    assert order.index(results.id()) < order.index(heat1.id())

    # the clicked point, with its embedding, in an editable memory layer
    points = QgsProject.instance().mapLayersByName(POINTS_NAME)[0]
    assert first.point_fid is not None, first.embedding
    assert points.providerType() == "memory" and points.featureCount() == 1, first.point_fid
    assert order.index(points.id()) < order.index(heat1.id())
    f = points.getFeature(first.point_fid)
    assert f["raster"] == "naip_2018" and f["heatmap"] == heat1.name()
    assert len(json.loads(f["embedding"])) == f["dim"] == 112
    assert abs(f.geometry().asPoint().x() - first.at[0]) < 1e-6
    assert points.startEditing() and points.deleteFeature(first.point_fid) and points.rollBack()

    # the next click replaces the previous heatmap...
    click(qgis_canvas, tool, FIELD)
    second = wait_for(tool.last_task)
    assert second.ok, second.error_text
    assert [lyr.id() for lyr in heatmaps()] == [second.heatmap_layer.id()]
    assert second.heatmap_layer.name() != name1  # the first one is gone from the project
    assert points.featureCount() == 2

    # ...unless the user pins them
    plugin.dock.embeddings.keep_heatmaps.setChecked(True)
    click(qgis_canvas, tool, SHORE)
    third = wait_for(tool.last_task)
    assert third.ok, third.error_text
    assert {lyr.id() for lyr in heatmaps()} == {second.heatmap_layer.id(), third.heatmap_layer.id()}
    assert points.featureCount() == 3
    plugin.dock.embeddings.keep_heatmaps.setChecked(False)


def test_flat_heatmap_looks_flat(plugin, clean_project, tmp_path):
    """A heatmap whose values barely vary gets one colour, not the whole ramp."""
    import numpy as np
    from osgeo import gdal
    from skyloc.layers import add_heatmap

    path = tmp_path / "flat.tif"
    ds = gdal.GetDriverByName("GTiff").Create(str(path), 20, 20, 1, gdal.GDT_Float32)
    ds.SetGeoTransform((488000, 10, 0, 5208000, 0, -10))
    ds.SetProjection(QgsRasterLayer(str(SAMPLE / "naip_2018.tif"), "r").crs().toWkt())
    values = np.full((20, 20), 0.30, np.float32)
    values[0, 0] = 0.31
    ds.GetRasterBand(1).WriteArray(values)
    ds = None
    layer = add_heatmap(str(path), name="flat", lo=0.30, hi=0.31)
    block = layer.renderer().block(1, layer.extent(), 20, 20)
    from qgis.PyQt.QtGui import QColor

    colours = [QColor(block.color(r, c)) for r in range(20) for c in range(20)]
    spread = max(
        max(getattr(c, ch)() for c in colours) - min(getattr(c, ch)() for c in colours)
        for ch in ("red", "green", "blue")
    )
    assert spread <= 6, spread  # stretched min..max it would span the whole ramp (purple to yellow)
    assert "0.300 to 0.310" in layer.metadata().abstract()


def test_pick_draws_the_point_and_radius(plugin, qgis_canvas, clean_project):
    from qgis.core import QgsCoordinateReferenceSystem, QgsRectangle
    from skyloc.map_tool import PickPointTool

    panel = plugin.dock.localize
    qgis_canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:4326"))
    qgis_canvas.setExtent(QgsRectangle(-100, 46, -98, 48))
    panel.radius.setValue(10)
    tool = panel._pick_point()
    assert isinstance(tool, PickPointTool) and qgis_canvas.mapTool() is tool
    where = QgsPointXY(-99.0, 47.0)
    from qgis.gui import QgsMapMouseEvent
    from qgis.PyQt.QtCore import QEvent, QPoint, Qt

    pixel = qgis_canvas.getCoordinateTransform().transform(where)
    tool.canvasPressEvent(  # QgsMapToolEmitPoint emits canvasClicked on the press
        QgsMapMouseEvent(
            qgis_canvas,
            QEvent.Type.MouseButtonPress,
            QPoint(round(pixel.x()), round(pixel.y())),
            Qt.MouseButton.LeftButton,
        )
    )
    assert panel.area.currentIndex() == 2
    assert abs(panel.lat.value() - 47.0) < 0.01 and abs(panel.lon.value() + 99.0) < 0.01
    assert qgis_canvas.mapTool() is not tool
    circle = panel.band.circle.asGeometry()
    box = circle.boundingBox()  # 10 km: 0.18 degrees of latitude across, more of longitude at 47 N
    assert abs(box.height() - 0.18) < 0.01 and box.width() > box.height()
    assert circle.contains(panel.band.point.asGeometry())
    panel.radius.setValue(20)  # follows the radius
    assert abs(panel.band.circle.asGeometry().boundingBox().height() - 0.36) < 0.01
    panel.area.setCurrentIndex(0)  # hidden with another search area
    assert panel.band.circle.asGeometry().isEmpty()
