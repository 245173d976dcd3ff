"""Processing algorithms (provider "skyloc"): usable alone, in batch and in the graphical modeler.

Each one asks the engine through a fresh client, follows the job with the feedback's progress, and
cancels the engine's job when the feedback is cancelled. Engine errors become ``QgsProcessingException``s
with the plugin's plain-words explanation.
"""

from __future__ import annotations

import json
import os
from typing import Any

from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsFeatureSink,
    QgsField,
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterPoint,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
    QgsProcessingUtils,
    QgsRectangle,
)
from qgis.PyQt.QtCore import QCoreApplication

from .client import Job, ServiceError, SkylocClient
from .engine_link import MODEL_LOAD_TIMEOUT_S, EngineLink, EngineSettings, explain, inside
from .layers import (
    heatmap_name,
    point_query,
    raster_file,
    renderer_bands,
    rgb_bands,
    style_candidates,
    style_footprints,
    style_heatmap,
)
from .paths import StagedOutput, engine_photos, engine_roots, require_inside
from .tasks import follow_job, stamp
from .tile_layers import MERCATOR, ZOOM0_RES, engine_source, extent_lonlat

WGS84 = "EPSG:4326"
#: Points per /embed request.
EMBED_CHUNK = 500


def new_field(name: str, kind: str) -> QgsField:
    """A field of type ``kind`` (Int, Double, String): QMetaType on QGIS >= 3.38 (Qt6-ready), QVariant before."""
    if Qgis.versionInt() >= 33800:
        from qgis.PyQt.QtCore import QMetaType

        return QgsField(name, getattr(QMetaType.Type, "QString" if kind == "String" else kind))
    from qgis.PyQt.QtCore import QVariant

    return QgsField(name, getattr(QVariant, kind))


def tr(text: str) -> str:
    return QCoreApplication.translate("Skyloc", text)


class StyleOnLoad(QgsProcessingLayerPostProcessorInterface):
    """Style an output layer when Processing loads it: the same styling code as the dock's layers."""

    #: QGIS does not own post-processors: they must outlive the algorithm (it runs them after).
    ALIVE: list[StyleOnLoad] = []

    def __init__(self, style, name: str | None = None) -> None:
        super().__init__()
        self.style = style
        self.name = name

    def postProcessLayer(self, layer, context, feedback) -> None:  # noqa: N802 (QGIS API)
        if self.name:
            layer.setName(self.name)
        self.style(layer)


def style_on_load(context: QgsProcessingContext, dest: str, style, name: str | None = None) -> bool:
    """Give the output ``dest`` (as the algorithm got it) ``style`` when it is loaded (False: not loaded)."""
    if not dest or not context.willLoadLayerOnCompletion(dest):
        return False
    post = StyleOnLoad(style, name)
    StyleOnLoad.ALIVE.append(post)
    context.layerToLoadOnCompletionDetails(dest).setPostProcessor(post)
    return True


