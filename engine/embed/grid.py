"""The feature grid of a whole raster, computed window by window with context, only where needed.

Cell (i, j) covers raster pixels [j*s, (j+1)*s) x [i*s, (i+1)*s) (s = the backbone's stride); the grid has
ceil(width/s) x ceil(height/s) cells, the last ones hanging over the raster's edge. Windows of
``window_cells`` overlap so that every cell is taken from a window where it lies at least ``margin_cells``
from the window's edge (unless it is at the raster's own edge); see :func:`plan_axis`.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..progress import CancelToken, ProgressFn, no_progress
from .backbones import Backbone
from .raster import EmbedRaster

#: Grids larger than this go to a temporary memory-mapped file instead of RAM.
IN_MEMORY_BYTES = 2 << 30


@dataclass(frozen=True)
class AxisWindow:
    offset: int  # first cell of the window
    own_start: int  # cells [own_start, own_end) are taken from this window
    own_end: int


def plan_axis(n_cells: int, window: int, margin: int) -> list[AxisWindow]:
    """Windows along one axis whose owned ranges partition [0, n_cells), each owned cell >= margin inside.

    Windows step by ``window - 2 * margin``; the last one is flush with the end. Where two windows overlap,
    the split is in the middle of the overlap, so each side keeps at least ``margin`` cells of context.
    """
    if window <= 2 * margin:
        raise ValueError(f"window {window} must exceed twice the margin {margin}")
    if n_cells <= window:
        return [AxisWindow(0, 0, n_cells)]
    step = window - 2 * margin
    offsets = list(range(0, n_cells - window + 1, step))
    if offsets[-1] != n_cells - window:
        offsets.append(n_cells - window)
    plan = []
    start = 0
    for k, off in enumerate(offsets):
        end = n_cells if k == len(offsets) - 1 else (offsets[k + 1] + off + window) // 2
        plan.append(AxisWindow(off, start, end))
        start = end
    return plan


class FeatureGrid:
    """Lazily computed (C, rows, cols) feature grid of one raster for one backbone."""

    def __init__(self, raster: EmbedRaster, backbone: Backbone) -> None:
        backbone.check(raster)
        self.raster = raster
        self.backbone = backbone
        s = backbone.stride
        self.rows, self.cols = math.ceil(raster.height / s), math.ceil(raster.width / s)
        win = backbone.window_cells
        margin = backbone.margin_cells
        if not backbone.fixed_window:  # a CNN takes a smaller input when the raster is small
            win_r, win_c = min(win, self.rows), min(win, self.cols)
        else:
            win_r = win_c = win
        self.win = (win_r, win_c)
        self.plan_rows = plan_axis(self.rows, win_r, min(margin, (win_r - 1) // 2))
        self.plan_cols = plan_axis(self.cols, win_c, min(margin, (win_c - 1) // 2))
        self.done = np.zeros((len(self.plan_rows), len(self.plan_cols)), bool)
        shape = (backbone.channels, self.rows, self.cols)
        nbytes = 4 * math.prod(shape)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if nbytes > IN_MEMORY_BYTES:
            self._tmp = tempfile.TemporaryDirectory(prefix="skyloc-grid-")
            self.feat = np.lib.format.open_memmap(
                Path(self._tmp.name) / "grid.npy", mode="w+", dtype=np.float32, shape=shape
            )
        else:
            self.feat = np.zeros(shape, np.float32)

    def close(self) -> None:
        if self._tmp is not None:
            del self.feat
            self._tmp.cleanup()
            self._tmp = None

    def cell_coords(self, cols_px: np.ndarray, rows_px: np.ndarray) -> np.ndarray:
        """Pixel positions (0 = left/top edge of the raster) -> (N, 2) cell units (cell centres at integers)."""
        s = self.backbone.stride
        return np.stack([np.asarray(cols_px) / s - 0.5, np.asarray(rows_px) / s - 0.5], axis=1)

    def _windows_for(self, r0: int, r1: int, c0: int, c1: int) -> list[tuple[int, int]]:
        """Window indices whose owned cells meet cells [r0, r1) x [c0, c1)."""
        rs = [i for i, w in enumerate(self.plan_rows) if w.own_start < r1 and w.own_end > r0]
        cs = [j for j, w in enumerate(self.plan_cols) if w.own_start < c1 and w.own_end > c0]
        return [(i, j) for i in rs for j in cs]

    def ensure(
        self,
        cells: tuple[int, int, int, int] | None = None,
        progress: ProgressFn = no_progress,
        cancel: CancelToken | None = None,
    ) -> None:
        """Compute the windows owning cells [r0, r1) x [c0, c1) (default: all) that are not done yet."""
        r0, r1, c0, c1 = cells if cells is not None else (0, self.rows, 0, self.cols)
        windows = self._windows_for(max(0, r0), min(self.rows, r1), max(0, c0), min(self.cols, c1))
        self._compute(windows, progress, cancel)

    def ensure_around(
        self,
        points_xy: np.ndarray,
        halo: int = 3,
        progress: ProgressFn = no_progress,
        cancel: CancelToken | None = None,
    ) -> None:
        """Compute the windows for the cells within ``halo`` cells of each point (NILI reads +-2 cells)."""
        boxes = {self.box_around(p, halo) for p in np.asarray(points_xy)}
        self._compute(sorted({w for b in boxes for w in self._windows_for(*b)}), progress, cancel)

    def _compute(
        self, windows: list[tuple[int, int]], progress: ProgressFn, cancel: CancelToken | None
    ) -> None:
        """Run the backbone on the windows not done yet and keep the cells each one owns."""
        todo = [(i, j) for i, j in windows if not self.done[i, j]]
        s = self.backbone.stride
        rows, cols = self.win
        for n, (i, j) in enumerate(todo):
            if cancel is not None:
                cancel.check()
            wr, wc = self.plan_rows[i], self.plan_cols[j]
            pixels, _ = self.backbone.read(self.raster, wc.offset * s, wr.offset * s, cols * s, rows * s)
            feat = self.backbone.features(pixels)
            self.feat[:, wr.own_start : wr.own_end, wc.own_start : wc.own_end] = feat[
                :,
                wr.own_start - wr.offset : wr.own_end - wr.offset,
                wc.own_start - wc.offset : wc.own_end - wc.offset,
            ]
            self.done[i, j] = True
            progress((n + 1) / len(todo), f"features: window {n + 1} of {len(todo)}")

    def box_around(self, point_xy: np.ndarray, halo: int = 3) -> tuple[int, int, int, int]:
        """Cells [r0, r1) x [c0, c1) within ``halo`` of a point (cell units), clipped to the grid."""
        cx, cy = int(np.floor(point_xy[0] + 0.5)), int(np.floor(point_xy[1] + 0.5))
        return (
            max(0, cy - halo),
            min(self.rows, cy + halo + 1),
            max(0, cx - halo),
            min(self.cols, cx + halo + 1),
        )
