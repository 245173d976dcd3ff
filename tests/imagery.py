"""Test imagery helpers: synthetic oblique photos made from real rasters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample"
SHARED_DATA = ROOT.parent / "shared" / "data"


def perspective_photo(rgb: np.ndarray, squeeze: float, rot_k: int, size: int = 320) -> np.ndarray:
    """An oblique-looking, rotated view of ``rgb`` (H, W, 3): top edge narrowed, then np.rot90 by rot_k."""
    img = Image.fromarray(rgb).resize((size, size), Image.LANCZOS)
    s, q = size, squeeze * size
    dst = [(q, 0), (s - q, 0), (s, s), (0, s)]
    src = [(0, 0), (s, 0), (s, s), (0, s)]
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    coeffs = np.linalg.solve(np.array(rows, float), np.array(rhs, float))
    warped = img.transform((s, s), Image.PERSPECTIVE, tuple(coeffs), Image.BICUBIC, fillcolor=(0, 0, 0))
    return np.rot90(np.asarray(warped), rot_k).copy()


def read_window(path: Path, col: int, row: int, size: int) -> np.ndarray:
    with rasterio.open(path) as ds:
        return np.moveaxis(ds.read((1, 2, 3), window=rasterio.windows.Window(col, row, size, size)), 0, -1)
