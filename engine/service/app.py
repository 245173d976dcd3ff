"""The FastAPI application: one endpoint per ``engine.api`` function, every error as JSON.

Short actions answer at once (health, version, models, uploads, embed at points); long ones (index,
localize, footprint, heatmap) are jobs (``jobs.py``): the POST answers 202 with the job, ``GET /jobs/{id}``
follows it. Every request needs the token (``auth.py``), every path must lie inside the roots
(``paths.py``), bodies are size-limited before they are read, and photos are checked against the pixel
limit from their header before anything decodes them.

Errors: ``{"code": ..., "message": ...}`` with the engine's own codes and statuses (``engine.errors``:
422 ``bad_input``, 413 ``too_large``, 404 ``index_not_found``, 409 ``model_mismatch`` ...) plus the
service's (401 ``unauthorized``, 403 ``forbidden_path``, 404 ``job_not_found``/``not_found``, 408
``timeout``, 409 ``output_in_use``, 503 ``busy``); an OSError with a user-side cause is answered as
``engine.errors.from_os_error`` maps it (a full disk: 507 ``no_space``); anything unexpected is logged with
its traceback and answered 500 ``internal_error`` without one. The server keeps serving after any of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import (
    ImageTooLargeError,
    IndexNotFoundError,
    InputError,
    ModelMismatchError,
    SkylocError,
    from_os_error,
)
from ..footprint.coregister import CoregParams
from ..imagery.photos import DEFAULT_MAX_PIXELS, DEFAULT_MAX_RASTER_PIXELS
from ..imagery.tile_service import default_cache_dir as default_tile_cache_dir
from ..imagery.tile_service import is_url, redact
from ..imagery.tile_source import plan_extent
from ..output_guard import check_output
from ..retrieval.index_store import check_index_out
from ..retrieval.search import check_search_settings
from .auth import TokenMiddleware
from .errors import BusyError, ForbiddenPathError, NotFoundError, UploadTooLargeError
from .gdal_guard import GdalGuard, disable_gdal_network
from .jobs import JobFn, JobManager, JobOutcome
from .middleware import (
    BODY_IDLE_TIMEOUT_S,
    BODY_TIMEOUT_S,
    INTERNAL_MESSAGE,
    BodyLimitMiddleware,
    CatchAllMiddleware,
    error_body,
    plain,
)
from .paths import PathPolicy
from .schemas import (
    AreaFields,
    EmbedRequest,
    ErrorOut,
    FootprintRequest,
    HeatmapRequest,
    IndexRequest,
    JobOut,
    LocalizeRequest,
    TileFields,
    TilePlanRequest,
    UploadOut,
)

log = logging.getLogger("skyloc.service")

API_VERSION = 1
#: Longest ``GET /jobs/{id}?wait=`` (seconds): a long poll holds no thread, but keep answers coming.
MAX_WAIT_S = 30.0
SHAPEFILE_PARTS = (".shp", ".shx", ".dbf", ".prj", ".cpg")
UPLOAD_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")


@dataclass
class ServiceConfig:
    """What ``skyloc serve`` configures. ``upload_dir`` None: a private temporary folder, removed at exit."""

    roots: Sequence[str]
    token: str
    workers: int = 1
    queue_size: int = 8
    max_upload_bytes: int = 100 * 2**20
    max_upload_total_bytes: int = 1024 * 2**20
    max_json_bytes: int = 4 * 2**20
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_raster_pixels: int = DEFAULT_MAX_RASTER_PIXELS
    sync_slots: int = 4
    sync_wait_s: float = 30.0
    keep_jobs: int = 200
    keep_jobs_seconds: float = 3600.0
    body_idle_timeout_s: float = BODY_IDLE_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S
    upload_dir: str | None = None
    on_ready: Callable[[], None] | None = None
    on_shutdown: Callable[[], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: accept http(s) tile URL templates as index sources (``skyloc serve --no-tile-urls`` turns it off)
    allow_tile_urls: bool = True


# ------------------------------------------------------------------------------------------ index cache


class IndexCache:
    """Opened indexes, kept loaded (the last ``size``); reopened when the folder was rebuilt."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._cache: OrderedDict[Path, tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path):
        from ..retrieval.index_store import MANIFEST, open_index

        try:
            st = (path / MANIFEST).stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        with self._lock:
            hit = self._cache.get(path)
            if hit is not None and stamp is not None and hit[0] == stamp:
                self._cache.move_to_end(path)
                return hit[1]
        idx = open_index(path)  # IndexNotFoundError (404) for anything that is not a complete index
        with self._lock:
            self._cache[path] = (stamp, idx)
            self._cache.move_to_end(path)
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return idx


# ----------------------------------------------------------------------------------------------- uploads

UPLOAD_ID = re.compile(r"[0-9a-f]{16}")


