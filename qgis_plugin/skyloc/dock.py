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
    QgsCollapsibleGroupBox,
    QgsDockWidget,
    QgsExtentWidget,
    QgsFileWidget,
    QgsMapLayerComboBox,
)
from qgis.PyQt.QtCore import Qt, QTimer
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
    QToolButton,
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
    rgb_bands,
    zoom_to_feature,
)
from .map_tool import PickPointTool, SearchAreaBand
from .messages import OUTCOME, clean, push, report_error
from .tasks import EngineTask, HeatmapTask, IndexTask, LocalizeTask, row_text, start_task
from .tile_layers import (
    ask_download,
    canvas_zoom,
    download_text,  # noqa: F401 (the dock's words for a plan, as tests and other callers know them)
    engine_source,
    extent_lonlat,
    layer_source,
    parse_zooms,
    plan_download,
    tile_extent_options,
)

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


def _narrow(combo: QComboBox, chars: int = 12) -> QComboBox:
    """A combo box whose width does not follow its longest item (a long layer name would widen the dock)."""
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(chars)
    combo.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
    return combo


def _wrapped(label: QLabel) -> QLabel:
    """A label that wraps instead of widening the dock."""
    label.setWordWrap(True)
    return label


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

    def __init__(self, text: str = "", lines: int = 1, keep_end: bool = False) -> None:
        super().__init__()
        self._full = ""
        self._probe: QLabel | None = None  # lays out candidate texts (never shown)
        self.lines = lines
        #: too long: keep the text's start up to its first " · " and its end, "…" between (a progress
        #: line's latest stage is at its end)
        self.keep_end = keep_end
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
        """Whether ``text`` takes at most ``lines`` lines at ``width``, laid out as a label lays it out
        (QFontMetrics' own wrapping breaks lines elsewhere than QLabel does: it over-counted lines)."""
        if self.lines == 1:
            return self.fontMetrics().horizontalAdvance(text) <= width
        if self._probe is None:
            self._probe = QLabel()
            self._probe.setWordWrap(True)
        self._probe.setFont(self.font())
        self._probe.setText("\n".join("x" * self.lines))  # the height of ``lines`` lines, as laid out
        room = self._probe.heightForWidth(width)
        self._probe.setText(text)
        return self._probe.heightForWidth(width) <= room

    def _elide(self) -> None:
        width = max(self.width() - 4, 40)
        text = self._full
        if self.lines == 1:
            shown = self.fontMetrics().elidedText(text, Qt.TextElideMode.ElideRight, width)
        elif self._fits(text, width):
            shown = text
        elif self.keep_end:
            head = text[: text.index(" · ") + 3] if " · " in text else ""
            rest = text[len(head) :]
            cuts = [i + 1 for i, c in enumerate(rest) if c == " "]
            shown = head + "…"
            for cut in cuts:  # the longest end, from a word on, that fits after the head and "…"
                if self._fits(head + "…" + rest[cut:], width):
                    shown = head + "…" + rest[cut:]
                    break
        else:  # the longest start of the text, cut after a word, that fits with "…" (wrapping is not
            # monotonic in the length: a long word moves to the next line, so no bisection)
            cuts = [i for i, c in enumerate(text) if c == " "] or [len(text)]
            shown = "…"
            for cut in reversed(cuts):
                if self._fits(text[:cut].rstrip() + "…", width):
                    shown = text[:cut].rstrip() + "…"
                    break
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
        # never clipped mid-line: elided in the middle (the latest stage stays), the whole text as tooltip
        self.label = ElidedLabel("", lines=4, keep_end=True)
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
        self.label.keep_end = True  # while it runs: the latest stage stays in sight
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
            self.label.keep_end = False  # how it ended: from its start
            if task.ok:
                text = getattr(task, "outcome", "") or "done"
            else:
                text = "cancelled" if task.was_canceled else clean(task.error_text)
            self.label.setText(text.split("; ")[0] if task.ok else text)
            self.label.setToolTip(text)

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()