class SkylocAlgorithm(QgsProcessingAlgorithm):
    """Common parts: client, job following with feedback, errors in words."""

    name_ = ""
    display = ""
    help_text = ""

    def name(self) -> str:
        return self.name_

    def displayName(self) -> str:  # noqa: N802 (QGIS API)
        return tr(self.display)

    def shortHelpString(self) -> str:  # noqa: N802 (QGIS API)
        return tr(self.help_text)

    def createInstance(self) -> QgsProcessingAlgorithm:  # noqa: N802 (QGIS API)
        return type(self)()

    #: read timeout of the algorithm's requests (seconds): longer where a request may load a model
    timeout = 60.0

    def client(self) -> SkylocClient:
        return EngineLink.instance().client(timeout=self.timeout)

    def follow(self, client: SkylocClient, job: Job, feedback: QgsProcessingFeedback) -> Job:
        last = [""]

        def progress(fraction: float, message: str) -> None:
            feedback.setProgress(100.0 * fraction)
            if message and message != last[0]:
                last[0] = message
                feedback.setProgressText(message)

        job = follow_job(client, job, progress, feedback.isCanceled)
        for warning in job.warnings:  # e.g. a raster whose band order the engine guessed
            feedback.pushWarning(f"engine warning: {warning}")
        return job

    def add_advanced(self, param: QgsProcessingParameterDefinition) -> None:
        """Add ``param`` among the dialog's "Advanced parameters" (folded by default)."""
        param.setFlags(param.flags() | QgsProcessingParameterDefinition.Flag.FlagAdvanced)
        self.addParameter(param)

    def add_model_parameters(self, label: str = "Model", advanced: bool = False) -> None:
        """MODEL, WEIGHTS (file) and SHA256: the model and, where it needs them, its weights."""
        model = QgsProcessingParameterString("MODEL", tr(label), "default")
        if advanced:
            self.add_advanced(model)
        else:
            self.addParameter(model)
        weights = QgsProcessingParameterFile(
            "WEIGHTS",
            tr("Weights file (empty: the weights the engine knows for the model)"),
            optional=True,
        )
        self.add_advanced(weights)
        sha = QgsProcessingParameterString("SHA256", tr("Weights sha256 (64 hex digits)"), optional=True)
        self.add_advanced(sha)

    def bands(self, parameters, context, layers) -> list[int] | None:
        """BANDS typed in, else the layers' renderer choice when they agree (None: the engine's rule)."""
        text = (self.parameterAsString(parameters, "BANDS", context) or "").replace(" ", "")
        if text:
            try:
                bands = [int(b) for b in text.split(",") if b]
            except ValueError:
                bands = []
            if len(bands) != 3 or min(bands) < 1:
                raise QgsProcessingException(
                    tr("Bands: three band numbers (1-based) as red,green,blue, e.g. 3,2,1")
                )
            return bands
        chosen = {tuple(b) for b in (renderer_bands(lyr) for lyr in layers) if b is not None}
        if len(chosen) > 1:
            raise QgsProcessingException(
                tr("The rasters show different bands: give the bands to read as red,green,blue.")
            )
        return list(chosen.pop()) if chosen else None

    def model_options(self, parameters, context, roots) -> dict[str, Any]:
        """``model``, ``weights`` (inside the engine's folders) and ``sha256`` for the client."""
        weights = self.parameterAsFile(parameters, "WEIGHTS", context) if parameters.get("WEIGHTS") else ""
        sha = (self.parameterAsString(parameters, "SHA256", context) or "").strip() or None
        return {
            "model": self.model(parameters, context),
            "weights": require_inside(weights, roots, "weights file") if weights else None,
            "sha256": sha,
        }

    def processAlgorithm(  # noqa: N802 (QGIS API)
        self, parameters: dict[str, Any], context: QgsProcessingContext, feedback: QgsProcessingFeedback
    ) -> dict[str, Any]:
        try:
            with self.client() as client:
                return self.process(client, parameters, context, feedback)
        except ServiceError as exc:
            raise QgsProcessingException(explain(exc, processing=True)) from exc

    def process(
        self,
        client: SkylocClient,
        parameters: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> dict[str, Any]:
        raise NotImplementedError

    def model(self, parameters: dict[str, Any], context: QgsProcessingContext) -> str:
        return self.parameterAsString(parameters, "MODEL", context) or EngineSettings.load().model

    def raster(self, parameters: dict[str, Any], name: str, context: QgsProcessingContext, roots):
        """The layer and what the engine reads: a raster file's path, an MBTiles/GeoPackage file's (both
        inside the engine's folders), or a tile service's URL template / ``wmts:`` source; and its
        :class:`~skyloc.tile_layers.LayerSource` (``kind``: "file", "tiles", "xyz", "wmts")."""
        layer = self.parameterAsRasterLayer(parameters, name, context)
        if layer is None:
            raise ServiceError(None, "raster_unusable", f"no raster given for {name}")
        src = engine_source(layer)
        if src.kind == "file":
            return layer, require_inside(raster_file(layer), roots, "raster"), src
        if src.kind == "tiles":
            return layer, require_inside(src.source, roots, "tiles file"), src
        return layer, src.source, src

    def add_tile_parameters(self, extent: bool = True) -> None:
        """ZOOM (advanced) and, with ``extent``, EXTENT: how a tile layer (XYZ, WMTS, MBTiles, GeoPackage)
        is read. Raster files ignore them."""
        zoom = QgsProcessingParameterNumber(
            "ZOOM",
            tr("Tile layers: zoom level to read (required for XYZ/WMTS services)"),
            QgsProcessingParameterNumber.Type.Integer,
            optional=True,
            minValue=0,
            maxValue=22,
        )
        self.add_advanced(zoom)
        if extent:
            self.addParameter(
                QgsProcessingParameterExtent(
                    "EXTENT",
                    tr(
                        "Tile layers: area to read (empty: the layer's extent; required for XYZ/WMTS services)"
                    ),
                    optional=True,
                )
            )

    def tile_zoom(self, parameters, context, layer, src) -> int | None:
        """ZOOM, checked against the layer's zooms; required for a tile service (and for tiles at all when
        ``required``)."""
        if parameters.get("ZOOM") in (None, ""):
            if src.is_service:
                raise QgsProcessingException(
                    tr(
                        f"Layer {layer.name()!r} is a tile service: give the zoom level to read its tiles at "
                        "(ZOOM, an advanced parameter; e.g. 15)."
                    )
                )
            return None
        zoom = self.parameterAsInt(parameters, "ZOOM", context)
        if src.zmin is not None and zoom < src.zmin or src.zmax is not None and zoom > src.zmax:
            raise QgsProcessingException(
                tr(f"Layer {layer.name()!r} serves zooms {src.zmin}-{src.zmax}, not ZOOM {zoom}.")
            )
        return zoom

    def tile_bbox(self, parameters, context, layer, src, name: str = "EXTENT") -> list[float] | None:
        """The area to read a tile layer over, [min lon, min lat, max lon, max lat]: ``name`` (EXTENT), else
        the layer's extent for a tiles file; required for a service (its extent is the world)."""
        if parameters.get(name) not in (None, ""):
            crs = self.parameterAsExtentCrs(parameters, name, context)
            box = self.parameterAsExtent(parameters, name, context, crs)
            if not box.isEmpty():
                return list(extent_lonlat(box, crs))
        if src.is_service:
            raise QgsProcessingException(
                tr(
                    f"Layer {layer.name()!r} is a tile service: give the area to read its tiles over "
                    f"({name}), not the whole world."
                )
            )
        return list(extent_lonlat(layer.extent(), layer.crs()))

    def tile_options(
        self, client, parameters, context, layer, src, feedback, around: QgsRectangle | None = None
    ) -> dict[str, Any]:
        """``zoom``, ``bbox`` and ``crs`` (the layer's: points are given in it) for reading a tile layer at
        one zoom (heatmap, embeddings); {} for a raster file. The zoom: ZOOM, else an MBTiles/GeoPackage
        file's finest; the area: EXTENT, else ``around`` (in the layer's CRS: the points) grown by two
        tiles, else a tiles file's extent."""
        if src.kind == "file":
            return {}
        zoom = self.tile_zoom(parameters, context, layer, src)
        if zoom is None:
            zoom = src.zmax
        if zoom is None:
            raise QgsProcessingException(
                tr(f"Give the zoom level to read layer {layer.name()!r} at (ZOOM, an advanced parameter).")
            )
        if around is not None and parameters.get("EXTENT") in (None, ""):
            box = QgsCoordinateTransform(
                layer.crs(), MERCATOR, context.transformContext()
            ).transformBoundingBox(around)
            bbox = list(extent_lonlat(box.buffered(2 * 256 * ZOOM0_RES / 2**zoom), MERCATOR))
        else:
            bbox = self.tile_bbox(parameters, context, layer, src)
        self.tile_plan_info(client, src, zoom, {"bbox": bbox}, feedback)
        crs = layer.crs().authid()
        return {"zoom": zoom, "bbox": bbox, **({"crs": crs} if crs else {})}

    def tile_plan_info(
        self, client, src, zoom: int, area: dict[str, Any], feedback, extent_only=True
    ) -> None:
        """Say in the log what reading a service at ``zoom`` over ``area`` (``bbox``, or ``near`` and
        ``radius_km``) downloads, from the engine's plan (``extent_only``: the area's tiles alone, as a
        heatmap reads them; else a match's overlapping mosaics); nothing is asked in Processing: the
        engine's tile cap refuses a huge area."""
        if not src.is_service:
            return
        exact = {"span": 1, "overlap": 0.0} if extent_only else {}
        plan = client.index_plan([src.source], zooms=[zoom], **area, **exact)
        p = plan[0] if plan else {}
        mb = (p.get("estimated_download_bytes") or 0) / 1e6
        feedback.pushInfo(
            f"{src.layer_name}: zoom {zoom}, {p.get('tiles_needed', '?')} tiles ({p.get('tiles_cached', 0)} "
            f"already cached, {p.get('tiles_to_download', '?')} to download, about {mb:.0f} MB)"
            + (f"; imagery: {src.attribution}" if src.attribution else "")
        )


class BuildIndex(SkylocAlgorithm):
    name_ = "buildindex"
    display = "Build index from rasters"
    help_text = (
        "Cuts the rasters (and/or a folder of XYZ mosaics) into tiles at each tile size, encodes every tile "
        "at 4 rotations and writes a Skyloc index folder, to localize photos on. The rasters and the index "
        "folder must lie inside the engine's folders (a temporary output goes to the results folder). "
        "Bands: the raster bands read as red, green, blue (empty: the layers' own renderer choice, else "
        "the engine's rule, which warns when it has to guess). Mosaics: with their subfolders if asked, "
        "leaving out the files matching the exclude patterns; span: XYZ tiles per side of a mosaic file."
    )

    def initAlgorithm(self, config=None) -> None:  # noqa: N802 (QGIS API)
        self.addParameter(
            QgsProcessingParameterMultipleLayers(
                "SOURCES", tr("Rasters"), QgsProcessing.SourceType.TypeRaster, optional=True
            )
        )
        self.addParameter(
            QgsProcessingParameterFile(
                "MOSAICS",
                tr("Folder of XYZ mosaics (*Z_ROW_COL.jpg|png)"),
                behavior=QgsProcessingParameterFile.Behavior.Folder,
                optional=True,
            )
        )
        self.addParameter(QgsProcessingParameterBoolean("RECURSIVE", tr("Mosaics: with subfolders"), False))
        self.addParameter(
            QgsProcessingParameterString(
                "EXCLUDE", tr("Mosaics: leave out (globs, comma-separated)"), optional=True
            )
        )
        self.addParameter(
            QgsProcessingParameterNumber(
                "SPAN",
                tr("Mosaics: span (tiles per side)"),
                QgsProcessingParameterNumber.Type.Integer,
                4,
                minValue=1,
                maxValue=64,
            )
        )
        self.addParameter(QgsProcessingParameterString("TILE_SIZES", tr("Tile sizes (pixels)"), "256,512"))
        self.addParameter(
            QgsProcessingParameterString(
                "BANDS",
                tr("Bands read as red,green,blue (e.g. 3,2,1; empty: the layers' own)"),
                optional=True,
            )
        )
        self.addParameter(
            QgsProcessingParameterNumber(
                "OVERLAP",
                tr("Overlap between neighbouring tiles"),
                QgsProcessingParameterNumber.Type.Double,
                0.5,
                minValue=0.0,
                maxValue=0.95,
            )
        )
        self.add_model_parameters()
        self.addParameter(QgsProcessingParameterFolderDestination("OUTPUT", tr("Index folder")))

    def process(self, client, parameters, context, feedback):
        roots = engine_roots(client)
        sources = []
        layers = self.parameterAsLayerList(parameters, "SOURCES", context)
        for layer in layers:
            sources.append(require_inside(raster_file(layer), roots, "raster"))
        mosaics = self.parameterAsFile(parameters, "MOSAICS", context)
        if mosaics:
            sources.append(require_inside(mosaics, roots, "mosaic folder"))
        if not sources:
            raise QgsProcessingException(tr("Give at least one raster or a folder of XYZ mosaics."))
        try:
            sizes = [int(s) for s in self.parameterAsString(parameters, "TILE_SIZES", context).split(",")]
        except ValueError as exc:
            raise QgsProcessingException(
                tr("Tile sizes: integers separated by commas, e.g. 256,512")
            ) from exc
        out = self.parameterAsFileOutput(parameters, "OUTPUT", context)
        if not inside(out, roots):
            if inside(out, [QgsProcessingUtils.tempFolder()]):
                out = os.path.join(EngineLink.instance().output_dir(client), f"index_{stamp()}")
                feedback.pushInfo(f"temporary output: the index goes to {out} (inside the engine's folders)")
            else:
                require_inside(out, roots, "index folder")
        bands = self.bands(parameters, context, layers)
        if bands is not None:
            feedback.pushInfo(f"bands read as red, green, blue: {','.join(map(str, bands))}")
        exclude = [
            p.strip()
            for p in (self.parameterAsString(parameters, "EXCLUDE", context) or "")
            .replace(";", ",")
            .split(",")
            if p.strip()
        ]
        job = client.index(
            sources,
            out,
            tile_sizes=sizes,
            overlap=self.parameterAsDouble(parameters, "OVERLAP", context),
            bands=bands,
            span=self.parameterAsInt(parameters, "SPAN", context) if mosaics else None,
            exclude=exclude or None,
            recursive=self.parameterAsBoolean(parameters, "RECURSIVE", context) or None,
            **self.model_options(parameters, context, roots),
        )
        job = self.follow(client, job, feedback)
        counts = (job.summary or {}).get("counts", {})
        feedback.pushInfo(f"index {out}: {counts.get('tiles')} tiles, {counts.get('vectors')} vectors")
        return {"OUTPUT": out}


class LocalizePhotos(SkylocAlgorithm):
    name_ = "localizephotos"
    display = "Localize photos (footprints)"
    help_text = (
        "For every photo of a folder: retrieves the most similar tiles of an index (or tries a raster), "
        "matches the photo on them and writes its footprint (status, confidence, reason) as a GeoPackage "
        "or Shapefile layer in EPSG:4326, with a georeferenced GeoTIFF and a Georeferencer .points file "
        "per localized photo (in a _georef folder beside the layer). Optional search area: a box, or a "
        "point with a radius. Photos outside the engine's folders are uploaded to it. The raster to match "
        "on may be a tile layer: an XYZ or WMTS service (give ZOOM, an advanced parameter, and the search "
        "area its tiles are fetched over, through the engine's cache) or an MBTiles/GeoPackage file."
    )

    def initAlgorithm(self, config=None) -> None:  # noqa: N802 (QGIS API)
        self.addParameter(
            QgsProcessingParameterFile(
                "PHOTOS", tr("Folder of photos"), behavior=QgsProcessingParameterFile.Behavior.Folder
            )
        )
        self.addParameter(
            QgsProcessingParameterFile(
                "INDEX",
                tr("Index folder"),
                behavior=QgsProcessingParameterFile.Behavior.Folder,
                optional=True,
            )
        )
        self.addParameter(
            QgsProcessingParameterRasterLayer(
                "AGAINST", tr("or: raster to match on (no index)"), optional=True
            )
        )
        self.addParameter(
            QgsProcessingParameterNumber(
                "TOP_K",
                tr("Places tried per photo"),
                QgsProcessingParameterNumber.Type.Integer,
                5,
                False,
                1,
                100,
            )
        )
        matcher = QgsProcessingParameterEnum("MATCHER", tr("Matcher"), options=list(MATCHERS), defaultValue=0)
        matcher.setHelp(tr(MATCHER_HELP))
        self.addParameter(matcher)
        bands = QgsProcessingParameterString(
            "BANDS",
            tr("Raster to match on: bands read as red,green,blue (e.g. 3,2,1; empty: the layer's own)"),
            optional=True,
        )
        self.add_advanced(bands)
        # an index is searched with the model it was built with (logged); these choose the model of the
        # windows of a raster to match on
        self.add_model_parameters("Raster to match on: retrieval model of its windows", advanced=True)
        self.add_tile_parameters(extent=False)  # ZOOM; the search area is the area of a tile layer
        self.addParameter(QgsProcessingParameterExtent("EXTENT", tr("Search area: box"), optional=True))
        self.addParameter(QgsProcessingParameterPoint("NEAR", tr("Search area: near point"), optional=True))
        self.addParameter(
            QgsProcessingParameterNumber(
                "RADIUS_KM",
                tr("Search area: radius around the point (km)"),
                QgsProcessingParameterNumber.Type.Double,
                optional=True,
                minValue=0.001,
            )
        )
        self.addParameter(
            QgsProcessingParameterVectorDestination(
                "OUTPUT", tr("Footprints"), QgsProcessing.SourceType.TypeVectorPolygon
            )
        )
        self.addParameter(
            QgsProcessingParameterVectorDestination(
                "CANDIDATES",
                tr("Candidate tiles"),
                QgsProcessing.SourceType.TypeVectorPolygon,
                optional=True,
                createByDefault=False,
            )
        )
        for name, text in (("LOCALIZED", "Localized"), ("REJECTED", "Rejected"), ("ERRORS", "Unreadable")):
            self.addOutput(QgsProcessingOutputNumber(name, tr(f"{text} photos")))

    def area(self, parameters, context) -> dict[str, Any]:
        wgs84 = QgsCoordinateReferenceSystem(WGS84)
        area: dict[str, Any] = {}
        if parameters.get("NEAR") not in (None, ""):
            p = self.parameterAsPoint(parameters, "NEAR", context, wgs84)
            radius = parameters.get("RADIUS_KM")
            if radius in (None, ""):
                raise QgsProcessingException(tr("A search point needs a radius (km)."))
            area.update(
                near=[p.y(), p.x()], radius_km=self.parameterAsDouble(parameters, "RADIUS_KM", context)
            )
        if parameters.get("EXTENT") not in (None, ""):
            box = self.parameterAsExtent(parameters, "EXTENT", context, wgs84)
            if not box.isEmpty():
                area["bbox"] = [box.xMinimum(), box.yMinimum(), box.xMaximum(), box.yMaximum()]
        return area

    def process(self, client, parameters, context, feedback):
        roots = engine_roots(client)
        work = os.path.join(EngineLink.instance().output_dir(client), "processing")
        photos_given = [self.parameterAsFile(parameters, "PHOTOS", context)]
        index = self.parameterAsFile(parameters, "INDEX", context)
        against = against_layer = src = None
        if parameters.get("AGAINST") not in (None, ""):
            against_layer, against, src = self.raster(parameters, "AGAINST", context, roots)
        if bool(index) == bool(against):
            raise QgsProcessingException(tr("Give either an index folder or a raster to match on."))
        out_dest = self.parameterAsOutputLayer(parameters, "OUTPUT", context)
        out = StagedOutput(out_dest, roots, work)
        cands = None
        cands_dest = ""
        if index and parameters.get("CANDIDATES") not in (None, ""):
            cands_dest = self.parameterAsOutputLayer(parameters, "CANDIDATES", context)
            cands = StagedOutput(cands_dest, roots, work)
        options: dict[str, Any] = {
            "top_k": self.parameterAsInt(parameters, "TOP_K", context),
            "matcher": MATCHERS[self.parameterAsEnum(parameters, "MATCHER", context)],
        }
        if index:
            options.update(index=require_inside(index, roots, "index"), **self.area(parameters, context))
            if cands is not None:
                options["candidates_out"] = cands.engine_path
            feedback.pushInfo(model_line(client, index_model_id(index)))
        else:
            model = self.model_options(parameters, context, roots)
            tiles: dict[str, Any] = {}
            if src.kind != "file":  # tiles: ZOOM and the search area say which (a service needs both)
                zoom = self.tile_zoom(parameters, context, against_layer, src)
                area = self.area(parameters, context)
                if src.is_service and not area:
                    raise QgsProcessingException(
                        tr(
                            f"Layer {against_layer.name()!r} is a tile service: give the search area (a box, "
                            "or a point and a radius) to read its tiles over, not the whole world."
                        )
                    )
                tiles = {"zooms": None if zoom is None else [zoom], **area}
                if zoom is not None:
                    self.tile_plan_info(client, src, zoom, area, feedback, extent_only=False)
            bands = self.bands(parameters, context, [against_layer]) if src.kind == "file" else None
            options.update(against=against, bands=bands, **model, **tiles)
            feedback.pushInfo(model_line(client, model["model"], model["weights"], model["sha256"]))
        try:
            with engine_photos(client, photos_given, roots) as photos:
                job = self.follow(client, client.footprint(photos, out.engine_path, **options), feedback)
        except BaseException:
            for staged in (out, cands):
                if staged is not None:
                    staged.discard()
            raise
        results = {"OUTPUT": out.finish()}
        if cands is not None:
            results["CANDIDATES"] = cands.finish()
        summary = job.summary or {}
        for p in summary.get("photos", []):
            where = p.get("geotiff") or ""
            feedback.pushInfo(
                f"{os.path.basename(p.get('photo', ''))}: {p.get('status')} {p.get('reason') or where}"
            )
            if p.get("status") == "error":
                feedback.reportError(f"photo {p.get('photo')} could not be read: {p.get('reason')}")
        # loaded like the dock's: styled footprints/candidates and every georeferenced photo
        if style_on_load(context, out_dest, style_footprints):
            for p in summary.get("photos", []):
                tif = p.get("geotiff")
                if tif and os.path.isfile(tif):
                    name = os.path.splitext(os.path.basename(tif))[0]
                    details = QgsProcessingContext.LayerDetails(name, context.project(), name)
                    context.addLayerToLoadOnCompletion(tif, details)
        if cands is not None:
            style_on_load(context, cands_dest, style_candidates)
        results.update(
            LOCALIZED=summary.get("localized", 0),
            REJECTED=summary.get("rejected", 0),
            ERRORS=summary.get("errors", 0),
        )
        return results


class HeatmapAtPoint(SkylocAlgorithm):
    name_ = "heatmapatpoint"
    display = "Embedding heatmap at a point"
    help_text = (
        "Similarity of every part of a raster to the embedding at one point (in any CRS: it is transformed "
        "to the raster's). Writes a float32 Cloud-Optimized GeoTIFF of cosine similarity on the raster's "
        "grid, with a pseudocolour .qml style beside it. A tile layer (XYZ, WMTS, MBTiles, GeoPackage) is "
        "read at ZOOM (advanced; a tiles file: its finest) over the area (EXTENT; a tiles file: its "
        "extent); a service needs both, and its download is said in the log."
    )

    def initAlgorithm(self, config=None) -> None:  # noqa: N802 (QGIS API)
        self.addParameter(QgsProcessingParameterRasterLayer("RASTER", tr("Raster")))
        self.addParameter(QgsProcessingParameterPoint("POINT", tr("Point")))
        self.addParameter(
            QgsProcessingParameterNumber(
                "RESOLUTION",
                tr("Output pixel size (raster CRS units; empty: the raster's)"),
                QgsProcessingParameterNumber.Type.Double,
                optional=True,
                minValue=0.0,
            )
        )
        self.add_model_parameters()
        self.add_tile_parameters()
        self.addParameter(QgsProcessingParameterRasterDestination("OUTPUT", tr("Heatmap")))

    def process(self, client, parameters, context, feedback):
        roots = engine_roots(client)
        layer, raster, src = self.raster(parameters, "RASTER", context, roots)
        point = self.parameterAsPoint(parameters, "POINT", context, layer.crs())
        tiles = self.tile_options(client, parameters, context, layer, src, feedback)
        resolution = None
        if parameters.get("RESOLUTION") not in (None, ""):
            resolution = self.parameterAsDouble(parameters, "RESOLUTION", context) or None
        work = os.path.join(EngineLink.instance().output_dir(client), "processing")
        out_dest = self.parameterAsOutputLayer(parameters, "OUTPUT", context)
        out = StagedOutput(out_dest, roots, work)
        if os.path.splitext(out.dest)[1].lower() not in (".tif", ".tiff"):
            raise QgsProcessingException(tr("The heatmap is a GeoTIFF: give a .tif output."))
        model = self.model_options(parameters, context, roots)
        job = client.heatmap(
            raster,
            out.engine_path,
            at=[point.x(), point.y()],
            resolution=resolution,
            bands=rgb_bands(layer, model["model"]) if src.kind == "file" else None,
            **model,
            **tiles,
        )
        try:
            job = self.follow(client, job, feedback)
        except BaseException:
            out.discard()
            raise
        summary = job.summary or {}
        feedback.pushInfo(f"{summary.get('query')}: similarity {summary.get('min')} to {summary.get('max')}")
        query = point_query(point.x(), point.y(), layer.crs())
        lo, hi = summary.get("min"), summary.get("max")
        style_on_load(
            context,
            out_dest,
            lambda lyr: style_heatmap(lyr, lo, hi, query),
            heatmap_name(layer.name(), query),
        )
        return {"OUTPUT": out.finish()}


class EmbeddingsAtPoints(SkylocAlgorithm):
    name_ = "embeddingsatpoints"
    timeout = MODEL_LOAD_TIMEOUT_S  # its first /embed may load the model
    display = "Embeddings at points of a layer"
    help_text = (
        "The embedding of the raster at each point of a layer (transformed to the raster's CRS). Output: a "
        "copy of the layer with emb_dim, emb_col, emb_row (raster pixel position) and, if asked, the vector "
        "itself as JSON text in 'embedding' (GeoPackage: Shapefile text fields hold only 254 characters). "
        "Optional sidecar: .json (vectors by feature id) or .npy (N x D matrix in feature order; NaN rows "
        "for points outside the raster). A tile layer (XYZ, WMTS, MBTiles, GeoPackage) is read at ZOOM "
        "(advanced; a tiles file: its finest) over EXTENT, else around the points."
    )

    def initAlgorithm(self, config=None) -> None:  # noqa: N802 (QGIS API)
        self.addParameter(QgsProcessingParameterRasterLayer("RASTER", tr("Raster")))
        self.addParameter(
            QgsProcessingParameterFeatureSource(
                "INPUT", tr("Points"), [QgsProcessing.SourceType.TypeVectorPoint]
            )
        )
        self.add_model_parameters()
        self.add_tile_parameters()
        self.addParameter(
            QgsProcessingParameterBoolean("ATTRIBUTE", tr("Store the embedding as an attribute (JSON)"), True)
        )
        self.addParameter(QgsProcessingParameterFeatureSink("OUTPUT", tr("Points with embeddings")))
        self.addParameter(
            QgsProcessingParameterFileDestination(
                "SIDECAR",
                tr("Sidecar file"),
                "JSON (*.json);;NumPy (*.npy)",
                optional=True,
                createByDefault=False,
            )
        )

    def process(self, client, parameters, context, feedback):
        roots = engine_roots(client)
        layer, raster, src = self.raster(parameters, "RASTER", context, roots)
        source = self.parameterAsSource(parameters, "INPUT", context)
        if source is None:
            raise QgsProcessingException(tr("No point layer given."))
        with_attr = self.parameterAsBoolean(parameters, "ATTRIBUTE", context)
        fields = source.fields()
        for name, kind in (("emb_dim", "Int"), ("emb_col", "Double"), ("emb_row", "Double")):
            fields.append(new_field(name, kind))
        if with_attr:
            fields.append(new_field("embedding", "String"))
        sink, dest_id = self.parameterAsSink(
            parameters, "OUTPUT", context, fields, source.wkbType(), source.sourceCrs()
        )
        if sink is None:
            raise QgsProcessingException(self.invalidSinkError(parameters, "OUTPUT"))
        if with_attr and str(dest_id).lower().endswith(".shp"):
            feedback.pushWarning(
                "Shapefile text fields hold 254 characters: 'embedding' will be cut; use a GeoPackage"
            )
        transform = QgsCoordinateTransform(source.sourceCrs(), layer.crs(), context.transformContext())
        extent = layer.extent()
        tiles: dict[str, Any] = {}
        if src.kind != "file":  # the points' neighbourhood unless EXTENT says where
            near = (
                transform.transformBoundingBox(source.sourceExtent()) if source.featureCount() > 0 else None
            )
            tiles = self.tile_options(client, parameters, context, layer, src, feedback, around=near)
            lonlat = QgsCoordinateTransform(
                QgsCoordinateReferenceSystem(WGS84), layer.crs(), context.transformContext()
            )
            w, s, e, n = tiles["bbox"]
            extent = lonlat.transformBoundingBox(QgsRectangle(w, s, e, n)).intersect(extent)
        features = list(source.getFeatures())
        points: list[tuple[int, list[float]]] = []
        for n, f in enumerate(features):
            g = f.geometry()
            if g is None or g.isEmpty():
                continue
            p = transform.transform(g.centroid().asPoint() if g.isMultipart() else g.asPoint())
            if extent.contains(p):
                points.append((n, [p.x(), p.y()]))
        skipped = len(features) - len(points)
        if skipped:
            feedback.pushWarning(f"{skipped} feature(s) without geometry or outside the raster: no embedding")
        vectors: dict[int, dict[str, Any]] = {}
        answer: dict[str, Any] = {}
        nodata = 0
        model = self.model_options(parameters, context, roots)
        bands = rgb_bands(layer, model["model"]) if src.kind == "file" else None
        if points:  # the engine's first /embed of a model loads it (this client waits for that)
            feedback.setProgressText(
                "loading the embedding model (its first use by the engine may take a minute)…"
            )
        for start in range(0, len(points), EMBED_CHUNK):
            if feedback.isCanceled():
                raise QgsProcessingException(tr("Cancelled."))
            chunk = points[start : start + EMBED_CHUNK]
            answer = client.embed(raster, [xy for _, xy in chunk], bands=bands, **model, **tiles)
            feedback.setProgressText(f"embedded {start + len(chunk)} of {len(points)} points")
            if len(answer["points"]) != len(chunk):
                raise QgsProcessingException(tr("The engine answered a different number of points."))
            for (n, _), emb in zip(chunk, answer["points"]):  # noqa: B905 (QGIS 3.22 may run Python 3.9)
                if emb.get("vector") is None:  # a nodata place of the raster: flagged, no embedding
                    nodata += 1
                    continue
                vectors[n] = emb
            feedback.setProgress(90.0 * (start + len(chunk)) / max(1, len(points)))
        if nodata:
            feedback.pushWarning(f"{nodata} point(s) fall on nodata pixels of the raster: no embedding")
        for n, f in enumerate(features):
            out = QgsFeature(fields)
            out.setGeometry(f.geometry())
            emb = vectors.get(n)
            attrs = f.attributes() + [None, None, None] + ([None] if with_attr else [])
            if emb is not None:
                base = len(f.attributes())
                attrs[base : base + 3] = [len(emb["vector"]), emb["col"], emb["row"]]
                if with_attr:
                    attrs[base + 3] = json.dumps([round(v, 6) for v in emb["vector"]])
            out.setAttributes(attrs)
            sink.addFeature(out, QgsFeatureSink.Flag.FastInsert)
        results: dict[str, Any] = {"OUTPUT": dest_id}
        sidecar = (
            self.parameterAsFileOutput(parameters, "SIDECAR", context) if parameters.get("SIDECAR") else ""
        )
        if sidecar:
            write_sidecar(sidecar, features, vectors, answer, raster)
            results["SIDECAR"] = sidecar
        feedback.setProgress(100.0)
        return results


def write_sidecar(
    path: str, features, vectors: dict[int, dict[str, Any]], answer: dict[str, Any], raster: str
) -> None:
    """``.npy``: (N, D) float32 in feature order, NaN rows where there is no embedding; else JSON."""
    if path.lower().endswith(".npy"):
        import numpy as np  # QGIS ships numpy; only this output needs it

        dim = next((len(v["vector"]) for v in vectors.values()), 0)
        matrix = np.full((len(features), dim), np.nan, np.float32)
        for n, emb in vectors.items():
            matrix[n] = emb["vector"]
        np.save(path, matrix)
        return
    doc = {
        "raster": raster,
        "model_id": answer.get("model_id"),
        "dim": answer.get("dim"),
        "crs": answer.get("crs"),
        "features": [
            {"fid": f.id(), "x": vectors[n]["x"], "y": vectors[n]["y"], "vector": vectors[n]["vector"]}
            for n, f in enumerate(features)
            if n in vectors
        ],
    }
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh)


