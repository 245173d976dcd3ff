"""Writing a similarity heatmap: output grid, strips of rows, Cloud-Optimized GeoTIFF, QGIS style sidecar.

The map is float32 cosine similarity in [-1, 1], nodata ``NODATA`` outside the raster's valid pixels. It is
written strip by strip into a tiled GeoTIFF beside the target, converted to a COG (with overviews) and
renamed into place: an interrupted run leaves nothing. ``HEAT.qml`` beside it makes QGIS open it as a
semi-transparent pseudocolour layer with a legend.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio
from affine import Affine
from rasterio.shutil import copy as rio_copy
from rasterio.windows import Window

from ..atomic import atomic_path
from ..errors import InputError
from ..output_guard import QML_MARK, TIFF_TAG
from ..progress import CancelToken, ProgressFn, no_progress
from .raster import EmbedRaster

NODATA = -9999.0
STRIP_ROWS = 256
#: A colour ramp from low to high similarity (viridis-like stops), written into the .qml sidecar.
RAMP = ("#440154", "#3b528b", "#21918c", "#5ec962", "#fde725")


@dataclass(frozen=True)
class OutputGrid:
    width: int
    height: int
    transform: Affine

    def pixel_centres_in_raster(
        self, raster: EmbedRaster, row0: int, rows: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raster pixel positions (col, row) of this grid's pixel centres for output rows [row0, row0+rows)."""
        jj, ii = np.meshgrid(np.arange(self.width) + 0.5, np.arange(row0, row0 + rows) + 0.5)
        xs, ys = self.transform @ (jj.ravel(), ii.ravel())
        cols, rows_px = ~raster.transform @ (np.asarray(xs), np.asarray(ys))
        return np.asarray(cols), np.asarray(rows_px)


def output_grid(raster: EmbedRaster, resolution: float | None) -> OutputGrid:
    """The raster's own grid, or one of ``resolution`` map units per pixel over the same bounds."""
    if resolution is None:
        return OutputGrid(raster.width, raster.height, raster.transform)
    if not (resolution > 0 and math.isfinite(resolution)):
        raise InputError(f"--resolution must be a positive number of map units, got {resolution}")
    t = raster.transform
    if t.b != 0 or t.d != 0:
        raise InputError(f"{raster.path} is rotated: --resolution needs a north-up raster (omit it)")
    left, bottom, right, top = raster.bounds()
    width, height = math.ceil((right - left) / resolution), math.ceil((top - bottom) / resolution)
    if width * height > 400_000_000:
        raise InputError(
            f"--resolution {resolution} gives {width}x{height} pixels: too many, choose a coarser one"
        )
    return OutputGrid(width, height, Affine(resolution, 0, left, 0, -resolution, top))


def _qml(lo: float, hi: float, opacity: float = 0.65) -> str:
    if not hi > lo:
        lo, hi = lo - 0.01, hi + 0.01
    stops = [lo + (hi - lo) * k / (len(RAMP) - 1) for k in range(len(RAMP))]
    items = "\n".join(
        f'            <item alpha="255" value="{v:.6f}" label="{v:.3f}" color="{c}"/>'
        for v, c in zip(stops, RAMP, strict=True)
    )
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.22.0" styleCategories="AllStyleCategories">
  <pipe>
    <rasterrenderer type="singlebandpseudocolor" band="1" opacity="{opacity}" alphaBand="-1"
                    classificationMin="{lo:.6f}" classificationMax="{hi:.6f}" nodataColor="">
      <rastershader>
        <colorrampshader colorRampType="INTERPOLATED" classificationMode="1" clip="0"
                         minimumValue="{lo:.6f}" maximumValue="{hi:.6f}" labelPrecision="3">
{items}
        </colorrampshader>
      </rastershader>
    </rasterrenderer>
  </pipe>
  <blendMode>0</blendMode>
  <layerGeometryType>-1</layerGeometryType>
  <!-- {escape("Skyloc similarity heatmap: cosine similarity, nodata " + str(NODATA))} -->
  {QML_MARK}
</qgis>
"""


@contextlib.contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A scratch GeoTIFF beside ``out`` (same filesystem), always removed."""
    scratch = out.with_name(f".{out.name}.strips.tif")
    try:
        yield scratch
    finally:
        scratch.unlink(missing_ok=True)


def write_heatmap(
    out: str | Path,
    grid: OutputGrid,
    crs_wkt: str,
    values_for_rows: Callable[[int, int], np.ndarray],
    tags: dict[str, str],
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> tuple[float, float]:
    """Write ``values_for_rows(row0, rows) -> (rows, width)`` strips as a COG at ``out``; returns (min, max).

    NaN values become nodata. The .qml sidecar is written after the COG is in place.
    """
    out = Path(out)
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise InputError(f"--out must be a .tif file (Cloud-Optimized GeoTIFF), got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    lo, hi = math.inf, -math.inf
    profile = dict(
        driver="GTiff",
        width=grid.width,
        height=grid.height,
        count=1,
        dtype="float32",
        crs=crs_wkt,
        transform=grid.transform,
        nodata=NODATA,
        tiled=True,
        blockxsize=256,
        blockysize=256,
        compress="deflate",
        predictor=3,
        BIGTIFF="IF_SAFER",
    )
    with _staged(out) as scratch:
        with rasterio.open(scratch, "w", **profile) as dst:
            for row0 in range(0, grid.height, STRIP_ROWS):
                if cancel is not None:
                    cancel.check()
                rows = min(STRIP_ROWS, grid.height - row0)
                values = np.asarray(values_for_rows(row0, rows), np.float32)
                finite = np.isfinite(values)
                if finite.any():
                    lo, hi = min(lo, float(values[finite].min())), max(hi, float(values[finite].max()))
                dst.write(np.where(finite, values, NODATA)[None], window=Window(0, row0, grid.width, rows))
                progress(
                    min(1.0, (row0 + rows) / grid.height), f"heatmap: row {row0 + rows} of {grid.height}"
                )
            dst.update_tags(**{TIFF_TAG: "similarity heatmap", **tags})
            dst.set_band_description(1, "cosine similarity")
        if not math.isfinite(lo):
            raise InputError("the heatmap has no valid pixel (the raster is all nodata)")
        with atomic_path(out, suffix=".tif") as tmp:
            rio_copy(
                scratch,
                tmp,
                driver="COG",
                compress="DEFLATE",
                predictor="YES",
                blocksize=512,
                overview_resampling="average",
                BIGTIFF="IF_SAFER",
            )
    with atomic_path(out.with_suffix(".qml"), suffix=".qml") as tmp:
        tmp.write_text(_qml(lo, hi), encoding="utf-8")
    return lo, hi
