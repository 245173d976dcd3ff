"""The "Skyloc" dock: Localize photos, Embeddings, Engine (widgets built in code, no .ui files)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from qgis.core import (
    Qgis,
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsMapLayerProxyModel,
    QgsProject,
    QgsRasterLayer,
    QgsTask,
)
from qgis.gui import (
    QgsCheckableComboBox,
    QgsDockWidget,
    QgsExtentWidget,
    QgsFileWidget,
    QgsMapLayerComboBox,
)
from qgis.PyQt.QtCore import QRect, Qt, QTimer
from qgis.PyQt.QtGui import QColor, QDoubleValidator
from qgis.PyQt.QtWidgets import (
    QAction,
    QApplication,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from .algorithms import MATCHER_HELP, MATCHER_TIPS, MATCHERS
from .engine_link import EngineLink, EngineSettings
from .layers import (
    GEOREF_HOW,
    STATUS_COLOURS,
    HeatmapSlot,
    add_index_tiles,
    georeferencer_files,
    is_heatmap,
    open_georeferencer,
    raster_file,
    renderer_bands,
    zoom_to_feature,
)
from .map_tool import PickPointTool, SearchAreaBand
from .messages import clean, push, report_error
from .tasks import EngineTask, HeatmapTask, IndexTask, LocalizeTask, row_text, start_task

WGS84 = QgsCoordinateReferenceSystem("EPSG:4326")
PHOTO_FILTER = "Images (*.jpg *.jpeg *.png *.tif *.tiff *.webp *.bmp)"


def raster_filter():
    """The 'raster layers' filter of layer combo boxes (Qgis.LayerFilter since QGIS 3.34)."""
    layer_filter = getattr(Qgis, "LayerFilter", None)
    if layer_filter is not None:
        return layer_filter.RasterLayer
    return QgsMapLayerProxyModel.Filter.RasterLayer


def _row(*widgets: QWidget) -> QWidget:
    box = QWidget()
    lay = QHBoxLayout(box)
    lay.setContentsMargins(0, 0, 0, 0)
    for w in widgets:
        lay.addWidget(w)
    return box


def _scrolled(inner: QWidget) -> QScrollArea:
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setWidget(inner)
    return area


def _spin(lo: float, hi: float, value: float, decimals: int = 6) -> QDoubleSpinBox:
    s = QDoubleSpinBox()
    s.setRange(lo, hi)
    s.setDecimals(decimals)
    s.setValue(value)
    return s


class CoordEdit(QLineEdit):
    """A latitude or longitude that starts empty (not 0): ``value()`` is None until one is typed."""

    def __init__(self, lo: float, hi: float, placeholder: str) -> None:
        super().__init__()
        self.setPlaceholderText(placeholder)
        validator = QDoubleValidator(lo, hi, 8)
        validator.setNotation(QDoubleValidator.Notation.StandardNotation)
        self.setValidator(validator)
        self.setMinimumWidth(60)

    def value(self) -> float | None:
        text = self.text().strip().replace(",", ".")
        try:
            return float(text) if text else None
        except ValueError:
            return None

    def setValue(self, v: float) -> None:  # noqa: N802 (like a spin box)
        self.setText(f"{v:.6f}")


def _lines(label: QLabel, n: int) -> QLabel:
    """Reserve ``n`` lines for ``label`` so that the widgets below it never move when its text changes."""
    label.setWordWrap(True)
    label.setFixedHeight(label.fontMetrics().lineSpacing() * n + 4)
    label.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return label


class ElidedLabel(QLabel):
    """``lines`` lines of text that never widen or grow their parent: wrapped, the end elided with "…" to
    the room it gets (the full text as tooltip), so the widgets below never move."""

    def __init__(self, text: str = "", lines: int = 1) -> None:
        super().__init__()
        self._full = ""
        self.lines = lines
        self.setWordWrap(lines > 1)
        self.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        self.setFixedHeight(self.fontMetrics().lineSpacing() * lines + 6)
        self.setText(text)

    def setText(self, text: str) -> None:  # noqa: N802 (Qt API)
        self._full = text
        self._elide()

    def text(self) -> str:
        return self._full

    def resizeEvent(self, event) -> None:  # noqa: N802 (Qt API)
        super().resizeEvent(event)
        self._elide()

    def _fits(self, text: str, width: int) -> bool:
        flags = int(Qt.TextFlag.TextWordWrap) if self.lines > 1 else 0
        rect = self.fontMetrics().boundingRect(QRect(0, 0, width, 100000), flags, text)
        room = self.fontMetrics().lineSpacing() * self.lines + self.fontMetrics().leading() + 2
        return rect.height() <= room and rect.width() <= width

    def _elide(self) -> None:
        width = max(self.width() - 4, 40)
        text = self._full
        if self.lines == 1:
            shown = self.fontMetrics().elidedText(text, Qt.TextElideMode.ElideRight, width)
        elif self._fits(text, width):
            shown = text
        else:
            lo, hi = 0, len(text)  # the longest start of the text that fits with "…"
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self._fits(text[:mid].rstrip() + "…", width):
                    lo = mid
                else:
                    hi = mid - 1
            shown = text[:lo].rstrip() + "…"
        super().setText(shown)


class TaskProgress(QWidget):
    """A progress bar + cancel button following one task at a time; below it the engine's latest
    message and the seconds it has stood (so a long photo shows time moving), then how it ended."""

    def __init__(self) -> None:
        super().__init__()
        self.bar = QProgressBar()
        self.bar.setRange(0, 100)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.label = ElidedLabel("", lines=2)  # never clipped mid-line: elided, the whole text as tooltip
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(_row(self.bar, self.cancel_button))
        lay.addWidget(self.label)
        self.task: QgsTask | None = None
        self.timer = QTimer(self)
        self.timer.setInterval(500)
        self.timer.timeout.connect(self.tick)

    def follow(self, task: EngineTask) -> None:
        self.task = task
        self.bar.setValue(0)
        self.label.setText(clean(task.description()) + ": starting…")
        self.label.setToolTip("")
        self.cancel_button.setEnabled(True)
        task.progressChanged.connect(lambda p: self.bar.setValue(int(p)))
        self.timer.start()

    def tick(self) -> str:
        """Show the running task's engine message and how long it has stood."""
        task = self.task
        if task is None:
            self.timer.stop()
            return self.label.text()
        now = time.monotonic()
        message = task.message or "waiting for the engine"
        text = f"{now - task.started_at:.0f} s · {message} ({now - task.message_since:.0f} s)"
        self.label.setText(text)
        self.label.setToolTip(text)
        return text

    def ended(self, task: EngineTask) -> None:
        if task is self.task:
            self.task = None
            self.timer.stop()
            self.cancel_button.setEnabled(False)
            self.bar.setValue(100 if task.ok else 0)
            if task.ok:
                text = getattr(task, "outcome", "") or "done"
            else:
                text = "cancelled" if task.was_canceled else clean(task.error_text)
            self.label.setText(text.split("; ")[0] if task.ok else text)
            self.label.setToolTip(text)

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()


