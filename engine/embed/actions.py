"""The two embedding actions behind ``engine.api.embed_at`` and ``engine.api.heatmap``.

Both go through one :class:`FeatureGrid` (the raster's feature map, windowed with context) and NILI, so the
embedding ``embed`` returns at a point is exactly the one the heatmap compares against there.

Resources: points cost the windows around them whatever the raster's size (a 10^10-pixel raster is fine for
``embed``); a heatmap needs the whole grid, so a raster declaring more than ``max_raster_pixels`` is refused
(ImageTooLargeError: exit 3, HTTP 413) before anything is allocated. A point on nodata has no embedding
(``vector`` None, ``reason`` "nodata"), as the heatmap marks that place nodata.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from pyproj import CRS, Transformer
from rasterio.errors import RasterioError

from .. import __version__
from ..errors import DiskFullError, ImageTooLargeError, InputError, OutsideAreaError, from_os_error
from ..imagery.photos import DEFAULT_MAX_PIXELS, DEFAULT_MAX_RASTER_PIXELS, read_image
from ..output_guard import check_output
from ..progress import CancelToken, ProgressFn, no_progress
from .cache import grid_for
from .grid import FeatureGrid
from .heatmap_io import NODATA, OutputGrid, output_grid, write_heatmap
from .models import EmbeddingModel, bands_key, load_embedding_model
from .nili import CosineField, NiliDecoder, NiliField, scalar_on_grid
from .raster import EmbedRaster

try:  # GDAL errors rasterio raises as they are (not wrapped in RasterioError)
    from rasterio._err import CPLE_BaseError
except ImportError:  # pragma: no cover - a rasterio without the private module
    CPLE_BaseError = RasterioError  # type: ignore[misc,assignment]

#: Points sampled inside a polygon/line of a --vector query, at most.
MAX_VECTOR_POINTS = 1024
#: Heatmaps: rasters declaring more pixels are refused (the whole feature grid is computed: with the
#: default model ~1.75 bytes per raster pixel, memory-mapped beyond 2 GiB, and ~20 min per gigapixel on
#: 2 cores). 2 GP is a 44,700-pixel square: real orthomosaics pass, a sparse 100000x100000 bomb does not.
#: Heatmaps: widest output (pixels) written; strips of 256 rows of this width are held in memory.
MAX_HEATMAP_WIDTH = 100_000
#: Cells of context around a point's cell fetched for NILI (it reads +-1 cell, a trained decoder +-2).
HALO = 3
#: Output pixels evaluated at once in a heatmap strip (bounds the temporaries of the cosine map).
POINTS_PER_CHUNK = 1 << 18
#: Location heatmaps of the default model: location embeddings on at most this many points per side,
#: interpolated bilinearly (GeoCLIP's finest capsule varies over ~100 km; a raster rarely needs more).
LOCATION_GRID = 64


@dataclass
class PointEmbedding:
    x: float
    y: float
    col: float  # raster pixel position (0 = left edge)
    row: float
    vector: list[float] | None  # None: no embedding here (see reason)
    reason: str | None = None  # why vector is None: "nodata" (the raster has no data under the point)


@dataclass
class EmbedResult:
    raster: str
    model_id: str
    dim: int
    crs: str  # CRS of x, y
    normalized: bool
    points: list[PointEmbedding] = field(default_factory=list)
    seconds: float = 0.0

    def matrix(self) -> np.ndarray:
        """(N, D) float32, one row per point; a point without embedding (nodata) is a row of NaN."""
        out = np.full((len(self.points), self.dim), np.nan, np.float32)
        for n, p in enumerate(self.points):
            if p.vector is not None:
                out[n] = p.vector
        return out

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class HeatmapResult:
    out: str
    style: str  # the .qml sidecar
    model_id: str
    query: str
    crs: str
    width: int
    height: int
    min: float
    max: float
    nodata: float
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _model(
    model: str, weights: str | None, sha256: str | None, bands: Sequence[int] | None
) -> EmbeddingModel:
    gair_bands = bands_key(bands) if (model or "").lower() == "gair" else None
    return load_embedding_model(model or "default", weights, sha256, gair_bands)


def _normalize(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.where(n > 0, v / np.where(n > 0, n, 1), v)


def embed_cells(
    grid: FeatureGrid,
    decoder: NiliDecoder,
    points_xy: np.ndarray,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> np.ndarray:
    """NILI embeddings (N, D) at points in cell units, computing only the windows around them.

    Points are grouped by the window owning their cell; each group gets the cells within ``HALO`` of its
    points (a few windows at most) and NILI looks them up in whole-grid coordinates, so the result is the
    one the whole grid would give, at a cost that does not depend on the raster's size.
    """
    pts = np.asarray(points_xy, np.float64).reshape(-1, 2)
    out = np.empty((len(pts), decoder.dim), np.float32)
    if len(pts) == 0:
        return out
    owners = np.asarray([grid.owner(p) for p in pts])
    order = np.lexsort((owners[:, 1], owners[:, 0]))
    groups = np.split(order, np.flatnonzero(np.any(np.diff(owners[order], axis=0), axis=1)) + 1)
    for g, idx in enumerate(groups):
        if cancel is not None:
            cancel.check()
        boxes = np.asarray([grid.box_around(p, HALO) for p in pts[idx]])
        r0, r1 = int(boxes[:, 0].min()), int(boxes[:, 1].max())
        c0, c1 = int(boxes[:, 2].min()), int(boxes[:, 3].max())
        part = grid.region(
            r0,
            r1,
            c0,
            c1,
            progress=lambda f, msg, g=g: progress((g + f) / len(groups), msg),
            cancel=cancel,
        )
        nili = NiliField(part, decoder, origin=(r0, c0), full_shape=(grid.rows, grid.cols))
        out[idx] = nili.embed(pts[idx])
    return out


def embed_at(
    raster: str,
    points: Sequence[tuple[float, float]] | np.ndarray,
    *,
    crs: str | None = None,
    model: str = "default",
    weights: str | None = None,
    sha256: str | None = None,
    bands: Sequence[int] | None = None,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> EmbedResult:
    """L2-normalised embeddings at points (x, y in ``crs``, default the raster's CRS) of a raster.

    A point on the raster's nodata (nodata value, mask, NaN) gets ``vector`` None and ``reason`` "nodata".
    """
    t0 = time.monotonic()
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2) if len(points) else np.empty((0, 2))
    if len(pts) == 0:
        raise InputError("no point given")
    m = _model(model, weights, sha256, bands)
    with grid_for(raster, m, bands) as (r, grid):
        pp = r.to_pixels(pts, crs)
        valid = r.valid_at(pp.cols, pp.rows)
        cells = grid.cell_coords(pp.cols, pp.rows)
        vectors = np.zeros((len(pts), m.dim), np.float32)
        if valid.any():
            vectors[valid] = _normalize(embed_cells(grid, m.decoder, cells[valid], progress, cancel))
    rows = [
        PointEmbedding(
            float(x),
            float(y),
            float(c),
            float(rw),
            [float(v) for v in vec] if ok else None,
            None if ok else "nodata",
        )
        for (x, y), c, rw, vec, ok in zip(pp.xy, pp.cols, pp.rows, vectors, valid, strict=True)
    ]
    return EmbedResult(raster, m.model_id, m.dim, pp.crs, True, rows, time.monotonic() - t0)


# ------------------------------------------------------------------------------------------ heatmap


def _vector_points(path: str, r: EmbedRaster, grid: FeatureGrid) -> np.ndarray:
    """Points (x, y in the raster's CRS) sampling a vector file's features inside the raster, cell spacing."""
    from ..vector_io import read_layer

    try:
        geoms, meta = read_layer(path)
    except Exception as exc:  # pyogrio raises its own DataSourceError/DataLayerError
        raise InputError(f"{path}: not a vector file OGR can read ({exc})") from exc
    geoms = [g for g in geoms if g is not None and not g.is_empty]
    if not geoms:
        raise InputError(f"{path}: the layer has no geometry")
    src_crs = meta.get("__crs__")
    if src_crs:
        tr = Transformer.from_crs(CRS.from_user_input(src_crs), r.crs, always_xy=True)
        geoms = [
            shapely.transform(g, lambda xy, tr=tr: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))
            for g in geoms
        ]
    step = abs(r.transform.a) * grid.backbone.stride  # one cell
    extent = shapely.box(*r.bounds())
    pts: list[np.ndarray] = [np.empty((0, 2))]
    for g in geoms:
        g = shapely.intersection(g, extent)  # only the part over the raster (also bounds the sampling)
        if g.is_empty:
            continue
        if g.geom_type in ("Point", "MultiPoint"):
            pts.append(shapely.get_coordinates(g))
        elif g.geom_type in ("LineString", "MultiLineString"):
            n = max(2, int(g.length / step) + 1)
            along = shapely.line_interpolate_point(g, np.linspace(0, 1, n), normalized=True)
            pts.append(shapely.get_coordinates(along))
        else:
            x0, y0, x1, y1 = g.bounds
            xs, ys = np.meshgrid(np.arange(x0 + step / 2, x1, step), np.arange(y0 + step / 2, y1, step))
            cand = np.column_stack([xs.ravel(), ys.ravel()])
            cand = cand[shapely.contains_xy(g, cand[:, 0], cand[:, 1])] if len(cand) else cand
            pts.append(cand if len(cand) else shapely.get_coordinates(g.representative_point()))
    allpts = np.concatenate(pts)[:, :2]
    cols, rows = ~r.transform @ (allpts[:, 0], allpts[:, 1])
    keep = (
        (np.asarray(cols) >= 0)
        & (np.asarray(rows) >= 0)
        & (np.asarray(cols) <= r.width)
        & (np.asarray(rows) <= r.height)
    )
    allpts = allpts[keep]
    if len(allpts) == 0:
        raise OutsideAreaError(f"{path}: no feature lies inside {r.path}")
    if len(allpts) > MAX_VECTOR_POINTS:
        allpts = allpts[np.random.default_rng(0).choice(len(allpts), MAX_VECTOR_POINTS, replace=False)]
    return allpts


def _check_latlon(location: tuple[float, float]) -> tuple[float, float]:
    lat, lon = (float(v) for v in location)
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise InputError(f"--location is LAT,LON in degrees (lat -90..90, lon -180..180), got {lat}, {lon}")
    return lat, lon


def heatmap(
    raster: str,
    out: str,
    *,
    at: tuple[float, float] | None = None,
    crs: str | None = None,
    photo: str | None = None,
    location: tuple[float, float] | None = None,
    vector: str | None = None,
    resolution: float | None = None,
    model: str = "default",
    weights: str | None = None,
    sha256: str | None = None,
    bands: Sequence[int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_raster_pixels: int = DEFAULT_MAX_RASTER_PIXELS,
    overwrite: bool = False,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> HeatmapResult:
    """Cosine-similarity map over a raster against the embedding of a point, photo, location or vector layer.

    ``max_pixels`` bounds the query photo; ``max_raster_pixels`` the raster (its declared size, checked
    before anything is allocated). A disk that fills while the map is written is a DiskFullError and leaves
    no new file at ``out``.
    """
    t0 = time.monotonic()
    given = [
        name
        for name, v in (("at", at), ("photo", photo), ("location", location), ("vector", vector))
        if v is not None
    ]
    if len(given) != 1:
        raise InputError(
            "give exactly one query: --at X,Y, --photo PHOTO, --location LAT,LON or --vector FILE"
        )
    if Path(out).suffix.lower() not in (".tif", ".tiff"):
        raise InputError(f"--out must be a .tif file (Cloud-Optimized GeoTIFF), got {out}")
    inputs = [raster, photo, vector, weights]
    check_output(out, inputs=inputs, overwrite=overwrite, what="heatmap")
    check_output(Path(out).with_suffix(".qml"), inputs=inputs, overwrite=overwrite, what="heatmap style")
    m = _model(model, weights, sha256, bands)
    with grid_for(raster, m, bands) as (r, grid), _disk_full_as_error(out) as room:
        _check_raster_size(r, max_raster_pixels)
        og = output_grid(r, resolution)
        _check_output_size(og, r)
        room.need = int(og.width * og.height * 4 * 2.5) + (1 << 20)  # strips + COG + overviews, raw
        query, values_for_rows = _query(
            m, r, grid, og, at, crs, photo, location, vector, max_pixels, progress, cancel
        )
        lo, hi = write_heatmap(
            out,
            og,
            r.crs.to_wkt(),
            values_for_rows,
            tags={
                "SKYLOC_MODEL": m.model_id,
                "SKYLOC_QUERY": query,
                "SKYLOC_VERSION": __version__,
                "SKYLOC_VALUE": "cosine similarity",
            },
            progress=lambda f, msg: progress(0.85 + 0.15 * f, msg),
            cancel=cancel,
        )
        crs_label = r.crs_label
    progress(1.0, f"heatmap written: {out}")
    return HeatmapResult(
        str(out),
        str(Path(out).with_suffix(".qml")),
        m.model_id,
        query,
        crs_label,
        og.width,
        og.height,
        lo,
        hi,
        NODATA,
        time.monotonic() - t0,
    )


def _query(
    m: EmbeddingModel,
    r: EmbedRaster,
    grid: FeatureGrid,
    og: OutputGrid,
    at: Any,
    crs: str | None,
    photo: str | None,
    location: Any,
    vector: str | None,
    max_pixels: int,
    progress: ProgressFn,
    cancel: CancelToken | None,
) -> tuple[str, Any]:
    """(query description, values_for_rows) for the one query given; computes the feature grid when needed."""
    if location is not None and not m.location_in_feature_space:
        lat, lon = _check_latlon(location)
        return f"location {lat:.6f},{lon:.6f} (location-encoder similarity)", _location_field(
            m, r, og, lat, lon
        )
    if at is not None:
        pp = r.to_pixels(np.asarray([at], float), crs)
        query = f"point {pp.xy[0, 0]:.6f},{pp.xy[0, 1]:.6f} ({pp.crs})"
        if not r.valid_at(pp.cols, pp.rows)[0]:
            raise InputError(f"the {query} lies on nodata of {r.path}: there is no embedding to compare with")
        v = embed_cells(grid, m.decoder, grid.cell_coords(pp.cols, pp.rows), cancel=cancel)[0]
    elif photo is not None:
        v = m.photo_vector(read_image(photo, max_pixels=max_pixels))
        query = f"photo {Path(photo).name}"
    elif location is not None:
        lat, lon = _check_latlon(location)
        v = m.location_vector(lat, lon)
        query = f"location {lat:.6f},{lon:.6f}"
    else:
        pts = _vector_points(str(vector), r, grid)
        cols, rows = (np.asarray(a) for a in ~r.transform @ (pts[:, 0], pts[:, 1]))
        valid = r.valid_at(cols, rows)
        if not valid.any():
            raise InputError(f"every point of {Path(str(vector)).name} over {r.path} lies on nodata")
        cells = grid.cell_coords(cols[valid], rows[valid])
        v = _normalize(embed_cells(grid, m.decoder, cells, cancel=cancel)).mean(axis=0)
        query = f"vector {Path(str(vector)).name} ({int(valid.sum())} points)"
    if not np.all(np.isfinite(v)) or not np.linalg.norm(v) > 0:
        raise InputError(f"the {query} has no usable embedding (all zero): is it blank or nodata?")
    grid.ensure(progress=lambda f, msg: progress(0.05 + 0.8 * f, msg), cancel=cancel)
    cosine = NiliField(grid.feat, m.decoder).cosine(v)
    return query, cosine_rows(cosine, r, grid.backbone.stride, og)


def cosine_rows(
    cosine: CosineField, r: EmbedRaster, stride: int, og: OutputGrid, *, pointwise: bool = False
) -> Callable[[int, int], np.ndarray]:
    """``values_for_rows(row0, rows)`` of a cosine heatmap on ``og``: NaN where the raster has no data.

    The fast path samples the cosine on the separable grid of the strip's pixel centres
    (:meth:`CosineField.on_grid`, :meth:`EmbedRaster.valid_grid`); ``pointwise`` (or an output grid
    that does not factor per axis) takes the reference path, one point at a time, kept to test and
    benchmark the fast one against.
    """
    axes = None if pointwise else og.axes_in_raster(r)
    step_rows = max(1, POINTS_PER_CHUNK // max(1, og.width))  # rows at once: bounded temporaries
    if axes is None:

        def pointwise_rows(row0: int, rows: int) -> np.ndarray:
            out = np.empty((rows, og.width), np.float32)
            for a in range(0, rows, step_rows):
                n = min(step_rows, rows - a)
                cols_px, rows_px = og.pixel_centres_in_raster(r, row0 + a, n)
                pts = np.stack([cols_px / stride - 0.5, rows_px / stride - 0.5], axis=1)
                vals = cosine(pts)
                vals[~r.valid_at(cols_px, rows_px)] = np.nan
                out[a : a + n] = vals.reshape(n, og.width)
            return out

        return pointwise_rows

    cols_px, rows_px = axes
    xs = cosine.blend_x(cols_px / stride - 0.5)  # the same for every strip

    def grid_rows(row0: int, rows: int) -> np.ndarray:
        out = np.empty((rows, og.width), np.float32)
        for a in range(0, rows, step_rows):
            n = min(step_rows, rows - a)
            ys = rows_px[row0 + a : row0 + a + n]
            out[a : a + n] = cosine.on_grid(xs, cosine.blend_y(ys / stride - 0.5))
        out[~r.valid_grid(cols_px, rows_px[row0 : row0 + rows])] = np.nan
        return out

    return grid_rows


def _check_raster_size(r: EmbedRaster, max_raster_pixels: int) -> None:
    """ImageTooLargeError for a raster declaring more pixels than a heatmap may cover (nothing allocated yet)."""
    pixels = r.width * r.height
    if pixels > max_raster_pixels:
        raise ImageTooLargeError(
            f"{r.path} is {r.width}x{r.height} = {pixels:,} pixels: over the heatmap limit of "
            f"{max_raster_pixels:,} raster pixels (--max-raster-pixels). A heatmap computes features over "
            "the whole raster; clip it to the area of interest, or embed points, which works at any size"
        )


def _check_output_size(og: OutputGrid, r: EmbedRaster) -> None:
    if og.width > MAX_HEATMAP_WIDTH:
        raise ImageTooLargeError(
            f"a heatmap of {r.path} on this grid is {og.width:,} pixels wide (at most {MAX_HEATMAP_WIDTH:,}): "
            "give a coarser --resolution"
        )


@dataclass
class _Room:
    need: int = 0  # bytes the heatmap's files may take at most (uncompressed)


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns)


@contextlib.contextmanager
def _disk_full_as_error(out: str) -> Iterator[_Room]:
    """A heatmap write that fails for lack of room -> DiskFullError (exit 3, HTTP 507), no new file at ``out``.

    Why a check of the free space: GDAL reports a full disk as a bare write error ("TIFFAppendToStrip:
    Write error at scanline 256"; the ENOSPC only goes to stderr), so a failed write is taken for a full
    disk when the file system lacks the room the heatmap's files may need (``room.need``, set once the
    output grid is known). A COG already moved into place whose style sidecar could not follow is removed.
    """
    room = _Room()
    target = Path(out)
    before = _identity(target)

    def remove_new_output() -> None:
        now = _identity(target)
        if now is not None and now != before:
            target.unlink(missing_ok=True)

    try:
        yield room
    except DiskFullError:
        remove_new_output()
        raise
    except (OSError, RasterioError, CPLE_BaseError) as exc:
        mapped = from_os_error(exc, f"writing {target.name}") if isinstance(exc, OSError) else None
        if not isinstance(mapped, DiskFullError):
            mapped = None
            with contextlib.suppress(OSError):
                free = shutil.disk_usage(target.parent).free
                if room.need and free < room.need:
                    mapped = DiskFullError(
                        f"no space left on device while writing {target.name} ({free / 2**20:.1f} MiB free "
                        f"in {target.parent}, the heatmap needs up to {room.need / 2**20:.1f} MiB); nothing "
                        "was left half-written"
                    )
        if mapped is None:
            raise
        remove_new_output()
        raise mapped from exc


def _location_field(m: EmbeddingModel, r: EmbedRaster, og: OutputGrid, lat: float, lon: float) -> Any:
    """Similarity of each place's location embedding with the query's (location encoder only, coarse grid)."""
    gh, gw = min(og.height, LOCATION_GRID), min(og.width, LOCATION_GRID)
    jj, ii = np.meshgrid((np.arange(gw) + 0.5) * og.width / gw, (np.arange(gh) + 0.5) * og.height / gh)
    xs, ys = og.transform @ (jj.ravel(), ii.ravel())
    cols, rows = ~r.transform @ (np.asarray(xs), np.asarray(ys))
    lons, lats = r.pixels_to_lonlat(cols, rows)
    emb = _normalize(m.location_encoder.embed(lats, lons))
    q = _normalize(m.location_vector(lat, lon)[None])[0]
    coarse = (emb @ q).reshape(1, gh, gw).astype(np.float32)
    xs_cells = (np.arange(og.width) + 0.5) * gw / og.width - 0.5  # the coarse grid's cells, per axis
    axes = og.axes_in_raster(r)

    def values_for_rows(row0: int, rows: int) -> np.ndarray:
        ys_cells = (np.arange(row0, row0 + rows) + 0.5) * gh / og.height - 0.5
        vals = scalar_on_grid(coarse[0], xs_cells, ys_cells)
        if axes is not None:
            vals[~r.valid_grid(axes[0], axes[1][row0 : row0 + rows])] = np.nan
        else:
            cols_px, rows_px = og.pixel_centres_in_raster(r, row0, rows)
            vals[~r.valid_at(cols_px, rows_px).reshape(rows, og.width)] = np.nan
        return vals

    return values_for_rows


__all__ = ["EmbedResult", "HeatmapResult", "PointEmbedding", "embed_at", "heatmap"]
