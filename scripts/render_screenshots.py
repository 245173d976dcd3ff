"""Render the README pictures with QGIS from real engine outputs on the bundled sample (run by `make screenshots`).

    QT_QPA_PLATFORM=offscreen .venv-qgis/bin/python scripts/render_screenshots.py [--out docs/images]

1. ``skyloc footprint`` places the sample photo on the 2009 NAIP raster; the picture shows the raster, the
   photo warped onto the ground (the engine's GeoTIFF, semi-transparent) and its footprint polygon.
2. ``skyloc heatmap`` at a point of the 2018 raster; the picture shows the heatmap with the style the engine
   writes beside it (``.qml``), over the raster, with the clicked point and a legend.

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
    return {"footprint": fp, "georef": georef / "photo_2009_oblique.jpg.tif", "heatmap": heat}


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

    app = QgsApplication([], False)
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
        heat = QgsRasterLayer(str(outputs["heatmap"]), "similarity to the click")
        msg, ok = heat.loadNamedStyle(str(outputs["heatmap"].with_suffix(".qml")))
        if not ok:
            raise RuntimeError(f"QGIS could not load the heatmap style: {msg}")
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