# ------------------------------------------------------------------------------------ Localize photos


class LocalizePanel(QWidget):
    """Photos + index (or build one from project rasters), search area, top-k; run as a task."""

    AREAS = ("Anywhere", "Inside a box", "Near a point")

    def __init__(self, iface) -> None:
        super().__init__()
        self.iface = iface
        form = QFormLayout(self)
        form.setRowWrapPolicy(
            QFormLayout.RowWrapPolicy.WrapLongRows
        )  # labels go above fields in a narrow dock

        self.photo_list = QListWidget()
        self.photo_list.setMaximumHeight(90)
        self.photo_list.setToolTip("Photos or folders of photos (the full path in each one's tooltip)")
        add_files, add_folder, clear = QPushButton("Files…"), QPushButton("Folder…"), QPushButton("Clear")
        add_files.clicked.connect(self._add_files)
        add_folder.clicked.connect(self._add_folder)
        clear.clicked.connect(self.photo_list.clear)
        self.photo_list.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.photo_list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        form.addRow(QLabel("Photos"))
        form.addRow(self.photo_list)
        form.addRow(_row(add_files, add_folder, clear))

        self.index = QgsFileWidget()
        self.index.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.tiles_button = QPushButton("Tiles")
        self.tiles_button.setToolTip("Add the index's tile footprints (tiles.gpkg) to the map")
        self.tiles_button.clicked.connect(self.add_tiles)
        form.addRow(QLabel("Index folder"))
        form.addRow(_row(self.index, self.tiles_button))
        self.rasters = QgsCheckableComboBox()
        refresh = QPushButton("↻")
        refresh.setToolTip("List the raster layers of the project")
        refresh.clicked.connect(self.refresh_rasters)
        self.build_button = QPushButton("Build index")
        self.build_button.clicked.connect(self.build_index)
        form.addRow(QLabel("or build one from layers"))
        form.addRow(self.rasters)
        form.addRow(_row(refresh, self.build_button))
        self.tile_sizes = QLineEdit("256,512")
        form.addRow("Tile sizes", self.tile_sizes)
        self.bands = QLineEdit()
        self.bands.setPlaceholderText("from the layers' style")
        self.bands.setToolTip(
            "Raster bands read as red, green, blue (1-based, e.g. 3,2,1). Empty: the checked layers' own "
            "band choice (a layer shown as 3,2,1 is read as red=3, green=2, blue=1)"
        )
        form.addRow("Bands (R,G,B)", self.bands)

        self.footprint = QCheckBox("Estimate footprints")
        self.footprint.setToolTip(
            "Match each photo against its candidates: footprint polygon, georeferenced GeoTIFF and .points"
        )
        self.footprint.setChecked(True)
        form.addRow(self.footprint)
        self.matcher = QComboBox()
        for i, name in enumerate(MATCHERS):
            self.matcher.addItem(name, name)
            self.matcher.setItemData(i, MATCHER_TIPS.get(name, ""), Qt.ItemDataRole.ToolTipRole)
        self.matcher.setToolTip(MATCHER_HELP)
        self.footprint.toggled.connect(self.matcher.setEnabled)
        form.addRow("Matcher", self.matcher)
        self.top_k = QSpinBox()
        self.top_k.setRange(1, 100)
        self.top_k.setValue(5)
        self.top_k.setToolTip("Places tried per photo")
        form.addRow("Top-k", self.top_k)

        self.area = QComboBox()
        self.area.addItems(self.AREAS)
        form.addRow("Search area", self.area)
        self.extent = QgsExtentWidget(None, QgsExtentWidget.WidgetStyle.CondensedStyle)  # fits a narrow dock
        if iface is not None:
            self.extent.setMapCanvas(iface.mapCanvas())
        form.addRow("Box", self.extent)
        self.lat, self.lon = CoordEdit(-90, 90, "lat"), CoordEdit(-180, 180, "lon")
        self.radius = _spin(0.001, 20000, 100, 3)
        pick = QPushButton("Pick")
        pick.setToolTip("Click the nadir point on the map (the point and the radius are drawn there)")
        pick.clicked.connect(self._pick_point)
        self.pick_button = pick
        form.addRow("Near lat, lon", _row(self.lat, self.lon))
        form.addRow("Radius (km)", _row(self.radius, pick))
        self.band: SearchAreaBand | None = None
        if iface is not None:
            self.band = SearchAreaBand(iface.mapCanvas())
        self.area.currentIndexChanged.connect(self._area_changed)
        self.radius.valueChanged.connect(self.draw_search_area)
        self.lat.editingFinished.connect(self.draw_search_area)
        self.lon.editingFinished.connect(self.draw_search_area)
        self._area_changed()

        self.run_button = QPushButton("Localize")
        self.run_button.clicked.connect(self.run)
        form.addRow(self.run_button)
        self.progress = TaskProgress()
        form.addRow(self.progress)
        self.results = QListWidget()
        self.results.setToolTip("What happened to each photo: click one to zoom to it")
        self.results.setWordWrap(True)
        self.results.setMinimumHeight(70)
        self.results.itemClicked.connect(self.zoom_to_row)
        form.addRow(self.results)
        self.georef_button = QPushButton("Open in Georeferencer")
        self.georef_button.setToolTip(
            "For the chosen placed photo: put its GCPs (<photo>.points) where QGIS's Georeferencer finds "
            "them and say how to refine them there (Projective transform)"
        )
        self.georef_button.setEnabled(False)
        self.georef_button.clicked.connect(self.open_in_georeferencer)
        self.results.currentItemChanged.connect(self._row_changed)
        form.addRow(self.georef_button)
        self._pick_tool: PickPointTool | None = None
        self.last_task: EngineTask | None = None
        self.refresh_rasters()
        QgsProject.instance().layersAdded.connect(self.refresh_rasters)
        QgsProject.instance().layersRemoved.connect(self.refresh_rasters)

    # ----------------------------------------------------------------------------------------- inputs

    def _add_files(self) -> None:
        files, _ = QFileDialog.getOpenFileNames(self, "Photos", "", PHOTO_FILTER)
        self.add_photos(files)

    def _add_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder of photos")
        if folder:
            self.add_photos([folder])

    def add_photos(self, paths: list[str]) -> None:
        """Add photos or folders: the list shows the file name, the path is the tooltip (and the data)."""
        have = set(self.photos())
        for p in paths:
            if not p or p in have:
                continue
            have.add(p)
            name = os.path.basename(p.rstrip("/\\")) or p
            item = QListWidgetItem(name + ("/" if os.path.isdir(p) else ""))
            item.setData(Qt.ItemDataRole.UserRole, p)
            item.setToolTip(p)
            self.photo_list.addItem(item)

    def photos(self) -> list[str]:
        return [
            self.photo_list.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.photo_list.count())
        ]

    def refresh_rasters(self, *_changed) -> None:
        """List the project's raster layers (checked ones stay checked)."""
        checked = set(self.rasters.checkedItemsData())
        self.rasters.clear()
        for layer in QgsProject.instance().mapLayers().values():
            if isinstance(layer, QgsRasterLayer) and not is_heatmap(layer):
                state = Qt.CheckState.Checked if layer.id() in checked else Qt.CheckState.Unchecked
                self.rasters.addItemWithCheckState(layer.name(), state, layer.id())

    def _area_changed(self) -> None:
        i = self.area.currentIndex()
        self.extent.setEnabled(i == 1)
        for w in (self.lat, self.lon, self.radius):
            w.setEnabled(i == 2)
        self.draw_search_area()

    def draw_search_area(self, *_args) -> bool:
        """Draw the search point and its radius on the map while "Near a point" is chosen (else hide)."""
        if self.band is None:
            return False
        lat, lon = self.lat.value(), self.lon.value()
        if self.area.currentIndex() != 2 or lat is None or lon is None:
            self.band.hide()
            return False
        self.band.show(lat, lon, self.radius.value())
        return True

    def set_point(self, lat: float, lon: float) -> None:
        """The search point (WGS84): the fields, "Near a point", the drawing on the map."""
        self.lat.setValue(lat)
        self.lon.setValue(lon)
        if self.area.currentIndex() != 2:
            self.area.setCurrentIndex(2)  # draws it
        else:
            self.draw_search_area()

    def _pick_point(self) -> PickPointTool | None:
        """Activate a map tool: the next click on the map is the search point."""
        if self.iface is None:
            return None
        canvas = self.iface.mapCanvas()
        self._pick_tool = PickPointTool(canvas, self.set_point)
        canvas.setMapTool(self._pick_tool)
        return self._pick_tool

    def add_tiles(self) -> object:
        """Add the chosen index's tiles.gpkg to the map."""
        index = self.index.filePath().strip()
        if not index:
            push("choose an index folder first", iface=self.iface)
            return None
        try:
            return add_index_tiles(index)
        except Exception as exc:
            report_error(exc, self.iface, "Index tiles")
            return None

    def _row_changed(self, item, _previous=None) -> None:
        row = item.data(Qt.ItemDataRole.UserRole + 1) if item is not None else None
        self.georef_button.setEnabled(bool(row and row.get("points")))

    def open_in_georeferencer(self, *_args) -> tuple[str, str] | None:
        """The chosen placed photo: its .points where the Georeferencer finds it, and what to do there."""
        item = self.results.currentItem()
        row = item.data(Qt.ItemDataRole.UserRole + 1) if item is not None else None
        if not row or not row.get("points"):
            push("choose a placed photo in the list first", iface=self.iface)
            return None
        try:
            photo, points = georeferencer_files(row.get("original") or row["photo"], row["points"])
        except Exception as exc:
            report_error(exc, self.iface, "Georeferencer")
            return None
        opened = open_georeferencer(self.iface)
        how = GEOREF_HOW.format(photo=photo, points=os.path.basename(points))
        push(
            (f"the Georeferencer is open: {how}" if opened else how[0].upper() + how[1:]),
            Qgis.MessageLevel.Info,
            self.iface,
            duration=0,
        )
        return photo, points

    def search_area(self) -> dict[str, Any]:
        """``near``/``radius_km`` or ``bbox`` (EPSG:4326) for the client."""
        i = self.area.currentIndex()
        if i == 2:
            lat, lon = self.lat.value(), self.lon.value()
            if lat is None or lon is None:
                raise ValueError("near a point: give its latitude and longitude (or Pick it on the map)")
            return {"near": [lat, lon], "radius_km": self.radius.value()}
        if i == 1:
            box = self.extent.outputExtent()
            crs = self.extent.outputCrs()
            if crs.isValid() and crs != WGS84:
                box = QgsCoordinateTransform(crs, WGS84, QgsProject.instance()).transformBoundingBox(box)
            if not box.isEmpty():
                return {"bbox": [box.xMinimum(), box.yMinimum(), box.xMaximum(), box.yMaximum()]}
        return {}

    # ---------------------------------------------------------------------------------------- actions

    def _tile_sizes(self) -> list[int]:
        return [int(s) for s in self.tile_sizes.text().replace(" ", "").split(",") if s]

    def index_bands(self, layers: list) -> list[int] | None:
        """The bands typed in, else the layers' renderer choice (None: single-band layers, the engine's
        default); ValueError when the layers show different bands (then type them)."""
        text = self.bands.text().replace(" ", "")
        if text:
            bands = [int(b) for b in text.split(",") if b]
            if len(bands) != 3 or min(bands) < 1:
                raise ValueError("bands: three band numbers (1-based) as red,green,blue, e.g. 3,2,1")
            return bands
        chosen = {tuple(b) for b in (renderer_bands(lyr) for lyr in layers) if b is not None}
        if len(chosen) > 1:
            raise ValueError(
                "the checked layers show different bands ("
                + "; ".join(",".join(map(str, b)) for b in sorted(chosen))
                + "): type the bands to read as red,green,blue"
            )
        return list(chosen.pop()) if chosen else None

    def build_index(self) -> IndexTask | None:
        """Build an index (in the results folder) from the checked raster layers."""
        try:
            ids = self.rasters.checkedItemsData()
            layers = [QgsProject.instance().mapLayer(i) for i in ids]
            if not layers:
                raise ValueError("check the raster layers to index in the list first")
            sources = [raster_file(lyr) for lyr in layers if lyr is not None]
            sizes = self._tile_sizes()
            bands = self.index_bands([lyr for lyr in layers if lyr is not None])
        except Exception as exc:
            report_error(exc, self.iface, "Build index")
            return None

        def done(task: EngineTask) -> None:
            self.progress.ended(task)
            if task.ok:
                self.index.setFilePath(task.out)

        task = IndexTask(sources, tile_sizes=sizes, bands=bands, iface=self.iface, on_done=done)
        self.progress.follow(task)
        self.last_task = start_task(task)
        return task

    def run(self) -> LocalizeTask | None:
        """Localize the photos (a task): candidates, footprints and georeferenced photos become layers."""
        photos, index = self.photos(), self.index.filePath().strip()
        if not photos or not index:
            push("add photos (or a folder) and choose an index folder first", iface=self.iface)
            return None
        try:
            area = self.search_area()
        except ValueError as exc:
            push(str(exc), Qgis.MessageLevel.Warning, self.iface)
            return None
        task = LocalizeTask(
            photos,
            index=index,
            footprint=self.footprint.isChecked(),
            top_k=self.top_k.value(),
            matcher=self.matcher.currentData() if self.footprint.isChecked() else None,
            iface=self.iface,
            on_done=self.show_outcome,
            **area,
        )
        self.results.clear()
        self.progress.follow(task)
        self.last_task = start_task(task)
        return task

    def show_outcome(self, task: EngineTask) -> None:
        """The run's outcome in words above, one line per photo below (click: zoom to its feature)."""
        self.progress.ended(task)
        self.results.clear()
        if not task.ok:  # the whole error, wrapped (the line above is elided)
            item = QListWidgetItem("cancelled" if task.was_canceled else clean(task.error_text))
            item.setForeground(QColor("#b2182b"))
            self.results.addItem(item)
        for row in getattr(task, "rows", []) if task.ok else []:
            item = QListWidgetItem(row_text(row))
            item.setData(Qt.ItemDataRole.UserRole, (row["layer_id"], row["fid"]))
            item.setData(Qt.ItemDataRole.UserRole + 1, row)
            item.setToolTip(row["photo"] + ("" if row["fid"] is not None else "\n(nothing to zoom to)"))
            colour = STATUS_COLOURS.get(row["status"])
            if colour:
                item.setForeground(QColor(colour).darker(130))
            self.results.addItem(item)

    def zoom_to_row(self, item: QListWidgetItem) -> bool:
        """Zoom to (and select) the feature of a photo's outcome; False when there is none."""
        layer_id, fid = item.data(Qt.ItemDataRole.UserRole) or (None, None)
        layer = QgsProject.instance().mapLayer(layer_id) if layer_id else None
        if layer is None or fid is None or self.iface is None:
            push(f"{item.text()}: no place to show on the map", iface=self.iface)
            return False
        return zoom_to_feature(self.iface.mapCanvas(), layer, fid)


