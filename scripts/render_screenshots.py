"""Render the README pictures with QGIS from real engine outputs on the bundled sample (run by `make screenshots`).

    QT_QPA_PLATFORM=offscreen .venv-qgis/bin/python scripts/render_screenshots.py [--out docs/images]

1. ``skyloc footprint`` places the sample photo on the 2009 NAIP raster; the picture shows the raster, the
   photo warped onto the ground (the engine's GeoTIFF, semi-transparent) and its footprint polygon.
2. ``skyloc heatmap`` at a point of the 2018 raster; the picture shows the heatmap styled by the plugin
   (``layers.style_heatmap``: the fixed cosine range 0..1, not stretched), over the raster, with the clicked
   point and a legend.

3. The plugin's dock at 300 px (the narrowest a right-hand dock is used at), with a real engine behind it
   (``skyloc serve``, started by the plugin's client): ``dock_localize.png`` after a run of two photos (one
   placed, one rejected: the outcome in words and one line per photo), ``dock_progress.png`` (mid-photo:
   the candidate and refinement pass), ``dock_build.png`` ('Build an index' open: layers, a mosaic folder
   tree, exclude, span, bands, model and the engine's weights file with its sha256), ``dock_embed.png`` and
   ``dock_engine.png`` (engine status, folders, models, diagnostics). A cramped or clipped dock shows here.
4. ``search_area.png``: a map canvas (not a layout: rubber bands live on the canvas) with the search point
   and its radius circle as the dock's "Pick" draws them. The plugin's icons are redrawn into
   ``qgis_plugin/skyloc/icons/`` (``icons.save_pngs``).

Runs the engine from ``.venv`` (it is not imported here: this is QGIS's Python) and QGIS's own renderer
(a print layout exported to PNG), so the pictures show what an analyst gets in QGIS.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKYLOC = ROOT / ".venv" / "bin" / "skyloc"
SAMPLE = ROOT / "sample"
CLICK_LONLAT = (-99.1540, 47.0205)  # a lake shore in the sample (as in `make demo`)


def skyloc(*args: str) -> None:
    print("$ skyloc " + " ".join(args), flush=True)
    subprocess.run([str(SKYLOC), *args, "--quiet"], check=True)


def engine_outputs(work: Path) -> dict[str, Path]:
    fp = work / "footprint.gpkg"
    georef = work / "georef"
    skyloc(
        "footprint",
        str(SAMPLE / "photo_2009_oblique.jpg"),
        "--against",
        str(SAMPLE / "naip_2009.tif"),
        "--out",
        str(fp),
        "--georef-dir",
        str(georef),
        "--restart",
    )
    heat = work / "heatmap.tif"
    lon, lat = CLICK_LONLAT
    skyloc(
        "heatmap",
        str(SAMPLE / "naip_2018.tif"),
        "--at",
        f"{lon},{lat}",
        "--crs",
        "EPSG:4326",
        "--out",
        str(heat),
    )
    index = work / "index_2009"
    skyloc("index", str(SAMPLE / "naip_2009.tif"), "--tile-sizes", "256", "--out", str(index))
    return {
        "footprint": fp,
        "georef": georef / "photo_2009_oblique.jpg.tif",
        "heatmap": heat,
        "work": work,
        "index": index,
    }


def featureless_photo(path: Path) -> Path:
    """A photo with nothing to match (a smooth gradient): the engine rejects it, the dock says why."""
    from qgis.PyQt.QtGui import QColor, QImage, QLinearGradient, QPainter

    image = QImage(480, 360, QImage.Format.Format_RGB32)
    painter = QPainter(image)
    gradient = QLinearGradient(0, 0, 480, 360)
    gradient.setColorAt(0, QColor("#4a6b3a"))
    gradient.setColorAt(1, QColor("#9bb07a"))
    painter.fillRect(image.rect(), gradient)
    painter.end()
    image.save(str(path), "JPG")
    return path


def plugin_package():
    """The plugin package from qgis_plugin/ (a source checkout), with its client."""
    if str(ROOT / "qgis_plugin") not in sys.path:
        sys.path.insert(0, str(ROOT / "qgis_plugin"))
    import skyloc as plugin_pkg

    plugin_pkg._ensure_client()
    return plugin_pkg


def render_search_area(out_dir: Path, written: list[Path]) -> None:
    """A canvas with naip_2009 and the search point + 2 km circle the dock's Pick draws."""
    import time

    from qgis.core import QgsApplication, QgsProject, QgsRasterLayer
    from qgis.gui import QgsMapCanvas

    plugin_package()
    from skyloc.map_tool import SearchAreaBand

    base = QgsRasterLayer(str(SAMPLE / "naip_2009.tif"), "naip_2009")
    QgsProject.instance().addMapLayer(base)
    canvas = QgsMapCanvas()
    canvas.resize(640, 500)
    canvas.setDestinationCrs(base.crs())
    canvas.setLayers([base])
    canvas.setExtent(base.extent())
    canvas.show()
    band = SearchAreaBand(canvas)
    band.show(47.02, -99.15, 2.0)
    canvas.refresh()
    end = time.monotonic() + 3
    while time.monotonic() < end:
        QgsApplication.processEvents()
        time.sleep(0.02)
    grab(canvas, out_dir / "search_area.png", written)
    band.remove()
    canvas.hide()
    QgsProject.instance().removeMapLayer(base.id())