def warning_line(warning: str) -> str:
    """An engine warning for the results list: its file by name only, its gist (up to a parenthesis)."""
    head, sep, rest = warning.partition(": ")
    if sep and os.sep in head:
        warning = os.path.basename(head) + sep + rest
    return warning.split(" (", 1)[0]


class ModelFields:
    """Model, weights file and its sha256 (both optional: the engine's shipped default needs neither); below
    them what the engine's status says of the model's weights (its file and sha256 where it knows them).
    The rows go into ``form`` (so that their labels line up with the form's others)."""

    def __init__(self, form: QFormLayout, kind: str, model: str = "default") -> None:
        self.kind = kind  # "retrieval" (indexes) or "embedding" (heatmaps)
        self.model = QLineEdit(model)
        self.model.setToolTip(
            "The engine's model (Engine tab: Models): default, or e.g. astroloc / gair with their weights file"
        )
        self.weights = QgsFileWidget()
        self.weights.setFilter("Weights (*.pth *.pt *.ckpt *.bin *.safetensors);;All files (*)")
        self.weights.setToolTip("The model's weights file (empty: the weights the engine knows for it)")
        self.sha256 = QLineEdit()
        self.sha256.setPlaceholderText("optional")
        self.sha256.setToolTip("The weights file's sha256 (sha256sum FILE): the engine refuses another file")
        self.hint = ElidedLabel("", lines=4)
        form.addRow("Model", self.model)
        form.addRow("Weights", self.weights)
        form.addRow("sha256", self.sha256)
        form.addRow(self.hint)
        self.model.editingFinished.connect(self.update_hint)
        self.weights.fileChanged.connect(self.update_hint)
        self.update_hint()

    def options(self) -> dict[str, Any]:
        """``model``, ``weights``, ``sha256`` for the client (None where empty); ValueError for a bad sha256."""
        sha = self.sha256.text().strip().lower().removeprefix("sha256:")
        if sha and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
            raise ValueError("sha256: all 64 hex digits, as 'sha256sum FILE' prints them")
        return {
            "model": self.model.text().strip() or None,
            "weights": self.weights.filePath().strip() or None,
            "sha256": sha or None,
        }

    def engine_model(self) -> dict[str, Any] | None:
        """The engine's entry (its last status) for the model named here, if it reported one."""
        name = (self.model.text().strip() or "default").lower()
        for m in EngineLink.instance().models:
            if m.get("kind") == self.kind and (m.get("name") == name or name in (m.get("aliases") or [])):
                return m
        return None

    def update_hint(self, *_args) -> str:
        """What the engine says of the weights of the model named here (the line under the fields)."""
        m = self.engine_model()
        given = self.weights.filePath().strip()
        if given:
            text = f"weights: {os.path.basename(given)} (the engine checks it when it loads)"
            tip = given
        elif m is None:
            text = "weights: the engine's own (Engine tab: Status)"
            tip = text
        elif m.get("weights_file") or m.get("sha256"):
            sha = m.get("sha256") or "?"
            text = f"weights: {os.path.basename(m.get('weights_file') or '?')}\nsha256 {sha[:16]}…"
            tip = f"{m.get('weights_file')}\nsha256 {sha}\n{m.get('weights', '')}"
        elif m.get("needs_weights"):
            text = f"{m.get('name')} needs its weights file: {m.get('weights', '')}"
            tip = text
        else:
            text = f"weights: {m.get('weights', '')}"
            tip = text
        self.hint.setText(text)
        self.hint.setToolTip(tip)
        return text


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
        self.against = _narrow(QgsMapLayerComboBox())
        self.against.setFilters(raster_filter())
        self.against.setAllowEmptyLayer(True)
        self.against.setLayer(None)
        self.against.setToolTip(
            "Match the photos on this raster layer instead of an index (no retrieval: the whole raster, "
            "then its windows most like the photo); footprints only, no search area. A tile layer (XYZ, "
            "WMTS) is read at the Zooms of 'Build an index' (empty: the zoom of the map's scale) over its "
            "Area (empty: the map extent), the download shown first; MBTiles/GeoPackage: as stored"
        )
        form.addRow(_wrapped(QLabel("or match on a raster layer (no index)")))
        form.addRow(self.against)
        form.addRow(self._build_box())

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

    def _build_box(self) -> QWidget:
        """'Build an index' (collapsed): from project raster layers (files, MBTiles, GeoPackage tiles, XYZ
        tile services over the map extent) and/or a folder (tree) of XYZ mosaics."""
        box = QgsCollapsibleGroupBox("Build an index")
        box.setCollapsed(True)
        box.setSaveCollapsedState(False)
        form = QFormLayout(box)
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        self.rasters = _narrow(QgsCheckableComboBox())
        self.rasters.setToolTip(
            "The project's raster layers to index: raster files, MBTiles and GeoPackage tiles, and XYZ "
            "tile services (fetched over the current map extent at the zooms below)"
        )
        refresh = QToolButton()  # a small button, sized to its one character
        refresh.setText("↻")
        refresh.setToolTip("List the raster layers of the project")
        refresh.clicked.connect(self.refresh_rasters)
        form.addRow(QLabel("Raster or tile layers"))
        form.addRow(_row(self.rasters, refresh))
        self.mosaics = QgsFileWidget()
        self.mosaics.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.mosaics.setToolTip("A folder of XYZ mosaics (*Z_ROW_COL.jpg|png), e.g. an AstroLoc database")
        self.recursive = QCheckBox("with its subfolders")
        self.recursive.setToolTip("Read the mosaics of the whole folder tree (each file once)")
        form.addRow(_wrapped(QLabel("and/or a folder of XYZ mosaics")))
        form.addRow(self.mosaics)
        self.exclude = QLineEdit()
        self.exclude.setPlaceholderText("e.g. surrounding_*")
        self.exclude.setToolTip(
            "Mosaic files to leave out: globs of file names or of paths inside the folder, separated by commas"
        )
        self.span = QSpinBox()
        self.span.setRange(1, 64)
        self.span.setValue(4)
        self.span.setToolTip("XYZ tiles per side of one mosaic file (AstroLoc's databases: 4)")
        form.addRow(self.recursive)
        form.addRow("Exclude", self.exclude)
        form.addRow("Span", self.span)
        self.tile_sizes = QLineEdit("256,512")
        self.tile_sizes.setToolTip("Raster layers: tile sides in pixels, separated by commas")
        form.addRow("Tile sizes", self.tile_sizes)
        self.zooms = QLineEdit()
        self.zooms.setPlaceholderText("XYZ: 12-14")
        self.zooms.setToolTip(
            "XYZ tile layers: the zoom levels to fetch and index over the current map extent (e.g. 12-14 "
            "or 12,14). The tile count and download size are shown before anything is fetched; tiles are "
            "cached, so a second build fetches nothing twice. Also the zooms a tile layer is matched at "
            "(empty there: the zoom of the map's scale)"
        )
        form.addRow("Zooms", self.zooms)
        self.tile_area = QgsExtentWidget(None, QgsExtentWidget.WidgetStyle.CondensedStyle)
        # empty means the map extent: said by a placeholder (grey), not by a null text, which QGIS draws
        # selected (white on blue) as if something were chosen
        self.tile_area.setNullValueAllowed(True, "")
        shown = self.tile_area.findChild(QLineEdit, "mCondensedLineEdit")
        if shown is not None:
            shown.setPlaceholderText("map extent")
        self.tile_area.clear()
        if self.iface is not None:
            self.tile_area.setMapCanvas(self.iface.mapCanvas())
        self.tile_area.setToolTip(
            "XYZ/WMTS layers: the area to fetch and index (or match on). Empty: the current map extent; the "
            "button's menu draws a box on the map, or takes a layer's extent"
        )
        form.addRow("Area", self.tile_area)
        self.bands = QLineEdit()
        self.bands.setPlaceholderText("layer style")
        self.bands.setToolTip(
            "Raster bands read as red, green, blue (1-based, e.g. 3,2,1). Empty: the checked layers' own "
            "band choice (a layer shown as 3,2,1 is read as red=3, green=2, blue=1)"
        )
        form.addRow("Bands", self.bands)
        self.model_fields = ModelFields(form, "retrieval")
        self.build_button = QPushButton("Build index")
        self.build_button.setToolTip("Build the index in the results folder; it becomes the index above")
        self.build_button.clicked.connect(self.build_index)
        form.addRow(self.build_button)
        self.build_box = box
        return box

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
        opened = open_georeferencer(self.iface, photo)
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

    def exclude_patterns(self) -> list[str]:
        return [p.strip() for p in self.exclude.text().replace(";", ",").split(",") if p.strip()]

    def build_index(self) -> IndexTask | None:
        """Build an index (in the results folder) from the checked layers and/or the mosaic folder. XYZ
        tile layers are indexed over the current map extent at the chosen zooms, after the user has seen
        (and accepted) how many tiles that downloads."""
        try:
            ids = self.rasters.checkedItemsData()
            layers = [lyr for lyr in (QgsProject.instance().mapLayer(i) for i in ids) if lyr is not None]
            mosaics = self.mosaics.filePath().strip()
            if not layers and not mosaics:
                raise ValueError("check the raster layers to index, or choose a folder of XYZ mosaics, first")
            if mosaics and not os.path.isdir(mosaics):
                raise ValueError(f"the mosaics folder {mosaics} does not exist")
            found = [layer_source(lyr) for lyr in layers]
            services = [s for s in found if s.is_service]
            sources = [s.source for s in found] + ([mosaics] if mosaics else [])
            sizes = self._tile_sizes()
            bands = self.index_bands([layers[i] for i, s in enumerate(found) if s.kind == "file"])
            model = self.model_fields.options()
            tiles = self._service_options(services, parse_zooms(self.zooms.text())) if services else {}
        except Exception as exc:
            report_error(exc, self.iface, "Build index")
            return None
        if tiles is None:  # the user declined the download
            return None

        def done(task: EngineTask) -> None:
            self.progress.ended(task)
            if task.ok:
                self.index.setFilePath(task.out)

        task = IndexTask(
            sources,
            tile_sizes=sizes,
            bands=bands,
            span=self.span.value() if mosaics else None,
            exclude=self.exclude_patterns() if mosaics else None,
            recursive=self.recursive.isChecked() if mosaics else None,
            iface=self.iface,
            on_done=done,
            **tiles,
            **model,
        )
        task.retry = self.build_index
        self.progress.follow(task)
        self.last_task = start_task(task)
        return task

    def _service_options(
        self, services: list, zooms: list[int], action: str = "Index", ask_over: int | None = None
    ) -> dict[str, Any] | None:
        """Zooms and box (the Area field, else the map extent) for the tile services, after the engine's
        plan (tiles, download size) was accepted (``ask_over``: asked only beyond that many tiles to
        download; None: always); None when the user declined. Errors (zooms a service does not serve, a
        plan over the engine's tile cap) are raised as sentences. Used by Build index and by matching on
        a tile layer."""
        where, bbox = self.tile_bbox()
        if not plan_download(services, zooms, bbox, self.confirm_download, where, action, ask_over):
            return None
        credits = sorted({s.attribution for s in services if s.attribution})
        return {"zooms": zooms, "bbox": bbox, "attribution": "; ".join(credits) or None}

    def tile_bbox(self) -> tuple[str, list[float]]:
        """The area to read tile layers over, in words and as [min lon, min lat, max lon, max lat]: the
        Area field when drawn or typed, else the current map extent."""
        if self.tile_area.isValid() and not self.tile_area.outputExtent().isEmpty():  # drawn or typed
            box, crs = self.tile_area.outputExtent(), self.tile_area.outputCrs()
            return "the chosen area", list(extent_lonlat(box, crs))
        canvas = self.iface.mapCanvas()
        return "the current map extent", list(
            extent_lonlat(canvas.extent(), canvas.mapSettings().destinationCrs())
        )

    def match_tiles(self, src) -> dict[str, Any] | None:
        """``zooms`` and ``bbox`` for matching on a tile layer: the Zooms field when filled, else the one
        zoom of the map's scale (within the layer's zooms); the Area field, else the map extent. A service's
        plan is shown when it downloads anything (None: declined); an MBTiles/GeoPackage file is read as it
        is (all its tiles unless zooms or an area are given)."""
        typed = self.zooms.text().strip()
        if src.is_service:
            zooms = parse_zooms(typed) if typed else [self._map_zoom(src)]
            options = self._service_options([src], zooms, "Match the photos on", ask_over=0)
            if options is not None:
                options.pop("attribution")
                if src.zmax is not None:  # the engine fetches finer zooms for the match: not past the layer's
                    options["max_fetch_zoom"] = max(src.zmax, max(zooms))
            return options
        options: dict[str, Any] = {"zooms": parse_zooms(typed) if typed else None}
        if self.tile_area.isValid() and not self.tile_area.outputExtent().isEmpty():
            options["bbox"] = self.tile_bbox()[1]
        return options

    def _map_zoom(self, src) -> int:
        return canvas_zoom(self.iface.mapCanvas().mapSettings(), src.zmin, src.zmax)

    def confirm_download(self, text: str) -> bool:
        """Ask before fetching tiles from a service (tests replace this with their own answer)."""
        return ask_download(self, text)

    def run(self) -> LocalizeTask | None:
        """Localize the photos (a task): candidates, footprints and georeferenced photos become layers."""
        photos, index = self.photos(), self.index.filePath().strip()
        layer = self.against.currentLayer()
        if not photos or not (index or layer is not None):
            push(
                "add photos (or a folder) and choose an index folder (or a raster layer to match on) first",
                iface=self.iface,
            )
            return None
        if layer is not None:  # footprints on a raster: no index, no search area
            try:
                src = engine_source(layer)
                against = raster_file(layer) if src.kind == "file" else src.source
                tiles = self.match_tiles(src) if src.kind != "file" else {}
            except Exception as exc:
                report_error(exc, self.iface, "Localize photos")
                return None
            if tiles is None:  # the user declined the download
                return None
            task = LocalizeTask(
                photos,
                against=against,
                # a file: the colours the analyst sees, not a guessed band order (tiles are RGB)
                bands=renderer_bands(layer) if src.kind == "file" else None,
                tiles=tiles,
                top_k=self.top_k.value(),
                matcher=self.matcher.currentData(),
                iface=self.iface,
                on_done=self.show_outcome,
            )
        else:
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
        task.retry = self.run
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
        for warning in task.warnings if task.ok else []:  # after the photos: short, the whole as tooltip
            item = QListWidgetItem("⚠ " + warning_line(warning))
            item.setToolTip(warning)
            item.setForeground(QColor("#b35806"))
            self.results.addItem(item)

    def zoom_to_row(self, item: QListWidgetItem) -> bool:
        """Zoom to (and select) the feature of a photo's outcome; False when there is none."""
        layer_id, fid = item.data(Qt.ItemDataRole.UserRole) or (None, None)
        layer = QgsProject.instance().mapLayer(layer_id) if layer_id else None
        if item.text().startswith("⚠"):  # the engine's warning about the run: nothing on the map
            return False
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
        models = QgsCollapsibleGroupBox("Model and weights")
        models.setCollapsed(True)
        models.setSaveCollapsedState(False)
        mform = QFormLayout(models)
        mform.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        self.model_fields = ModelFields(mform, "embedding", EngineSettings.load().model)
        self.model = self.model_fields.model
        self.models_box = models
        lay.addWidget(models)
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
        self.raster = _narrow(QgsMapLayerComboBox())
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

    def model_options(self) -> dict[str, Any]:
        """``model``, ``weights``, ``sha256`` of the fields (the map tool's too); ValueError for a bad sha256."""
        return self.model_fields.options()

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
            src = engine_source(layer)
            path = raster_file(layer) if src.kind == "file" else src.source
            model = self.model_options()
            tiles = (
                tile_extent_options(src, layer, self.iface.mapCanvas().mapSettings(), self.confirm_download)
                if src.kind != "file"
                else {}
            )
        except Exception as exc:
            report_error(exc, self.iface, "Heatmap")
            return None
        if tiles is None:  # the user declined the download
            return None
        task = HeatmapTask(
            path,
            layer=layer,
            tiles=tiles,
            bands=rgb_bands(layer, model["model"]) if src.kind == "file" else None,
            iface=self.iface,
            on_done=self.progress.ended,
            slot=self.heatmaps,
            **model,
            **query,
        )
        task.retry = lambda: self._heatmap(**query)
        self.progress.follow(task)
        self.last_task = start_task(task)
        return task

    def confirm_download(self, text: str) -> bool:
        """Ask before fetching many tiles for a heatmap (tests replace this with their own answer)."""
        return ask_download(self, text)

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
        then, self.panel._then = self.panel._then, None
        if ok and then is not None:
            then()


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


