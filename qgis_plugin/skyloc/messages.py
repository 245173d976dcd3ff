"""Messages to the user: the QGIS message bar (and the log panel), errors explained in words."""

from __future__ import annotations

from qgis.core import Qgis, QgsMessageLog

from .engine_link import EngineLink, explain

TITLE = "Skyloc"


def _iface(iface=None):
    if iface is not None:
        return iface
    try:
        from qgis.utils import iface as qgis_iface
    except ImportError:  # pragma: no cover - QGIS always has qgis.utils
        return None
    return qgis_iface


def push(text: str, level: Qgis.MessageLevel = Qgis.MessageLevel.Info, iface=None, duration: int = 8) -> None:
    """Show ``text`` in the message bar (and the log panel); silent when there is no interface."""
    QgsMessageLog.logMessage(text, TITLE, level)
    bar_owner = _iface(iface)
    if bar_owner is not None:
        bar_owner.messageBar().pushMessage(TITLE, text, level=level, duration=duration)


def report_error(exc: BaseException, iface=None, what: str = "") -> str:
    """Explain ``exc`` in the message bar as a critical message; the text shown."""
    text = (f"{what}: " if what else "") + explain(exc)
    EngineLink.instance().record_error(text)
    push(text, Qgis.MessageLevel.Critical, iface, duration=0)
    return text
