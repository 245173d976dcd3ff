"""Request and response models of the HTTP API (pydantic): what the OpenAPI schema publishes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# ----------------------------------------------------------------------------------------- request models

Path_ = Annotated[str, Field(min_length=1, max_length=4096)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
LatLon = Annotated[list[Finite], Field(min_length=2, max_length=2, description="[lat, lon] in degrees")]
Backend = Literal["onnx", "torch"]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]
Bands = Annotated[list[Annotated[int, Field(ge=1, le=1000)]], Field(min_length=1, max_length=16)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorOut(BaseModel):
    code: str = Field(description="stable error code, e.g. bad_input, too_large, forbidden_path, busy")
    message: str = Field(description="what went wrong, for a human")


class JobError(BaseModel):
    code: str
    message: str
    http_status: int


class JobResult(BaseModel):
    files: list[str] = Field(description="paths of the files written")
    summary: Any = Field(description="the engine's JSON summary of the action")
    seconds: float


class JobOut(BaseModel):
    id: str
    kind: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: float = Field(description="fraction done, 0..1")
    message: str
    cancel_requested: bool
    created: float
    started: float | None
    finished: float | None
    params: dict[str, Any]
    result: JobResult | None
    error: JobError | None
    warnings: list[str] = Field(default_factory=list, description="what the engine warned about on the way")


class AreaFields(Strict):
    near: LatLon | None = Field(None, description="search only near this [lat, lon] (needs radius_km)")
    radius_km: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    bbox: Annotated[list[Finite], Field(min_length=4, max_length=4)] | None = Field(
        None, description="[min_lon, min_lat, max_lon, max_lat]"
    )


Zooms = Annotated[list[Annotated[int, Field(ge=0, le=30)]], Field(min_length=1, max_length=31)]
MaxTiles = Annotated[int, Field(ge=1, le=10_000_000)]
Subdomains = Annotated[list[Annotated[str, Field(min_length=1, max_length=40)]], Field(max_length=26)]
RETRY_MISSING = (
    "URL source: ask the service again for the tiles it had none for (404/204/empty); without it they are "
    "asked again once recorded over 30 days ago"
)


class TileFields(Strict):
    """A tile source's options (URL template, MBTiles, GeoPackage), as ``POST /index`` takes them."""

    max_tiles: MaxTiles = Field(20_000, description="refuse a URL source that needs more tiles than this")
    tile_cache: Path_ | None = Field(
        None, description="URL source: its MBTiles download cache, inside the roots (default: the engine's)"
    )
    subdomains: Subdomains | None = None
    retry_missing: bool = Field(False, description=RETRY_MISSING)


class TilePlanRequest(Strict):
    """What ``POST /index`` would download for its tile sources (nothing is fetched)."""

    sources: Annotated[list[Path_], Field(min_length=1, max_length=1000)]
    zooms: Zooms | None = None
    near: LatLon | None = None
    radius_km: Annotated[float, Field(gt=0, le=20000, allow_inf_nan=False)] | None = None
    bbox: Annotated[list[Finite], Field(min_length=4, max_length=4)] | None = None
    span: Annotated[int, Field(ge=1, le=64)] = 4
    overlap: Annotated[float, Field(ge=0, lt=1)] = 0.5
    max_tiles: Annotated[int, Field(ge=1, le=10_000_000)] = 20_000
    tile_cache: Path_ | None = None
    subdomains: Subdomains | None = None
    retry_missing: bool = Field(False, description=RETRY_MISSING)


