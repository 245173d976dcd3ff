"""Database tiles cut from a georeferenced raster (GeoTIFF or anything GDAL opens) at several scales.

Geometry goes through the raster's own affine transform and pyproj (never a linear map in degrees). Colour:
three bands are picked as RGB (see choose_rgb_bands) and, for anything but uint8, stretched once for the
whole raster, so that the same ground value gives the same colour in every tile.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio import windows
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window

from ..errors import InputError, NoCRSError, SkylocError, from_os_error
from ..geo.crs import crs_label, densified_ring_lonlat
from .base import TileSpec
from .photos import short_path
from .stretch import Stretch, apply_band_stretch, choose_rgb_bands, compute_stretch

#: Longest side of the decimated read that gives the stretch and the nodata fractions.
OVERVIEW_MAX_SIDE = 1024
#: Smallest tile side accepted when the raster is smaller than every requested tile size.
MIN_TILE_SIDE = 64
#: Segments per tile edge in footprint_lonlat.
POINTS_PER_EDGE = 8


def window_offsets(length: int, size: int, stride: int) -> list[int]:
    """Offsets of windows of ``size`` every ``stride`` pixels, plus one flush with the end so all is covered."""
    if size > length:
        return []
    offsets = list(range(0, length - size + 1, stride))
    if offsets[-1] != length - size:
        offsets.append(length - size)
    return offsets


def _gdal_reason(exc: BaseException) -> str:
    """rasterio says "Read failed. See previous exception for details.": the GDAL message is its cause."""
    cause = exc.__cause__ or exc.__context__
    return str(cause) if cause is not None and str(cause) else str(exc)


@contextlib.contextmanager
def raster_errors(path: str, what: str = "reading") -> Iterator[None]:
    """GDAL failures while ``what`` a raster -> InputError naming the file (a truncated or corrupt file).

    Why: a truncated GeoTIFF opens fine (its header is intact) and fails only when a block is read, with a
    RasterioIOError that batch loops and the CLI would otherwise report as a bug.
    """
    try:
        yield
    except SkylocError:
        raise
    except RasterioError as exc:
        raise InputError(
            f"{path}: cannot be read, it is truncated or corrupt ({what}: {_gdal_reason(exc)})"
        ) from exc
    except OSError as exc:
        name = short_path(Path(path))
        raise from_os_error(exc, f"{what} {name}") or InputError(f"{name}: {what} failed: {exc}") from exc


def _open_dataset(path: str) -> Any:
    p = Path(path)
    with raster_errors(path, "opening"):
        exists = p.exists()
    if not exists:
        raise InputError(f"{path}: no such file")
    try:
        return rasterio.open(path)
    except RasterioError as exc:
        raise InputError(f"{path}: not a raster GDAL can read ({_gdal_reason(exc)})") from exc


def _check_georeferenced(ds: Any, path: str) -> None:
    if ds.crs is None:
        hint = (
            "it has ground control points but no geotransform: warp it first (gdalwarp)" if ds.gcps[0] else ""
        )
        raise NoCRSError(
            f"{path} has no coordinate reference system, so its tiles cannot be placed on the ground. "
            f"Assign one, e.g. `gdal_edit.py -a_srs EPSG:<code> {Path(path).name}`"
            + (f"; {hint}" if hint else ", or georeference it in QGIS")
        )
    if ds.transform.is_identity:
        raise InputError(
            f"{path} has a CRS but no geotransform (pixel -> map coordinates); georeference it first"
        )


class GeoTiffSource:
    """Square windows of a georeferenced raster at several sizes (in source pixels), with overlap.

    Not thread-safe (one GDAL handle); pickling drops the handle and the copy reopens the file on demand,
    so a source can be shipped to worker processes.
    """

    kind = "geotiff"

    def __init__(
        self,
        path: str | Path,
        tile_sizes: Sequence[int] = (256, 512),
        overlap: float = 0.5,
        bands: Sequence[int] | None = None,
        max_nodata_fraction: float = 0.5,
    ) -> None:
        self.path = str(path)
        _check_params(self.path, tile_sizes, overlap, max_nodata_fraction)
        self.overlap = float(overlap)
        self.max_nodata_fraction = float(max_nodata_fraction)
        self._ds: Any = _open_dataset(self.path)
        try:
            _check_georeferenced(self._ds, self.path)
            self.crs = crs_label(self._ds.crs)
            self.rgb_bands = choose_rgb_bands(self._ds, bands)
            self.width, self.height = self._ds.width, self._ds.height
            self.transform = self._ds.transform
            self.tile_sizes = self._usable_sizes(tile_sizes)
        except Exception:
            self.close()
            raise
        self._stats: tuple[np.ndarray, Stretch] | None = None
        self._specs: list[TileSpec] | None = None

    # -- handle ---------------------------------------------------------------------------------------
    @property
    def dataset(self) -> Any:
        """The open rasterio dataset (reopened if closed or unpickled)."""
        if self._ds is None or self._ds.closed:
            self._ds = _open_dataset(self.path)
        return self._ds

    def close(self) -> None:
        if self._ds is not None:
            self._ds.close()
            self._ds = None

    def __enter__(self) -> GeoTiffSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_ds"] = None
        return state

    # -- tiling ---------------------------------------------------------------------------------------
    def _usable_sizes(self, tile_sizes: Sequence[int]) -> tuple[int, ...]:
        short = min(self.width, self.height)
        sizes = tuple(sorted({int(s) for s in tile_sizes if int(s) <= short}))
        if sizes:
            return sizes
        if short >= MIN_TILE_SIDE:
            return (short,)
        raise InputError(
            f"{self.path} is {self.width}x{self.height} pixels: too small for a tile "
            f"(needs at least {MIN_TILE_SIDE} pixels on its short side)"
        )

    def _overview(self) -> tuple[np.ndarray, Stretch]:
        """Validity mask and stretch from ONE decimated read (longest side <= OVERVIEW_MAX_SIDE)."""
        if self._stats is None:
            scale = min(1.0, OVERVIEW_MAX_SIDE / max(self.width, self.height))
            shape = (max(1, round(self.height * scale)), max(1, round(self.width * scale)))
            data = None
            if any(self.dataset.dtypes[b - 1] != "uint8" for b in self.rgb_bands):
                with raster_errors(self.path, "reading an overview"):
                    data = self.dataset.read(
                        list(self.rgb_bands), out_shape=(3, *shape), resampling=Resampling.nearest
                    )
            valid = self._valid(data, window=None, shape=shape)
            self._stats = (valid, None if data is None else compute_stretch(data, valid))
        return self._stats

    def _valid(self, data: np.ndarray | None, window: Window | None, shape: tuple[int, int]) -> np.ndarray:
        """Pixels valid in at least one RGB band (nodata value, alpha or internal mask), and finite."""
        ds = self.dataset
        flags = [ds.mask_flag_enums[b - 1] for b in self.rgb_bands]
        if all(f == [MaskFlags.all_valid] for f in flags):
            valid = np.ones(shape, dtype=bool)
        else:
            with raster_errors(self.path, "reading the nodata mask"):
                masks = ds.read_masks(
                    list(self.rgb_bands), window=window, out_shape=(3, *shape), resampling=Resampling.nearest
                )
            valid = np.any(masks > 0, axis=0)
        if data is not None and np.issubdtype(data.dtype, np.floating):
            valid &= np.all(np.isfinite(data), axis=0)
        return valid

    def _nodata_fraction(self, col: int, row: int, size: int) -> float:
        valid, _ = self._overview()
        sy, sx = valid.shape[0] / self.height, valid.shape[1] / self.width
        r0, r1 = int(row * sy), max(int(row * sy) + 1, math.ceil((row + size) * sy))
        c0, c1 = int(col * sx), max(int(col * sx) + 1, math.ceil((col + size) * sx))
        return 1.0 - float(valid[r0:r1, c0:c1].mean())

    def _spec(self, col: int, row: int, size: int) -> TileSpec:
        window = Window(col, row, size, size)
        t = self.transform
        native = [t @ (col, row), t @ (col + size, row), t @ (col + size, row + size), t @ (col, row + size)]
        ring = densified_ring_lonlat(
            self.crs, native, POINTS_PER_EDGE, what=f"{self.path} window col={col} row={row} size={size}"
        )
        return TileSpec(
            source=self.path,
            kind=self.kind,
            scale=size,
            zoom=None,
            window=(col, row, size, size),
            crs=self.crs,
            bounds=tuple(float(v) for v in windows.bounds(window, t)),  # type: ignore[arg-type]
            corners_lonlat=tuple(ring[i * POINTS_PER_EDGE] for i in range(4)),
            footprint_lonlat=ring,
        )

    def specs(self) -> list[TileSpec]:
        """Windows of every usable size, row by row; those mostly nodata are left out."""
        if self._specs is None:
            out = []
            for size in self.tile_sizes:
                stride = max(1, round(size * (1.0 - self.overlap)))
                for row in window_offsets(self.height, size, stride):
                    for col in window_offsets(self.width, size, stride):
                        if self._nodata_fraction(col, row, size) <= self.max_nodata_fraction:
                            out.append(self._spec(col, row, size))
            self._specs = out
        return list(self._specs)

    # -- pixels ---------------------------------------------------------------------------------------
    def read(self, spec: TileSpec, size: int) -> np.ndarray:
        """The window resampled to (size, size, 3) uint8: area average when shrinking, bilinear when growing."""
        if spec.window is None:
            raise ValueError(f"{spec.source}: not a GeoTIFF tile (no window)")
        col, row, width, height = spec.window
        rgb, _ = self.read_window(Window(col, row, width, height), (size, size))
        return rgb

    def read_window(self, window: Window, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Any window resampled to ``shape`` (rows, cols): (H, W, 3) uint8 RGB (0 where invalid), (H, W) valid.

        Area average when shrinking, bilinear when growing; the raster-wide stretch, so that colours agree
        between reads (the footprint estimator reads many windows of one raster).
        """
        _, stretch = self._overview()
        shrinking = window.width >= shape[1] and window.height >= shape[0]
        with raster_errors(self.path, "reading pixels"):
            data = self.dataset.read(
                list(self.rgb_bands),
                window=window,
                out_shape=(3, *shape),
                resampling=Resampling.average if shrinking else Resampling.bilinear,
            )
        valid = self._valid(data, window=window, shape=shape)
        rgb = apply_band_stretch(data, stretch)
        rgb[:, ~valid] = 0
        return np.ascontiguousarray(rgb.transpose(1, 2, 0)), valid


def _check_params(path: str, tile_sizes: Sequence[int], overlap: float, max_nodata: float) -> None:
    if not tile_sizes or any(int(s) < 1 for s in tile_sizes):
        raise InputError(f"{path}: tile_sizes must be positive pixel counts, got {tuple(tile_sizes)!r}")
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"{path}: overlap must be in [0, 1), got {overlap!r}")
    if not 0.0 <= max_nodata <= 1.0:
        raise InputError(f"{path}: max_nodata_fraction must be in [0, 1], got {max_nodata!r}")
