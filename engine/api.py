"""One function per user action. The CLI, the HTTP service and the tests all call these.

Long actions take ``progress(fraction, message)`` and a ``CancelToken``; they return typed results with a
``to_json()`` for the CLI's ``--json`` and the service.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .embed.actions import EmbedResult as EmbedResult
from .embed.actions import HeatmapResult as HeatmapResult
from .embed.actions import embed_at as embed_at
from .embed.actions import heatmap as heatmap
from .embed.models import embedding_models
from .errors import EmptyInputError, InputError, SkylocError
from .footprint.batch import FOOTPRINT_LAYER, run_batch
from .footprint.coregister import CoregParams
from .footprint.estimate import Footprint, check_matcher, estimate
from .footprint.places import IndexPlaces, RasterPlaces
from .geo.search_area import SearchArea
from .imagery import open_source
from .imagery.photos import DEFAULT_MAX_PIXELS, read_image
from .imagery.tile_service import is_url, redact
from .imagery.tile_source import (
    DEFAULT_MAX_TILES,
    TileMosaicSource,
    is_tile_source,
    prepare_tile_sources,
    tile_build_params,
    tile_source_options,
)
from .imagery.tile_source import render_tiles as render_tiles  # an extent of tiles as one GeoTIFF
from .imagery.tile_views import DEFAULT_FETCH_BUDGET
from .nets.base import ImageEncoder
from .nets.registry import available_models, load_encoder, resolve_name
from .output_guard import check_output
from .progress import CancelToken, ProgressFn, no_progress, within
from .retrieval import search as tile_search
from .retrieval.index_store import (
    FAISS_FILE,
    MANIFEST,
    TILES_FILE,
    VECTORS_FILE,
    TileIndex,
    build_index,
    check_index_out,
    open_index,
)
from .vector_io import driver_for, write_polygons

#: ONNX Runtime by default: same descriptors as PyTorch (cosine >= 0.9999) and faster on a CPU: per photo
#: 26 ms vs 55 ms on an idle 2-core machine, 61 ms vs 2.1 s when the cores are shared (PyTorch's OpenMP
#: threads stall under load); bench/retrieval_iss.py. The export is cached per model and input size.
DEFAULT_BACKEND = "onnx"
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp"}


@functools.lru_cache(maxsize=4)
def get_encoder(
    model: str = "default",
    weights: str | None = None,
    backend: str = DEFAULT_BACKEND,
    input_size: int | None = None,
    sha256: str | None = None,
) -> ImageEncoder:
    """Encoders are expensive to build: keep the last few (the service reuses them across requests)."""
    return load_encoder(model, weights=weights, backend=backend, input_size=input_size, sha256=sha256)


# ----------------------------------------------------------------------------------------------- index


def index(
    sources: Sequence[str],
    out: str,
    *,
    model: str = "default",
    weights: str | None = None,
    sha256: str | None = None,
    backend: str = DEFAULT_BACKEND,
    input_size: int | None = None,
    factory: str = "Flat",
    tile_sizes: Sequence[int] = (256, 512),
    overlap: float = 0.5,
    bands: Sequence[int] | None = None,
    span: int = 4,
    exclude: Sequence[str] | None = None,
    recursive: bool = False,
    zooms: Sequence[int] | str | None = None,
    area: SearchArea | None = None,
    max_tiles: int = DEFAULT_MAX_TILES,
    tile_cache: str | None = None,
    attribution: str | None = None,
    subdomains: Sequence[str] | None = None,
    retry_missing: bool = False,
    ray: str | bool | None = None,
    ray_workers: int | None = None,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Build a tile database from GeoTIFFs and/or XYZ mosaic folders (``recursive``: and their
    subfolders, ``exclude`` globs of paths relative to the folder). Returns the index manifest.

    Also from XYZ tile services (URL templates, with ``zooms`` and ``area``), MBTiles files and GeoPackage
    tile tables (engine/imagery/tile_source.py). Everything is checked (sources, output folder, tile count
    against ``max_tiles``) before any tile is downloaded; tiles go through an MBTiles cache (``tile_cache``,
    default one file per service under ``~/.cache/skyloc/tiles``) so that a re-run downloads nothing twice.

    ``ray``: encode the tiles on a Ray cluster (True: Ray's default cluster; "local", "auto", "HOST:PORT",
    "ray://HOST:PORT"), ``ray_workers`` workers (default: one per CPU, or per GPU, of the cluster); the
    same index as without it (engine/retrieval/ray_build.py). None: no Ray (it is not imported).
    """
    if not sources:
        raise EmptyInputError("no source given: name GeoTIFF files and/or folders of XYZ mosaics")
    if not 0 <= overlap < 1:
        raise InputError(f"overlap must be in [0, 1), got {overlap}")
    if ray_workers is not None and (ray is None or ray is False or ray_workers < 1):
        raise InputError(f"ray_workers (--ray-workers) must be >= 1 and needs ray (--ray), got {ray_workers}")
    # absolute: the index is used from other working folders (the plugin's engine, the service)
    sources = [s if is_url(s) else os.path.abspath(s) for s in sources]
    # InputError for tile options without a tile source, or one cache file for several services
    tile_options = tile_source_options(
        sources, zooms, area, max_tiles, tile_cache, attribution, subdomains, retry_missing
    )
    check_index_out(out)  # before any download
    opened: list[Any] = []
    try:
        for s in sources:
            opened.append(
                open_source(
                    s,
                    tile_sizes=tuple(tile_sizes),
                    overlap=overlap,
                    bands=bands,
                    span=span,
                    exclude=exclude,
                    recursive=recursive,
                    tile_options=tile_options,
                )
            )
        encoder = get_encoder(model, weights, backend, input_size, sha256)
        progress = prepare_tile_sources(opened, progress, cancel)  # downloads; progress then continues
        params = {
            "tile_sizes": list(tile_sizes),
            "overlap": overlap,
            "bands": list(bands) if bands else None,
            "span": span,
            "exclude": list(exclude) if exclude else None,
            "recursive": bool(recursive),
            "weights": str(weights) if weights else None,
            **tile_build_params(opened),
        }
        if ray is None or ray is False:
            return build_index(
                opened, encoder, out, factory=factory, build_params=params, progress=progress, cancel=cancel
            )
        # tiles encoded by Ray workers (engine/retrieval/ray_build.py); the same index, manifest and resume
        from .retrieval.ray_build import EncoderRecipe, RayCluster

        recipe = EncoderRecipe.for_workers(model, weights, backend, input_size, sha256)
        with RayCluster(ray, workers=ray_workers, progress=progress, cancel=cancel) as cluster:
            cluster.start(recipe, opened, encoder)
            return build_index(
                opened,
                encoder,
                out,
                factory=factory,
                build_params=params,
                progress=progress,
                cancel=cancel,
                encode_with=cluster.encode_all,
            )
    finally:
        for src in opened:
            src.close()