# ----------------------------------------------------------------------------------------- Embeddings


class EmbeddingsPanel(QWidget):
    """The click map tool, the last embedding, heatmaps from a photo or a location."""

    def __init__(self, iface, map_tool_action: QAction | None) -> None:
        super().__init__()
        self.iface = iface
        lay = QVBoxLayout(self)
        click = QPushButton("Click on a raster…")
        click.setToolTip("Map tool: click a raster layer to get the embedding there and a similarity heatmap")
        click.setCheckable(True)
        if map_tool_action is not None:
            click.toggled.connect(lambda on: on != map_tool_action.isChecked() and map_tool_action.trigger())
            map_tool_action.toggled.connect(click.setChecked)
        lay.addWidget(click)
        self.click_button = click
        form = QFormLayout()
        self.model = QLineEdit(EngineSettings.load().model)
        form.addRow("Model", self.model)
        lay.addLayout(form)
        self.keep_heatmaps = QCheckBox("Keep previous heatmaps")
        self.keep_heatmaps.setToolTip(
            "Off: each new heatmap replaces the previous one on the map. On: they pile up (pinned); "
            "every click's point and embedding stay in the 'Skyloc clicked points' layer either way"
        )
        lay.addWidget(self.keep_heatmaps)
        #: the latest heatmap (of a click or of this tab), replaced by the next one unless pinned
        self.heatmaps = HeatmapSlot(keep=self.keep_heatmaps.isChecked)
        self.embedding = QPlainTextEdit()
        self.embedding.setReadOnly(True)
        self.embedding.setPlaceholderText("The embedding at the clicked point appears here.")
        self.embedding.setMaximumHeight(110)
        copy = QPushButton("Copy embedding")
        copy.clicked.connect(lambda: QApplication.clipboard().setText(self.embedding.toPlainText()))
        lay.addWidget(self.embedding)
        lay.addWidget(copy)

        box = QGroupBox("Similarity heatmap")
        box.setToolTip(
            "A similarity heatmap over a raster, to a photo or to the place at a latitude, longitude"
        )
        bform = QFormLayout(box)
        bform.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapAllRows)  # fits a 300 px dock
        self.raster = QgsMapLayerComboBox()
        self.raster.setFilters(raster_filter())
        bform.addRow("Raster", self.raster)
        self.photo = QgsFileWidget()
        self.photo.setFilter(PHOTO_FILTER)
        from_photo = QPushButton("Heatmap from photo")
        from_photo.clicked.connect(self.heatmap_from_photo)
        bform.addRow("Photo", self.photo)
        bform.addRow(from_photo)
        self.lat, self.lon = CoordEdit(-90, 90, "lat"), CoordEdit(-180, 180, "lon")
        from_loc = QPushButton("Heatmap from location")
        from_loc.clicked.connect(self.heatmap_from_location)
        bform.addRow("Lat, lon", _row(self.lat, self.lon))
        bform.addRow(from_loc)
        lay.addWidget(box)
        self.progress = TaskProgress()
        lay.addWidget(self.progress)
        lay.addStretch(1)
        self.last_task: EngineTask | None = None

    def model_name(self) -> str | None:
        return self.model.text().strip() or None

    def show_embedding(self, answer: dict[str, Any]) -> None:
        """Show the engine's /embed answer: point, pixel, model and the vector (JSON)."""
        p = answer["points"][0]
        head = (
            f"model {answer.get('model_id')} ({answer.get('dim')}-d); x={p['x']:.3f} y={p['y']:.3f} "
            f"({answer.get('crs')}); pixel col={p['col']:.1f} row={p['row']:.1f}"
        )
        if p.get("vector") is None:  # the raster has no data there: say so instead of a vector
            reason = p.get("reason") or "no data"
            self.embedding.setPlainText(
                f"{head}\nno embedding here: {reason} (the raster has no data at this point)"
            )
            return
        self.embedding.setPlainText(head + "\n" + json.dumps([round(v, 6) for v in p["vector"]]))

    def _heatmap(self, **query: Any) -> HeatmapTask | None:
        layer = self.raster.currentLayer()
        try:
            if layer is None:
                raise ValueError("choose a raster layer")
            path = raster_file(layer)
        except Exception as exc:
            report_error(exc, self.iface, "Heatmap")
            return None
        task = HeatmapTask(
            path,
            layer=layer,
            model=self.model_name(),
            iface=self.iface,
            on_done=self.progress.ended,
            slot=self.heatmaps,
            **query,
        )
        self.progress.follow(task)
        self.last_task = start_task(task)
        return task

    def heatmap_from_photo(self) -> HeatmapTask | None:
        photo = self.photo.filePath().strip()
        if not photo:
            push("choose a photo first", iface=self.iface)
            return None
        return self._heatmap(photo=photo)

    def heatmap_from_location(self) -> HeatmapTask | None:
        lat, lon = self.lat.value(), self.lon.value()
        if lat is None or lon is None:
            push("give the latitude and longitude of the place first", Qgis.MessageLevel.Warning, self.iface)
            return None
        return self._heatmap(location=[lat, lon])


