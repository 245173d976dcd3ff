"""What a footprint leaves on disk: QGIS Georeferencer GCPs and the photo warped onto the ground (COG).

Both start from ``h``, the 3x3 homography photo pixel -> ground coordinates in a CRS, with GDAL's pixel
convention: (0, 0) is the outer corner of the top-left pixel, pixel centres sit at +0.5, and the photo's
corners are (0, 0), (W, 0), (W, H), (0, H) (upper-left, upper-right, lower-right, lower-left).

* ``write_points``: a ``.points`` file for QGIS's Georeferencer, so an analyst can open the photo there, load
  the points and refine them by hand. The format is the one QGIS 3.x writes and reads
  (``QgsGCPList::saveGcps`` / ``loadGcps`` in ``src/app/georeferencer/qgsgcplist.cpp``)::

      #CRS: <WKT of the map coordinates' CRS>           (QGIS >= 3.26; optional when reading)
      mapX,mapY,sourceX,sourceY,enable,dX,dY,residual
      <x>,<y>,<col>,<-row>,1,0,0,0

  The source end of a GCP is in the layer coordinates of the non-georeferenced photo, which QGIS shows
  with y up: sourceX = column, sourceY = -row. Naming the file ``<photo file>.points`` makes the
  Georeferencer load it with the photo.
* ``write_geotiff``: the photo resampled onto a north-up grid in the ground CRS, RGB + alpha (0 outside the
  photo's quadrilateral), written as a Cloud-Optimized GeoTIFF (DEFLATE, internal overviews).

Both writes are atomic: the final path holds the complete file or is left as it was.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import rasterio
from pyproj import CRS
from pyproj.exceptions import CRSError
from rasterio.enums import ColorInterp
from rasterio.transform import Affine

from ..atomic import atomic_path
from ..errors import InputError
from ..geo.crs import crs_label
from ..geo.homography import affine_matrix, apply_h, corners, cv_matrix, frame_outline, local_scale, scaling
from ..output_guard import TIFF_TAG, mark_written

POINTS_HEADER = "mapX,mapY,sourceX,sourceY,enable,dX,dY,residual"
CORNER_ORDER = "upper_left,upper_right,lower_right,lower_left"
#: cv2.remap (behind warpPerspective) indexes its source with 16-bit integers.
CV_MAX_SIDE = 32000


def _pyproj_crs(crs: Any) -> CRS:
    try:
        return CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
    except CRSError as exc:
        raise InputError(f"not a usable CRS: {str(crs)[:80]!r} ({exc})") from exc


def _number(v: float) -> str:
    """Shortest text that reads back as exactly ``v``, without an exponent (degrees keep every digit)."""
    return np.format_float_positional(float(v), unique=True, trim="-")


def check_homography(h: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Validate a photo -> ground homography for a (rows, cols) photo; return the projected corners (4, 2).

    Raises InputError when ``h`` is not a finite 3x3 matrix, when the horizon (w = 0) crosses the photo
    (the ground outline would fold or reach infinity), or when the corners do not make a non-degenerate
    convex quadrilateral (rank-deficient ``h``).
    """
    h = np.asarray(h, dtype=np.float64)
    if h.shape != (3, 3) or not np.all(np.isfinite(h)):
        raise InputError(f"footprint homography must be a finite 3x3 matrix, got {h.tolist()!r}")
    rows, cols = shape
    if rows < 1 or cols < 1:
        raise InputError(f"photo has no pixels: shape {shape}")
    four = corners(shape)
    w = four @ h[2, :2] + h[2, 2]
    if not (np.all(w > 0) or np.all(w < 0)) or np.min(np.abs(w)) <= 1e-12 * np.max(np.abs(w)):
        raise InputError("footprint homography puts the horizon inside the photo: its ground outline folds")
    quad = apply_h(h, four)
    edges = np.roll(quad, -1, axis=0) - quad
    cross = edges[:, 0] * np.roll(edges, -1, axis=0)[:, 1] - edges[:, 1] * np.roll(edges, -1, axis=0)[:, 0]
    scale = float(np.max(np.hypot(edges[:, 0], edges[:, 1])))
    if not np.all(np.isfinite(quad)) or scale == 0 or np.min(np.abs(cross)) <= 1e-9 * scale**2:
        raise InputError("footprint homography is degenerate: the photo collapses onto a line or a point")
    if not (np.all(cross > 0) or np.all(cross < 0)):
        raise InputError("footprint homography is degenerate: the photo's ground outline is not convex")
    try:
        inv = np.linalg.inv(h)
    except np.linalg.LinAlgError as exc:
        raise InputError("footprint homography is not invertible") from exc
    if not np.all(np.isfinite(inv)):
        raise InputError("footprint homography is not invertible")
    return quad