def plan_index(
    sources: Sequence[str],
    *,
    zooms: Sequence[int] | str | None = None,
    area: SearchArea | None = None,
    span: int = 4,
    overlap: float = 0.5,
    max_tiles: int = DEFAULT_MAX_TILES,
    tile_cache: str | None = None,
    attribution: str | None = None,
    subdomains: Sequence[str] | None = None,
    retry_missing: bool = False,
) -> list[dict[str, Any]]:
    """What ``index`` would fetch, per tile source, without downloading or encoding anything: mosaics,
    tiles needed / cached / to download, estimated download bytes (the plugin shows it before starting).

    Raises what ``index`` would raise for the same tile options (bad template, over the cap ...)."""
    sources = [s if is_url(s) else os.path.abspath(s) for s in sources]
    options = tile_source_options(
        sources, zooms, area, max_tiles, tile_cache, attribution, subdomains, retry_missing
    )
    plans = []
    for s in sources:
        if not is_tile_source(s):
            continue
        with TileMosaicSource(s, span=span, overlap=overlap, **options) as src:
            plans.append(src.plan())
    return plans


def on_tile_extent(
    source: str,
    run: Callable[[str, ProgressFn], Any],
    *,
    zoom: int | str | Sequence[int] | None = None,
    area: SearchArea | None = None,
    max_tiles: int = DEFAULT_MAX_TILES,
    tile_cache: str | None = None,
    subdomains: Sequence[str] | None = None,
    retry_missing: bool = False,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> Any:
    """``run(raster, progress)`` (``embed_at``, ``heatmap`` ...) on ``source``: a raster as it is; a tile
    source (URL template, MBTiles, GeoPackage) rendered first at one ``zoom`` over ``area`` into a temporary
    GeoTIFF (``render_tiles``: the first 30% of the progress), removed afterwards. A result that names its
    raster (``.raster``) names ``source``, never the temporary file. Tile options with a raster: InputError.
    """
    if not is_tile_source(source):
        if zoom not in (None, "", []) or area is not None or tile_cache or subdomains or retry_missing:
            raise InputError(
                f"{source}: zoom/--zooms, the area (--bbox/--near), --tile-cache, --subdomains and "
                "--retry-missing apply to tile sources (URL, MBTiles, GeoPackage), not to a raster"
            )
        return run(source, progress)
    if zoom in (None, "", []):
        raise InputError(f"{redact(source)}: give the ONE zoom level to read the tiles at (--zooms 15)")
    share = 0.3
    with tempfile.TemporaryDirectory(prefix="skyloc-tiles-") as tmp:
        extent = os.path.join(tmp, "extent.tif")
        render_tiles(
            source,
            extent,
            zoom=zoom,
            area=area,
            max_tiles=max_tiles,
            tile_cache=tile_cache,
            subdomains=subdomains,
            retry_missing=retry_missing,
            progress=lambda f, m: progress(share * f, m),
            cancel=cancel,
        )
        if cancel is not None:
            cancel.check()
        result = run(extent, lambda f, m: progress(share + (1 - share) * f, m))
    if isinstance(getattr(result, "raster", None), str):
        result.raster = source
    return result


# -------------------------------------------------------------------------------------------- localize


@dataclass
class Candidate:
    rank: int
    tile_id: int
    score: float
    rotation_deg: int
    source: str
    kind: str
    scale: int
    zoom: int | None
    bounds_lonlat: tuple[float, float, float, float]  # (lon_min, lat_min, lon_max, lat_max)


@dataclass
class PhotoResult:
    photo: str
    status: str  # "ok" | "error"
    candidates: list[Candidate] = field(default_factory=list)
    error_code: str | None = None
    message: str | None = None
    encode_ms: float | None = None
    search_ms: float | None = None


@dataclass
class LocalizeResult:
    index: str
    model_id: str
    top_k: int
    area: str | None
    photos: list[PhotoResult]
    out: str | None = None

    @property
    def n_failed(self) -> int:
        return sum(p.status != "ok" for p in self.photos)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def expand_photos(paths: Sequence[str]) -> list[Path]:
    """Files as given; folders give their image files (sorted). Nothing at all is an error."""
    photos: list[Path] = []
    for p in map(Path, paths):
        try:
            is_dir = p.is_dir()
        except OSError:  # e.g. a 4,000-character name: that photo fails alone, later, with its reason
            is_dir = False
        if is_dir:
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in PHOTO_SUFFIXES and f.is_file())
            if not found:
                raise EmptyInputError(f"folder {p} holds no photo ({', '.join(sorted(PHOTO_SUFFIXES))})")
            photos.extend(found)
        else:
            photos.append(p)
    if not photos:
        raise EmptyInputError("no photo given")
    return photos


