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

    def axes_in_raster(self, raster: EmbedRaster) -> tuple[np.ndarray, np.ndarray] | None:
        """Raster pixel positions of this grid's pixel centres as (cols (width,), rows (height,)), or None.

        Why: on the raster's own grid, or a north-up grid over a north-up raster (what ``--resolution``
        gives), a column of the output maps to one raster column whatever the row, so the positions of a
        strip are two 1-D arrays instead of one pair per pixel. None when they do not factor (then use
        :meth:`pixel_centres_in_raster`). Same arithmetic as that method, so the same positions.
        """
        j, i = np.arange(self.width) + 0.5, np.arange(self.height) + 0.5
        if self.transform == raster.transform:
            return j, i
        t, inv = self.transform, ~raster.transform
        if t.b != 0 or t.d != 0 or inv.b != 0 or inv.d != 0:
            return None
        cols = inv.a * (t.a * j + t.c) + inv.c
        rows = inv.e * (t.e * i + t.f) + inv.f
        return cols, rows


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


@dataclass(frozen=True)
class CogSettings:
    """How the strips become a COG: what costs is compression (deflate of float32 that barely compresses).

    ``staging`` compresses the scratch strips file (the COG driver then decompresses it again), ``level``
    is deflate's level (None: GDAL's 6), ``quantum`` rounds the cosine to multiples of it before writing
    (zeroed low mantissa bits compress and deflate much faster; 2^-18 moves a value by at most 1.9e-6),
    ``threads`` is GDAL's NUM_THREADS for compressing blocks and overviews.
    """

    staging: str | None = None
    level: int | None = 1
    quantum: float | None = 2.0**-18
    threads: str | None = "ALL_CPUS"


#: What heatmaps are written with: raw scratch strips, deflate level 1, 2^-18 quantum, all cores.
FAST_COG = CogSettings()
#: The settings before (deflate-compressed scratch, deflate level 6, full float32): kept for the benchmark.
REFERENCE_COG = CogSettings(staging="deflate", level=None, quantum=None, threads=None)


def write_heatmap(
    out: str | Path,
    grid: OutputGrid,
    crs_wkt: str,
    values_for_rows: Callable[[int, int], np.ndarray],
    tags: dict[str, str],
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
    cog: CogSettings = FAST_COG,
) -> tuple[float, float]:
    """Write ``values_for_rows(row0, rows) -> (rows, width)`` strips as a COG at ``out``; returns (min, max).

    NaN values become nodata. The .qml sidecar is written after the COG is in place. Memory: one strip.
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
        BIGTIFF="IF_SAFER",
    )
    if cog.staging is not None:
        profile.update(compress=cog.staging, predictor=3)
    with _staged(out) as scratch:
        with rasterio.open(scratch, "w", **profile) as dst:
            for row0 in range(0, grid.height, STRIP_ROWS):
                if cancel is not None:
                    cancel.check()
                rows = min(STRIP_ROWS, grid.height - row0)
                values = np.asarray(values_for_rows(row0, rows), np.float32)
                if cog.quantum is not None:  # a power of two: exact scaling, only the rounding moves values
                    values = np.round(values / np.float32(cog.quantum)) * np.float32(cog.quantum)
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
        options: dict[str, str | int] = {}
        if cog.level is not None:
            options["level"] = cog.level
        if cog.threads is not None:
            options["num_threads"] = cog.threads
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
                **options,
            )
    with atomic_path(out.with_suffix(".qml"), suffix=".qml") as tmp:
        tmp.write_text(_qml(lo, hi), encoding="utf-8")
    return lo, hi
