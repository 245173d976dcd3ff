"""The Processing algorithms against the real engine, through ``processing.run("skyloc:...")``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import PHOTO, SAMPLE
from qgis.core import (
    NULL,
    QgsFeature,
    QgsGeometry,
    QgsPointXY,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsRasterLayer,
    QgsVectorLayer,
)


def read_layer(path: str) -> QgsVectorLayer:
    layer = QgsVectorLayer(path, "out", "ogr")
    assert layer.isValid(), path
    return layer


class Log(QgsProcessingFeedback):
    """The messages an algorithm writes to its log (what the Processing dialog shows)."""

    def __init__(self) -> None:
        super().__init__()
        self.infos: list[str] = []
        self.warnings: list[str] = []

    def pushInfo(self, info: str) -> None:  # noqa: N802 (QGIS API)
        self.infos.append(info)
        super().pushInfo(info)

    def pushWarning(self, warning: str) -> None:  # noqa: N802 (QGIS API)
        self.warnings.append(warning)
        super().pushWarning(warning)


def test_localize_photos_on_index(plugin, built_index, photo_folder, work_dir, engine_settings):
    import processing

    out = work_dir / "results" / "footprints_alg.gpkg"
    cands = work_dir / "results" / "candidates_alg.gpkg"
    log = Log()
    result = processing.run(
        "skyloc:localizephotos",
        {
            "PHOTOS": str(photo_folder),
            "INDEX": built_index,
            "TOP_K": 3,
            "OUTPUT": str(out),
            "CANDIDATES": str(cands),
        },
        feedback=log,
    )
    # the model the index was built with, and the weights file and sha256 behind it
    manifest = json.loads((Path(built_index) / "manifest.json").read_text())
    line = next(i for i in log.infos if i.startswith("model "))
    assert line.startswith(f"model {manifest['model']['model_id']}: weights "), line
    sha = line.rsplit("sha256 ", 1)[1]
    assert len(sha) == 64 and manifest["model"]["model_id"].split("sha256:")[1] == sha[:8], line
    assert result["OUTPUT"] == str(out) and result["LOCALIZED"] == 1 and result["ERRORS"] == 0
    layer = read_layer(result["OUTPUT"])
    assert layer.crs().authid() == "EPSG:4326"
    assert layer.featureCount() == 1
    feature = next(layer.getFeatures())
    assert feature["status"] == "localized"
    assert feature["confidence"] > 0.5
    assert not feature.geometry().isEmpty()
    assert Path(feature["geotiff"]).is_file()
    assert read_layer(result["CANDIDATES"]).featureCount() == 3


def test_localize_photos_outside_roots_against_raster_to_shapefile(plugin, tmp_path, engine_settings):
    """Photos outside the engine's folders are uploaded; a Shapefile asked outside them is copied there."""
    import processing

    photos = tmp_path / "my photos"
    photos.mkdir()
    shutil.copy(PHOTO, photos / PHOTO.name)
    out = tmp_path / "out" / "footprints.shp"
    log = Log()
    result = processing.run(
        "skyloc:localizephotos",
        {"PHOTOS": str(photos), "AGAINST": str(SAMPLE / "naip_2009.tif"), "TOP_K": 2, "OUTPUT": str(out)},
        feedback=log,
    )
    assert result["OUTPUT"] == str(out)
    # the raster is read with the bands its layer shows (no guessed band order), the model is logged
    assert not [w for w in log.warnings if "band order guessed" in w], log.warnings
    assert any(i.startswith("model default: weights ") and "sha256 " in i for i in log.infos), log.infos
    for ext in (".shp", ".shx", ".dbf", ".prj"):
        assert out.with_suffix(ext).is_file()
    layer = read_layer(str(out))
    assert layer.crs().authid() == "EPSG:4326"
    assert layer.featureCount() == 1
    feature = next(layer.getFeatures())
    assert feature["status"] == "localized"
    assert not Path(feature["photo"]).exists()  # the upload was deleted from the engine after the job


