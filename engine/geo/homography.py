"""3x3 homographies between pixel frames and ground coordinates, in GDAL's pixel convention.

(0, 0) is the outer corner of the top-left pixel and pixel centres sit at +0.5. OpenCV puts centres on
integers; the conversion lives in ``cv_matrix`` (and ``engine.footprint.matching``) and nowhere else.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def translation(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def scaling(sx: float, sy: float | None = None) -> np.ndarray:
    return np.diag([sx, sx if sy is None else sy, 1.0])


def affine_matrix(transform: Any) -> np.ndarray:
    """A rasterio/affine Affine as a 3x3 matrix (pixel -> CRS)."""
    a, b, c, d, e, f = (float(v) for v in tuple(transform)[:6])
    return np.array([[a, b, c], [d, e, f], [0.0, 0.0, 1.0]])


def apply_h(h: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Points (n, 2) through a 3x3 homography; a point at infinity (w ~ 0) comes back as nan."""
    pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    w = pts @ h[2, :2] + h[2, 2]
    out = (pts @ h[:2, :2].T + h[:2, 2]) / np.where(np.abs(w) < 1e-12, np.nan, w)[:, None]
    return out


def cv_matrix(gdal_h: np.ndarray) -> np.ndarray:
    """A homography between GDAL pixel frames as OpenCV expects it (pixel centres on integers)."""
    return translation(-0.5, -0.5) @ gdal_h @ translation(0.5, 0.5)


def corners(shape: tuple[int, int]) -> np.ndarray:
    """The 4 outer corners of a (rows, cols) frame: upper-left, upper-right, lower-right, lower-left."""
    rows, cols = shape
    return np.array([[0.0, 0.0], [cols, 0.0], [cols, rows], [0.0, rows]])


def frame_outline(shape: tuple[int, int], per_edge: int = 8) -> np.ndarray:
    """Points along the border of a (rows, cols) pixel frame, corners included (GDAL convention)."""
    h, w = shape
    t = np.linspace(0.0, 1.0, per_edge + 1)
    top = np.stack([t * w, np.zeros_like(t)], 1)
    right = np.stack([np.full_like(t, w), t * h], 1)
    bottom = np.stack([t * w, np.full_like(t, h)], 1)
    left = np.stack([np.zeros_like(t), t * h], 1)
    return np.vstack([top, right, bottom, left])


def local_scale(h: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Linear scale (target units per pixel) of ``h`` at the 4 corners and the centre of a frame."""
    rows, cols = shape
    pts = np.array([[0, 0], [cols, 0], [cols, rows], [0, rows], [cols / 2, rows / 2]], dtype=float)
    out = []
    for x, y in pts:
        p = apply_h(h, np.array([[x, y], [x + 1, y], [x, y + 1]]))
        jx, jy = p[1] - p[0], p[2] - p[0]
        out.append(math.sqrt(abs(jx[0] * jy[1] - jx[1] * jy[0])))
    return np.array(out)