def write_points(
    path: str | Path, h: np.ndarray, photo_shape: tuple[int, int], crs: Any, grid: int = 3
) -> Path:
    """Write a QGIS Georeferencer GCP file for the (non-georeferenced) photo; return its path.

    ``grid`` x ``grid`` points on a regular lattice over the photo, its 4 corners included (a projective
    transform needs >= 4), each mapped through ``h`` into ``crs``. ``photo_shape`` is (rows, cols).
    """
    if int(grid) < 2:
        raise InputError(f"GCP grid must be at least 2 x 2, got {grid}")
    rows, cols = int(photo_shape[0]), int(photo_shape[1])
    check_homography(h, (rows, cols))
    wkt = _pyproj_crs(crs).to_wkt()  # single line, WKT2 2019: what QGIS writes (WKT_PREFERRED)
    xs, ys = np.meshgrid(np.linspace(0.0, cols, int(grid)), np.linspace(0.0, rows, int(grid)))
    pixels = np.stack([xs.ravel(), ys.ravel()], axis=1)
    ground = apply_h(np.asarray(h, dtype=np.float64), pixels)
    lines = [f"#CRS: {wkt}", POINTS_HEADER]
    for (gx, gy), (col, row) in zip(ground, pixels, strict=True):
        lines.append(f"{_number(gx)},{_number(gy)},{_number(col)},{_number(-row + 0.0)},1,0,0,0")
    with atomic_path(path, ".points") as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        mark_written(tmp)
    return Path(path)