class IndexRequest(Strict):
    sources: Annotated[list[Path_], Field(min_length=1, max_length=1000)] = Field(
        description="GeoTIFF files and/or folders of XYZ mosaics"
    )
    out: Path_ = Field(description="index folder to write (a new folder, or an existing Skyloc index)")
    model: Annotated[str, Field(max_length=100)] = "default"
    weights: Path_ | None = None
    sha256: Sha256 | None = None
    backend: Backend = "onnx"
    input_size: Annotated[int, Field(ge=32, le=2048)] | None = None
    factory: Annotated[str, Field(max_length=200)] = "Flat"
    tile_sizes: Annotated[
        list[Annotated[int, Field(ge=16, le=65536)]], Field(min_length=1, max_length=16)
    ] = [
        256,
        512,
    ]
    overlap: Annotated[float, Field(ge=0, lt=1)] = 0.5
    bands: Annotated[list[Annotated[int, Field(ge=1, le=1000)]], Field(min_length=3, max_length=3)] | None = (
        None
    )
    span: Annotated[int, Field(ge=1, le=64)] = 4
    exclude: Annotated[list[Annotated[str, Field(max_length=200)]], Field(max_length=100)] | None = None
    recursive: bool = Field(False, description="folders of XYZ mosaics: their subfolders too")
    # tile services (http(s) URL templates), MBTiles files, GeoPackage tile tables: see TileOptions
    zooms: Zooms | None = Field(None, description="tile sources: zoom levels (required for a URL)")
    near: LatLon | None = Field(None, description="tile services: mosaics within radius_km of [lat, lon]")
    radius_km: Annotated[float, Field(gt=0, le=20000, allow_inf_nan=False)] | None = None
    bbox: Annotated[list[Finite], Field(min_length=4, max_length=4)] | None = Field(
        None, description="tile services: mosaics in [min_lon, min_lat, max_lon, max_lat]"
    )
    max_tiles: Annotated[int, Field(ge=1, le=10_000_000)] = Field(
        20_000, description="refuse a URL source that needs more tiles than this"
    )
    tile_cache: Path_ | None = Field(
        None, description="URL source: its MBTiles download cache, inside the roots (default: the engine's)"
    )
    attribution: Annotated[str, Field(max_length=2000)] | None = Field(
        None, description="credit line of the imagery (default: the MBTiles/GeoPackage metadata)"
    )
    subdomains: Subdomains | None = None
    retry_missing: bool = Field(False, description=RETRY_MISSING)
    ray: bool | Annotated[str, Field(min_length=1, max_length=300)] | None = Field(
        None,
        description="encode on a Ray cluster: true (Ray's default), 'local', 'auto', or HOST:PORT of the head",
    )
    ray_workers: Annotated[int, Field(ge=1, le=100000)] | None = Field(
        None, description="with ray: encoding workers (default one per CPU, or GPU, of the cluster)"
    )


class LocalizeRequest(AreaFields):
    photos: Annotated[list[Path_], Field(min_length=1, max_length=10000)] = Field(
        description="photo files or folders of photos"
    )
    index: Path_ = Field(description="index folder")
    out: Path_ | None = Field(None, description="write the candidate footprints here (.gpkg or .shp)")
    top_k: Annotated[int, Field(ge=1, le=1000)] = 10
    model: Annotated[str, Field(max_length=100)] | None = None
    weights: Path_ | None = None
    sha256: Sha256 | None = None
    backend: Backend = "onnx"
    nprobe: Annotated[int, Field(ge=1, le=1_000_000)] | None = Field(
        None, description="IVF/compressed index: lists probed (default: the index's; more = closer to exact)"
    )
    rerank: Annotated[int, Field(ge=1, le=1_000_000)] | None = Field(
        None,
        description="compressed index: candidates re-scored exactly (default: the index's, 1000 for 2-bit "
        "codes, 3000 for the preset's 1-bit codes from 500k vectors up, 10000 for its half-bit codes from 2M up)",
    )
    overwrite: bool = Field(
        False,
        description="replace existing outputs that Skyloc did not write (never an input of the request)",
    )