def render_dock(out_dir: Path, work: Path, index: Path, width: int = 300) -> list[Path]:
    """The plugin's dock (from qgis_plugin/, a source checkout) at ``width`` px: three tab pictures."""
    import shutil
    import time

    from qgis.core import QgsApplication, QgsProject, QgsRasterLayer, QgsSettings

    plugin_package()
    from skyloc.client import launch
    from skyloc.dock import SkylocDock
    from skyloc.engine_link import EngineLink, EngineSettings

    def settle(seconds: float = 0.3) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            QgsApplication.processEvents()
            time.sleep(0.01)

    saved = {k: QgsSettings().value(k) for k in QgsSettings().allKeys() if k.startswith("skyloc/")}
    photos = work / "photos"
    photos.mkdir(exist_ok=True)
    shutil.copy(SAMPLE / "photo_2009_oblique.jpg", photos / "photo_2009_oblique.jpg")
    plain = featureless_photo(photos / "plain_field.jpg")
    engine = launch([str(SKYLOC), "serve"], roots=[str(work), str(SAMPLE)])
    written = []
    try:
        EngineSettings(
            url=engine.url,
            token_file=engine.token_file,
            executable=str(SKYLOC),
            roots=[str(work), str(SAMPLE)],
            output_dir=str(work / "results"),
        ).save()
        project = QgsProject.instance()
        project.addMapLayer(QgsRasterLayer(str(SAMPLE / "naip_2009.tif"), "naip_2009"))
        dock = SkylocDock(None)
        dock.setFloating(True)
        dock.resize(width, 1000)
        dock.show()
        dock.engine.load_fields()
        dock.engine.refresh()
        panel = dock.localize
        panel.add_photos([str(photos / "photo_2009_oblique.jpg"), str(plain)])
        panel.index.setFilePath(str(index))
        panel.top_k.setValue(3)
        task = panel.run()
        deadline = time.monotonic() + 300
        seen_running = False
        while not task.ended:
            settle(0.1)
            if not seen_running and ": candidate " in task.message:
                seen_running = True  # mid-photo: the candidate and refinement pass the engine is at
                area = dock.tabs.widget(0)
                area.verticalScrollBar().setValue(area.verticalScrollBar().maximum())
                settle(1.2)
                grab(dock, out_dir / "dock_progress.png", written)
            if time.monotonic() > deadline:
                raise RuntimeError("the dock's run did not end in 300 s")
        if not task.ok:
            raise RuntimeError(f"the dock's run failed: {task.error_text}")
        panel.results.setCurrentRow(0)  # the placed photo: "Open in Georeferencer" enabled
        settle()
        area = dock.tabs.widget(0)
        area.verticalScrollBar().setValue(area.verticalScrollBar().maximum())
        settle()
        grab(dock, out_dir / "dock_localize.png", written)
        area.verticalScrollBar().setValue(0)  # 'Build an index' opened: sources, mosaics, model, weights
        panel.build_box.setCollapsed(False)
        panel.mosaics.setFilePath(str(work / "mosaics"))
        panel.recursive.setChecked(True)
        panel.exclude.setText("surrounding_*")
        panel.model_fields.update_hint()
        settle()
        area.verticalScrollBar().setValue(panel.build_box.y())
        settle()
        grab(dock, out_dir / "dock_build.png", written)
        panel.build_box.setCollapsed(True)
        dock.tabs.setCurrentIndex(1)
        dock.embeddings.raster.setLayer(project.mapLayersByName("naip_2009")[0])
        dock.embeddings.models_box.setCollapsed(False)
        settle()
        grab(dock, out_dir / "dock_embed.png", written)
        dock.tabs.setCurrentIndex(2)
        dock.engine.refresh()
        settle()
        grab(dock, out_dir / "dock_engine.png", written)
        dock.hide()
        dock.deleteLater()
        settle()
    finally:
        EngineLink.instance().stop_local()
        engine.stop()
        settings = QgsSettings()
        for key in [k for k in settings.allKeys() if k.startswith("skyloc/")]:
            settings.remove(key)
        for key, value in saved.items():
            settings.setValue(key, value)
    return written