class Uploads:
    """The upload folder's bookkeeping, in memory: ids that are complete, and the bytes each holds.

    The quota check reads these numbers instead of walking the folder, which another request may be
    deleting from at that moment (that walk met vanished files: 500s, and the upload was lost). An upload
    counts against the quota from the moment its bytes are stored, and becomes visible (to DELETE) only
    once it is complete; a DELETE and an upload of other ids never touch the same files.
    """

    def __init__(self, folder: Path, max_total: int) -> None:
        self.folder = folder
        self.max_total = max_total
        self._bytes: dict[str, int] = {}
        self._ready: set[str] = set()
        self._lock = threading.Lock()
        for entry in folder.iterdir():  # a configured folder may already hold uploads (start-up only)
            if entry.is_dir() and UPLOAD_ID.fullmatch(entry.name):
                self._bytes[entry.name] = sum(p.stat().st_size for p in entry.iterdir() if p.is_file())
                self._ready.add(entry.name)

    def reserve(self, upload_id: str, nbytes: int) -> None:
        """Count ``nbytes`` for ``upload_id``, or UploadTooLargeError (413) when the folder would be over."""
        with self._lock:
            total = sum(self._bytes.values())
            if total + nbytes > self.max_total:
                raise UploadTooLargeError(
                    f"the upload folder holds over {self.max_total:,} bytes: delete uploads you no longer "
                    "need (DELETE /uploads/{id})"
                )
            self._bytes[upload_id] = nbytes

    def commit(self, upload_id: str) -> None:
        with self._lock:
            self._ready.add(upload_id)

    def release(self, upload_id: str) -> None:
        with self._lock:
            self._bytes.pop(upload_id, None)
            self._ready.discard(upload_id)

    def take(self, upload_id: str) -> Path:
        """Forget a complete upload (NotFoundError when there is none) and return its folder to remove."""
        with self._lock:
            if upload_id not in self._ready:
                raise NotFoundError(f"no upload {upload_id!r}")
            self._ready.discard(upload_id)
            self._bytes.pop(upload_id, None)
        return self.folder / upload_id


# ----------------------------------------------------------------------------------------------- the app