def model_line(m: dict[str, Any]) -> str:
    """One model of the engine's list: name, kind, description, weights (file and sha256 where known)."""
    line = f"{m.get('name')} ({m.get('kind')}): {m.get('description', '')}"
    if m.get("weights_file") or m.get("sha256"):
        line += f" Weights file: {m.get('weights_file') or '(missing)'}, sha256 {m.get('sha256') or '?'}."
    elif m.get("weights"):
        line += f" Weights: {m['weights']}."
    return line


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
        #: what to run once the engine being started answers (after 'Add folder')
        self._then = None
        #: called after each refresh, when the engine's model list may have changed (the dock's hints)
        self.on_models: list = []
        self.link.changed.connect(self.refresh)
        self.link.folder_adder = self.add_folders

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

    def add_folders(self, folders: list[str], then=None) -> bool:
        """Add ``folders`` to the engine's folders (saved) and restart the engine with them, then run
        ``then``; False (and why, in the bar) when the engine is not one the plugin can restart."""
        s = EngineSettings.load()
        names = ", ".join(folders)
        s.with_roots(folders).save()
        self.load_fields()
        if not s.executable:
            push(
                f"added {names} to the engine's folders, but the engine at {s.url or 'its URL'} was started "
                f"outside QGIS: restart 'skyloc serve' with --root {folders[0]} (or set the engine "
                "executable in the Engine tab, and the plugin restarts it itself)",
                Qgis.MessageLevel.Warning,
                self.iface,
                key=OUTCOME,
            )
            return False
        push(f"restarting the engine with {names} among its folders…", iface=self.iface, key=OUTCOME)
        self._then = then
        self.start(save=False)
        return True

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
            self.models.setPlainText("\n".join(model_line(m) for m in st["models"]))
        else:
            self.models.setPlainText("")
        self.diagnostics.setPlainText(self.link.diagnostics())
        for hint in self.on_models:
            hint()
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
        self.engine.on_models += [
            self.localize.model_fields.update_hint,
            self.embeddings.model_fields.update_hint,
        ]
        body = QWidget()
        lay = QVBoxLayout(body)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(self.line)
        lay.addWidget(self.tabs)
        self.setWidget(body)