class FootprintRequest(AreaFields, TileFields):
    """``against`` a tile source (URL template, MBTiles, GeoPackage): ``zooms`` and the area (bbox, or near
    and radius_km) say which tiles; with ``index`` the area restricts the retrieval."""

    photos: Annotated[list[Path_], Field(min_length=1, max_length=10000)]
    against: Path_ | None = Field(
        None,
        description="a raster (or XYZ folder), an http(s) tile URL template, an MBTiles or a GeoPackage of "
        "tiles to match on; or give index",
    )
    zooms: Zooms | None = Field(None, description="against tiles: zoom levels (required for a URL)")
    max_fetch_zoom: Annotated[int, Field(ge=0, le=30)] | None = Field(
        None,
        description="finest zoom a footprint may fetch from a tile service beyond the indexed/given zooms "
        "(default: those + 3, within the service's own; e.g. a QGIS layer's zmax)",
    )
    index: Path_ | None = Field(None, description="an index: retrieval first, then footprints")
    out: Path_ = Field(description="footprint layer (.gpkg or .shp)")
    top_k: Annotated[int, Field(ge=1, le=100)] | None = Field(
        None, description="places tried (default 5 with against, 10 with index)"
    )
    georef_dir: Path_ | None = Field(None, description="default: OUT_georef/ beside out")
    geotiff: Path_ | None = Field(None, description="one photo: its georeferenced GeoTIFF here")
    points: Path_ | None = Field(None, description="one photo: its Georeferencer .points here")
    candidates_out: Path_ | None = Field(None, description="with index: also write the retrieved tiles")
    nprobe: Annotated[int, Field(ge=1, le=1_000_000)] | None = Field(
        None, description="IVF/compressed index: lists probed (default: the index's; more = closer to exact)"
    )
    rerank: Annotated[int, Field(ge=1, le=1_000_000)] | None = Field(
        None,
        description="compressed index: candidates re-scored exactly (default: the index's, 1000 for 2-bit "
        "codes, 3000 for the preset's 1-bit codes from 500k vectors up, 10000 for its half-bit codes from 2M up)",
    )
    model: Annotated[str, Field(max_length=100)] = "default"
    weights: Path_ | None = Field(None, description="against: weights file of the model (astroloc ...)")
    sha256: Sha256 | None = Field(None, description="against: expected sha256 of weights")
    bands: Annotated[list[Annotated[int, Field(ge=1, le=1000)]], Field(min_length=3, max_length=3)] | None = (
        Field(
            None,
            description="against a raster: its 1-based bands read as R,G,B (default: names, else guessed)",
        )
    )
    backend: Backend = "onnx"
    resume: bool = True
    matcher: Literal["sift", "aliked", "disk", "auto"] = Field(
        "auto",
        description="local matcher: auto (the default: SIFT, then ALIKED + LightGlue where SIFT places "
        "nothing), sift, aliked or disk (+ LightGlue)",
    )
    overwrite: bool = Field(
        False,
        description="replace existing outputs that Skyloc did not write (never an input of the request)",
    )


class EmbedRequest(AreaFields, TileFields):
    """A ``raster`` that is a tile source (URL template, MBTiles, GeoPackage) is read at one ``zoom`` over
    the area (bbox, or near and radius_km; a file: default all its tiles), rendered as a GeoTIFF first."""

    raster: Path_ = Field(
        description="a georeferenced raster, or an http(s) tile URL template, an MBTiles or a GeoPackage of tiles"
    )
    zoom: Annotated[int, Field(ge=0, le=30)] | None = Field(
        None, description="raster of tiles: the zoom level to read (required for tiles)"
    )
    points: Annotated[
        list[Annotated[list[Finite], Field(min_length=2, max_length=2)]],
        Field(min_length=1, max_length=10000),
    ] = Field(description="[x, y] in crs (default: the raster's CRS)")
    crs: Annotated[str, Field(max_length=2000)] | None = None
    model: Annotated[str, Field(max_length=100)] = "default"
    weights: Path_ | None = None
    sha256: Sha256 | None = None
    bands: Bands | None = Field(None, description="1-based raster bands to use as R,G,B")


class HeatmapRequest(AreaFields, TileFields):
    """A ``raster`` that is a tile source: as for ``POST /embed`` (``zoom`` and the area)."""

    raster: Path_ = Field(
        description="a georeferenced raster, or an http(s) tile URL template, an MBTiles or a GeoPackage of tiles"
    )
    zoom: Annotated[int, Field(ge=0, le=30)] | None = Field(
        None, description="raster of tiles: the zoom level to read (required for tiles)"
    )
    out: Path_ = Field(description="the similarity heatmap (Cloud-Optimized GeoTIFF) to write")
    overwrite: bool = Field(
        False,
        description="replace existing outputs that Skyloc did not write (never an input of the request)",
    )
    at: Annotated[list[Finite], Field(min_length=2, max_length=2)] | None = Field(
        None, description="[x, y] in crs: similarity to the embedding at this point"
    )
    crs: Annotated[str, Field(max_length=2000)] | None = None
    photo: Path_ | None = Field(None, description="similarity to this photo's embedding")
    location: LatLon | None = Field(None, description="similarity to this place's location embedding")
    vector: Path_ | None = Field(None, description="similarity to the features of a vector layer (OGR file)")
    resolution: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        None, description="output pixel size in the raster's CRS units (default: the engine's)"
    )
    model: Annotated[str, Field(max_length=100)] = "default"
    weights: Path_ | None = None
    sha256: Sha256 | None = None
    bands: Bands | None = Field(None, description="1-based raster bands to use as R,G,B")


class UploadOut(BaseModel):
    id: str
    path: str = Field(description="give this path to the other endpoints")
    name: str
    bytes: int
    width: int
    height: int