def read_points(path: str | Path) -> tuple[str | None, np.ndarray, np.ndarray]:
    """Parse a QGIS ``.points`` file: (CRS WKT or None, map xy (n, 2), photo pixel (col, row) (n, 2)).

    Reads like QGIS does: an optional ``#CRS: `` first line, the column header, then one GCP a line
    (comma- or, in old files, tab-separated). Disabled GCPs (enable = 0) are left out.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read GCP points ({exc})") from exc
    crs = None
    if lines and lines[0].startswith("#CRS:"):
        crs = lines.pop(0)[len("#CRS:") :].strip() or None
    if lines:
        lines.pop(0)  # column header
    map_xy, pixel_xy = [], []
    for number, line in enumerate(lines, start=3 if crs is not None else 2):
        if not line.strip():
            continue
        fields = line.split(",") if "," in line else line.split("\t")
        try:
            values = [float(v) for v in fields[:4]]
            enabled = len(fields) < 5 or int(float(fields[4])) != 0
        except ValueError:
            values, enabled = [], True
        if len(values) < 4:
            raise InputError(f"{path}: malformed GCP at line {number}: {line[:80]!r}")
        if enabled:
            map_xy.append(values[:2])
            pixel_xy.append([values[2], -values[3]])
    return crs, np.array(map_xy, float).reshape(-1, 2), np.array(pixel_xy, float).reshape(-1, 2)


def write_geotiff(
    path: str | Path,
    rgb: np.ndarray,
    h: np.ndarray,
    crs: Any,
    *,
    resolution: float | None = None,
    max_side: int = 8192,
    cog: bool = True,
) -> Path:
    """Warp the photo onto the ground and write it as an RGBA GeoTIFF in ``crs``; return its path.

    The grid is north up over the bounding box of the photo's ground outline. ``resolution`` (CRS units
    per pixel) defaults to the median ground size of a photo pixel, coarsened so neither side exceeds
    ``max_side``. Band 4 is alpha (255 on the photo, 0 outside it), which QGIS shows as transparency.
    ``cog``: a Cloud-Optimized GeoTIFF (tiled, DEFLATE, internal overviews); otherwise a tiled GeoTIFF.
    Tags: ``SKYLOC_HOMOGRAPHY`` (JSON of ``h``), ``SKYLOC_CORNERS`` (JSON of the ground corners) and
    ``SKYLOC_CORNER_ORDER``.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        raise InputError(f"photo must be a non-empty uint8 (H, W, 3) array, got {rgb.dtype} {rgb.shape}")
    if resolution is not None and not (math.isfinite(resolution) and resolution > 0):
        raise InputError(f"output resolution must be a positive number, got {resolution}")
    if int(max_side) < 1:
        raise InputError(f"max_side must be positive, got {max_side}")
    rows, cols = rgb.shape[:2]
    h = np.asarray(h, dtype=np.float64)
    corners = check_homography(h, (rows, cols))
    label = crs_label(_pyproj_crs(crs))

    outline = apply_h(h, frame_outline((rows, cols), per_edge=16))
    (minx, miny), (maxx, maxy) = outline.min(0), outline.max(0)
    scales = local_scale(h, (rows, cols))
    res = float(np.median(scales)) if resolution is None else float(resolution)
    res = max(res, (maxx - minx) / max_side, (maxy - miny) / max_side)
    width = max(1, min(int(max_side), math.ceil((maxx - minx) / res - 1e-9)))
    height = max(1, min(int(max_side), math.ceil((maxy - miny) / res - 1e-9)))
    transform = Affine(res, 0.0, float(minx), 0.0, -res, float(maxy))

    # Average the photo down first where the output is much coarser than it (warping alone would alias).
    shrink = max(res / float(np.min(scales)), max(rows, cols) / CV_MAX_SIDE)
    photo, photo_to_crs = rgb, h
    if shrink > 1.5:
        nw, nh = max(1, round(cols / shrink)), max(1, round(rows / shrink))
        photo = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)
        photo_to_crs = h @ scaling(cols / nw, rows / nh)
    out_to_photo = cv_matrix(np.linalg.inv(photo_to_crs) @ affine_matrix(transform))
    flags = cv2.WARP_INVERSE_MAP
    warped = cv2.warpPerspective(
        photo, out_to_photo, (width, height), flags=cv2.INTER_LINEAR | flags, borderMode=cv2.BORDER_REPLICATE
    )
    inside = np.full(photo.shape[:2], 255, np.uint8)
    alpha = cv2.warpPerspective(inside, out_to_photo, (width, height), flags=cv2.INTER_NEAREST | flags)
    warped[alpha == 0] = 0
    bands = np.concatenate([warped.transpose(2, 0, 1), alpha[None]], axis=0)

    profile: dict[str, Any] = dict(
        width=width, height=height, count=4, dtype="uint8", crs=label, transform=transform, compress="deflate"
    )
    if cog:
        profile.update(driver="COG", blocksize=512, predictor="YES", overview_resampling="average")
    else:
        profile.update(driver="GTiff", tiled=True, blockxsize=512, blockysize=512, predictor=2)
        profile.update(photometric="RGB", alpha="YES")
    tags = {
        TIFF_TAG: "georeferenced photo",
        "SKYLOC_CORNER_ORDER": CORNER_ORDER,
        "SKYLOC_HOMOGRAPHY": json.dumps(h.tolist()),
        "SKYLOC_CORNERS": json.dumps(corners.tolist()),
    }
    with atomic_path(path, ".tif") as tmp:
        try:
            with rasterio.open(tmp, "w", **profile) as ds:
                ds.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
                ds.update_tags(**tags)
                ds.write(bands)
        except BaseException:
            # GDAL may leave side files (overview temporaries) beside a failed write
            for stray in tmp.parent.glob(glob.escape(tmp.name) + "*"):
                with contextlib.suppress(OSError):
                    stray.unlink()
            raise
    return Path(path)