def localize(
    photos: Sequence[str],
    index: str | TileIndex,
    *,
    out: str | None = None,
    top_k: int = 10,
    area: SearchArea | None = None,
    model: str | None = None,
    weights: str | None = None,
    sha256: str | None = None,
    backend: str = DEFAULT_BACKEND,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    overwrite: bool = False,
    nprobe: int | None = None,
    rerank: int | None = None,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
    keep_decoded: dict[str, np.ndarray] | None = None,
) -> LocalizeResult:
    """Retrieve the ``top_k`` most similar tiles for each photo; optionally write their footprints.

    ``nprobe`` / ``rerank``: per-run search settings of an IVF / compressed index (more = slower, closer to
    exact; None: the index's own).

    A photo that cannot be read is reported with ``status="error"`` and the others go on; if none succeeds
    nothing is written and the first error is raised. ``keep_decoded`` receives the decoded photos (by
    path, up to ``KEEP_DECODED_BYTES`` in all) so that ``localize --footprint`` does not decode them again.
    """
    if top_k < 1:
        raise InputError(f"--top-k must be >= 1, got {top_k}")
    idx = index if isinstance(index, TileIndex) else open_index(index)
    built_with = idx.manifest["model"]
    encoder = get_encoder(
        model or built_with["name"],
        weights or idx.manifest["build"].get("weights"),
        backend,
        built_with["input_size"] if model is None or resolve_name(model) == built_with["name"] else None,
        sha256,
    )
    idx.check_encoder(encoder)
    tiles = tile_search.allowed_tiles(idx, area)
    paths = expand_photos(photos)
    inputs = [*paths, *index_files(idx)]
    if out is not None:
        check_output(out, inputs=inputs, overwrite=overwrite, layer="candidates", what="candidates layer")

    results: list[PhotoResult] = []
    first_error: SkylocError | None = None
    for i, path in enumerate(paths):
        if cancel is not None:
            cancel.check()
        progress(i / len(paths), f"photo {i + 1} of {len(paths)}: {path.name}")
        try:
            results.append(
                _localize_one(path, idx, encoder, top_k, tiles, max_pixels, keep_decoded, (nprobe, rerank))
            )
        except SkylocError as exc:
            first_error = first_error or exc
            results.append(
                PhotoResult(photo=str(path), status="error", error_code=exc.code, message=exc.message)
            )
    if first_error is not None and all(r.status != "ok" for r in results):
        raise first_error
    result = LocalizeResult(
        index=str(idx.path),
        model_id=idx.model_id,
        top_k=top_k,
        area=area.describe() if area else None,
        photos=results,
    )
    if out is not None:
        result.out = str(write_candidates(out, result, idx, inputs=inputs, overwrite=overwrite))
    progress(1.0, "done")
    return result


