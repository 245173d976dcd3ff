"""The "Skyloc" dock: Localize photos, Embeddings, Engine (widgets built in code, no .ui files)."""

from __future__ import annotations

import json
import os
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
    QgsMapToolEmitPoint,
)
from qgis.PyQt.QtCore import Qt
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
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from .engine_link import EngineLink, EngineSettings
from .layers import raster_file
from .messages import push, report_error
from .tasks import EngineTask, HeatmapTask, IndexTask, LocalizeTask, start_task

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


class TaskProgress(QWidget):
    """A progress bar + cancel button following one task at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.bar = QProgressBar()
        self.bar.setRange(0, 100)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.label = QLabel("")
        self.label.setWordWrap(True)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(_row(self.bar, self.cancel_button))
        lay.addWidget(self.label)
        self.task: QgsTask | None = None

    def follow(self, task: EngineTask) -> None:
        self.task = task
        self.bar.setValue(0)
        self.label.setText(task.description())
        self.cancel_button.setEnabled(True)
        task.progressChanged.connect(lambda p: self.bar.setValue(int(p)))

    def ended(self, task: EngineTask) -> None:
        if task is self.task:
            self.task = None
            self.cancel_button.setEnabled(False)
            self.bar.setValue(100 if task.ok else 0)
            self.label.setText(
                "done" if task.ok else ("cancelled" if task.was_canceled else task.error_text.split("\n")[0])
            )

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
        add_files, add_folder, clear = QPushButton("Files…"), QPushButton("Folder…"), QPushButton("Clear")
        add_files.clicked.connect(self._add_files)
        add_folder.clicked.connect(self._add_folder)
        clear.clicked.connect(self.photo_list.clear)
        form.addRow("Photos", self.photo_list)
        form.addRow("", _row(add_files, add_folder, clear))

        self.index = QgsFileWidget()
        self.index.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        form.addRow("Index folder", self.index)
        self.rasters = QgsCheckableComboBox()
        refresh = QPushButton("↻")
        refresh.setToolTip("List the raster layers of the project")
        refresh.clicked.connect(self.refresh_rasters)
        self.build_button = QPushButton("Build index")
        self.build_button.clicked.connect(self.build_index)
        form.addRow("or build from", self.rasters)
        form.addRow("", _row(refresh, self.build_button))
        self.tile_sizes = QLineEdit("256,512")
        form.addRow("Tile sizes", self.tile_sizes)

        self.footprint = QCheckBox("Estimate footprints")
        self.footprint.setToolTip(
            "Match each photo against its candidates: footprint polygon, georeferenced GeoTIFF and .points"
        )
        self.footprint.setChecked(True)
        form.addRow(self.footprint)
        self.top_k = QSpinBox()
        self.top_k.setRange(1, 100)
        self.top_k.setValue(5)
        form.addRow("Top-k", self.top_k)

        self.area = QComboBox()
        self.area.addItems(self.AREAS)
        form.addRow("Search area", self.area)
        self.extent = QgsExtentWidget(None, QgsExtentWidget.WidgetStyle.CondensedStyle)  # fits a narrow dock
        if iface is not None:
            self.extent.setMapCanvas(iface.mapCanvas())
        form.addRow("Box", self.extent)
        self.lat, self.lon = _spin(-90, 90, 0), _spin(-180, 180, 0)
        self.radius = _spin(0.001, 20000, 100, 3)
        pick = QPushButton("Pick")
        pick.setToolTip("Click the nadir point on the map")
        pick.clicked.connect(self._pick_point)
        form.addRow("Near lat, lon", _row(self.lat, self.lon))
        form.addRow("Radius (km)", _row(self.radius, pick))
        self.area.currentIndexChanged.connect(self._area_changed)
        self._area_changed()

        self.run_button = QPushButton("Localize")
        self.run_button.clicked.connect(self.run)
        form.addRow(self.run_button)
        self.progress = TaskProgress()
        form.addRow(self.progress)
        self._pick_tool: QgsMapToolEmitPoint | None = None
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
        for p in paths:
            if p and not self.photo_list.findItems(p, Qt.MatchFlag.MatchExactly):
                self.photo_list.addItem(p)

    def photos(self) -> list[str]:
        return [self.photo_list.item(i).text() for i in range(self.photo_list.count())]

    def refresh_rasters(self, *_changed) -> None:
        """List the project's raster layers (checked ones stay checked)."""
        checked = set(self.rasters.checkedItemsData())
        self.rasters.clear()
        for layer in QgsProject.instance().mapLayers().values():
            if isinstance(layer, QgsRasterLayer) and not layer.name().startswith("Skyloc heatmap"):
                state = Qt.CheckState.Checked if layer.id() in checked else Qt.CheckState.Unchecked
                self.rasters.addItemWithCheckState(layer.name(), state, layer.id())

    def _area_changed(self) -> None:
        i = self.area.currentIndex()
        self.extent.setEnabled(i == 1)
        for w in (self.lat, self.lon, self.radius):
            w.setEnabled(i == 2)

    def _pick_point(self) -> None:
        if self.iface is None:
            return
        canvas = self.iface.mapCanvas()
        self._pick_tool = QgsMapToolEmitPoint(canvas)

        def picked(point, _button) -> None:
            tr = QgsCoordinateTransform(canvas.mapSettings().destinationCrs(), WGS84, QgsProject.instance())
            p = tr.transform(point)
            self.lat.setValue(p.y())
            self.lon.setValue(p.x())
            self.area.setCurrentIndex(2)
            canvas.unsetMapTool(self._pick_tool)

        self._pick_tool.canvasClicked.connect(picked)
        canvas.setMapTool(self._pick_tool)

    def search_area(self) -> dict[str, Any]:
        """``near``/``radius_km`` or ``bbox`` (EPSG:4326) for the client."""
        i = self.area.currentIndex()
        if i == 2:
            return {"near": [self.lat.value(), self.lon.value()], "radius_km": self.radius.value()}
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

    def build_index(self) -> IndexTask | None:
        """Build an index (in the results folder) from the checked raster layers."""
        try:
            ids = self.rasters.checkedItemsData()
            layers = [QgsProject.instance().mapLayer(i) for i in ids]
            if not layers:
                raise ValueError("check the raster layers to index in the list first")
            sources = [raster_file(lyr) for lyr in layers if lyr is not None]
            sizes = self._tile_sizes()
        except Exception as exc:
            report_error(exc, self.iface, "Build index")
            return None

        def done(task: EngineTask) -> None:
            self.progress.ended(task)
            if task.ok:
                self.index.setFilePath(task.out)

        task = IndexTask(sources, tile_sizes=sizes, iface=self.iface, on_done=done)
        self.progress.follow(task)
        self.last_task = start_task(task)
        return task

    def run(self) -> LocalizeTask | None:
        """Localize the photos (a task): candidates, footprints and georeferenced photos become layers."""
        photos, index = self.photos(), self.index.filePath().strip()
        if not photos or not index:
            push("add photos (or a folder) and choose an index folder first", iface=self.iface)
            return None
        task = LocalizeTask(
            photos,
            index=index,
            footprint=self.footprint.isChecked(),
            top_k=self.top_k.value(),
            iface=self.iface,
            on_done=self.progress.ended,
            **self.search_area(),
        )
        self.progress.follow(task)
        self.last_task = start_task(task)
        return task


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
        self.embedding = QPlainTextEdit()
        self.embedding.setReadOnly(True)
        self.embedding.setPlaceholderText("The embedding at the clicked point appears here.")
        self.embedding.setMaximumHeight(110)
        copy = QPushButton("Copy embedding")
        copy.clicked.connect(lambda: QApplication.clipboard().setText(self.embedding.toPlainText()))
        lay.addWidget(self.embedding)
        lay.addWidget(copy)

        box = QGroupBox("Heatmap from a photo or a place")
        bform = QFormLayout(box)
        bform.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        self.raster = QgsMapLayerComboBox()
        self.raster.setFilters(raster_filter())
        bform.addRow("Raster", self.raster)
        self.photo = QgsFileWidget()
        self.photo.setFilter(PHOTO_FILTER)
        from_photo = QPushButton("Heatmap from photo")
        from_photo.clicked.connect(self.heatmap_from_photo)
        bform.addRow("Photo", self.photo)
        bform.addRow(from_photo)
        self.lat, self.lon = _spin(-90, 90, 0), _spin(-180, 180, 0)
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
            path, layer=layer, model=self.model_name(), iface=self.iface, on_done=self.progress.ended, **query
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
        return self._heatmap(location=[self.lat.value(), self.lon.value()])


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
        self.panel.refresh()
        self.panel._start_task = None


