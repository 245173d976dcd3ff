"""`skyloc` command line: the same engine.api functions as the HTTP service and the plugin.

Exit codes: 0 success; 1 internal error (a bug: please report it); 2 bad command line; 3 unreadable or
unusable input (missing/corrupt file, raster without CRS, empty folder, image too large, bad weights, some
photos failed); 4 index built with another model; 5 search area or point outside the index/raster;
6 footprint: no photo could be placed (every one rejected, each with its reason in the layer); 130
interrupted (Ctrl-C; a footprint batch resumes where it stopped when run again).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import InputError, SkylocError, from_os_error
from .geo.search_area import SearchArea
from .imagery.photos import DEFAULT_MAX_PIXELS, DEFAULT_MAX_RASTER_PIXELS
from .output_guard import JSON_KEY, check_output, mark_written

EXIT_CODES = __doc__.split("Exit codes: ", 1)[1].strip()


class StderrProgress:
    """Progress on stderr: a redrawn bar on a terminal, a line every 10% otherwise (logs, CI)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last_decile = -1
        self.t0 = time.monotonic()

    def __call__(self, fraction: float, message: str) -> None:
        if self.quiet:
            return
        pct = int(round(100 * max(0.0, min(1.0, fraction))))
        if self.tty:
            bar = "#" * (pct // 4) + "-" * (25 - pct // 4)
            end = "\n" if fraction >= 1 else ""
            sys.stderr.write(f"\r[{bar}] {pct:3d}% {message[:70]:<70}{end}")
            sys.stderr.flush()
        elif pct // 10 != self.last_decile or fraction >= 1:
            self.last_decile = pct // 10
            sys.stderr.write(f"[{pct:3d}% {time.monotonic() - self.t0:6.1f}s] {message}\n")


def _floats(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise InputError(f"{what}: expected {n} comma-separated numbers, got {text!r}")
    return values


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise InputError(f"{what}: expected comma-separated integers, got {text!r}") from exc


def _sha256(text: str) -> str:
    """``--sha256``: the full 64 hex digits (``sha256:`` prefix allowed); a short prefix proves nothing."""
    digest = text.strip().lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise argparse.ArgumentTypeError(
            f"expected the full sha256 of the weights file, 64 hex digits (as `sha256sum FILE` prints), "
            f"got {text!r} ({len(digest)} characters)"
        )
    return digest


def tile_source_args(p: argparse.ArgumentParser, area: bool) -> None:
    """Options of XYZ tile services (URL templates), MBTiles files and GeoPackage tile tables."""
    g = p.add_argument_group(
        "tile services, MBTiles, GeoPackage tiles",
        "SOURCE may be an http(s) URL template (https://host/{z}/{x}/{y}.jpg; {-y} TMS, {q} quadkey, {s} or "
        "{switch:a,b,c} subdomains), an .mbtiles file or a .gpkg with a raster tile table (EPSG:3857)",
    )
    g.add_argument("--zooms", metavar="Z", help="zoom levels: 9-11 or 9,11 (services: required; files: all)")
    if area:
        g.add_argument("--near", metavar="LAT,LON", help="index the mosaics within --radius-km of this point")
        g.add_argument("--radius-km", type=float, help="radius for --near, in km")
        g.add_argument(
            "--bbox", metavar="MIN_LON,MIN_LAT,MAX_LON,MAX_LAT", help="index the mosaics in this box"
        )
    g.add_argument(
        "--max-tiles",
        type=int,
        default=None,
        metavar="N",
        help="refuse to fetch more than N tiles per service (default 20000: about 0.5 GB)",
    )
    g.add_argument(
        "--tile-cache",
        metavar="FILE.mbtiles",
        help="download cache of a URL source (default: ~/.cache/skyloc/tiles/HOST-HASH.mbtiles, or "
        "$SKYLOC_TILE_CACHE/...); a re-run or resumed build downloads nothing twice",
    )
    g.add_argument(
        "--attribution", metavar="TEXT", help="credit line of the imagery (stored in the manifest)"
    )
    g.add_argument("--subdomains", metavar="a,b,c", help="subdomains for {s} (default a,b,c)")
    g.add_argument(
        "--retry-missing",
        action="store_true",
        help="ask the service again for the tiles it had no tile for (404/204/empty); without it they are "
        "asked again once recorded over 30 days ago",
    )


def _tile_options(args: argparse.Namespace) -> dict[str, Any]:
    """The api.index/footprint keyword arguments of tile_source_args."""
    from .imagery.tile_source import DEFAULT_MAX_TILES

    return {
        "zooms": args.zooms,
        "max_tiles": args.max_tiles if args.max_tiles is not None else DEFAULT_MAX_TILES,
        "tile_cache": args.tile_cache,
        "attribution": args.attribution,
        "subdomains": [s.strip() for s in args.subdomains.split(",") if s.strip()]
        if args.subdomains
        else None,
        "retry_missing": bool(getattr(args, "retry_missing", False)),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skyloc",
        description="Where was this photo taken from above? Index satellite imagery, localize photos.",
        epilog="exit codes: " + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"skyloc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser, default: str | None) -> None:
        p.add_argument(
            "--model",
            default=default,
            help="encoder name (see `skyloc models`)"
            + (f"; default {default}" if default else "; default: the index's model"),
        )
        p.add_argument("--weights", help="checkpoint file for models that need one (astroloc)")
        p.add_argument(
            "--sha256", type=_sha256, help="expected sha256 of --weights (64 hex digits): others are refused"
        )
        p.add_argument(
            "--backend",
            choices=("torch", "onnx"),
            default="onnx",
            help="run the encoder with ONNX Runtime (default, faster on a CPU) or PyTorch; same descriptors",
        )
        p.add_argument("--quiet", action="store_true", help="no progress on stderr")
        if default:
            p.add_argument(
                "--input-size", type=int, help="encoder input side in pixels (default: the model's)"
            )

    def footprint_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--format", choices=("gpkg", "shp"), help="layer format (default: from --out's extension)"
        )
        p.add_argument("--geotiff", metavar="OUT.tif", help="one photo: write it georeferenced here (COG)")
        p.add_argument("--points", metavar="OUT.points", help="one photo: QGIS Georeferencer GCPs here")
        p.add_argument(
            "--georef-dir",
            metavar="DIR",
            help="write <photo>.tif and <photo>.points for every localized photo here "
            "(default: OUT_georef/ beside --out)",
        )
        p.add_argument("--restart", action="store_true", help="ignore the records of an interrupted run")
        p.add_argument(
            "--no-fetch-finer",
            dest="fetch_finer",
            action="store_false",
            help="tiles of a service: read only the zooms indexed (or given), never fetch finer ones",
        )
        p.add_argument(
            "--matcher",
            choices=("sift", "aliked", "disk", "auto"),
            default=None,
            help="local matcher: sift (RootSIFT, fastest), aliked or disk (+ LightGlue: haze, season, "
            "obliquity), auto (the default: SIFT, then ALIKED where SIFT places nothing)",
        )
        overwrite_arg(p)

    def overwrite_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="replace existing output files that Skyloc did not write (never the inputs)",
        )

    p = sub.add_parser("index", help="build a tile database from GeoTIFFs and/or XYZ mosaic folders")
    p.add_argument(
        "sources", nargs="+", metavar="SOURCE", help="GeoTIFF file or folder of *Z_ROW_COL.jpg|png"
    )
    p.add_argument("--out", required=True, metavar="INDEX_DIR")
    p.add_argument(
        "--tile-sizes", default="256,512", help="GeoTIFF tile sides in source pixels (default 256,512)"
    )
    p.add_argument(
        "--overlap", type=float, default=0.5, help="overlap between neighbouring tiles (default 0.5)"
    )
    p.add_argument("--bands", help="1-based bands to use as R,G,B (default: from colour interpretation)")
    p.add_argument("--span", type=int, default=4, help="XYZ mosaics: tiles per side (default 4)")
    p.add_argument(
        "--exclude",
        action="append",
        default=None,
        metavar="GLOB",
        help="XYZ folders: skip file names matching GLOB (repeatable), e.g. 'surrounding_*'",
    )
    p.add_argument("--recursive", action="store_true", help="XYZ folders: read their subfolders too")
    tile_source_args(p, area=True)
    p.add_argument(
        "--plan",
        action="store_true",
        help="tile sources: print (JSON) the mosaics, tiles to download and estimated size, then stop",
    )
    p.add_argument(
        "--factory",
        default="Flat",
        help="FAISS index factory string: Flat (exact, default), auto (by database size), compressed (codes in "
        "RAM, exact re-ranking from float16 vectors on disk; any '<factory>+rerank' too), IVF4096,SQ8, HNSW32, ...",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const=True,
        default=None,
        metavar="ADDRESS",
        help="encode the tiles on a Ray cluster (pip install 'skyloc[ray]'): HOST:PORT of the head node, "
        "'auto' (a cluster started here with `ray start`), 'local' (a new one on this machine); alone: "
        "RAY_ADDRESS, else a running cluster, else a new local one. Same index as without --ray",
    )
    p.add_argument(
        "--ray-workers",
        type=int,
        metavar="N",
        help="with --ray: encoding workers (default: one per CPU of the cluster, or one per GPU)",
    )
    model_args(p, "default")

    p = sub.add_parser("localize", help="retrieve the satellite tiles most similar to each photo")
    p.add_argument("photos", nargs="+", metavar="PHOTO", help="photo files or folders of photos")
    p.add_argument("--index", required=True, metavar="INDEX_DIR")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--near", metavar="LAT,LON", help="search only near this point (e.g. the nadir point)")
    p.add_argument("--radius-km", type=float, help="radius for --near, in km")
    p.add_argument("--bbox", metavar="MIN_LON,MIN_LAT,MAX_LON,MAX_LAT", help="search only inside this box")
    p.add_argument("--out", metavar="OUT.gpkg", help="write candidate footprints (.gpkg, or .shp)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument(
        "--footprint",
        action="store_true",
        help="estimate each photo's footprint on its candidates: --out is then the footprint layer",
    )
    p.add_argument("--candidates", metavar="CANDS.gpkg", help="with --footprint: also write the candidates")
    p.add_argument(
        "--nprobe",
        type=int,
        help="IVF/compressed indexes: lists probed (default: the index's; more = closer to exact)",
    )
    p.add_argument(
        "--rerank",
        type=int,
        help="compressed indexes: candidates re-scored exactly (default: the index's, 1000 for 2-bit codes, 3000 "
        "for the preset's 1-bit codes from 500k vectors up, 10000 for its half-bit codes from 2M up; more = closer)",
    )
    footprint_args(p)
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse larger photos (default {DEFAULT_MAX_PIXELS:,} pixels)",
    )
    model_args(p, None)

    p = sub.add_parser("footprint", help="footprints of photos on a raster you name (no index needed)")
    p.add_argument("photos", nargs="+", metavar="PHOTO", help="photo files or folders of photos")
    p.add_argument(
        "--against",
        required=True,
        metavar="RASTER",
        help="GeoTIFF, folder of XYZ mosaics, tile URL template, .mbtiles or .gpkg of tiles",
    )
    p.add_argument("--out", required=True, metavar="OUT.gpkg", help="footprint layer (.gpkg, or .shp)")
    p.add_argument("--top-k", type=int, default=5, help="places tried: whole extent + most similar windows")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger photos (default 100 MP)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--backend", choices=("torch", "onnx"), default="onnx", help="retrieval encoder backend")
    p.add_argument(
        "--bands", help="--against a raster: 1-based bands read as R,G,B (default: band names, else guessed)"
    )
    p.add_argument("--model", default="default", help="retrieval encoder for the candidate windows")
    p.add_argument("--weights", help="checkpoint file for models that need one (astroloc)")
    p.add_argument("--sha256", type=_sha256, help="expected sha256 of --weights (64 hex digits)")
    footprint_args(p)
    tile_source_args(p, area=True)  # --against a tile service URL, an MBTiles or a GeoPackage of tiles

    def embed_model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "raster", metavar="RASTER", help="georeferenced raster (GeoTIFF or anything GDAL reads)"
        )
        p.add_argument(
            "--crs", help="CRS of --at/--points coordinates (default: the raster's), e.g. EPSG:4326 (x=lon)"
        )
        p.add_argument("--model", default="default", choices=("default", "gair"), help="embedding model")
        p.add_argument("--weights", metavar="FILE", help="checkpoint for --model gair (not shipped)")
        p.add_argument("--sha256", type=_sha256, help="expected sha256 of --weights (64 hex digits)")
        p.add_argument(
            "--bands",
            help="default model: 3 band numbers for R,G,B; gair: the 10 bands B2,B3,B4,B5,B6,B7,B8,B8A,B11,B12",
        )
        p.add_argument("--quiet", action="store_true", help="no progress on stderr")
        tile_source_args(p, area=True)  # RASTER may be tiles: their extent at one zoom, as a GeoTIFF

    p = sub.add_parser("embed", help="embedding of a raster at exact coordinates (GAIR's NILI)")
    embed_model_args(p)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--at", metavar="X,Y", help="one point, in --crs (default the raster's CRS)")
    where.add_argument(
        "--points", metavar="FILE", help="many points: a CSV of x,y lines (header optional) or a point layer"
    )
    p.add_argument("--out", metavar="OUT.json|OUT.npy", help="write here (default: JSON on stdout)")
    overwrite_arg(p)

    p = sub.add_parser(
        "heatmap", help="similarity heatmap (Cloud-Optimized GeoTIFF) of a raster against a query"
    )
    embed_model_args(p)
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--at", metavar="X,Y", help="the embedding at this point (in --crs)")
    query.add_argument("--photo", metavar="PHOTO", help="the embedding of a photo")
    query.add_argument("--location", metavar="LAT,LON", help="the location encoder's embedding of a place")
    query.add_argument(
        "--vector", metavar="FILE", help="mean embedding over the points/lines/polygons of a layer"
    )
    p.add_argument("--out", required=True, metavar="HEAT.tif", help="output COG (+ HEAT.qml style for QGIS)")
    p.add_argument(
        "--resolution", type=float, help="output pixel size in map units (default: the raster's grid)"
    )
    p.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger photos (default 100 MP)"
    )
    p.add_argument(
        "--max-raster-pixels",
        type=int,
        default=DEFAULT_MAX_RASTER_PIXELS,
        help=f"refuse heatmaps of larger rasters (default {DEFAULT_MAX_RASTER_PIXELS:,} pixels)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    overwrite_arg(p)

    p = sub.add_parser(
        "train",
        help="fine-tune the index's encoder (default or AstroLoc) on your localized photos: writes a --model folder",
    )
    p.add_argument(
        "--footprints", required=True, metavar="FOOTPRINTS.gpkg", help="footprint layer (localized)"
    )
    p.add_argument(
        "--index", required=True, metavar="INDEX_DIR", help="index built with the default model or AstroLoc"
    )
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model folder to write")
    p.add_argument("--steps", type=int, default=30, help="optimisation steps (default 30: minutes on a CPU)")
    p.add_argument("--batch-photos", type=int, default=4, help="photos per step (default 4)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    p.add_argument("--train-blocks", type=int, help="last EfficientNet blocks trained (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run with the same settings")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    overwrite_arg(p)

    p = sub.add_parser("models", help="list the encoders and what they can do")
    p.add_argument("--json", action="store_true")

    from .service import serve

    serve.add_parser(sub)
    return parser


def _area(args: argparse.Namespace) -> SearchArea | None:
    if args.near and args.bbox:
        raise InputError("give --near/--radius-km or --bbox, not both")
    if args.near:
        lat, lon = _floats(args.near, 2, "--near")
        return SearchArea(near=(lat, lon), radius_km=args.radius_km)
    if args.radius_km is not None:
        raise InputError("--radius-km needs --near LAT,LON")
    if args.bbox:
        return SearchArea(bbox=_floats(args.bbox, 4, "--bbox"))  # type: ignore[arg-type]
    return None


def _run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        from .service import serve

        return serve.run(args)
    from . import api  # heavy imports (torch, faiss) only once the command line is valid

    if args.command == "models":
        rows = api.models()
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            for kind, title in (
                ("retrieval", "retrieval encoders (index, localize: --model)"),
                ("embedding", "embedding models (embed, heatmap: --model)"),
            ):
                print(title + ":")
                for m in (m for m in rows if m.get("kind") == kind):
                    aliases = f" (= {', '.join(m['aliases'])})" if m.get("aliases") else ""
                    weights = "needs --weights" if m.get("needs_weights") else "offline"
                    print(
                        f"  {m['name'] + aliases:<30} {m.get('dim', '?'):>5}-d  {weights:<15} {m.get('description', '')}"
                    )
                    if m.get("frontends"):
                        print(
                            f"  {'':<30} front end: {m['frontend']} (default; --model {m['name']}+NAME for "
                            f"{', '.join(f for f in m['frontends'] if f != m['frontend'])})"
                        )
        return 0

    progress = StderrProgress(quiet=args.quiet)
    if args.command == "index":
        if args.plan:
            plans = api.plan_index(
                args.sources, area=_area(args), span=args.span, overlap=args.overlap, **_tile_options(args)
            )
            print(json.dumps(plans, indent=1))
            return 0
        manifest = api.index(
            args.sources,
            args.out,
            model=args.model,
            weights=args.weights,
            sha256=args.sha256,
            backend=args.backend,
            input_size=args.input_size,
            factory=args.factory,
            tile_sizes=_ints(args.tile_sizes, "--tile-sizes"),
            overlap=args.overlap,
            bands=_ints(args.bands, "--bands") if args.bands else None,
            span=args.span,
            exclude=args.exclude,
            recursive=args.recursive,
            area=_area(args),
            **_tile_options(args),
            ray=args.ray,
            ray_workers=args.ray_workers,
            progress=progress,
        )
        c = manifest["counts"]
        print(
            f"index {args.out}: {c['tiles']} tiles x {len(manifest['rotations'])} rotations = {c['vectors']} "
            f"vectors, model {manifest['model']['model_id']}, factory {manifest['factory']}"
        )
        for rec in manifest.get("sources", []):
            if rec.get("download"):
                d = rec["download"]
                print(
                    f"  {rec['url']}: {d['downloaded']} tiles downloaded ({d['bytes'] / 2**20:.1f} MB), "
                    f"{d['cached_before']} from the cache {rec['cache']}, {d['missing']} missing (no tile there)"
                )
            if rec.get("attribution"):
                print(f"  imagery: {rec['attribution']}")
        return 0

    if args.command == "train":
        trained = api.train(
            args.footprints,
            args.index,
            args.out,
            steps=args.steps,
            batch_photos=args.batch_photos,
            lr=args.lr,
            train_blocks=args.train_blocks,
            seed=args.seed,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=progress,
        )
        if args.json:
            print(json.dumps(trained.to_json(), indent=1))
        else:
            print(
                f"model {trained.out}: {trained.model_id}, {trained.steps} steps on {trained.photos} photos "
                f"({trained.pairs} photo-tile pairs), {trained.seconds:.0f} s on {trained.device}; "
                f"use it with --model {trained.out} (and an index built with it)"
            )
        for why in trained.skipped:
            print(f"skyloc: skipped {why}", file=sys.stderr)
        return 0
    if args.command in ("embed", "heatmap"):
        return _embeddings(api, args, progress)
    if args.command == "footprint" or getattr(args, "footprint", False):
        return _footprints(api, args, progress)
    result = api.localize(
        args.photos,
        args.index,
        out=args.out,
        top_k=args.top_k,
        area=_area(args),
        model=args.model,
        weights=args.weights,
        sha256=args.sha256,
        backend=args.backend,
        max_pixels=args.max_pixels,
        overwrite=args.overwrite,
        nprobe=args.nprobe,
        rerank=args.rerank,
        progress=progress,
    )
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    else:
        for photo in result.photos:
            if photo.status != "ok":
                print(f"{photo.photo}: ERROR {photo.error_code}: {photo.message}")
                continue
            print(f"{photo.photo}  (encode {photo.encode_ms:.0f} ms, search {photo.search_ms:.1f} ms)")
            for c in photo.candidates:
                where = f"z{c.zoom}" if c.zoom is not None else f"{c.scale}px"
                print(
                    f"  {c.rank:>3}  score {c.score:.4f}  rot {c.rotation_deg:>3}  tile {c.tile_id:<7} "
                    f"{where:<6} {c.source}"
                )
        if result.out:
            print(f"candidate footprints: {result.out}")
    for photo in result.photos:
        if photo.status != "ok":
            print(f"skyloc: {photo.photo}: {photo.message}", file=sys.stderr)
    return 3 if result.n_failed else 0


def _layer_path(args: argparse.Namespace) -> str:
    if args.out is None:
        raise InputError("--footprint needs --out OUT.gpkg (the footprint layer)")
    if args.format:
        return str(Path(args.out).with_suffix("." + args.format))
    return args.out


def _footprints(api: Any, args: argparse.Namespace, progress: StderrProgress) -> int:
    from .footprint.coregister import CoregParams  # noqa: PLC0415 - keep the CLI's start fast

    out = _layer_path(args)
    georef_dir = args.georef_dir
    if georef_dir is None and not (args.geotiff or args.points):
        georef_dir = str(Path(out).with_name(Path(out).stem + "_georef"))
    common = {
        "out": out,
        "top_k": args.top_k,
        "georef_dir": georef_dir,
        "geotiff": args.geotiff,
        "points": args.points,
        "backend": args.backend,
        "max_pixels": args.max_pixels,
        "resume": not args.restart,
        "overwrite": args.overwrite,
        "progress": progress,
        "params": CoregParams(matcher=args.matcher) if args.matcher else None,
        "fetch_finer": args.fetch_finer,
    }
    if args.command == "footprint":
        tiles = _tile_options(args)
        tiles.pop("attribution")
        bands = _ints(args.bands, "--bands") if args.bands else None
        results = api.footprint(
            args.photos,
            args.against,
            area=_area(args),
            bands=bands,
            model=args.model,
            weights=args.weights,
            sha256=args.sha256,
            **tiles,
            **common,
        )
    else:
        results = api.localize_footprints(
            args.photos,
            args.index,
            area=_area(args),
            candidates_out=args.candidates,
            nprobe=args.nprobe,
            rerank=args.rerank,
            **common,
        )
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in results], indent=1, default=str))
    else:
        for r in results:
            if r.status == "localized":
                print(
                    f"{r.photo}: localized on {r.candidate} (candidate {r.candidate_rank}), "
                    f"{r.verified} verified matches, confidence {r.confidence:.2f}, {r.seconds:.1f} s"
                )
                for name, path in (("GeoTIFF", r.geotiff), ("GCPs", r.points)):
                    if path:
                        print(f"  {name}: {path}")
            else:
                print(f"{r.photo}: {r.status.upper()}: {r.reason}")
        print(
            f"footprint layer: {out} ({sum(r.status == 'localized' for r in results)} of {len(results)} placed)"
        )
    if any(r.status == "error" for r in results):
        return 3
    return 0 if any(r.status == "localized" for r in results) else 6


