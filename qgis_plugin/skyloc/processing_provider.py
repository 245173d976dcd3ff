"""The "Skyloc" Processing provider (id ``skyloc``): its four algorithms."""

from __future__ import annotations

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .algorithms import ALGORITHMS

PROVIDER_ID = "skyloc"


class SkylocProvider(QgsProcessingProvider):
    """Build index, localize photos, heatmap at a point, embeddings at points."""

    def __init__(self, icon: QIcon | None = None) -> None:
        super().__init__()
        self._icon = icon or QIcon()

    def id(self) -> str:
        return PROVIDER_ID

    def name(self) -> str:
        return "Skyloc"

    def longName(self) -> str:  # noqa: N802 (QGIS API)
        return "Skyloc: localize photos, footprints, embeddings"

    def icon(self) -> QIcon:
        return self._icon

    def loadAlgorithms(self) -> None:  # noqa: N802 (QGIS API)
        for cls in ALGORITHMS:
            self.addAlgorithm(cls())

    # the engine writes GeoPackage/Shapefile layers and GeoTIFF rasters itself
    def supportedOutputVectorLayerExtensions(self) -> list[str]:  # noqa: N802 (QGIS API)
        return ["gpkg", "shp"]

    def defaultVectorFileExtension(self, hasGeometry: bool = True) -> str:  # noqa: N802, N803, FBT001, FBT002
        return "gpkg"

    def supportedOutputRasterLayerExtensions(self) -> list[str]:  # noqa: N802 (QGIS API)
        return ["tif"]

    def defaultRasterFileExtension(self) -> str:  # noqa: N802 (QGIS API)
        return "tif"
