"""QgsTasks: cancel an index build (no output left), localize from the dock (layers added)."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import PHOTO, SAMPLE, wait_for
from qgis.core import QgsApplication, QgsProject, QgsRasterLayer, QgsRectangle, QgsVectorLayer

PHOTO_NAME = PHOTO.name


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


def featureless_photo(path: Path) -> Path:
    """A photo with nothing to match (a smooth gradient): the engine rejects it."""
    from qgis.PyQt.QtGui import QColor, QImage, QLinearGradient, QPainter

    image = QImage(480, 360, QImage.Format.Format_RGB32)
    painter = QPainter(image)
    gradient = QLinearGradient(0, 0, 480, 360)
    gradient.setColorAt(0, QColor("#4a6b3a"))
    gradient.setColorAt(1, QColor("#9bb07a"))
    painter.fillRect(image.rect(), gradient)
    painter.end()
    assert image.save(str(path), "JPG")
    return path


def test_dock_localize_outcome_matcher_and_groups(
    plugin, built_index, photo_folder, work_dir, qgis_canvas, qgis_iface, clean_project, engine_settings
):
    """Matcher choice round trip, the outcome in words, per-photo rows that zoom, one group per run."""
    from qgis.core import Qgis
    from skyloc.messages import bar_messages

    panel = plugin.dock.localize
    panel.photo_list.clear()
    plain = featureless_photo(photo_folder / "plain_field.jpg")
    panel.add_photos([str(photo_folder / PHOTO_NAME), str(plain)])
    assert [panel.photo_list.item(i).text() for i in range(2)] == [PHOTO_NAME, "plain_field.jpg"]
    assert panel.photo_list.item(0).toolTip() == str(photo_folder / PHOTO_NAME)  # the path as tooltip
    panel.index.setFilePath(built_index)
    panel.top_k.setValue(2)
    assert panel.matcher.currentText() == "auto"  # the engine's default first
    panel.matcher.setCurrentIndex(panel.matcher.findText("aliked"))
    assert panel.lat.value() is None and panel.lon.value() is None  # empty, not 0,0
    panel.area.setCurrentIndex(2)  # near a point: the sample's centre, 5 km
    panel.lat.setText("47.02")
    panel.lon.setText("-99.15")
    panel.radius.setValue(5)
    task = panel.run()
    assert task is not None and task.area["near"] == [47.02, -99.15] and task.matcher == "aliked"
    wait_for(task, timeout=300)
    assert task.ok, task.error_text
    assert task.job.params["matcher"] == "aliked"  # it reached the engine

    # one group named after the run holds its layers
    root = QgsProject.instance().layerTreeRoot()
    group = task.group
    assert group is not None and group.name().startswith("Skyloc 2 photo sources ")
    layers = {n.layer().name(): n.layer() for n in group.findLayers()}
    cands, feet = layers["Skyloc candidates"], layers["Skyloc footprints"]
    assert isinstance(cands, QgsVectorLayer) and cands.featureCount() == 4
    assert cands.renderer().type() == "categorizedSymbol"
    assert isinstance(feet, QgsVectorLayer) and feet.featureCount() == 2
    by_name = {f["photo_name"]: f for f in feet.getFeatures()}
    assert by_name[PHOTO_NAME]["status"] == "localized" and by_name[PHOTO_NAME]["matcher"] == "aliked"
    assert by_name["plain_field.jpg"]["status"] == "rejected"
    photo = layers[PHOTO_NAME]
    assert isinstance(photo, QgsRasterLayer) and photo.isValid()
    assert root.findGroup("Skyloc results") is None  # no growing stack of loose results

    # the outcome in words: in the dock and (the same) in the message bar, one message
    assert task.outcome.startswith("1 of 2 photos placed; plain_field.jpg rejected: ")
    assert "features in the photo" in task.outcome  # the engine's reason, in the dock
    assert panel.progress.label.text() == "1 of 2 photos placed"  # one line; the whole as tooltip
    assert panel.progress.label.toolTip() == task.outcome
    assert panel.progress.bar.value() == 100
    warnings = bar_messages(qgis_iface, Qgis.MessageLevel.Warning)
    assert warnings == [f"Skyloc:{task.outcome}"], warnings

    # one row per photo; a click zooms to (and selects) its feature
    rows = [panel.results.item(i) for i in range(panel.results.count())]
    assert [r.text().split(" ")[0] for r in rows] == [PHOTO_NAME, "plain_field.jpg"]
    assert rows[0].text().startswith(f"{PHOTO_NAME} placed (") and "aliked" in rows[0].text()
    qgis_canvas.setDestinationCrs(feet.crs())
    qgis_canvas.setExtent(QgsRectangle(0, 0, 1, 1))
    assert panel.zoom_to_row(rows[0])
    fid = by_name[PHOTO_NAME].id()
    assert feet.selectedFeatureIds() == [fid]
    assert qgis_canvas.extent().contains(by_name[PHOTO_NAME].geometry().boundingBox())
    assert panel.zoom_to_row(rows[1])  # rejected: its best candidate place
    assert len(cands.selectedFeatureIds()) == 1

    # Open in Georeferencer: <photo file name>.points beside the photo (its folder is writable)
    panel.results.setCurrentItem(rows[1])
    assert not panel.georef_button.isEnabled()  # a rejected photo has no GCPs
    panel.results.setCurrentItem(rows[0])
    assert panel.georef_button.isEnabled()
    beside = photo_folder / f"{PHOTO_NAME}.points"
    beside.unlink(missing_ok=True)
    opened = panel.open_in_georeferencer()
    assert opened == (str(photo_folder / PHOTO_NAME), str(beside))
    assert beside.read_text() == Path(by_name[PHOTO_NAME]["points"]).read_text()
    infos = bar_messages(qgis_iface, Qgis.MessageLevel.Info)
    assert any("Georeferencer" in m and "Projective" in m and PHOTO_NAME in m for m in infos), infos
    # the Georeferencer's Open Raster dialog starts on the photo (QGIS reads this setting; it then loads
    # the .points beside it by itself)
    from qgis.core import QgsSettings

    assert QgsSettings().value("/Plugin-GeoReferencer/rasterdirectory") == str(photo_folder / PHOTO_NAME)


def test_dock_builds_index_from_project_rasters(plugin, clean_project, engine_settings, work_dir):
    panel = plugin.dock.localize
    raster = QgsRasterLayer(str(SAMPLE / "naip_2009.tif"), "naip_2009")
    clean_project.addMapLayer(raster)
    # the layer shown as 3,2,1: the index reads red=3, green=2, blue=1 (its renderer's choice)
    from qgis.core import QgsMultiBandColorRenderer

    raster.setRenderer(QgsMultiBandColorRenderer(raster.dataProvider(), 3, 2, 1))
    panel.refresh_rasters()
    panel.rasters.setCheckedItems(["naip_2009"])
    panel.tile_sizes.setText("512")
    panel.bands.setText("")
    task = panel.build_index()
    assert task is not None
    wait_for(task)
    assert task.ok, task.error_text
    assert task.job.params["bands"] == [3, 2, 1]  # it reached the engine
    assert Path(task.out, "manifest.json").is_file()
    assert Path(task.out).is_relative_to(work_dir / "results")
    assert panel.index.filePath() == task.out

    # the index's tiles.gpkg on the map, from the button beside the index folder
    panel.tiles_button.click()
    tiles = [
        lyr for lyr in QgsProject.instance().mapLayers().values() if lyr.name().startswith("Skyloc index")
    ]
    assert len(tiles) == 1 and tiles[0].isValid() and tiles[0].featureCount() > 0
    assert tiles[0].source().startswith(str(Path(task.out, "tiles.gpkg")))


def test_georeferencer_files_never_replace_the_users_points(tmp_path, skyloc_pkg, monkeypatch):
    import os

    from skyloc.layers import georeferencer_files

    photos, results = tmp_path / "photos", tmp_path / "results"
    photos.mkdir()
    results.mkdir()
    photo = photos / "p.jpg"
    photo.write_bytes(b"jpeg")
    engine_points = results / "p.jpg.points"
    engine_points.write_text("mapX,mapY,sourceX,sourceY,enable,dX,dY,residual\n1,2,3,-4,1,0,0,0\n")
    # the user's own refined GCPs beside the photo stay: the photo is copied beside the engine's instead
    (photos / "p.jpg.points").write_text("my refined points")
    assert georeferencer_files(str(photo), str(engine_points)) == (str(results / "p.jpg"), str(engine_points))
    assert (photos / "p.jpg.points").read_text() == "my refined points"
    assert (results / "p.jpg").read_bytes() == b"jpeg"
    # a read-only photo folder: the same
    (photos / "p.jpg.points").unlink()
    (results / "p.jpg").unlink()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if str(p) == str(photos) else real_access(p, mode)
    )
    assert georeferencer_files(str(photo), str(engine_points)) == (str(results / "p.jpg"), str(engine_points))
    assert not (photos / "p.jpg.points").exists()
