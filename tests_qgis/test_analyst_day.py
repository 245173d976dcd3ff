"""Issue 13, the rest of the analyst's day: a raster outside the engine's folders is one click away from
working (its folder added, the engine restarted, the click run again); a first click says it loads the
model instead of timing out; progress moves during a photo; weights, bands, exclude, span and a folder tree
of mosaics from the dock and Processing; footprints on a raster layer from the dock; the engine's warnings.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from conftest import ENGINE, PHOTO, SAMPLE, bar_texts, clear_bar, process_events, wait_for
from qgis.core import (
    Qgis,
    QgsApplication,
    QgsPointXY,
    QgsProject,
    QgsRasterLayer,
)
from qgis.PyQt.QtWidgets import QPushButton

TARGET = QgsPointXY(488500.0, 5207000.0)  # a lake shore of the sample, EPSG:26914


def wait_started(panel, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while panel._start_task is not None:
        QgsApplication.processEvents()
        time.sleep(0.02)
        assert time.monotonic() < deadline, "the local engine did not start"
    process_events()


def show_raster(canvas, path: Path, name: str) -> QgsRasterLayer:
    raster = QgsRasterLayer(str(path), name)
    assert raster.isValid()
    QgsProject.instance().addMapLayer(raster)
    canvas.setDestinationCrs(raster.crs())
    canvas.setExtent(raster.extent())
    canvas.setLayers([raster])
    return raster


def test_raster_outside_the_engines_folders_offers_to_add_it_and_runs_again(
    plugin, qgis_canvas, qgis_iface, clean_project, tmp_path, work_dir, engine_settings
):
    """The map tool on a raster outside the folders: 'Add folder' adds its folder (saved), restarts the
    plugin's engine with it, and runs the click again, which then works. A fresh engine's first click says
    it loads the embedding model (that first /embed used to time out into 'the engine is not running')."""
    from skyloc.engine_link import EngineLink, EngineSettings

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(SAMPLE / "naip_2018.tif", elsewhere / "naip_outside.tif")
    link, panel = EngineLink.instance(), plugin.dock.engine
    EngineSettings(executable=str(ENGINE), roots=[str(work_dir)], output_dir=str(work_dir / "results")).save()
    panel.start(save=False)
    wait_started(panel)
    try:
        assert link.local_running()
        first_url = link.local.url
        raster = show_raster(qgis_canvas, elsewhere / "naip_outside.tif", "naip_outside")
        tool = plugin.map_tool
        task = wait_for(tool.heatmap_at(TARGET))
        assert not task.ok and task.error.code == "forbidden_path"
        assert task.outside == [str(elsewhere.resolve())]
        items = [i for i in qgis_iface.messageBar().items() if i.level() == Qgis.MessageLevel.Critical]
        assert len(items) == 1
        assert "Add folder" in items[0].toolTip() and str(elsewhere.resolve()) in items[0].toolTip()
        add = [b for b in items[0].findChildren(QPushButton) if b.text() == "Add folder"]
        assert len(add) == 1
        add[0].click()
        wait_started(panel)
        deadline = time.monotonic() + 60
        while tool.last_task is task:  # the click runs again once the engine answers
            QgsApplication.processEvents()
            time.sleep(0.02)
            assert time.monotonic() < deadline, "the click was not run again"
        again = wait_for(tool.last_task, timeout=300)
        assert again.ok, again.error_text
        assert link.local.url != first_url  # a new engine...
        roots = link.status()["version"]["roots"]
        assert str(elsewhere.resolve()) in roots  # ...that may read the folder
        assert EngineSettings.load().roots == [str(work_dir), str(elsewhere.resolve())]  # kept
        assert again.messages[0] == "loading the embedding model (its first use by this engine)…"
        assert again.heatmap_layer is not None and again.raster_name == raster.name()
        third = wait_for(tool.heatmap_at(TARGET))  # the model is loaded now: no "loading" this time
        assert third.ok and third.messages[0] == "embedding at the clicked point…"
    finally:
        plugin.map_tool.last_task = None  # as found (other tests look at the tool's tasks)
        panel.stop()
        process_events()


def test_forbidden_path_without_a_restartable_engine_says_how(plugin, qgis_iface, engine_settings, tmp_path):
    """An engine started outside QGIS (URL + token only): 'Add folder' saves the folder and says to restart
    'skyloc serve' with --root, instead of pretending."""
    from skyloc.client import ServiceError
    from skyloc.engine_link import EngineSettings
    from skyloc.messages import add_folders, report_error

    clear_bar(qgis_iface)
    before = EngineSettings.load()
    text = report_error(
        ServiceError(403, "forbidden_path", f"raster {tmp_path}/r.tif lies outside the folders"),
        qgis_iface,
        "heatmap",
        folders=[str(tmp_path)],
    )
    assert "Add folder" in text
    assert add_folders([str(tmp_path)], None, qgis_iface) is False
    warned = bar_texts(qgis_iface, Qgis.MessageLevel.Warning)
    assert any("--root" in m and str(tmp_path) in m for m in warned), warned
    assert str(tmp_path) in EngineSettings.load().roots
    before.save()


def test_dock_progress_moves_within_a_photo(plugin, clean_project, engine_settings, photo_folder):
    """Footprints on a raster layer from the dock (no index); the engine's messages name the candidate and
    the refinement pass, and the bar moves while the photo is matched."""
    panel = plugin.dock.localize
    raster = QgsRasterLayer(str(SAMPLE / "naip_2009.tif"), "naip_2009")
    clean_project.addMapLayer(raster)
    panel.photo_list.clear()
    panel.add_photos([str(photo_folder / PHOTO.name)])
    panel.index.setFilePath("")
    panel.against.setLayer(raster)
    panel.matcher.setCurrentIndex(panel.matcher.findText("sift"))
    # shown as 3,2,1: the engine reads red=3, green=2, blue=1 as the analyst sees it, and guesses nothing
    from qgis.core import QgsMultiBandColorRenderer, QgsSingleBandGrayRenderer

    raster.setRenderer(QgsMultiBandColorRenderer(raster.dataProvider(), 3, 2, 1))
    panel.top_k.setValue(1)
    shown = wait_for(panel.run(), timeout=300)
    assert shown.ok, shown.error_text
    assert shown.job.params["bands"] == [3, 2, 1]
    assert not [w for w in shown.warnings if "band order guessed" in w], shown.warnings
    # shown as one gray band: no colour choice to pass, the engine guesses and says so (below)
    raster.setRenderer(QgsSingleBandGrayRenderer(raster.dataProvider(), 1))
    panel.top_k.setValue(2)
    try:
        task = panel.run()
        assert task is not None and task.against == str(SAMPLE / "naip_2009.tif") and task.index is None
        values = set()
        while not task.ended:
            QgsApplication.processEvents()
            values.add(panel.progress.bar.value())
            time.sleep(0.02)
        assert task.ok, task.error_text
    finally:
        panel.against.setLayer(None)
        panel.matcher.setCurrentIndex(0)
    passes = [m for m in task.messages if ": candidate " in m and ": pass " in m]
    assert passes, task.messages  # e.g. "photo 1 of 1: x.jpg: candidate 1 (1 of 2, sift): pass 2: ..."
    assert {v for v in values if 0 < v < 100}, (sorted(values), task.messages)  # it moved during the photo
    assert any(m.endswith(": first match") for m in task.messages), task.messages
    assert task.outcome.startswith("1 of 1 photo placed")
    # NAIP has no band names and the layer shows no colour choice, so the engine guessed 1,2,3 and said
    # so; the dock lists that warning above the photo's row
    assert any("band order guessed" in w for w in task.warnings), task.warnings
    assert panel.results.item(0).text().startswith("photo_2009_oblique.jpg placed")  # the photo first
    last = panel.results.item(panel.results.count() - 1)
    assert last.text().startswith("⚠ naip_2009.tif: band order guessed: bands 1,2,3")
    assert "give the bands to choose" in last.toolTip()  # the whole warning
    assert not panel.zoom_to_row(last)


def write_jpeg(path: Path, seed: int) -> None:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)


def test_dock_builds_an_index_from_a_folder_tree_of_mosaics(plugin, clean_project, engine_settings, work_dir):
    """A folder tree of XYZ mosaics, recursive, with an exclude pattern and a span, from the dock; the
    model fields (weights, sha256) reach the engine, and the weights hint shows the engine's file."""
    tree = work_dir / "mosaic_tree"
    write_jpeg(tree / "photoA" / "cand_14_4726_0344.jpg", 1)
    write_jpeg(tree / "photoB" / "cand_14_4770_15528.jpg", 2)
    write_jpeg(tree / "photoB" / "surrounding_14_4770_15528.jpg", 3)
    panel = plugin.dock.localize
    panel.refresh_rasters()
    panel.rasters.deselectAllOptions()
    panel.mosaics.setFilePath(str(tree))
    panel.recursive.setChecked(True)
    panel.exclude.setText("surrounding_*")
    panel.span.setValue(2)
    fields = panel.model_fields
    plugin.dock.engine.refresh()  # the engine's model list, for the weights hint
    assert "efficientnet-lite1" in fields.hint.text() and "sha256 77cc7160d37b" in fields.hint.text()
    fields.sha256.setText("abc")
    assert panel.build_index() is None  # a bad sha256 is refused in words before any job
    fields.sha256.setText("")
    try:
        task = panel.build_index()
        assert task is not None
        wait_for(task, timeout=300)
        assert task.ok, task.error_text
    finally:
        panel.mosaics.setFilePath("")
        panel.recursive.setChecked(False)
        panel.exclude.setText("")
        panel.span.setValue(4)
    params = task.job.params
    assert params["recursive"] is True and params["exclude"] == ["surrounding_*"] and params["span"] == 2
    assert task.job.summary["counts"]["tiles"] == 2  # both subfolders, the excluded file left out