def _points_file(path: str, crs: str | None) -> tuple[list[tuple[float, float]], str | None]:
    """Points from a CSV (x,y per line; a header line is skipped) or from a point layer (its CRS wins)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path}: no such file")
    if p.suffix.lower() in (".csv", ".txt"):
        pts = []
        for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            cells = [c.strip() for c in line.replace(";", ",").split(",")]
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                pts.append((float(cells[0]), float(cells[1])))
            except (ValueError, IndexError):
                if n == 1:
                    continue  # header
                raise InputError(f"{path}, line {n}: expected x,y numbers, got {line!r}") from None
        return pts, crs
    from .vector_io import read_layer

    try:
        geoms, meta = read_layer(path)
    except Exception as exc:  # pyogrio's own errors for unreadable files
        raise InputError(f"{path}: not a CSV or a vector layer OGR can read ({exc})") from exc
    bad = [g.geom_type for g in geoms if g is None or g.geom_type != "Point"]
    if bad:
        raise InputError(f"{path}: --points needs a layer of points, found {sorted(set(map(str, bad)))}")
    return [(g.x, g.y) for g in geoms], meta.get("__crs__") or crs


def _embeddings(api: Any, args: argparse.Namespace, progress: StderrProgress) -> int:
    """embed/heatmap; RASTER may be tiles (a service, MBTiles, GeoPackage): their extent at one zoom is
    rendered to a temporary GeoTIFF first (api.on_tile_extent)."""
    from .imagery.tile_source import is_tile_source

    opts = _tile_options(args)
    source = args.raster
    raster_input = None if is_tile_source(source) else source
    tiles = {
        "zoom": args.zooms,
        "area": _area(args),
        "max_tiles": opts["max_tiles"],
        "tile_cache": opts["tile_cache"],
        "subdomains": opts["subdomains"],
        "retry_missing": opts["retry_missing"],
        "progress": progress,
    }
    bands = _ints(args.bands, "--bands") if args.bands else None
    common = {"model": args.model, "weights": args.weights, "sha256": args.sha256, "bands": bands}
    if args.command == "embed":
        if args.out and Path(args.out).suffix.lower() not in (".json", ".npy"):
            raise InputError(f"--out must end in .json or .npy, got {args.out}")
        if args.out:
            check_output(
                args.out,
                inputs=[raster_input, args.points, args.weights],
                overwrite=args.overwrite,
                what="--out",
            )
        if args.at:
            points, crs = [_floats(args.at, 2, "--at")], args.crs
        else:
            points, crs = _points_file(args.points, args.crs)
        result = api.on_tile_extent(
            source,
            lambda raster, prog: api.embed_at(raster, points, crs=crs, progress=prog, **common),
            **tiles,
        )
        if args.out and args.out.lower().endswith(".npy"):
            import numpy as np

            from .atomic import atomic_path

            with atomic_path(args.out, suffix=".npy") as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, result.matrix())
                mark_written(tmp)
            print(
                f"{len(result.points)} embeddings ({result.dim}-d, L2-normalised, {result.model_id}): {args.out}"
            )
        elif args.out:
            from .atomic import atomic_path

            with atomic_path(args.out, suffix=".json") as tmp:
                tmp.write_text(json.dumps({JSON_KEY: "embeddings", **result.to_json()}), encoding="utf-8")
            print(f"{len(result.points)} embeddings ({result.dim}-d, {result.model_id}): {args.out}")
        else:
            print(json.dumps(result.to_json()))
        return 0
    query: dict[str, Any] = {}
    if args.at:
        query["at"] = _floats(args.at, 2, "--at")
    elif args.location:
        query["location"] = _floats(args.location, 2, "--location")
    elif args.photo:
        query["photo"] = args.photo
    else:
        query["vector"] = args.vector
    result = api.on_tile_extent(
        source,
        lambda raster, prog: api.heatmap(
            raster,
            args.out,
            crs=args.crs,
            resolution=args.resolution,
            max_pixels=args.max_pixels,
            max_raster_pixels=args.max_raster_pixels,
            overwrite=args.overwrite,
            progress=prog,
            **query,
            **common,
        ),
        **tiles,
    )
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    else:
        print(
            f"heatmap {result.out} ({result.width}x{result.height}, {result.crs}): cosine similarity "
            f"{result.min:.3f}..{result.max:.3f} to the {result.query}; QGIS style {result.style}"
        )
    return 0


#: Options whose value may start with a minus sign (negative coordinates), which argparse takes for an option.
SIGNED_VALUE_OPTIONS = ("--at", "--location", "--near", "--bbox")


def _join_signed_values(argv: Sequence[str]) -> list[str]:
    """``--at -98.5,47`` -> ``--at=-98.5,47`` so that negative coordinates work without the '=' form."""
    out: list[str] = []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if (
            tok in SIGNED_VALUE_OPTIONS
            and len(nxt) > 1
            and nxt[0] == "-"
            and (nxt[1].isdigit() or nxt[1] == ".")
        ):
            out.append(f"{tok}={nxt}")
            i += 2
            continue
        out.append(tok)
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_join_signed_values(sys.argv[1:] if argv is None else argv))
    try:
        return _run(args)
    except SkylocError as exc:
        print(f"skyloc: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # last resort: a full disk or a 4,000-character name, wherever it is met
        mapped = from_os_error(exc, f"running `skyloc {args.command}`")
        if mapped is None:
            raise  # anything else is a bug: exit 1 with the traceback to report
        print(f"skyloc: error: {mapped.message}", file=sys.stderr)
        return mapped.exit_code
    except KeyboardInterrupt:
        print("skyloc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