# --------------------------------------------------------------------------------------------- Engine


class StartEngineTask(QgsTask):
    """Start the local engine in the background (it takes a few seconds to load its models)."""

    def __init__(self, panel: EnginePanel) -> None:
        super().__init__("Skyloc: start the engine")
        self.panel = panel
        self.error: BaseException | None = None

    def run(self) -> bool:
        try:
            EngineLink.instance().start_local()
            return True
        except Exception as exc:
            self.error = exc
            return False

    def finished(self, ok: bool) -> None:  # noqa: FBT001 (QGIS API)
        self.panel.start_button.setEnabled(True)
        if not ok and self.error is not None:
            report_error(self.error, self.panel.iface, "Start engine")
        self.panel._start_task = None
        self.panel.refresh()


def engine_line(st: dict[str, Any]) -> str:
    """One short line about the engine for the top of the dock (the same facts as the Engine tab)."""
    if st.get("starting"):
        return "Engine: starting…"
    if st.get("ok"):
        where = str(st.get("url", "")).replace("http://", "")
        return "Engine: running" + (" (plugin's)" if st.get("local") else "") + f" at {where}"
    code = st.get("code")
    if code == "not_configured":
        return "Engine: not set up (Engine tab)"
    if code == "stopped":
        return "Engine: stopped (Engine tab: Start)"
    if code == "unreachable" and "did not answer in time" in st.get("error", ""):
        return "Engine: busy or loading (no answer in time)"
    if code == "unreachable":
        return "Engine: not running"
    return "Engine: error (Engine tab)"


