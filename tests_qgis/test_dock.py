"""The dock in a real (offscreen) QGIS: layout at 300 px, messages, progress text, matcher choices."""

from __future__ import annotations

import time

from conftest import SAMPLE, clear_bar, process_events, wait_for
from qgis.core import Qgis, QgsApplication
from qgis.PyQt.QtWidgets import QPushButton, QScrollArea


def show_narrow(dock, width: int = 300, height: int = 760):
    dock.setFloating(True)
    dock.resize(width, height)
    dock.show()
    process_events(0.3)


def test_dock_fits_300_px_with_every_tab_reachable(plugin):
    from qgis.gui import QgsCollapsibleGroupBox
    from skyloc.dock import NARROW

    dock = plugin.dock
    show_narrow(dock, NARROW)
    boxes = dock.findChildren(QgsCollapsibleGroupBox)
    assert len(boxes) >= 2  # 'Build an index', 'Model and weights': checked open, as a user opens them
    try:
        for box in boxes:
            box.setCollapsed(False)
        tabs = dock.tabs
        bar = tabs.tabBar()
        assert bar.sizeHint().width() <= tabs.width(), (bar.sizeHint().width(), tabs.width())
        for i in range(tabs.count()):
            assert bar.tabRect(i).right() <= tabs.width(), tabs.tabText(i)  # no tab behind a scroll arrow
            tabs.setCurrentIndex(i)
            process_events(0.1)
            area = tabs.widget(i)
            assert isinstance(area, QScrollArea)
            # nothing wider than the dock: no sideways scrolling, no clipped field
            assert area.horizontalScrollBar().maximum() == 0, tabs.tabText(i)
            for button in area.widget().findChildren(QPushButton):
                if button.isVisible():
                    assert button.width() >= button.minimumSizeHint().width() - 1, button.text()
        assert dock.minimumSizeHint().width() <= NARROW
    finally:
        for box in boxes:
            box.setCollapsed(True)
        tabs.setCurrentIndex(0)
        dock.hide()


def test_status_texts_move_no_button(plugin):
    dock = plugin.dock
    show_narrow(dock)
    try:
        panel = dock.localize
        dock.tabs.setCurrentIndex(0)
        process_events(0.1)
        before = panel.run_button.geometry(), panel.progress.cancel_button.geometry()
        panel.progress.label.setText("a long engine message " * 20)
        process_events(0.1)
        assert (panel.run_button.geometry(), panel.progress.cancel_button.geometry()) == before
        engine = dock.engine
        dock.tabs.setCurrentIndex(2)
        process_events(0.1)
        buttons = engine.start_button.geometry()
        engine.status.setText("status: " + "a very long explanation of what went wrong " * 10)
        process_events(0.1)
        assert engine.start_button.geometry() == buttons
        engine.refresh()
    finally:
        dock.tabs.setCurrentIndex(0)
        dock.hide()


def test_error_messages_single_prefix_not_clipped_replaced_by_next_outcome(plugin, qgis_iface):
    from skyloc.client import ServiceError
    from skyloc.messages import OUTCOME, bar_messages, push, report_error

    clear_bar(qgis_iface)
    long = "photo /somewhere/" + "deep/" * 30 + "x.jpg: cannot identify image file"
    text = report_error(ServiceError(422, "bad_input", long), qgis_iface, "Skyloc: localize photos")
    assert text.startswith("Localize photos: A photo could not be read")
    assert "Skyloc" not in text
    items = qgis_iface.messageBar().items()
    assert len(items) == 1
    item = items[0]
    assert item.title() == "Skyloc" and not item.text().startswith("Skyloc")
    assert len(item.text()) <= 160 and item.widget() is not None  # the rest behind "Details"
    assert item.toolTip() == text  # nothing lost
    assert item.duration() == 0  # an error stays...
    push("1 of 1 photo placed", Qgis.MessageLevel.Success, qgis_iface, key=OUTCOME)
    process_events()
    # ...until the next outcome replaces it
    assert bar_messages(qgis_iface) == ["Skyloc:1 of 1 photo placed"]
    assert qgis_iface.messageBar().items()[0].duration() > 0
    clear_bar(qgis_iface)