def grab(widget, path: Path, written: list[Path], height: int | None = None) -> None:
    """Save what ``widget`` shows (its top ``height`` pixels) as a PNG."""
    pixmap = widget.grab()
    if height is not None:
        pixmap = pixmap.copy(0, 0, pixmap.width(), height)
    if not pixmap.save(str(path), "PNG"):
        raise RuntimeError(f"cannot write {path}")
    written.append(path)


def render(out_dir: Path, outputs: dict[str, Path]) -> list[Path]:
    import os

    os.environ["GDAL_PAM_ENABLED"] = "NO"  # no .aux.xml statistics files beside the sample rasters
    from qgis.core import (
        QgsApplication,
        QgsCoordinateReferenceSystem,
        QgsFeature,
        QgsFillSymbol,
        QgsGeometry,
        QgsLayoutExporter,
        QgsLayoutItemLabel,
        QgsLayoutItemLegend,
        QgsLayoutItemMap,
        QgsLayoutItemScaleBar,
        QgsLayoutPoint,
        QgsLayoutSize,
        QgsMarkerSymbol,
        QgsPointXY,
        QgsPrintLayout,
        QgsProject,
        QgsRasterLayer,
        QgsRectangle,
        QgsUnitTypes,
        QgsVectorLayer,
    )
    from qgis.PyQt.QtGui import QFont

    app = QgsApplication([], True)  # widgets too (the dock); QT_QPA_PLATFORM=offscreen needs no display
    app.initQgis()
    written = []
    try:
        project = QgsProject.instance()

        def layout(name: str, layers: list, extent: QgsRectangle, title: str, legend: bool) -> Path:
            lay = QgsPrintLayout(project)
            lay.initializeDefaults()
            page = lay.pageCollection().page(0)
            page.setPageSize(QgsLayoutSize(268, 170, QgsUnitTypes.LayoutMillimeters))
            m = QgsLayoutItemMap(lay)
            m.attemptMove(QgsLayoutPoint(5, 14, QgsUnitTypes.LayoutMillimeters))
            m.attemptResize(QgsLayoutSize(170 if legend else 230, 150, QgsUnitTypes.LayoutMillimeters))
            m.setLayers(layers)
            m.setCrs(layers[-1].crs())
            m.setExtent(extent)
            lay.addLayoutItem(m)
            label = QgsLayoutItemLabel(lay)
            label.setText(title)
            label.setFont(QFont("DejaVu Sans", 13))
            label.attemptMove(QgsLayoutPoint(5, 3, QgsUnitTypes.LayoutMillimeters))
            label.attemptResize(QgsLayoutSize(230, 10, QgsUnitTypes.LayoutMillimeters))
            lay.addLayoutItem(label)
            bar = QgsLayoutItemScaleBar(lay)
            bar.setStyle("Single Box")
            bar.setLinkedMap(m)
            bar.applyDefaultSize()
            bar.attemptMove(QgsLayoutPoint(8, 150, QgsUnitTypes.LayoutMillimeters))
            lay.addLayoutItem(bar)
            if legend:
                leg = QgsLayoutItemLegend(lay)
                leg.setLinkedMap(m)
                leg.setTitle("Legend")
                leg.attemptMove(QgsLayoutPoint(178, 14, QgsUnitTypes.LayoutMillimeters))
                lay.addLayoutItem(leg)
            path = out_dir / f"{name}.png"
            settings = QgsLayoutExporter.ImageExportSettings()
            settings.dpi = 110
            settings.generateWorldFile = False
            settings.exportMetadata = False
            result = QgsLayoutExporter(lay).exportToImage(str(path), settings)
            if result != QgsLayoutExporter.Success:
                raise RuntimeError(f"QGIS could not export {path}: {result}")
            written.append(path)
            return path

        # 1. footprint over the raster
        base = QgsRasterLayer(str(SAMPLE / "naip_2009.tif"), "NAIP 2009 (sample)")
        photo = QgsRasterLayer(str(outputs["georef"]), "photo, georeferenced by Skyloc")
        photo.renderer().setOpacity(0.8)
        fp = QgsVectorLayer(f"{outputs['footprint']}|layername=footprints", "photo footprint", "ogr")
        fp.setRenderer(fp.renderer().clone())
        fp.renderer().setSymbol(
            QgsFillSymbol.createSimple(
                {"color": "0,0,0,0", "outline_color": "255,40,40,255", "outline_width": "0.9"}
            )
        )
        for lyr in (base, photo, fp):
            if not lyr.isValid():
                raise RuntimeError(f"QGIS cannot open {lyr.source()}")
            project.addMapLayer(lyr)
        feat = next(fp.getFeatures())
        geom = QgsGeometry(feat.geometry())
        from qgis.core import QgsCoordinateTransform

        geom.transform(QgsCoordinateTransform(fp.crs(), base.crs(), project))
        extent = geom.boundingBox()
        extent.scale(1.6)
        layout(
            "footprint",
            [fp, photo, base],
            extent,
            f"Footprint of the sample photo on NAIP 2009: {feat['status']}, {feat['verified']} verified matches",
            legend=False,
        )

        project.removeAllMapLayers()  # the legend of the next picture lists only its own layers

        # 2. heatmap over the raster, with the clicked point
        base18 = QgsRasterLayer(str(SAMPLE / "naip_2018.tif"), "NAIP 2018 (sample)")
        plugin_package()
        from skyloc.icons import save_pngs
        from skyloc.layers import style_heatmap

        written += save_pngs(ROOT / "qgis_plugin" / "skyloc" / "icons")
        heat = QgsRasterLayer(str(outputs["heatmap"]), "similarity to the click (0..1)")
        stats = heat.dataProvider().bandStatistics(1)
        style_heatmap(heat, stats.minimumValue, stats.maximumValue, "at the clicked point")
        click = QgsVectorLayer("Point?crs=EPSG:4326", "clicked point", "memory")
        f = QgsFeature()
        f.setGeometry(QgsGeometry.fromPointXY(QgsPointXY(*CLICK_LONLAT)))
        click.dataProvider().addFeatures([f])
        click.renderer().setSymbol(
            QgsMarkerSymbol.createSimple(
                {"name": "cross2", "color": "255,255,255", "size": "5", "outline_width": "0.8"}
            )
        )
        for lyr in (base18, heat, click):
            project.addMapLayer(lyr)
        layout(
            "heatmap",
            [click, heat, base18],
            base18.extent(),
            "Similarity heatmap of NAIP 2018 to the embedding at the clicked point (default model)",
            legend=True,
        )
        assert heat.crs() == QgsCoordinateReferenceSystem("EPSG:26914")
        project.removeAllMapLayers()

        # 3. the dock at 300 px, driven like a user would, with a real engine
        written += render_dock(out_dir, outputs["work"], outputs["index"])
        # 4. the search area drawn on the map by the dock's Pick
        render_search_area(out_dir, written)
    finally:
        QgsProject.instance().clear()
        app.exitQgis()
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs" / "images"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="skyloc-shots-") as tmp:
        for path in render(out, engine_outputs(Path(tmp))):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