#: local matchers of the engine (engine.footprint.learned.MATCHERS), the default first
MATCHERS = ("auto", "sift", "aliked", "disk")
MATCHER_HELP = "auto (default): SIFT, then ALIKED+LightGlue where SIFT places nothing; sift: fastest; aliked/disk: learned"
#: one line per matcher (the dock's tooltips)
MATCHER_TIPS = {
    "auto": "the default: SIFT, then ALIKED+LightGlue for the photos SIFT places nothing for",
    "sift": "SIFT only: fastest (a rejected photo costs 1-3 min less on 2 cores)",
    "aliked": "ALIKED+LightGlue (learned): slower, for hard (oblique, seasonal) photos",
    "disk": "DISK+LightGlue (learned): slower, for hard photos",
}

ALGORITHMS = (BuildIndex, LocalizePhotos, HeatmapAtPoint, EmbeddingsAtPoints)


def index_model_id(index: str) -> str:
    """The model id an index was built with (its manifest), e.g. ``effnet-lite0-gem+gray-clahe/sha256:57934424``."""
    try:
        with open(os.path.join(index, "manifest.json"), encoding="utf-8") as f:
            return str(json.load(f)["model"]["model_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return "?"  # the engine says what is wrong with the index


def model_line(
    client: SkylocClient, model: str, weights: str | None = None, sha256: str | None = None
) -> str:
    """``model ...: weights FILE, sha256 ...`` for the log: the model a run uses and the weights behind it,
    as the engine's /models knows them (or as given)."""
    base = model.split("/")[0].split("@")[0].split("+")[0]
    if weights:
        return f"model {model}: weights {weights}" + (f", sha256 {sha256}" if sha256 else "")
    try:
        known = client.models()
    except ServiceError:
        known = []
    for m in known:
        if base == m.get("name") or base in (m.get("aliases") or []):
            if m.get("weights_file") or m.get("sha256"):
                return (
                    f"model {model}: weights {m.get('weights_file') or '?'}, sha256 {m.get('sha256') or '?'}"
                )
            return f"model {model}: weights {m.get('weights') or 'unknown'}"
    return f"model {model}"
