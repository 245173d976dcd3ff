"""Test imagery helpers: synthetic oblique photos made from real rasters."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import rasterio

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample"
SHARED_DATA = ROOT.parent / "shared" / "data"

sys.path.insert(0, str(ROOT / "scripts"))
from make_sample import oblique_view  # noqa: E402


def perspective_photo(rgb: np.ndarray, squeeze: float, rot_k: int, size: int = 320) -> np.ndarray:
    """An oblique-looking, rotated view of ``rgb``: the recipe of the bundled sample photo."""
    return oblique_view(rgb, squeeze=squeeze, rot_k=rot_k, size=size)


def read_window(path: Path, col: int, row: int, size: int) -> np.ndarray:
    with rasterio.open(path) as ds:
        return np.moveaxis(ds.read((1, 2, 3), window=rasterio.windows.Window(col, row, size, size)), 0, -1)
