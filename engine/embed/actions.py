"""The two embedding actions behind ``engine.api.embed_at`` and ``engine.api.heatmap``.

Both go through one :class:`FeatureGrid` (the raster's feature map, windowed with context) and NILI, so the
embedding ``embed`` returns at a point is exactly the one the heatmap compares against there.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from pyproj import CRS, Transformer

from .. import __version__
from ..errors import InputError, OutsideAreaError
from ..imageio import DEFAULT_MAX_PIXELS, read_image
from ..progress import CancelToken, ProgressFn, no_progress
from .cache import grid_for
from .grid import FeatureGrid
from .heatmap_io import NODATA, OutputGrid, output_grid, write_heatmap
from .models import EmbeddingModel, bands_key, load_embedding_model
from .nili import NiliDecoder, NiliField
from .raster import EmbedRaster

#: Points sampled inside a polygon/line of a --vector query, at most.
MAX_VECTOR_POINTS = 1024
#: Location heatmaps of the default model: location embeddings on at most this many points per side,
#: interpolated bilinearly (GeoCLIP's finest capsule varies over ~100 km; a raster rarely needs more).
LOCATION_GRID = 64


@dataclass
class PointEmbedding:
    x: float
    y: float
    col: float  # raster pixel position (0 = left edge)
    row: float
    vector: list[float]


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
        return np.asarray([p.vector for p in self.points], np.float32).reshape(len(self.points), self.dim)

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


def embed_cells(grid: FeatureGrid, decoder: NiliDecoder, points_xy: np.ndarray) -> np.ndarray:
    """NILI embeddings (N, D) at points in cell units of a grid whose windows around them are computed."""
    if decoder.is_identity:  # A = feat: the whole grid costs nothing to 'decode'
        return NiliField(grid.feat, decoder).embed(points_xy)
    out = np.empty((len(points_xy), decoder.dim), np.float32)
    for n, p in enumerate(points_xy):  # a trained decoder: decode only the cells around each point
        r0, r1, c0, c1 = grid.box_around(p, 3)
        sub = NiliField(np.asarray(grid.feat[:, r0:r1, c0:c1]), decoder)
        out[n] = sub.embed(np.asarray([[p[0] - c0, p[1] - r0]]))[0]
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
    """L2-normalised embeddings at points (x, y in ``crs``, default the raster's CRS) of a raster."""
    t0 = time.monotonic()
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2) if len(points) else np.empty((0, 2))
    if len(pts) == 0:
        raise InputError("no point given")
    m = _model(model, weights, sha256, bands)
    with grid_for(raster, m, bands) as (r, grid):
        pp = r.to_pixels(pts, crs)
        cells = grid.cell_coords(pp.cols, pp.rows)
        grid.ensure_around(cells, progress=progress, cancel=cancel)
        vectors = _normalize(embed_cells(grid, m.decoder, cells))
    rows = [
        PointEmbedding(float(x), float(y), float(c), float(rw), [float(v) for v in vec])
        for (x, y), c, rw, vec in zip(pp.xy, pp.cols, pp.rows, vectors, strict=True)
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
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> HeatmapResult:
    """Cosine-similarity map over a raster against the embedding of a point, photo, location or vector layer."""
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
    m = _model(model, weights, sha256, bands)
    with grid_for(raster, m, bands) as (r, grid):
        og = output_grid(r, resolution)
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
        cells = grid.cell_coords(pp.cols, pp.rows)
        grid.ensure_around(cells, cancel=cancel)
        v = embed_cells(grid, m.decoder, cells)[0]
        query = f"point {pp.xy[0, 0]:.6f},{pp.xy[0, 1]:.6f} ({pp.crs})"
    elif photo is not None:
        v = m.photo_vector(read_image(photo, max_pixels=max_pixels))
        query = f"photo {Path(photo).name}"
    elif location is not None:
        lat, lon = _check_latlon(location)
        v = m.location_vector(lat, lon)
        query = f"location {lat:.6f},{lon:.6f}"
    else:
        pts = _vector_points(str(vector), r, grid)
        cols, rows = ~r.transform @ (pts[:, 0], pts[:, 1])
        cells = grid.cell_coords(np.asarray(cols), np.asarray(rows))
        grid.ensure_around(cells, cancel=cancel)
        v = _normalize(embed_cells(grid, m.decoder, cells)).mean(axis=0)
        query = f"vector {Path(str(vector)).name} ({len(pts)} points)"
    if not np.all(np.isfinite(v)) or not np.linalg.norm(v) > 0:
        raise InputError(f"the {query} has no usable embedding (all zero): is it blank or nodata?")
    grid.ensure(progress=lambda f, msg: progress(0.05 + 0.8 * f, msg), cancel=cancel)
    cosine = NiliField(grid.feat, m.decoder).cosine(v)

    def values_for_rows(row0: int, rows: int) -> np.ndarray:
        cols_px, rows_px = og.pixel_centres_in_raster(r, row0, rows)
        vals = cosine(grid.cell_coords(cols_px, rows_px))
        vals[~r.valid_at(cols_px, rows_px)] = np.nan
        return vals.reshape(rows, og.width)

    return query, values_for_rows


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
    field_ = NiliField(coarse, NiliDecoder.identity(1))

    def values_for_rows(row0: int, rows: int) -> np.ndarray:
        j, i = np.meshgrid(np.arange(og.width) + 0.5, np.arange(row0, row0 + rows) + 0.5)
        pts = np.column_stack([j.ravel() * gw / og.width - 0.5, i.ravel() * gh / og.height - 0.5])
        vals = field_.embed(pts)[:, 0]
        cols_px, rows_px = og.pixel_centres_in_raster(r, row0, rows)
        vals[~r.valid_at(cols_px, rows_px)] = np.nan
        return vals.reshape(rows, og.width)

    return values_for_rows


__all__ = ["EmbedResult", "HeatmapResult", "PointEmbedding", "embed_at", "heatmap"]
