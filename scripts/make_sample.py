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
    view = oblique_view(
        np.moveaxis(rgb, 0, -1), squeeze=0.15, rot_k=ROT_K, size=OUT_SIZE, fill=(90, 110, 140)
    )
    photo = Image.fromarray(view)
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


def oblique_view(
    rgb: np.ndarray, squeeze: float, rot_k: int, size: int, fill: tuple[int, int, int] = (0, 0, 0)
) -> np.ndarray:
    """An oblique-looking, rotated view of ``rgb`` (H, W, 3), as a (size, size, 3) uint8 array.

    The far (top) edge of the ground square appears narrower by ``squeeze`` x size on each side, then the
    result is turned by np.rot90(k=rot_k), i.e. 90 * rot_k degrees counter-clockwise. The tests make their
    synthetic photos with this too.
    """
    img = Image.fromarray(rgb).resize((size, size), Image.LANCZOS)
    s, q = size, squeeze * size
    dst = [(q, 0), (s - q, 0), (s, s), (0, s)]  # where the ground corners land in the photo
    src = [(0, 0), (s, 0), (s, s), (0, s)]
    # PIL's PERSPECTIVE maps output pixels to input pixels: solve for the output -> input coefficients.
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    coeffs = np.linalg.solve(np.array(rows, float), np.array(rhs, float))
    warped = img.transform((s, s), Image.PERSPECTIVE, tuple(coeffs), Image.BICUBIC, fillcolor=fill)
    return np.rot90(np.asarray(warped), rot_k).copy()


if __name__ == "__main__":
    main()
