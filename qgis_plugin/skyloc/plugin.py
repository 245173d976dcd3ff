"""The plugin object: dock, toolbar/menu actions, map tool, Processing provider; engine check at load."""

from __future__ import annotations

from pathlib import Path

from qgis.core import Qgis, QgsApplication
from qgis.PyQt.QtCore import Qt, QTimer
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

from .dock import SkylocDock
from .engine_link import SETUP_HINT, EngineLink
from .icons import dock_icon, map_tool_icon
from .map_tool import HeatmapMapTool
from .messages import push
from .processing_provider import SkylocProvider

MENU = "&Skyloc"


def plugin_icon() -> QIcon:
    """``icon.png`` beside the package (zip) or in ``qgis_plugin/`` (source checkout)."""
    here = Path(__file__).parent
    for path in (here / "icon.png", here.parent / "icon.png"):
        if path.is_file():
            return QIcon(str(path))
    return QIcon()


class SkylocPlugin:
    """What QGIS loads: ``initGui`` builds everything, ``unload`` removes all of it."""

    def __init__(self, iface) -> None:
        self.iface = iface
        self.link = EngineLink.instance()  # created here, on the main thread
        self.provider: SkylocProvider | None = None
        self.dock: SkylocDock | None = None
        self.dock_action: QAction | None = None
        self.tool_action: QAction | None = None
        self.map_tool: HeatmapMapTool | None = None
        self.engine_status: dict | None = None

    # -------------------------------------------------------------------------------------- lifecycle

    def initProcessing(self) -> None:  # noqa: N802 (QGIS API)
        """Register the Processing provider (QGIS calls this before initGui for processing plugins)."""
        if self.provider is None:
            provider = SkylocProvider(plugin_icon())
            if QgsApplication.processingRegistry().addProvider(provider):
                self.provider = provider  # else another copy of the plugin holds the id: leave it alone

    def initGui(self) -> None:  # noqa: N802 (QGIS API)
        self.initProcessing()
        window = self.iface.mainWindow()
        self.dock_action = QAction(dock_icon(), "Skyloc", window)
        self.dock_action.setCheckable(True)
        self.dock_action.setToolTip("Show the Skyloc dock: localize photos, embeddings, engine")
        self.tool_action = QAction(map_tool_icon(), "Skyloc: embedding + heatmap at a click", window)
        self.tool_action.setCheckable(True)
        self.tool_action.triggered.connect(self.toggle_map_tool)

        canvas = self.iface.mapCanvas()
        self.dock = SkylocDock(self.iface, self.tool_action)
        self.map_tool = HeatmapMapTool(
            canvas,
            self.iface,
            model=self.dock.embeddings.model_options,
            on_embedding=self.dock.embeddings.show_embedding,
            slot=self.dock.embeddings.heatmaps,
        )
        self.map_tool.setAction(self.tool_action)
        self.iface.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.dock)
        self.dock.hide()
        self.dock.setToggleVisibilityAction(self.dock_action)

        for action in (self.dock_action, self.tool_action):
            self.iface.addToolBarIcon(action)
            self.iface.addPluginToMenu(MENU, action)
        QTimer.singleShot(0, self.check_engine)

    def unload(self) -> None:
        if self.map_tool is not None:
            canvas = self.iface.mapCanvas()
            if canvas.mapTool() is self.map_tool:
                canvas.unsetMapTool(self.map_tool)
            self.map_tool = None
        for action in (self.dock_action, self.tool_action):
            if action is not None:
                self.iface.removePluginMenu(MENU, action)
                self.iface.removeToolBarIcon(action)
                action.deleteLater()
        self.dock_action = self.tool_action = None
        if self.dock is not None:
            if self.dock.localize.band is not None:
                self.dock.localize.band.remove()
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        self.link.folder_adder = None
        self.link.stop_local()

    # ---------------------------------------------------------------------------------------- actions

    def toggle_map_tool(self, checked: bool) -> None:  # noqa: FBT001
        canvas = self.iface.mapCanvas()
        if self.map_tool is None:
            return
        if checked:
            canvas.setMapTool(self.map_tool)
        elif canvas.mapTool() is self.map_tool:
            canvas.unsetMapTool(self.map_tool)

    def check_engine(self) -> dict:
        """At load: is an engine reachable? If not, start the saved one (in the background) or say what
        to do (an info message, never an exception). The dock's status line and Engine tab show it."""
        try:
            st = self.link.status(timeout=3.0)
        except Exception as exc:  # status() does not raise; belt and braces at load time
            st = {"ok": False, "error": str(exc), "code": "error"}
        self.engine_status = st
        panel = self.dock.engine if self.dock is not None else None
        unreachable = not st["ok"] and st.get("code") in ("not_configured", "unreachable")
        if unreachable and panel is not None and self.link.can_autostart():
            panel.start(save=False)  # the saved engine, without a click; the dock says "starting…"
            self.engine_status = st = {**st, "starting": True}
            return st
        if panel is not None:
            panel.show_status(st)
            if st["ok"]:
                panel.refresh()
        if not st["ok"]:
            if st.get("code") == "not_configured":
                text = "no engine is set up yet. " + SETUP_HINT
            else:
                text = st.get("error", "the engine does not answer")
            push(text, Qgis.MessageLevel.Info, self.iface, duration=15)
        return st
