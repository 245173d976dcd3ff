"""Make the bundled sample photo: an oblique, rotated view of a crop of the 2009 NAIP raster.

The demo indexes the 2018 raster of the same place and localizes this photo: a real 9-year change
(fields, crops, roads) plus a synthetic perspective and a 90-degree rotation. Run from the repository root;
the output is committed, so this only needs re-running when the recipe changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from pyproj import Transformer
from rasterio.windows import Window

SAMPLE = Path(__file__).resolve().parents[1] / "sample"
CROP = Window(col_off=420, row_off=230, width=300, height=300)  # 1.5 km x 1.5 km at 5 m
OUT_SIZE = 400
ROT_K = 1  # np.rot90 k: the photo is the scene rotated 90 degrees counter-clockwise


def main() -> None:
    with rasterio.open(SAMPLE / "naip_2009.tif") as ds:
        rgb = ds.read((1, 2, 3), window=CROP)
        transform = ds.window_transform(CROP)
        crs = ds.crs
    img = Image.fromarray(np.moveaxis(rgb, 0, -1)).resize((OUT_SIZE, OUT_SIZE), Image.LANCZOS)
    # Oblique look: the far (top) edge of the ground square appears narrower. PIL's PERSPECTIVE maps output
    # pixels to input pixels, so give the coefficients of output->input from 4 point pairs.
    s = OUT_SIZE
    squeeze = 0.15 * s
    dst = [(squeeze, 0), (s - squeeze, 0), (s, s), (0, s)]  # where the ground corners land in the photo
    src = [(0, 0), (s, 0), (s, s), (0, s)]
    coeffs = _perspective_coeffs(dst, src)
    photo = img.transform((s, s), Image.PERSPECTIVE, coeffs, Image.BICUBIC, fillcolor=(90, 110, 140))
    photo = Image.fromarray(np.rot90(np.asarray(photo), ROT_K).copy())
    photo.save(SAMPLE / "photo_2009_oblique.jpg", quality=90)

    to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    corners = [
        transform * (c, r) for c, r in [(0, 0), (CROP.width, 0), (CROP.width, CROP.height), (0, CROP.height)]
    ]
    truth = {
        "source": "naip_2009.tif",
        "window": [CROP.col_off, CROP.row_off, CROP.width, CROP.height],
        "crs": crs.to_string(),
        "ground_corners_native": corners,
        "ground_corners_lonlat": [to_lonlat.transform(x, y) for x, y in corners],
        "corner_order": "upper_left, upper_right, lower_right, lower_left of the unrotated crop",
        "rotation_deg_ccw": 90 * ROT_K,
        "perspective": "top edge squeezed by 15% on each side before rotation",
    }
    (SAMPLE / "photo_2009_oblique.json").write_text(json.dumps(truth, indent=1))
    print(f"wrote {SAMPLE / 'photo_2009_oblique.jpg'}")


def _perspective_coeffs(dst: list[tuple[float, float]], src: list[tuple[float, float]]) -> list[float]:
    """Coefficients a..h such that src = ((a x + b y + c) / (g x + h y + 1), (d x + e y + f) / (...))."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return list(np.linalg.solve(np.array(rows, float), np.array(rhs, float)))


if __name__ == "__main__":
    main()