def test_localize_photos_with_the_learned_matcher(plugin, tmp_path, engine_settings):
    import processing

    photos, out = tmp_path / "photos", tmp_path / "fp_aliked.gpkg"
    photos.mkdir()
    shutil.copy(PHOTO, photos / PHOTO.name)
    result = processing.run(
        "skyloc:localizephotos",
        {"PHOTOS": str(photos), "AGAINST": str(SAMPLE / "naip_2009.tif"), "TOP_K": 1,
         "MATCHER": 2, "OUTPUT": str(out)},
    )  # fmt: skip
    feature = next(read_layer(result["OUTPUT"]).getFeatures())
    assert feature["status"] == "localized" and feature["matcher"] == "aliked"


def test_localize_photos_needs_index_or_raster(plugin, photo_folder, tmp_path, engine_settings):
    import processing

    with pytest.raises(QgsProcessingException, match="either an index"):
        processing.run(
            "skyloc:localizephotos", {"PHOTOS": str(photo_folder), "OUTPUT": str(tmp_path / "x.gpkg")}
        )


def test_heatmap_at_point_in_another_crs(plugin, tmp_path, engine_settings):
    import processing

    out = tmp_path / "heat.tif"  # outside the engine's folders: staged, then copied with its style
    result = processing.run(
        "skyloc:heatmapatpoint",
        {"RASTER": str(SAMPLE / "naip_2018.tif"), "POINT": "-99.154,47.0205 [EPSG:4326]", "OUTPUT": str(out)},
    )
    assert result["OUTPUT"] == str(out)
    assert out.with_suffix(".qml").is_file()
    heat, raster = QgsRasterLayer(str(out), "heat"), QgsRasterLayer(str(SAMPLE / "naip_2018.tif"), "r")
    assert heat.isValid()
    assert heat.crs() == raster.crs()
    assert heat.extent().toString(1) == raster.extent().toString(1)
    assert heat.renderer().type() == "singlebandpseudocolor"  # the .qml beside it is its default style


def test_embeddings_at_points(plugin, tmp_path, engine_settings):
    import numpy as np
    import processing

    points = QgsVectorLayer("Point?crs=EPSG:4326&field=name:string", "pts", "memory")
    feats = []
    for name, (lon, lat) in {
        "shore": (-99.154, 47.0205),
        "field": (-99.14, 47.015),
        "away": (10.0, 50.0),
    }.items():
        f = QgsFeature(points.fields())
        f.setAttributes([name])
        f.setGeometry(QgsGeometry.fromPointXY(QgsPointXY(lon, lat)))
        feats.append(f)
    points.dataProvider().addFeatures(feats)
    sidecar = tmp_path / "emb.npy"
    result = processing.run(
        "skyloc:embeddingsatpoints",
        {
            "RASTER": str(SAMPLE / "naip_2018.tif"),
            "INPUT": points,
            "ATTRIBUTE": True,
            "OUTPUT": str(tmp_path / "emb.gpkg"),
            "SIDECAR": str(sidecar),
        },
    )
    layer = read_layer(result["OUTPUT"])
    rows = {f["name"]: f for f in layer.getFeatures()}
    assert set(rows) == {"shore", "field", "away"}
    vec = json.loads(rows["shore"]["embedding"])
    assert rows["shore"]["emb_dim"] == len(vec) == 112
    assert abs(sum(v * v for v in vec) - 1.0) < 1e-3  # L2-normalised
    assert rows["away"]["emb_dim"] is None or rows["away"]["emb_dim"] == NULL
    matrix = np.load(sidecar)
    assert matrix.shape == (3, 112)
    assert np.isnan(matrix[2]).all() and np.isfinite(matrix[:2]).all()