class Service:
    """State shared by the endpoints: roots, jobs, caches, uploads."""

    def __init__(self, config: ServiceConfig) -> None:
        from .. import api  # heavy (torch, faiss): the service keeps it loaded

        self.api = api
        self.config = config
        self.own_upload_dir = config.upload_dir is None
        upload_dir = config.upload_dir or tempfile.mkdtemp(prefix="skyloc-uploads-")
        os.makedirs(upload_dir, mode=0o700, exist_ok=True)
        self.upload_dir = Path(os.path.realpath(upload_dir))
        # the engine's own tile cache folder is readable like the uploads: an index of a tile service
        # names its cache there, and footprints read it
        tile_cache_dir = str(default_tile_cache_dir())
        self.policy = PathPolicy(config.roots, read_only_roots=[str(self.upload_dir), tile_cache_dir])
        self.gdal = GdalGuard(self.policy.allowed, self.policy.describe)
        self.jobs = JobManager(
            config.workers, config.queue_size, keep=config.keep_jobs, keep_seconds=config.keep_jobs_seconds
        )
        self.indexes = IndexCache()
        self.sync_slots = threading.BoundedSemaphore(config.sync_slots)
        self.uploads = Uploads(self.upload_dir, config.max_upload_total_bytes)

    def close(self) -> None:
        self.jobs.shutdown()
        if self.own_upload_dir:
            shutil.rmtree(self.upload_dir, ignore_errors=True)

    @contextlib.contextmanager
    def sync_slot(self) -> Iterator[None]:
        if not self.sync_slots.acquire(timeout=self.config.sync_wait_s):
            raise BusyError(f"all {self.config.sync_slots} compute slots are busy: try again later")
        try:
            yield
        finally:
            self.sync_slots.release()

    # ------------------------------------------------------------------------------------ input checks

    def photo_files(self, photos: Sequence[str]) -> list[Path]:
        """Photos as real files inside the roots: folders expanded (one level), headers checked."""
        files: list[Path] = []
        for given in photos:
            real = self.policy.resolve_input(given, what="photo")
            if real.is_dir():
                for p in self.api.expand_photos([str(real)]):
                    photo = Path(os.path.realpath(p))
                    self.gdal.image(photo, "photo")
                    files.append(photo)
            else:
                files.append(self.photo_file(given))
        return files

    def photo_file(self, given: str) -> Path:
        """One photo file inside the roots, its pixel count checked from the header (no decoding)."""
        from ..imagery.photos import image_size

        real = self.input_file(given, what="photo")
        self.gdal.image(real, "photo")  # a TIFF that is a VRT: what it refers to is checked too
        w, h = image_size(real)  # header only: a bomb is refused before any decoding
        if w * h > self.config.max_pixels:
            raise ImageTooLargeError(
                f"{given}: {w}x{h} = {w * h:,} pixels is over the limit of {self.config.max_pixels:,} pixels"
            )
        return real

    def input_file(self, path: str, what: str) -> Path:
        real = self.policy.resolve_input(path, what=what)
        if not real.is_file():
            raise InputError(f"{what} {path!r} is a folder; expected a file")
        return real

    def index(self, path: str):
        """An opened index (cached): 403 outside the roots, 404 when it is not a Skyloc index."""
        from ..retrieval.index_store import TILES_FILE

        real = self.policy.resolve(path, what="index")
        if not real.is_dir():
            raise IndexNotFoundError(f"index {path!r}: no such index folder")
        self.policy.check_folder(real, what="index")  # no index.faiss symlinked to a file outside
        tiles = real / TILES_FILE
        if tiles.exists():  # OGR opens it: a VRT (or anything else) in its place is refused
            self.policy.resolve(str(tiles), what="index tiles")
            self.gdal.geopackage(tiles, "index tiles")
        return self.indexes.get(real)

    def raster_file(self, path: str, what: str) -> Path:
        """A raster file inside the roots, and every file GDAL would open for it (VRT sources ...) too."""
        real = self.input_file(path, what=what)
        self.gdal.raster(real, what)
        return real

    def index_source(self, given: str) -> str:
        """A source of ``POST /index``: an http(s) tile URL template (unless the engine runs with
        ``--no-tile-urls``), an MBTiles/GeoPackage tile file inside the roots (read with sqlite, never by
        GDAL), else a raster or XYZ folder (``raster_input``)."""
        from ..imagery.tile_service import is_url
        from ..imagery.tile_source import is_tile_source
        from ..imagery.tile_template import parse_template

        if is_url(given):
            if not self.config.allow_tile_urls:
                raise InputError(f"source {given[:200]!r}: this engine was started with --no-tile-urls")
            parse_template(given)  # 422 for a bad template or a scheme other than http(s)
            return given
        real = self.policy.resolve_input(given, what="source")
        if real.is_file() and is_tile_source(str(real)):
            return str(real)
        return str(self.raster_input(given, what="source"))

    def tile_source(self, given: str) -> str | None:
        """``given`` checked as ``index_source`` checks it, when it is a tile source (an http(s) URL
        template, an MBTiles/GeoPackage of tiles inside the roots); None when it is not one."""
        from ..imagery.tile_source import is_tile_source

        checked = self.index_source(given)
        return checked if is_tile_source(checked) else None

    def tile_options(self, req: TileFields, tiled: bool, what: str, zooms: str) -> dict[str, Any]:
        """The tile options of a request whose ``what`` is a tile source (``tiled``): the area from its
        bbox/near/radius_km, the cache checked as an output. For a raster, any of them given: 422."""
        if not tiled:
            fields = (
                zooms,
                "near",
                "radius_km",
                "bbox",
                "max_tiles",
                "tile_cache",
                "subdomains",
                "retry_missing",
            )
            given = [f for f in fields if f in req.model_fields_set and getattr(req, f) not in (None, False)]
            if given:
                raise InputError(
                    f"{', '.join(given)}: these apply when {what} is a tile source (an http(s) URL template, "
                    "an MBTiles or a GeoPackage of tiles), not a raster"
                )
            return {}
        assert isinstance(req, AreaFields)
        return dict(
            area=self.area(req),
            max_tiles=req.max_tiles,
            tile_cache=self.tile_cache(req.tile_cache),
            subdomains=req.subdomains,
            retry_missing=req.retry_missing,
        )

    def check_extent(self, source: str, zoom: int | None, options: dict[str, Any]) -> None:
        """A raster of tiles (``/embed``, ``/heatmap``): its one zoom, area and tile count, checked before
        anything is fetched (``plan_extent``: 422, 413 ``too_many_tiles``)."""
        if zoom is None:
            raise InputError(
                f"raster {redact(source)[:200]!r} is a tile source: give zoom, the one zoom level to read it at"
            )
        plan_extent(source, zoom=zoom, **{k: options[k] for k in ("area", "max_tiles", "subdomains")})

    def tile_cache(self, path: str | None) -> str | None:
        """A tile cache named by a request: an .mbtiles the service may write (inside the roots)."""
        return None if path is None else str(self.output(path, "tile_cache", (".mbtiles",)))

    def raster_input(self, path: str, what: str) -> Path:
        """A raster file or an XYZ mosaic folder (read by PIL, checked entry by entry by the policy)."""
        real = self.policy.resolve_input(path, what=what)
        if real.is_file():
            self.gdal.raster(real, what)
        return real

    def index_sources(self, idx: Any) -> None:
        """The imagery an index's tiles name must lie inside the roots (footprints read it)."""
        tiles = idx.tiles
        checked: set[str] = set()
        for source, kind in zip(tiles.source, tiles.kind, strict=True):
            src = str(source)
            if src in checked:
                continue
            checked.add(src)
            real = os.path.realpath(src)
            if not self.policy.allowed(real):
                raise ForbiddenPathError(
                    f"index {idx.path}: the imagery of its tiles, {src}, lies outside the folders this "
                    f"service may read ({self.policy.describe()})"
                )
            if str(kind) not in ("xyz", "tiles") and os.path.isfile(real):  # tiles: read by sqlite
                self.gdal.raster(Path(real), "index imagery")

    def optional_input(self, path: str | None, what: str) -> str | None:
        return None if path is None else str(self.policy.resolve_input(path, what=what))

    def vector_input(self, path: str | None, what: str) -> str | None:
        if path is None:
            return None
        real = self.policy.resolve_input(path, what=what)
        self.gdal.vector(real, what)
        return str(real)

    def output(self, path: str | None, what: str, suffixes: Sequence[str] | None = None) -> Path | None:
        if path is None:
            return None
        real = self.policy.resolve(path, write=True, what=what)
        if suffixes is not None and real.suffix.lower() not in suffixes:
            raise InputError(f"{what} {path!r}: expected a file ending in {' or '.join(suffixes)}")
        if real.is_dir():
            raise InputError(f"{what} {path!r} is a folder; expected a file name")
        if any(real == Path(r) for r in self.policy.roots):
            raise InputError(f"{what} {path!r} is a root folder")
        return real

    def layer_output(self, path: str | None, what: str) -> Path | None:
        out = self.output(path, what, (".gpkg", ".shp"))
        return out

    @staticmethod
    def layer_files(out: Path | None) -> list[Path]:
        if out is None:
            return []
        if out.suffix.lower() == ".shp":
            return [out.with_suffix(ext) for ext in SHAPEFILE_PARTS]
        return [out]

    @staticmethod
    def area(req: AreaFields):
        from ..geo.search_area import SearchArea

        if req.near is not None and req.bbox is not None:
            raise InputError("give near/radius_km or bbox, not both")
        if req.near is not None:
            return SearchArea(near=tuple(req.near), radius_km=req.radius_km)
        if req.radius_km is not None:
            raise InputError("radius_km needs near [lat, lon]")
        if req.bbox is not None:
            return SearchArea(bbox=tuple(req.bbox))
        return None

    def check_model_name(self, model: str | None, index_manifest: dict[str, Any] | None = None) -> None:
        from ..nets.registry import names_a_path, resolve_name

        built_with = (index_manifest or {}).get("model", {}).get("name")
        for given in (model, built_with):
            if given and names_a_path(given):
                # a fine-tuned model folder (`skyloc train`) is read like any input: inside the roots (403)
                self.policy.resolve(given, what="model folder")
        if model is None:
            return
        name = resolve_name(model)  # InputError (422) for an unknown model
        if index_manifest is not None and name != index_manifest["model"]["name"]:
            built = index_manifest["model"]
            raise ModelMismatchError(
                f"the index was built with model {built['model_id']} ({built['dim']}-d); the query model is "
                f"{name}: query it with model {built['name']!r}, or rebuild the index with this model"
            )


