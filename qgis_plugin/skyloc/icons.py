"""The plugin's two icons, drawn with QPainter (crisp at any size; no image file needed in the zip).

* dock: a photo frame (sky-blue, a mountain) with a location pin on it - "where was this photo taken".
* map tool: a crosshair over a small heatmap patch (viridis colours) - "click: embedding + heatmap".

``save_pngs(folder)`` writes them as 24 and 64 px PNGs (``icons/dock.png``, ``icons/map_tool.png``...),
the files committed beside this module; ``scripts/render_screenshots.py`` regenerates them.
"""

from __future__ import annotations

from pathlib import Path

from qgis.PyQt.QtCore import QPointF, QRectF, Qt
from qgis.PyQt.QtGui import QBrush, QColor, QIcon, QPainter, QPainterPath, QPen, QPixmap, QPolygonF

SIZES = (16, 24, 32, 48, 64)
INK = QColor("#1f2d3d")


def _canvas(size: int) -> tuple[QPixmap, QPainter]:
    pixmap = QPixmap(size, size)
    pixmap.fill(Qt.GlobalColor.transparent)
    painter = QPainter(pixmap)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    painter.scale(size / 24.0, size / 24.0)  # drawn on a 24 x 24 grid
    return pixmap, painter


def draw_dock(size: int = 24) -> QPixmap:
    """A photo (sky, mountain) with a red location pin."""
    pixmap, p = _canvas(size)
    p.setPen(QPen(INK, 1.4))
    p.setBrush(QBrush(QColor("#9ecae1")))
    p.drawRoundedRect(QRectF(1.5, 5.5, 17, 13), 1.5, 1.5)
    p.setPen(Qt.PenStyle.NoPen)
    p.setBrush(QBrush(QColor("#41ab5d")))
    p.drawPolygon(
        QPolygonF(
            [QPointF(2.3, 17.8), QPointF(8, 10), QPointF(11.5, 14), QPointF(13.5, 12), QPointF(17.7, 17.8)]
        )
    )
    pin = QPainterPath()
    pin.moveTo(17, 22.5)
    pin.cubicTo(13.2, 17, 12, 15, 12, 12.5)
    pin.arcTo(QRectF(12, 7.5, 10, 10), 180, -180)
    pin.cubicTo(22, 15, 20.8, 17, 17, 22.5)
    p.setPen(QPen(QColor("#7f0000"), 1.2))
    p.setBrush(QBrush(QColor("#e31a1c")))
    p.drawPath(pin)
    p.setPen(Qt.PenStyle.NoPen)
    p.setBrush(QBrush(QColor("white")))
    p.drawEllipse(QPointF(17, 12.5), 2.0, 2.0)
    p.end()
    return pixmap


def draw_map_tool(size: int = 24) -> QPixmap:
    """A 3 x 3 heatmap patch (viridis) under a black-and-white crosshair."""
    pixmap, p = _canvas(size)
    ramp = ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"]
    levels = [[0, 1, 2], [1, 4, 2], [0, 2, 1]]
    p.setPen(Qt.PenStyle.NoPen)
    for r, row in enumerate(levels):
        for c, level in enumerate(row):
            p.setBrush(QBrush(QColor(ramp[level])))
            p.drawRect(QRectF(3 + 6 * c, 3 + 6 * r, 6, 6))
    p.setBrush(Qt.BrushStyle.NoBrush)
    p.setPen(QPen(INK, 1.2))
    p.drawRect(QRectF(3, 3, 18, 18))
    for colour, width in ((QColor("white"), 3.6), (INK, 1.6)):
        p.setPen(QPen(colour, width, Qt.PenStyle.SolidLine, Qt.PenCapStyle.RoundCap))
        p.drawLine(QPointF(12, 0.8), QPointF(12, 8.5))
        p.drawLine(QPointF(12, 15.5), QPointF(12, 23.2))
        p.drawLine(QPointF(0.8, 12), QPointF(8.5, 12))
        p.drawLine(QPointF(15.5, 12), QPointF(23.2, 12))
        p.drawEllipse(QPointF(12, 12), 3.2, 3.2)
    p.end()
    return pixmap


def _icon(draw) -> QIcon:
    icon = QIcon()
    for size in SIZES:
        icon.addPixmap(draw(size))
    return icon


def dock_icon() -> QIcon:
    return _icon(draw_dock)


def map_tool_icon() -> QIcon:
    return _icon(draw_map_tool)


def save_pngs(folder: str | Path) -> list[Path]:
    """Write ``dock.png``/``map_tool.png`` (24 px) and ``*_64.png`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in (("dock", draw_dock), ("map_tool", draw_map_tool)):
        for size, suffix in ((24, ""), (64, "_64")):
            path = folder / f"{name}{suffix}.png"
            if not draw(size).save(str(path), "PNG"):
                raise RuntimeError(f"cannot write {path}")
            written.append(path)
    return written