def test_temporary_outputs(plugin, photo_folder, work_dir, engine_settings):
    """Temporary outputs (the modeler's default) work although Processing's temp folder is not a root."""
    import processing

    index = processing.run(
        "skyloc:buildindex",
        {"SOURCES": [str(SAMPLE / "naip_2009.tif")], "TILE_SIZES": "512", "OUTPUT": "TEMPORARY_OUTPUT"},
    )["OUTPUT"]
    assert Path(index).is_relative_to(work_dir / "results") and Path(index, "manifest.json").is_file()
    footprints = processing.run(
        "skyloc:localizephotos",
        {"PHOTOS": str(photo_folder), "INDEX": index, "TOP_K": 2, "OUTPUT": "TEMPORARY_OUTPUT"},
    )["OUTPUT"]
    assert read_layer(footprints).featureCount() == 1
    heat = processing.run(
        "skyloc:heatmapatpoint",
        {
            "RASTER": str(SAMPLE / "naip_2018.tif"),
            "POINT": "488500,5207000 [EPSG:26914]",
            "OUTPUT": "TEMPORARY_OUTPUT",
        },
    )["OUTPUT"]
    assert QgsRasterLayer(heat, "heat").isValid()


def test_processing_cancel_cancels_the_engine_job(plugin, work_dir, engine_settings):
    """feedback.cancel() during a run -> the engine's job is cancelled, nothing is left behind."""
    import processing
    from qgis.core import QgsProcessingFeedback

    feedback = QgsProcessingFeedback()
    feedback.progressChanged.connect(lambda p: p > 0 and feedback.cancel())
    out = work_dir / "cancelled_by_feedback"
    with pytest.raises(QgsProcessingException, match="Cancelled"):
        processing.run(
            "skyloc:buildindex",
            {"SOURCES": [str(SAMPLE / "naip_2018.tif")], "TILE_SIZES": "64,96", "OUTPUT": str(out)},
            feedback=feedback,
        )
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_loaded_results_styled_like_the_docks_with_the_georeferenced_photo(
    plugin, built_index, photo_folder, work_dir, clean_project, engine_settings
):
    """Run from the Processing dialog (results loaded): the dock's styles, and the photo layer too."""
    import processing
    from qgis.core import QgsProject
    from skyloc.layers import HEATMAP_RANGE, is_heatmap

    result = processing.runAndLoadResults(
        "skyloc:localizephotos",
        {
            "PHOTOS": str(photo_folder),
            "INDEX": built_index,
            "TOP_K": 2,
            "OUTPUT": str(work_dir / "results" / "loaded_footprints.gpkg"),
            "CANDIDATES": str(work_dir / "results" / "loaded_candidates.gpkg"),
        },
    )
    assert result["LOCALIZED"] == 1
    layers = list(QgsProject.instance().mapLayers().values())
    vectors = {lyr.source().split("|")[0]: lyr for lyr in layers if isinstance(lyr, QgsVectorLayer)}
    feet = vectors[str(work_dir / "results" / "loaded_footprints.gpkg")]
    cands = vectors[str(work_dir / "results" / "loaded_candidates.gpkg")]
    for layer, field in ((feet, "status"), (cands, "rank")):
        assert layer.renderer().type() == "categorizedSymbol" and layer.renderer().classAttribute() == field
    tif = next(f["geotiff"] for f in feet.getFeatures() if f["status"] == "localized")
    photos = [lyr for lyr in layers if isinstance(lyr, QgsRasterLayer) and lyr.source() == tif]
    assert len(photos) == 1 and photos[0].isValid()

    heat = processing.runAndLoadResults(
        "skyloc:heatmapatpoint",
        {
            "RASTER": str(SAMPLE / "naip_2018.tif"),
            "POINT": "488500,5207000 [EPSG:26914]",
            "RESOLUTION": 20,
            "OUTPUT": str(work_dir / "results" / "loaded_heat.tif"),
        },
    )
    loaded = [lyr for lyr in QgsProject.instance().mapLayers().values() if lyr.source() == heat["OUTPUT"]]
    assert len(loaded) == 1 and is_heatmap(loaded[0])
    assert loaded[0].name() == "Skyloc heatmap naip_2018 @ 488500, 5207000"
    renderer = loaded[0].renderer()
    assert (renderer.classificationMin(), renderer.classificationMax()) == HEATMAP_RANGE
    assert "this heatmap's values" in loaded[0].metadata().abstract()