class EnginePanel(QWidget):
    """URL, token file, executable, folders, output folder; start/stop; status, models, diagnostics."""

    def __init__(self, iface) -> None:
        super().__init__()
        self.iface = iface
        self.link = EngineLink.instance()
        s = EngineSettings.load()
        form = QFormLayout(self)
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapAllRows)  # paths get the dock's whole width
        self.url = QLineEdit(s.url)
        self.url.setPlaceholderText("http://127.0.0.1:PORT of a running 'skyloc serve'")
        self.token_file = QgsFileWidget()
        self.token_file.setFilePath(s.token_file)
        self.executable = QgsFileWidget()
        self.executable.setFilePath(s.executable)
        self.executable.setToolTip(
            "The 'skyloc' program of the engine's environment, e.g. .venv/bin/skyloc: started by Start, "
            "and without a click on first use in a new QGIS session"
        )
        self.roots = QLineEdit(os.pathsep.join(s.roots))
        self.roots.setPlaceholderText(f"separated by '{os.pathsep}' (default: home)")
        self.roots.setToolTip("The folders the engine may read and write; Start restarts it with new ones")
        self.output_dir = QgsFileWidget()
        self.output_dir.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.output_dir.setFilePath(s.output_dir)
        form.addRow("URL", self.url)
        form.addRow("Token file", self.token_file)
        form.addRow("Engine executable", self.executable)
        form.addRow("Folders", self.roots)
        form.addRow("Results folder", self.output_dir)
        save = QPushButton("Save settings")
        save.setToolTip("Save the settings (Start saves them too)")
        save.clicked.connect(self.save)
        form.addRow(save)
        self.start_button, stop, refresh = QPushButton("Start"), QPushButton("Stop"), QPushButton("Status")
        self.start_button.setToolTip(
            "Start the engine (restart it when the folders or the executable changed)"
        )
        stop.setToolTip("Stop the engine the plugin started; the settings stay")
        self.start_button.clicked.connect(self.start)
        stop.clicked.connect(self.stop)
        refresh.clicked.connect(self.refresh)
        form.addRow(_row(self.start_button, stop, refresh))
        self.status = _lines(QLabel("status: not checked yet"), 4)
        form.addRow(self.status)
        self.models = QPlainTextEdit()
        self.models.setReadOnly(True)
        self.models.setMaximumHeight(100)
        form.addRow("Models", self.models)
        self.diagnostics = QPlainTextEdit()
        self.diagnostics.setReadOnly(True)
        self.diagnostics.setMinimumHeight(120)
        copy = QPushButton("Copy diagnostics")
        copy.clicked.connect(self.copy_diagnostics)
        form.addRow("Diagnostics", self.diagnostics)
        form.addRow(copy)
        self.line: ElidedLabel | None = None  # the dock's one-line engine status
        self._start_task: StartEngineTask | None = None
        self.link.changed.connect(self.refresh)

    def settings(self) -> EngineSettings:
        roots = [r.strip() for r in self.roots.text().split(os.pathsep) if r.strip()]
        old = EngineSettings.load()
        return EngineSettings(
            url=self.url.text().strip(),
            token_file=self.token_file.filePath().strip(),
            executable=self.executable.filePath().strip(),
            roots=roots,
            output_dir=self.output_dir.filePath().strip(),
            model=old.model,
        )

    def save(self) -> None:
        self.settings().save()
        self.refresh()

    def load_fields(self) -> None:
        """Show the saved settings in the fields."""
        s = EngineSettings.load()
        self.url.setText(s.url)
        self.token_file.setFilePath(s.token_file)
        self.executable.setFilePath(s.executable)
        self.roots.setText(os.pathsep.join(s.roots))
        self.output_dir.setFilePath(s.output_dir)

    def start(self, save: bool = True) -> StartEngineTask | None:
        """Save the settings (``save``; else show the saved ones) and start the engine in the background
        (restarted if its folders changed)."""
        if save:
            self.settings().save()
        else:
            self.load_fields()
        if self._start_task is not None:
            return self._start_task
        self.show_status({"starting": True})
        self.start_button.setEnabled(False)
        self._start_task = StartEngineTask(self)
        QgsApplication.taskManager().addTask(self._start_task)
        return self._start_task

    def stop(self) -> None:
        """Stop the engine the plugin started; the settings (and these fields) stay as they are."""
        if self.link.stop_local() is None:
            self.link.stopped = False  # nothing of ours ran: automatic starts stay allowed
            push(
                "the plugin did not start an engine (stop a 'skyloc serve' you started yourself with Ctrl-C)",
                iface=self.iface,
            )
        self.refresh()

    def show_status(self, st: dict[str, Any]) -> str:
        """Show an engine status (of :meth:`EngineLink.status`) here and in the dock's status line."""
        if st.get("starting"):
            text = "status: starting the engine (loading its models takes a few seconds)…"
        elif st.get("ok"):
            v = st["version"]
            where = "local engine started by the plugin" if st.get("local") else "engine"
            text = (
                f"status: {where} {v.get('version')} running at {st['url']}; "
                f"folders: {', '.join(v.get('roots', []))}"
            )
        else:
            text = f"status: {st.get('error')}"
        self.status.setText(text)
        self.status.setToolTip(text)
        if self.line is not None:
            line = engine_line(st)
            self.line.setText(line)
            self.line.setToolTip(text)
        return text

    def refresh(self, *_args) -> dict[str, Any]:
        """Ask the engine for its status; show it (and the diagnostics)."""
        if self._start_task is not None:
            st = {"ok": False, "starting": True}
            self.show_status(st)
            return st
        st = self.link.status()
        if not st["ok"] and self.link.stopped and EngineSettings.load().executable:
            st.update(code="stopped", error="the engine was stopped (Start starts it again; settings kept)")
        self.show_status(st)
        if st["ok"]:
            self.models.setPlainText(
                "\n".join(
                    f"{m.get('name')} ({m.get('kind')}): {m.get('description', '')}"
                    + (f" Weights: {m['weights']}." if m.get("weights") else "")
                    for m in st["models"]
                )
            )
        else:
            self.models.setPlainText("")
        self.diagnostics.setPlainText(self.link.diagnostics())
        return st

    def copy_diagnostics(self) -> str:
        text = self.link.diagnostics()
        self.diagnostics.setPlainText(text)
        QApplication.clipboard().setText(text)
        return text


