"""QgsTasks: cancel an index build (no output left), localize from the dock (layers added)."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import SAMPLE, wait_for
from qgis.core import QgsApplication, QgsProject, QgsRasterLayer, QgsVectorLayer


def test_cancel_index_task_leaves_no_output(
    plugin, skyloc_pkg, engine, work_dir, qgis_iface, engine_settings
):
    from skyloc.tasks import IndexTask, start_task

    out = work_dir / "cancelled_index"
    task = IndexTask(
        [str(SAMPLE / "naip_2018.tif"), str(SAMPLE / "naip_2009.tif")],
        str(out),
        tile_sizes=[64, 96],  # thousands of tiles: long enough to cancel in the middle
        iface=qgis_iface,
    )
    start_task(task)
    deadline = time.monotonic() + 60
    while task.job is None or task.job.state != "running":
        QgsApplication.processEvents()
        time.sleep(0.02)
        assert time.monotonic() < deadline, "the index job did not start"
        assert not task.ended, task.error_text
    job_id = task.job.id
    task.cancel()
    wait_for(task)
    assert not task.ok and task.was_canceled
    assert engine.client.job(job_id).state == "cancelled"
    assert not out.exists()
    assert not Path(str(out) + ".partial").exists()


def test_dock_localize_adds_layers(
    plugin, built_index, photo_folder, qgis_canvas, clean_project, engine_settings
):
    panel = plugin.dock.localize
    panel.photo_list.clear()
    panel.add_photos([str(photo_folder)])
    panel.index.setFilePath(built_index)
    panel.top_k.setValue(3)
    panel.area.setCurrentIndex(2)  # near a point: the sample's centre, 5 km
    panel.lat.setValue(47.02)
    panel.lon.setValue(-99.15)
    panel.radius.setValue(5)
    task = panel.run()
    assert task is not None and task.area["near"] == [47.02, -99.15]
    wait_for(task)
    assert task.ok, task.error_text
    layers = {lyr.name(): lyr for lyr in QgsProject.instance().mapLayers().values()}
    cands, feet = layers["Skyloc candidates"], layers["Skyloc footprints"]
    assert isinstance(cands, QgsVectorLayer) and cands.featureCount() == 3
    assert cands.renderer().type() == "categorizedSymbol"
    assert isinstance(feet, QgsVectorLayer) and feet.featureCount() == 1
    assert next(feet.getFeatures())["status"] == "localized"
    photo = layers["photo_2009_oblique.jpg"]
    assert isinstance(photo, QgsRasterLayer) and photo.isValid()
    assert panel.progress.bar.value() == 100
    assert qgis_canvas.extent().intersects(
        qgis_canvas.mapSettings().layerExtentToOutputExtent(feet, feet.extent())
    )


def test_dock_builds_index_from_project_rasters(plugin, clean_project, engine_settings, work_dir):
    panel = plugin.dock.localize
    raster = QgsRasterLayer(str(SAMPLE / "naip_2009.tif"), "naip_2009")
    clean_project.addMapLayer(raster)
    panel.refresh_rasters()
    panel.rasters.setCheckedItems(["naip_2009"])
    panel.tile_sizes.setText("512")
    task = panel.build_index()
    assert task is not None
    wait_for(task)
    assert task.ok, task.error_text
    assert Path(task.out, "manifest.json").is_file()
    assert Path(task.out).is_relative_to(work_dir / "results")
    assert panel.index.filePath() == task.out