def test_processing_build_index_bands_exclude_span_weights_and_warnings(plugin, engine_settings, work_dir):
    """Build index in Processing: BANDS, mosaics with RECURSIVE/EXCLUDE/SPAN, WEIGHTS/SHA256 (advanced).
    Bands given reach the engine, which then guesses nothing (no warning)."""
    import processing
    from qgis.core import QgsProcessingFeedback

    alg = QgsApplication.processingRegistry().algorithmById("skyloc:buildindex")
    names = {p.name() for p in alg.parameterDefinitions()}
    assert {"BANDS", "EXCLUDE", "SPAN", "RECURSIVE", "WEIGHTS", "SHA256", "MODEL"} <= names
    for name in ("heatmapatpoint", "embeddingsatpoints"):
        other = QgsApplication.processingRegistry().algorithmById(f"skyloc:{name}")
        assert {"WEIGHTS", "SHA256"} <= {p.name() for p in other.parameterDefinitions()}

    class Feedback(QgsProcessingFeedback):
        def __init__(self):
            super().__init__()
            self.warnings: list[str] = []

        def pushWarning(self, warning):  # noqa: N802 (QGIS API)
            self.warnings.append(warning)
            super().pushWarning(warning)

    tree = work_dir / "mosaic_tree_proc"
    write_jpeg(tree / "a" / "cand_14_4726_0344.jpg", 4)
    write_jpeg(tree / "b" / "cand_14_4770_15528.jpg", 5)
    write_jpeg(tree / "b" / "skip_14_4770_15530.jpg", 6)
    out = work_dir / "index_tree_proc"
    result = processing.run(
        "skyloc:buildindex",
        {"MOSAICS": str(tree), "RECURSIVE": True, "EXCLUDE": "skip_*", "SPAN": 2, "OUTPUT": str(out)},
    )
    import json

    build = json.loads((Path(result["OUTPUT"]) / "manifest.json").read_text())["build"]
    assert build["recursive"] is True and build["exclude"] == ["skip_*"] and build["span"] == 2
    assert build["n_tiles"] == 2

    # a raster with no band names, its bands given: read as given, no guess
    out2 = work_dir / "index_bands_proc"
    feedback = Feedback()
    result = processing.run(
        "skyloc:buildindex",
        {
            "SOURCES": [str(SAMPLE / "naip_2009.tif")],
            "TILE_SIZES": "512",
            "BANDS": "3,2,1",
            "OUTPUT": str(out2),
        },
        feedback=feedback,
    )
    build = json.loads((Path(result["OUTPUT"]) / "manifest.json").read_text())["build"]
    assert build["bands"] == [3, 2, 1]
    assert not any("band order guessed" in w for w in feedback.warnings), feedback.warnings