# ----------------------------------------------------------------------------------------------- dock

#: the width the dock must fit (every tab reachable, nothing clipped)
NARROW = 300


class SkylocDock(QgsDockWidget):
    """The dock: a one-line engine status, then three tabs."""

    TABS = ("Localize", "Embed", "Engine")  # short: the three fit 300 px even with a 12 pt font

    def __init__(self, iface, map_tool_action: QAction | None = None) -> None:
        super().__init__("Skyloc")
        self.setObjectName("SkylocDock")
        self.localize = LocalizePanel(iface)
        self.embeddings = EmbeddingsPanel(iface, map_tool_action)
        self.engine = EnginePanel(iface)
        self.tabs = QTabWidget()
        self.tabs.setUsesScrollButtons(False)  # every tab stays visible in a narrow dock
        for panel, name in zip((self.localize, self.embeddings, self.engine), self.TABS):  # noqa: B905
            self.tabs.addTab(_scrolled(panel), name)
        for i, tip in enumerate(
            (
                "Localize photos: index, footprints, what happened to each photo",
                "Embeddings: the embedding at a click, similarity heatmaps",
                "The engine: where it is, its folders, start and stop, diagnostics",
            )
        ):
            self.tabs.setTabToolTip(i, tip)
        self.line = ElidedLabel("Engine: not checked yet")
        self.engine.line = self.line
        body = QWidget()
        lay = QVBoxLayout(body)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(self.line)
        lay.addWidget(self.tabs)
        self.setWidget(body)