def create_app(config: ServiceConfig) -> FastAPI:
    """The application; ``config.on_ready`` runs once it is ready to answer (models list loaded)."""
    disable_gdal_network()  # before the service opens any raster; `skyloc serve` did it already
    svc = Service(config)
    api = svc.api

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if config.on_ready is not None:
            config.on_ready()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, svc.close)
            if config.on_shutdown is not None:
                config.on_shutdown()

    errors = {s: {"model": ErrorOut} for s in (401, 403, 404, 409, 413, 422, 500, 503, 507)}
    app = FastAPI(
        title="Skyloc engine",
        version=__version__,
        description=(
            "Local engine of the Skyloc QGIS plugin. Every request needs `Authorization: Bearer <token>`. "
            "Long actions are jobs: follow them at `/jobs/{id}`."
        ),
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        responses=errors,
        # declares the bearer scheme in the OpenAPI schema; TokenMiddleware enforces it on every request
        dependencies=[Depends(HTTPBearer(auto_error=False))],
    )
    app.state.service = svc

    def body_limit(path: str) -> int:
        if path.rstrip("/") == "/uploads":
            return config.max_upload_bytes + 64 * 1024  # multipart envelope
        return config.max_json_bytes

    # added last = outermost: token first, then the catch-all, then the body limit
    app.add_middleware(
        BodyLimitMiddleware,
        limit_for=body_limit,
        idle_timeout=config.body_idle_timeout_s,
        total_timeout=config.body_timeout_s,
    )
    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(TokenMiddleware, token=config.token)

    @app.exception_handler(SkylocError)
    async def skyloc_error(request: Request, exc: SkylocError) -> JSONResponse:
        if exc.http_status >= 500:
            level = logging.WARNING if isinstance(exc, BusyError) else logging.ERROR
            log.log(level, "%s on %s %s: %s", exc.code, request.method, request.url.path, exc.message)
        return JSONResponse(error_body(exc.code, exc.message), status_code=exc.http_status)

    @app.exception_handler(OSError)
    async def os_error(request: Request, exc: OSError) -> JSONResponse:
        """A full disk (507 ``no_space``), a name too long (422) ... is the user's side, not a 500."""
        mapped = from_os_error(exc, f"answering {request.method} {request.url.path}")
        if mapped is None:
            log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
            return JSONResponse(error_body("internal_error", INTERNAL_MESSAGE), status_code=500)
        return await skyloc_error(request, mapped)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
        return JSONResponse(error_body("bad_input", "invalid request: " + "; ".join(parts)), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        code = codes.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no endpoint {request.method} {request.url.path}"
        return JSONResponse(error_body(code, message), status_code=exc.status_code, headers=exc.headers)

    def submit(
        kind: str,
        fn: JobFn,
        params: dict[str, Any],
        outputs: Sequence[Path],
        recheck: Callable[[], None] | None = None,
    ) -> JSONResponse:
        """Queue ``fn``; ``recheck`` runs again, when the job starts, the input checks that a file changed
        while the job waited could defeat (a raster replaced by a VRT pointing out of the roots)."""
        if recheck is not None:
            inner = fn

            def fn(progress, cancel):  # noqa: F811
                recheck()
                return inner(progress, cancel)

        job = svc.jobs.submit(kind, fn, params=plain(params), outputs=outputs)
        return JSONResponse(job.snapshot(), status_code=202, headers={"Location": f"/jobs/{job.id}"})

    # --------------------------------------------------------------------------------- short actions

    @app.get("/health", tags=["service"])
    def health() -> dict[str, Any]:
        """The service answers; job counts."""
        return {"status": "ok", "version": __version__, "jobs": svc.jobs.counts()}

    @app.get("/version", tags=["service"])
    def version() -> dict[str, Any]:
        """Engine version, HTTP API version, what the service can do, and its limits."""
        actions = ["index", "localize", "footprint"] + [n for n in ("embed_at", "heatmap") if hasattr(api, n)]
        return {
            "version": __version__,
            "api_version": API_VERSION,
            "actions": actions,
            "roots": svc.policy.roots,
            "limits": {
                "max_upload_bytes": config.max_upload_bytes,
                "max_pixels": config.max_pixels,
                "workers": config.workers,
                "queue_size": config.queue_size,
            },
        }

    @app.get("/models", tags=["engine"])
    def models() -> list[dict[str, Any]]:
        """The encoders this engine can run, and what each can do."""
        return plain(api.models())

    @app.post("/uploads", status_code=201, response_model=UploadOut, tags=["service"])
    def upload(file: Annotated[UploadFile, File(description="a photo or raster")]) -> dict[str, Any]:
        """Store an image in the service's upload folder; its ``path`` can then be given to any action."""
        from ..imagery.photos import image_size, read_image

        raw = os.path.basename((file.filename or "").replace("\\", "/"))
        stem, suffix = os.path.splitext(raw)
        suffix = suffix.lower()
        if suffix not in UPLOAD_SUFFIXES:
            raise InputError(f"upload {raw!r}: expected an image file ({', '.join(UPLOAD_SUFFIXES)})")
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:100] or "upload"
        upload_id = secrets.token_hex(8)
        folder = svc.upload_dir / upload_id
        folder.mkdir(mode=0o700)
        dest = folder / (stem + suffix)
        try:
            size = 0
            with open(dest, "wb") as f:
                while chunk := file.file.read(1 << 20):
                    size += len(chunk)
                    if size > config.max_upload_bytes:
                        raise UploadTooLargeError(
                            f"upload over the limit of {config.max_upload_bytes:,} bytes"
                        )
                    f.write(chunk)
            svc.uploads.reserve(upload_id, size)  # the folder's quota, from memory (413 when over)
            svc.gdal.image(dest, "upload")  # a .tif that is a VRT may only refer to files in the roots
            width, height = image_size(dest)  # header only: bombs stop here
            with svc.sync_slot():
                read_image(dest, max_pixels=config.max_pixels)  # a corrupt or truncated image stops here
            svc.uploads.commit(upload_id)
        except BaseException:
            svc.uploads.release(upload_id)
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return {
            "id": upload_id,
            "path": str(dest),
            "name": dest.name,
            "bytes": size,
            "width": width,
            "height": height,
        }

    @app.delete("/uploads/{upload_id}", tags=["service"])
    def delete_upload(upload_id: str) -> dict[str, str]:
        """Remove an upload."""
        if not UPLOAD_ID.fullmatch(upload_id):
            raise NotFoundError(f"no upload {upload_id!r}")
        shutil.rmtree(svc.uploads.take(upload_id), ignore_errors=True)
        return {"deleted": upload_id}

    if hasattr(api, "embed_at"):

        @app.post("/embed", tags=["engine"])
        def embed(req: EmbedRequest) -> dict[str, Any]:
            """Embeddings of the raster at points (synchronous); a raster of tiles (URL template, MBTiles,
            GeoPackage) is read at ``zoom`` over the area, rendered as a temporary GeoTIFF first."""
            tiles = svc.tile_source(req.raster)
            raster = tiles if tiles is not None else str(svc.raster_file(req.raster, what="raster"))
            options = svc.tile_options(req, tiles is not None, "raster", "zoom")
            if tiles is not None:  # zoom, area, cap: refused now (422/413), before any download
                svc.check_extent(tiles, req.zoom, options)
            weights = svc.optional_input(req.weights, "weights")
            points = [tuple(p) for p in req.points]
            with svc.sync_slot():
                result = api.on_tile_extent(
                    raster,
                    lambda r, progress: api.embed_at(
                        r,
                        points,
                        crs=req.crs,
                        model=req.model,
                        weights=weights,
                        sha256=req.sha256,
                        bands=req.bands,
                        progress=progress,
                    ),
                    zoom=req.zoom if tiles is not None else None,
                    **options,
                )
            return plain(result.to_json())

    # ------------------------------------------------------------------------------------------- jobs

    @app.post("/index", status_code=202, response_model=JobOut, tags=["jobs"])
    def post_index(req: IndexRequest):
        """Build a tile database (a job)."""
        sources = [svc.index_source(s) for s in req.sources]
        tile_cache = svc.tile_cache(req.tile_cache)
        area = svc.area(req)
        tile_options = dict(
            zooms=req.zooms,
            area=area,
            max_tiles=req.max_tiles,
            tile_cache=tile_cache,
            attribution=req.attribution,
            subdomains=req.subdomains,
            retry_missing=req.retry_missing,
        )
        out = svc.policy.resolve(req.out, write=True, what="out")
        if any(out == Path(r) or Path(r).is_relative_to(out) for r in svc.policy.roots):
            raise InputError(f"out {req.out!r} is (or holds) a root folder")
        check_index_out(out)
        weights = svc.optional_input(req.weights, "weights")
        svc.check_model_name(req.model)
        staged = out.with_name(out.name + ".partial")
        # tile templates, caps, MBTiles/GeoPackage tilings: refused now (422/413), not as a failed job
        api.plan_index(sources, span=req.span, overlap=req.overlap, **tile_options)

        def run(progress, cancel) -> JobOutcome:
            manifest = api.index(
                sources,
                str(out),
                model=req.model,
                weights=weights,
                sha256=req.sha256,
                backend=req.backend,
                input_size=req.input_size,
                factory=req.factory,
                tile_sizes=req.tile_sizes,
                overlap=req.overlap,
                bands=req.bands,
                span=req.span,
                exclude=req.exclude,
                recursive=req.recursive,
                ray=req.ray or None,
                ray_workers=req.ray_workers,
                **tile_options,
                progress=progress,
                cancel=cancel,
            )
            return JobOutcome(sorted(str(p) for p in out.iterdir()), plain(manifest))

        params = {**req.model_dump(), "sources": sources, "out": out}
        recheck = lambda: [svc.index_source(s) for s in sources]  # noqa: E731
        return submit("index", run, params, [out, staged], recheck)

    @app.post("/index/plan", tags=["actions"])
    def post_index_plan(req: TilePlanRequest) -> list[dict[str, Any]]:
        """What indexing these tile sources would download (mosaics, tiles, estimated bytes): nothing is
        fetched; the same errors as ``POST /index`` (bad template, over max_tiles ...)."""
        sources = [svc.index_source(s) for s in req.sources]
        with svc.sync_slot():
            return plain(
                api.plan_index(
                    sources,
                    zooms=req.zooms,
                    area=svc.area(req),
                    span=req.span,
                    overlap=req.overlap,
                    max_tiles=req.max_tiles,
                    tile_cache=svc.tile_cache(req.tile_cache),
                    subdomains=req.subdomains,
                    retry_missing=req.retry_missing,
                )
            )

    @app.post("/localize", status_code=202, response_model=JobOut, tags=["jobs"])
    def post_localize(req: LocalizeRequest):
        """Retrieve the most similar tiles of an index for each photo (a job)."""
        photos = svc.photo_files(req.photos)
        idx = svc.index(req.index)
        check_search_settings(idx, req.rerank)
        svc.check_model_name(req.model, idx.manifest)
        area = svc.area(req)
        out = svc.layer_output(req.out, "out")
        weights = svc.optional_input(req.weights, "weights")

        def run(progress, cancel) -> JobOutcome:
            result = api.localize(
                [str(p) for p in photos],
                idx,
                out=None if out is None else str(out),
                top_k=req.top_k,
                area=area,
                model=req.model,
                weights=weights,
                sha256=req.sha256,
                backend=req.backend,
                max_pixels=config.max_pixels,
                overwrite=req.overwrite,
                nprobe=req.nprobe,
                rerank=req.rerank,
                progress=progress,
                cancel=cancel,
            )
            return JobOutcome([result.out] if result.out else [], plain(result.to_json()))

        if out is not None:  # refused at once (409) rather than as a failed job
            check_output(
                out, inputs=[*photos, *api.index_files(idx)], overwrite=req.overwrite, layer="candidates"
            )
        params = {**req.model_dump(), "photos": photos, "index": idx.path, "out": out}
        recheck = lambda: [svc.gdal.image(p, "photo") for p in photos]  # noqa: E731
        return submit("localize", run, params, svc.layer_files(out), recheck)

    @app.post("/footprint", status_code=202, response_model=JobOut, tags=["jobs"])
    def post_footprint(req: FootprintRequest):
        """Footprints of photos, on a raster (``against``) or on an index's candidates (``index``): a job."""
        from ..footprint.batch import georef_names, parts_dir
        from ..imagery.tile_source import is_tile_source

        if (req.against is None) == (req.index is None):
            raise InputError("give either against (a raster or XYZ folder) or index, not both")
        photos = svc.photo_files(req.photos)
        out = svc.layer_output(req.out, "out")
        geotiff = svc.output(req.geotiff, "geotiff", (".tif", ".tiff"))
        points = svc.output(req.points, "points", (".points",))
        if (geotiff or points) and len(photos) != 1:
            raise InputError("geotiff/points name the files of ONE photo; for several use georef_dir")
        georef_dir = None
        if req.georef_dir is not None:
            georef_dir = svc.policy.resolve(req.georef_dir, write=True, what="georef_dir")
        elif not (geotiff or points):
            georef_dir = out.with_name(out.stem + "_georef")
        outputs = [*svc.layer_files(out), parts_dir(out)]
        if georef_dir is not None:  # the engine's own names for each photo's GeoTIFF and .points
            names = georef_names(photos, georef_dir)
            outputs += [georef_dir] + [Path(f) for pair in names.values() for f in pair if f]
        outputs += [p for p in (geotiff, points) if p is not None]
        common = dict(
            out=str(out),
            georef_dir=None if georef_dir is None else str(georef_dir),
            geotiff=None if geotiff is None else str(geotiff),
            points=None if points is None else str(points),
            backend=req.backend,
            max_pixels=config.max_pixels,
            resume=req.resume,
            overwrite=req.overwrite,
            params=CoregParams(matcher=req.matcher),
            # finer zooms than the index/against holds are fetched only where this engine may reach URLs
            fetch_finer=config.allow_tile_urls,
            max_fetch_zoom=req.max_fetch_zoom,
        )
        check_output(out, inputs=photos, overwrite=req.overwrite, layer="footprints", what="footprint layer")
        candidates_out = None
        if req.against is not None:
            if req.candidates_out or req.nprobe is not None or req.rerank is not None:
                raise InputError("candidates_out/nprobe/rerank go with index, not against")
            # a raster, an XYZ folder, or tiles (URL template, MBTiles, GeoPackage) as POST /index takes them
            against = svc.index_source(req.against)
            tiled = is_tile_source(against)
            tile_options = svc.tile_options(req, tiled, "against", "zooms")
            if tiled:  # template, zooms, area, cap: refused now (422/413), not as a failed job
                tile_options["zooms"] = req.zooms
                api.plan_index([against], **tile_options)
            svc.check_model_name(req.model)
            weights = svc.optional_input(req.weights, "weights")
            if req.bands is not None and (tiled or Path(against).is_dir()):
                raise InputError("bands apply to a raster file against, not to tiles or mosaic folders")

            def call(progress, cancel):
                return api.footprint(
                    [str(p) for p in photos],
                    against,
                    top_k=req.top_k or 5,
                    model=req.model,
                    weights=weights,
                    sha256=req.sha256,
                    bands=req.bands,
                    progress=progress,
                    cancel=cancel,
                    **tile_options,
                    **common,
                )

            params = {**req.model_dump(), "against": against}
        else:
            if req.bands is not None or req.weights is not None or req.sha256 is not None:
                raise InputError("bands/weights/sha256 go with against; an index reads with its own model")
            idx = svc.index(req.index)
            check_search_settings(idx, req.rerank)
            svc.index_sources(idx)  # footprints read the tiles' imagery: it must lie inside the roots
            area = svc.area(req)
            candidates_out = svc.layer_output(req.candidates_out, "candidates_out")
            outputs += svc.layer_files(candidates_out)

            def call(progress, cancel):
                return api.localize_footprints(
                    [str(p) for p in photos],
                    idx,
                    nprobe=req.nprobe,
                    rerank=req.rerank,
                    top_k=req.top_k or 10,
                    area=area,
                    candidates_out=None if candidates_out is None else str(candidates_out),
                    progress=progress,
                    cancel=cancel,
                    **common,
                )

            params = {**req.model_dump(), "index": idx.path}

        def run(progress, cancel) -> JobOutcome:
            results = call(progress, cancel)
            files = [str(out)] + [f for r in results for f in (r.geotiff, r.points) if f]
            if candidates_out is not None:
                files.append(str(candidates_out))
            summary = {
                "out": str(out),
                "localized": sum(r.status == "localized" for r in results),
                "rejected": sum(r.status == "rejected" for r in results),
                "errors": sum(r.status == "error" for r in results),
                "photos": plain(results),
            }
            return JobOutcome(files, summary)

        params.update(photos=photos, out=out, georef_dir=georef_dir, geotiff=geotiff, points=points)

        def recheck() -> None:
            for p in photos:
                svc.gdal.image(p, "photo")
            if req.against is not None:
                svc.index_source(str(params["against"]))
            else:
                svc.index_sources(svc.index(str(params["index"])))

        return submit("footprint", run, params, outputs, recheck)

    if hasattr(api, "heatmap"):

        @app.post("/heatmap", status_code=202, response_model=JobOut, tags=["jobs"])
        def post_heatmap(req: HeatmapRequest):
            """Similarity heatmap over a raster, written as a Cloud-Optimized GeoTIFF (a job); a raster of
            tiles (URL template, MBTiles, GeoPackage) is read at ``zoom`` over the area, rendered in the job
            as a temporary GeoTIFF first."""
            tiles = svc.tile_source(req.raster)
            raster = tiles if tiles is not None else str(svc.raster_file(req.raster, what="raster"))
            options = svc.tile_options(req, tiles is not None, "raster", "zoom")
            if tiles is not None:  # zoom, area, cap: refused now (422/413), before any download
                svc.check_extent(tiles, req.zoom, options)
            out = svc.output(req.out, "out", (".tif", ".tiff"))
            photo = None if req.photo is None else str(svc.photo_file(req.photo))
            vector = svc.vector_input(req.vector, "vector")
            weights = svc.optional_input(req.weights, "weights")

            def heatmap(r: str, progress, cancel):
                return api.heatmap(
                    r,
                    str(out),
                    at=None if req.at is None else tuple(req.at),
                    crs=req.crs,
                    photo=photo,
                    location=None if req.location is None else tuple(req.location),
                    vector=vector,
                    resolution=req.resolution,
                    model=req.model,
                    weights=weights,
                    sha256=req.sha256,
                    bands=req.bands,
                    max_pixels=config.max_pixels,
                    max_raster_pixels=config.max_raster_pixels,
                    overwrite=req.overwrite,
                    progress=progress,
                    cancel=cancel,
                )

            def run(progress, cancel) -> JobOutcome:
                result = api.on_tile_extent(
                    raster,
                    lambda r, progress: heatmap(r, progress, cancel),
                    zoom=req.zoom if tiles is not None else None,
                    **options,
                    progress=progress,
                    cancel=cancel,
                )
                return JobOutcome([result.out, result.style], plain(result.to_json()))

            source = None if is_url(raster) else raster
            for target in (out, out.with_suffix(".qml")):  # refused at once (409) rather than as a failed job
                check_output(target, inputs=[source, photo, vector, weights], overwrite=req.overwrite)
            params = {**req.model_dump(), "raster": raster, "out": out}

            def recheck() -> None:
                if tiles is not None:
                    svc.index_source(raster)
                else:
                    svc.gdal.raster(Path(raster), "raster")
                if photo is not None:
                    svc.gdal.image(Path(photo), "photo")
                if vector is not None:
                    svc.gdal.vector(Path(vector), "vector")

            return submit("heatmap", run, params, [out, out.with_suffix(".qml")], recheck)

    @app.get("/jobs", response_model=list[JobOut], tags=["jobs"])
    def list_jobs() -> list[dict[str, Any]]:
        """Every job the service remembers (queued, running, and the recently finished)."""
        return [j.snapshot() for j in svc.jobs.list()]

    @app.get("/jobs/{job_id}", response_model=JobOut, tags=["jobs"])
    async def get_job(
        job_id: str,
        wait: Annotated[
            float, Query(ge=0, le=MAX_WAIT_S, description="seconds to wait for the job to finish")
        ] = 0,
    ) -> dict[str, Any]:
        """A job's state, progress, and result or error; ``wait`` long-polls until it finishes."""
        job = svc.jobs.get(job_id)
        deadline = time.monotonic() + wait
        while not job.done.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return job.snapshot()

    @app.post("/jobs/{job_id}/cancel", response_model=JobOut, tags=["jobs"])
    def cancel_job(job_id: str) -> dict[str, Any]:
        """Ask a job to stop; it ends ``cancelled`` and leaves no partial output."""
        return svc.jobs.cancel(job_id).snapshot()

    @app.delete("/jobs/{job_id}", response_model=JobOut, tags=["jobs"])
    def delete_job(job_id: str) -> dict[str, Any]:
        """Cancel the job if it is not finished, and forget it."""
        return svc.jobs.delete(job_id).snapshot()

    return app