def test_bar_line_fits_a_narrow_window(plugin, qgis_iface):
    """QGIS wraps a long bar line and its fixed bar height clips the second line (seen in a narrow
    desktop window): the line is cut to the bar's width, the whole text behind Details and the tooltip."""
    from skyloc.messages import BAR_RESERVED_PX, bar_chars, push

    clear_bar(qgis_iface)
    window, bar = qgis_iface.mainWindow(), qgis_iface.messageBar()
    old, old_bar = window.size(), bar.size()
    text = "1 of 2 photos placed; " + "photo_x.jpg rejected: 3 verified matches, needs 12; " * 3
    try:
        window.resize(700, old.height())
        bar.resize(700, old_bar.height())  # the desktop lays the bar out over the map's width
        item = push(text, Qgis.MessageLevel.Info, qgis_iface)
        metrics = qgis_iface.messageBar().fontMetrics()
        assert bar_chars(qgis_iface) < 100
        assert (
            metrics.horizontalAdvance(item.text()) <= 700 - BAR_RESERVED_PX + 8 * metrics.averageCharWidth()
        )
        assert item.text().startswith("1 of 2 photos placed") and item.toolTip() == text.strip()
        assert item.widget() is not None  # Details
        window.resize(2400, old.height())
        bar.resize(2400, old_bar.height())
        assert bar_chars(qgis_iface) == 150  # a wide window: the bar's own limit
    finally:
        window.resize(old)
        bar.resize(old_bar)
        clear_bar(qgis_iface)


def test_progress_shows_the_engines_messages(plugin, qgis_iface, engine_settings, work_dir):
    from skyloc.tasks import IndexTask, start_task

    panel = plugin.dock.localize
    task = IndexTask([str(SAMPLE / "naip_2009.tif")], str(work_dir / "progress_index"), tile_sizes=[256])
    task.on_done = panel.progress.ended
    panel.progress.follow(task)
    start_task(task)
    seen = set()
    deadline = time.monotonic() + 120
    while not task.ended and time.monotonic() < deadline:
        QgsApplication.processEvents()
        seen.add(panel.progress.label.text())
        time.sleep(0.05)
    wait_for(task)
    assert task.ok, task.error_text
    shown = [t for t in seen if "tiles" in t and " s · " in t]
    assert shown, seen  # e.g. "3 s · encoded 64 of 178 tiles x 4 rotations (1 s)"
    assert panel.progress.label.text() == "done"


def test_matcher_choices_are_the_processing_ones(plugin):
    from qgis.PyQt.QtCore import Qt
    from skyloc.algorithms import MATCHERS

    combo = plugin.dock.localize.matcher
    assert [combo.itemText(i) for i in range(combo.count())] == list(MATCHERS)
    assert all(combo.itemData(i, Qt.ItemDataRole.ToolTipRole) for i in range(combo.count()))
    plugin.dock.localize.footprint.setChecked(False)
    assert not combo.isEnabled()  # candidates only: no matching
    plugin.dock.localize.footprint.setChecked(True)
    assert combo.isEnabled()


def test_empty_coordinates_are_refused_in_words(plugin, qgis_iface):
    from skyloc.messages import bar_messages

    clear_bar(qgis_iface)
    panel = plugin.dock.embeddings
    panel.lat.clear()
    panel.lon.clear()
    assert panel.lat.placeholderText() == "lat" and panel.lat.value() is None
    assert panel.heatmap_from_location() is None
    assert any("latitude and longitude" in m for m in bar_messages(qgis_iface)), bar_messages(qgis_iface)
    clear_bar(qgis_iface)


def test_status_lines_show_whole_text_or_elide_visibly(plugin):
    from qgis.PyQt.QtWidgets import QLabel
    from skyloc.dock import ElidedLabel

    label = ElidedLabel("", lines=2)
    label.resize(270, label.height())
    short = "12 s · photo 1 of 2: photo_2009_oblique.jpg (3 s)"
    label.setText(short)
    assert QLabel.text(label) == short  # two lines hold it: shown whole
    label.setText("word " * 100)
    assert QLabel.text(label).endswith("…") and label.text() == "word " * 100  # elided, never cut mid-line