#: Decoded photos handed from retrieval to footprint matching, at most (bytes); beyond, decoded again.
KEEP_DECODED_BYTES = 1 << 30


def _localize_one(
    path: Path,
    idx: TileIndex,
    encoder: ImageEncoder,
    top_k: int,
    tiles: np.ndarray | None,
    max_pixels: int,
    keep: dict[str, np.ndarray] | None = None,
    search: tuple[int | None, int | None] = (None, None),
) -> PhotoResult:
    image = read_image(path, max_pixels=max_pixels)
    if keep is not None and sum(a.nbytes for a in keep.values()) + image.nbytes <= KEEP_DECODED_BYTES:
        keep[str(path)] = image
    t0 = time.perf_counter()
    desc = encoder.encode(image[None])
    t1 = time.perf_counter()
    hits = tile_search.search(idx, desc, top_k, tiles, nprobe=search[0], rerank=search[1])[0]
    t2 = time.perf_counter()
    table = idx.tiles
    cands = [
        Candidate(
            rank=r + 1,
            tile_id=h.tile_id,
            score=round(h.score, 6),
            rotation_deg=h.rotation_deg,
            source=str(table.source[h.tile_id]),
            kind=str(table.kind[h.tile_id]),
            scale=int(table.scale[h.tile_id]),
            zoom=None if table.zoom[h.tile_id] < 0 else int(table.zoom[h.tile_id]),
            bounds_lonlat=tuple(round(v, 8) for v in table.footprints[h.tile_id].bounds),
        )
        for r, h in enumerate(hits)
    ]
    return PhotoResult(
        photo=str(path),
        status="ok",
        candidates=cands,
        encode_ms=round((t1 - t0) * 1000, 2),
        search_ms=round((t2 - t1) * 1000, 2),
    )


