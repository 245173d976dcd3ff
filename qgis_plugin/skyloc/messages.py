"""Messages to the user: the QGIS message bar (and the log panel), errors explained in words.

The bar gets one short line (the title "Skyloc" once, never "Skyloc: Skyloc:"); a longer text keeps its
first sentence there and the whole of it behind a "Details" button, so nothing is clipped. Messages about
jobs share the key ``"outcome"``: the next outcome replaces the previous one (an error about a finished
job does not stay on top of later successes); durations follow the level (:data:`DURATIONS`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable

from qgis.core import Qgis, QgsMessageLog
from qgis.gui import QgsMessageBarItem
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import QHBoxLayout, QMessageBox, QPushButton, QWidget

from .engine_link import EngineLink, EngineSettings, explain

TITLE = "Skyloc"
#: characters of a message shown in the bar itself (the rest behind "Details")
BAR_CHARS = 150
#: seconds a message stays in the bar, by level (0: until closed or replaced by the next outcome)
DURATIONS = {
    Qgis.MessageLevel.Info: 8,
    Qgis.MessageLevel.Success: 8,
    Qgis.MessageLevel.Warning: 15,
    Qgis.MessageLevel.Critical: 0,
}
OUTCOME = "outcome"
_ITEMS: dict[str, QgsMessageBarItem] = {}
_PREFIX = re.compile(r"^(\s*skyloc\s*:\s*)+", re.IGNORECASE)


def _iface(iface=None):
    if iface is not None:
        return iface
    try:
        from qgis.utils import iface as qgis_iface
    except ImportError:  # pragma: no cover - QGIS always has qgis.utils
        return None
    return qgis_iface


def clean(text: str) -> str:
    """``text`` without leading "Skyloc:" prefixes (the bar's title says it once)."""
    return _PREFIX.sub("", text).strip()


def headline(text: str, limit: int = BAR_CHARS) -> str:
    """The first line of ``text``, cut after a sentence (or a word) to at most ``limit`` characters."""
    first = text.strip().split("\n", 1)[0]
    if len(first) <= limit:
        return first
    cut = first[:limit]
    end = max(cut.rfind(". "), cut.rfind("; "), cut.rfind(": "))
    if end > limit // 3:
        return cut[: end + 1].rstrip(";:") + " …"
    return cut[: cut.rfind(" ")].rstrip(",;:") + " …"


#: pixels of the bar that are not the message: icon, title, buttons, close button, margins
BAR_RESERVED_PX = 330


def bar_chars(iface=None) -> int:
    """Characters of a message that fit on ONE line of the bar at its present width (QGIS wraps a longer
    line and its fixed bar height clips the second line in a narrow window); at most BAR_CHARS."""
    owner = _iface(iface)
    if owner is None:
        return BAR_CHARS
    bar = owner.messageBar()
    width = bar.width() if bar.isVisible() else owner.mainWindow().width()
    char = max(1, bar.fontMetrics().averageCharWidth())
    return max(40, min(BAR_CHARS, (width - BAR_RESERVED_PX) // char))


def drop(key: str, iface=None) -> None:
    """Remove the bar message pushed under ``key`` (if it is still there)."""
    item = _ITEMS.pop(key, None)
    owner = _iface(iface)
    if item is None or owner is None:
        return
    bar = owner.messageBar()
    with contextlib.suppress(RuntimeError):  # already closed by the user or expired: deleted
        if item in bar.items():
            bar.popWidget(item)


def push(
    text: str,
    level: Qgis.MessageLevel = Qgis.MessageLevel.Info,
    iface=None,
    duration: int | None = None,
    key: str | None = None,
    buttons: list[tuple[str, str, Callable[[], object]]] | None = None,
    short: str | None = None,
) -> QgsMessageBarItem | None:
    """Show ``text`` in the message bar (and the log panel); silent when there is no interface.

    ``key``: replaces the message pushed earlier with the same key. ``duration`` None: by level.
    ``buttons``: (label, tooltip, action) of buttons in the message, after "Details" (if any).
    ``short``: the line shown in the bar (default: the text's first sentences, up to BAR_CHARS).
    """
    text = clean(text)
    QgsMessageLog.logMessage(text, TITLE, level)
    owner = _iface(iface)
    if owner is None:
        return None
    if key is not None:
        drop(key, owner)
    short = clean(short) if short else headline(text, bar_chars(owner))
    item = QgsMessageBarItem(TITLE, short, level, DURATIONS.get(level, 8) if duration is None else duration)
    wanted = (
        [("Details", "The whole message", lambda: _show_details(text, level))] if short != text else []
    ) + (buttons or [])
    if wanted:
        holder = QWidget(item)  # owned by the item
        row = QHBoxLayout(holder)
        row.setContentsMargins(0, 0, 0, 0)
        for label, tip, action in wanted:
            button = QPushButton(label, holder)
            button.setToolTip(tip)
            button.clicked.connect(lambda _checked=False, action=action: action())
            row.addWidget(button)
        item.setWidget(holder)
    item.setToolTip(text)
    owner.messageBar().pushItem(item)
    if key is not None:
        _ITEMS[key] = item
    return item


def _show_details(text: str, level: Qgis.MessageLevel) -> None:
    icon = QMessageBox.Icon.Critical if level == Qgis.MessageLevel.Critical else QMessageBox.Icon.Information
    box = QMessageBox(icon, TITLE, text)
    box.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    box.exec()


def bar_messages(iface, level: Qgis.MessageLevel | None = None) -> list[str]:
    """``"Skyloc:<text>"`` of the messages in the bar now (full text), of one level or all (for tests)."""
    out = []
    for item in iface.messageBar().items():
        if level is None or item.level() == level:
            out.append(f"{item.title()}:{item.toolTip() or item.text()}")
    return out


def report_error(
    exc: BaseException,
    iface=None,
    what: str = "",
    key: str | None = OUTCOME,
    folders: list[str] | None = None,
    retry: Callable[[], object] | None = None,
) -> str:
    """Explain ``exc`` in the message bar as a critical message (replacing the last outcome); the text.

    ``folders``: for an input outside the engine's folders, the folders that would let the engine read it:
    the message offers to add them to the engine's folders and restart it (then ``retry``)."""
    what = clean(what)
    lead = f"{what[:1].upper() + what[1:]}: " if what else ""
    text = lead + explain(exc)
    buttons = short = None
    if folders:  # a short first sentence: the bar shows it alone (a narrow bar clips a long one)
        names = ", ".join(folders)
        short = f"{lead}{names} is outside the engine's folders ('Add folder' adds it)."
        text = (
            f"{short} {explain(exc)} "
            f"'Add folder' adds {names} to the engine's folders and restarts the engine"
            + (", then runs this again." if retry is not None else ".")
        )
        buttons = [
            (
                "Add folder",
                f"Add {names} to the engine's folders and restart the engine",
                lambda: add_folders(folders, retry, iface),
            )
        ]
    EngineLink.instance().record_error(text, exc)
    push(text, Qgis.MessageLevel.Critical, iface, key=key, buttons=buttons, short=short)
    return text


def add_folders(folders: list[str], retry: Callable[[], object] | None = None, iface=None) -> bool:
    """Add ``folders`` to the engine's folders and restart it (through the dock when there is one);
    ``retry`` runs once it answers again. False when only the settings could change."""
    drop(OUTCOME, iface)
    adder = EngineLink.instance().folder_adder
    if adder is not None:
        return bool(adder(folders, retry))
    EngineSettings.load().with_roots(folders).save()
    push(
        f"added {', '.join(folders)} to the engine's folders: restart the engine to use them",
        Qgis.MessageLevel.Info,
        iface,
        key=OUTCOME,
    )
    return False