class EnginePanel(QWidget):
    """URL, token file, executable, folders, output folder; start/stop; status, models, diagnostics."""

    def __init__(self, iface) -> None:
        super().__init__()
        self.iface = iface
        self.link = EngineLink.instance()
        s = EngineSettings.load()
        form = QFormLayout(self)
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        self.url = QLineEdit(s.url)
        self.url.setPlaceholderText("http://127.0.0.1:PORT of a running 'skyloc serve'")
        self.token_file = QgsFileWidget()
        self.token_file.setFilePath(s.token_file)
        self.executable = QgsFileWidget()
        self.executable.setFilePath(s.executable)
        self.executable.setToolTip("The 'skyloc' program of the engine's environment, e.g. .venv/bin/skyloc")
        self.roots = QLineEdit(os.pathsep.join(s.roots))
        self.roots.setPlaceholderText(
            f"folders the engine may use, separated by '{os.pathsep}' (default: home)"
        )
        self.output_dir = QgsFileWidget()
        self.output_dir.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.output_dir.setFilePath(s.output_dir)
        form.addRow("URL", self.url)
        form.addRow("Token file", self.token_file)
        form.addRow("Engine executable", self.executable)
        form.addRow("Folders", self.roots)
        form.addRow("Results folder", self.output_dir)
        save = QPushButton("Save settings")
        save.clicked.connect(self.save)
        self.start_button, stop, refresh = QPushButton("Start"), QPushButton("Stop"), QPushButton("Status")
        self.start_button.clicked.connect(self.start)
        stop.clicked.connect(self.stop)
        refresh.clicked.connect(self.refresh)
        form.addRow(_row(self.start_button, stop, refresh))
        form.addRow(save)
        self.status = QLabel("status: not checked yet")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        form.addRow(self.status)
        self.models = QPlainTextEdit()
        self.models.setReadOnly(True)
        self.models.setMaximumHeight(100)
        form.addRow("Models", self.models)
        self.diagnostics = QPlainTextEdit()
        self.diagnostics.setReadOnly(True)
        copy = QPushButton("Copy diagnostics")
        copy.clicked.connect(self.copy_diagnostics)
        form.addRow("Diagnostics", self.diagnostics)
        form.addRow(copy)
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

    def start(self) -> None:
        self.settings().save()
        if self._start_task is not None:
            return
        self.status.setText("status: starting the engine…")
        self.start_button.setEnabled(False)
        self._start_task = StartEngineTask(self)
        QgsApplication.taskManager().addTask(self._start_task)

    def stop(self) -> None:
        if self.link.stop_local() is None:
            push(
                "the plugin did not start an engine (stop a 'skyloc serve' you started yourself with Ctrl-C)"
            )
        self.refresh()

    def refresh(self) -> dict[str, Any]:
        """Ask the engine for its status; show it (and the diagnostics)."""
        st = self.link.status()
        if st["ok"]:
            v = st["version"]
            where = "local engine started by the plugin" if st["local"] else "engine"
            self.status.setText(
                f"status: {where} {v.get('version')} running at {st['url']}; folders: {', '.join(v.get('roots', []))}"
            )
            self.models.setPlainText(
                "\n".join(
                    f"{m.get('name')} ({m.get('kind')}): {m.get('description', '')}" for m in st["models"]
                )
            )
        else:
            self.status.setText(f"status: {st.get('error')}")
            self.models.setPlainText("")
        self.diagnostics.setPlainText(self.link.diagnostics())
        return st

    def copy_diagnostics(self) -> str:
        text = self.link.diagnostics()
        self.diagnostics.setPlainText(text)
        QApplication.clipboard().setText(text)
        return text


# ----------------------------------------------------------------------------------------------- dock


class SkylocDock(QgsDockWidget):
    """The dock: three tabs."""

    def __init__(self, iface, map_tool_action: QAction | None = None) -> None:
        super().__init__("Skyloc")
        self.setObjectName("SkylocDock")
        self.localize = LocalizePanel(iface)
        self.embeddings = EmbeddingsPanel(iface, map_tool_action)
        self.engine = EnginePanel(iface)
        self.tabs = QTabWidget()
        self.tabs.addTab(_scrolled(self.localize), "Localize photos")
        self.tabs.addTab(_scrolled(self.embeddings), "Embeddings")
        self.tabs.addTab(_scrolled(self.engine), "Engine")
        self.setWidget(self.tabs)