def index_files(idx: TileIndex) -> list[Path]:
    """The files of an index folder: inputs of any action that reads it, so never outputs."""
    return [idx.path / name for name in (MANIFEST, FAISS_FILE, VECTORS_FILE, TILES_FILE)]


def write_candidates(
    out: str,
    result: LocalizeResult,
    idx: TileIndex,
    *,
    inputs: Sequence[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> Path:
    """One polygon per (photo, candidate): the candidate tile's footprint, EPSG:4326."""
    rows = [(p, c) for p in result.photos for c in p.candidates]
    return write_polygons(
        out,
        [idx.tiles.footprints[c.tile_id] for _, c in rows],
        {
            "photo": [p.photo for p, _ in rows],
            "photo_name": [Path(p.photo).name for p, _ in rows],
            "rank": np.array([c.rank for _, c in rows], dtype=np.int32),
            "score": np.array([c.score for _, c in rows], dtype=np.float64),
            "rotation": np.array([c.rotation_deg for _, c in rows], dtype=np.int32),
            "tile_id": np.array([c.tile_id for _, c in rows], dtype=np.int64),
            "source": [c.source for _, c in rows],
            "scale": np.array([c.scale for _, c in rows], dtype=np.int32),
            "zoom": np.array([-1 if c.zoom is None else c.zoom for _, c in rows], dtype=np.int32),
        },
        layer="candidates",
        inputs=inputs,
        overwrite=overwrite,
    )


def models() -> list[dict[str, Any]]:
    """The encoders this engine can run, and what each can do (retrieval encoders, then embedding models)."""
    return [{"kind": "retrieval", **m} for m in available_models()] + embedding_models()


# ------------------------------------------------------------------------------------------ embeddings
# embed_at(raster, points, crs=...) and heatmap(raster, out, at=|photo=|location=|vector=) live in
# engine.embed.actions (re-exported here): one function per user action for the CLI, service and plugin.


# ------------------------------------------------------------------------------------------- footprint


def footprint(
    photos: Sequence[str],
    against: str,
    *,
    out: str,
    top_k: int = 5,
    georef_dir: str | None = None,
    geotiff: str | None = None,
    points: str | None = None,
    model: str = "default",
    backend: str = DEFAULT_BACKEND,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    resume: bool = True,
    overwrite: bool = False,
    params: CoregParams | None = None,
    zooms: Sequence[int] | str | None = None,
    area: SearchArea | None = None,
    max_tiles: int = DEFAULT_MAX_TILES,
    tile_cache: str | None = None,
    subdomains: Sequence[str] | None = None,
    retry_missing: bool = False,
    bands: Sequence[int] | None = None,
    weights: str | None = None,
    sha256: str | None = None,
    fetch_finer: bool = True,
    max_fetch_zoom: int | None = None,
    fetch_budget: int = DEFAULT_FETCH_BUDGET,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> list[Footprint]:
    """Footprints of photos on one raster (GeoTIFF) or XYZ folder named by the user, no index needed.

    ``against`` may also be a tile service URL template (with ``zooms`` and ``area``: its tiles are fetched
    once through the MBTiles cache ``tile_cache``), an MBTiles file or a GeoPackage tile table; the ground
    is then read from the tiles at the zoom each view needs. ``bands``: the raster's 1-based bands read as
    red, green, blue (default: from its band names or colour interpretation, else a warned guess).
    ``fetch_finer``: a view finer than ``zooms`` has the service's finer tiles fetched (through the cache)
    up to ``max_fetch_zoom`` (default: the finest of ``zooms`` + 3, never past the service's finest), at most
    ``fetch_budget`` tiles in all; beyond, the stored zooms are read (said once in the log).

    Candidates: the whole extent, then the ``top_k - 1`` windows most similar to the photo. Writes the
    footprint layer ``out`` (one feature per photo), and for localized photos the georeferenced GeoTIFF and
    the Georeferencer ``.points`` (``geotiff``/``points`` for one photo, ``georef_dir`` for several).
    """
    if top_k < 1:
        raise InputError(f"--top-k must be >= 1, got {top_k}")
    params = params or CoregParams()
    check_matcher(params)  # weights checked before any output
    paths = expand_photos(photos)
    tile_options = None
    if is_tile_source(against):
        tile_options = tile_source_options(
            [against], zooms, area, max_tiles, tile_cache, None, subdomains, retry_missing
        )
        tile_options.pop("attribution")
    elif zooms or area is not None or tile_cache or subdomains or retry_missing:
        raise InputError(
            "--zooms/--bbox/--near/--tile-cache/--subdomains/--retry-missing apply to tile sources "
            "(URL, MBTiles, GeoPackage)"
        )
    encoder = get_encoder(model, weights, backend, None, sha256)
    places = RasterPlaces(
        against,
        encoder,
        tile_options=tile_options,
        progress=progress,
        cancel=cancel,
        bands=bands,
        fetch_finer=fetch_finer,
        max_fetch_zoom=max_fetch_zoom,
        fetch_budget=fetch_budget,
    )
    try:

        def locate(path: Path, progress: ProgressFn = no_progress) -> tuple[Footprint, np.ndarray]:
            rgb = read_image(path, max_pixels=max_pixels)
            # the first photo encodes the raster's windows (seconds to a minute): a share of the bar
            share = 0.4 if places.pending and top_k > 1 else 0.02
            progress(0.0, "finding candidate windows")
            cands = places.candidates(rgb, top_k, within(progress, 0.0, share))
            return estimate(str(path), rgb, cands, params, cancel, progress=within(progress, share, 1.0)), rgb

        settings = dict(
            against=against if is_url(against) else Path(against).resolve(),
            top_k=top_k,
            model=model,
            params=asdict(params),
            outputs=[georef_dir, geotiff, points],
            max_pixels=max_pixels,
            # absent when not given: runs of earlier versions still resume
            **({"bands": [int(b) for b in bands]} if bands else {}),
            **({"model_id": encoder.model_id} if weights else {}),
            **_fetch_settings(fetch_finer, max_fetch_zoom, fetch_budget),
        )
        return run_batch(
            paths,
            out,
            locate,
            settings,
            georef_dir=georef_dir,
            geotiff=geotiff,
            points=points,
            inputs=[against, *([weights] if weights else [])],
            overwrite=overwrite,
            resume=resume,
            progress=progress,
            cancel=cancel,
        )
    finally:
        places.close()


def localize_footprints(
    photos: Sequence[str],
    index: str | TileIndex,
    *,
    out: str,
    top_k: int = 10,
    area: SearchArea | None = None,
    georef_dir: str | None = None,
    geotiff: str | None = None,
    points: str | None = None,
    candidates_out: str | None = None,
    backend: str = DEFAULT_BACKEND,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    resume: bool = True,
    overwrite: bool = False,
    params: CoregParams | None = None,
    fetch_finer: bool = True,
    max_fetch_zoom: int | None = None,
    fetch_budget: int = DEFAULT_FETCH_BUDGET,
    nprobe: int | None = None,
    rerank: int | None = None,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> list[Footprint]:
    """Retrieval, then footprint estimation on the ``top_k`` candidates of each photo (``localize --footprint``).

    The winning candidate re-ranks the retrieval (``Footprint.checks`` lists every candidate, accepted
    first). ``candidates_out`` also writes the retrieved tiles, as ``localize --out`` does.
    ``fetch_finer``: for tiles indexed from a service (URL template, WMTS), a view finer than the indexed
    zooms has the finer tiles fetched into the index's tile cache, up to ``max_fetch_zoom`` (default: the
    finest indexed zoom + 3) and ``fetch_budget`` tiles per cache; never for MBTiles/GeoPackage sources, nor
    when the manifest hides a secret of the URL (the stored zooms are read, said once in the log).
    """
    params = params or CoregParams()
    check_matcher(params)  # weights checked before any output
    idx = index if isinstance(index, TileIndex) else open_index(index)
    driver_for(out)
    check_output(
        out,
        inputs=[*expand_photos(photos), *index_files(idx)],
        overwrite=overwrite,
        layer=FOOTPRINT_LAYER,
        what="footprint layer",
    )
    decoded: dict[str, np.ndarray] = {}  # photos decoded for retrieval, passed on to matching
    retrieved = localize(
        photos,
        idx,
        out=candidates_out,
        top_k=top_k,
        area=area,
        backend=backend,
        max_pixels=max_pixels,
        overwrite=overwrite,
        progress=lambda f, m: progress(0.1 * f, m),
        cancel=cancel,
        keep_decoded=decoded,
        nprobe=nprobe,
        rerank=rerank,
    )
    by_photo = {p.photo: p for p in retrieved.photos}
    places = IndexPlaces(
        idx, fetch_finer=fetch_finer, max_fetch_zoom=max_fetch_zoom, fetch_budget=fetch_budget, cancel=cancel
    )
    try:

        def locate(path: Path, progress: ProgressFn = no_progress) -> tuple[Footprint, np.ndarray]:
            hit = by_photo[str(path)]
            if hit.status != "ok":
                return Footprint(
                    photo=str(path), status="error", reason=f"{hit.error_code}: {hit.message}"
                ), None
            rgb = decoded.pop(str(path), None)
            if rgb is None:
                rgb = read_image(path, max_pixels=max_pixels)
            cands = [places.candidate(c.tile_id, c.rank) for c in hit.candidates]
            for cand, c in zip(cands, hit.candidates, strict=True):
                cand.rotation = float(c.rotation_deg)  # the learned matchers try this turn first
            return estimate(str(path), rgb, cands, params, cancel, progress=progress), rgb

        settings = dict(
            index=idx.path.resolve(),
            top_k=top_k,
            area=area.describe() if area else None,
            params=asdict(params),
            outputs=[georef_dir, geotiff, points],
            max_pixels=max_pixels,
            **_fetch_settings(fetch_finer, max_fetch_zoom, fetch_budget),
            # absent when not given: runs of earlier versions still resume
            **{k: v for k, v in (("nprobe", nprobe), ("rerank", rerank)) if v is not None},
        )
        return run_batch(
            [Path(p.photo) for p in retrieved.photos],
            out,
            locate,
            settings,
            georef_dir=georef_dir,
            geotiff=geotiff,
            points=points,
            inputs=[*index_files(idx), *({str(s) for s in idx.tiles.source})],
            overwrite=overwrite,
            resume=resume,
            progress=lambda f, m: progress(0.1 + 0.9 * f, m),
            cancel=cancel,
        )
    finally:
        places.close()


def _fetch_settings(fetch_finer: bool, max_fetch_zoom: int | None, fetch_budget: int) -> dict[str, Any]:
    """What the finer-tile fetching adds to a footprint batch's resume settings: nothing at the defaults
    (runs of earlier versions still resume)."""
    out: dict[str, Any] = {}
    if not fetch_finer:
        out["fetch_finer"] = False
    if max_fetch_zoom is not None:
        out["max_fetch_zoom"] = int(max_fetch_zoom)
    if fetch_budget != DEFAULT_FETCH_BUDGET:
        out["fetch_budget"] = int(fetch_budget)
    return out


# ----------------------------------------------------------------------------------------------- train


def train(
    footprints: str,
    index: str,
    out: str,
    *,
    steps: int = 30,
    batch_photos: int = 4,
    lr: float = 1e-4,
    train_blocks: int | None = None,
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> Any:
    """Fine-tune the index's encoder (the default, or AstroLoc with its checkpoint) on the localized photos
    of a footprint layer (engine/train.py).

    Writes a model folder that ``--model OUT`` accepts everywhere; returns a ``TrainResult``."""
    from . import train as training

    params = training.TrainParams(steps=steps, batch_photos=batch_photos, lr=lr, seed=seed)
    if train_blocks is not None:
        params.train_blocks = train_blocks
    result = training.train(
        footprints,
        index,
        out,
        params=params,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        cancel=cancel,
    )
    get_encoder.cache_clear()  # a model folder rewritten in place must not be served from the cache
    return result
