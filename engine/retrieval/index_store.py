"""A tile database on disk: FAISS vectors + a GeoPackage of tile footprints + a manifest.

Layout of an index folder::

    manifest.json   model id/name/dim, rotations, build parameters, counts, format version
    index.faiss     4 vectors per tile (0/90/180/270 degrees), vector id = tile_id * 4 + k
    index.f16.npy   only for a compressed index (factory ``compressed`` / ``...+rerank``): the full vectors,
                    float16, memory-mapped to re-rank exactly what index.faiss (codes only) finds
    tiles.gpkg      layer "tiles": footprint polygons in EPSG:4326, one per tile_id, openable in QGIS as is

The folder is built under ``<out>.partial`` and swapped into place only when complete (manifest written
last), so an interrupted build never leaves something that looks like a valid index. Descriptors are kept
in chunks inside ``.partial``: re-running the same build resumes where it stopped.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from .. import __version__
from ..atomic import atomic_path, replace_dir
from ..errors import (
    EmptyInputError,
    IndexNotFoundError,
    InputError,
    ModelMismatchError,
    os_errors_as_user_errors,
)
from ..imagery.base import TileSource, TileSpec
from ..locking import output_lock
from ..nets.base import ImageEncoder
from ..nets.frontend import SEPARATOR
from ..progress import CancelToken, ProgressFn, no_progress
from ..vector_io import read_layer, write_polygons
from . import faiss_index
from .chunked import ChunkedVectors

FORMAT_VERSION = 1
ROTATIONS = (0, 90, 180, 270)  # counter-clockwise; np.rot90(img, k) for k = 0..3
MANIFEST = "manifest.json"
FAISS_FILE = "index.faiss"
#: The full vectors of a compressed index (``--factory compressed``, or any ``...+rerank``), float16, (n, dim):
#: memory-mapped to re-rank the candidates of index.faiss, which then holds only the codes.
VECTORS_FILE = faiss_index.rerank_file(FAISS_FILE).name
TILES_FILE = "tiles.gpkg"
TILES_LAYER = "tiles"
CHUNK_TILES = 128
#: Tiles (x 4 rotations = images) per encoder call when the network runs on the CPU. Small calls keep the
#: network's activations in the caches: 64 images at 384 px write ~300 MB a layer. Measured (session 30,
#: default model, ONNX Runtime, 2 cores, the bundled NAIP tiles, scratch ``local_bt.py`` / ``scale2.py``,
#: interleaved): a local build 2.0-2.4 tiles/s with 16 tiles a call, 3.4-3.7 with 4, 3.7-4.0 with 2, 3.8-4.0
#: with 1; one 1-thread worker (a Ray worker) 1.9-2.0 with 16, 2.5-2.7 with 1, and two at once 3.3-3.7 vs
#: 4.7-4.9 tiles/s; the torch backend (2 threads) 0.60-0.75 with 16, 2.6-2.8 with 1 (``torch_bt.py``). The
#: descriptors are the same, bit for bit. Not measured on the AstroLoc ViT (8 images a call before: 2 tiles).
#: A GPU takes the encoder's ``max_batch``.
CPU_TILES_PER_CALL = 1


@dataclass
class TileTable:
    """Per-tile attributes of an index, in tile_id order (tile_id == row number)."""

    footprints: list[shapely.Polygon]
    source: np.ndarray
    kind: np.ndarray
    scale: np.ndarray
    zoom: np.ndarray  # -1 for GeoTIFF tiles
    native_crs: np.ndarray
    native_bounds: np.ndarray  # (n, 4)

    def __len__(self) -> int:
        return len(self.footprints)


@dataclass
class TileIndex:
    """An opened index folder, ready to be searched (kept loaded by the service)."""

    path: Path
    manifest: dict[str, Any]
    faiss: Any
    tiles: TileTable

    @property
    def model_id(self) -> str:
        return self.manifest["model"]["model_id"]

    @property
    def n_rotations(self) -> int:
        return len(self.manifest["rotations"])

    def check_encoder(self, encoder: ImageEncoder) -> None:
        """Refuse a query encoder that is not the one the database was encoded with.

        The photometric front end is part of the model id (engine/nets/frontend.py): the same network
        with another front end is refused too, with a message that says so.
        """
        model = self.manifest["model"]
        query_fe, built_fe = getattr(encoder, "frontend", "none"), model.get("frontend", "none")
        base = model["name"].partition(SEPARATOR)[0]
        if encoder.name.partition(SEPARATOR)[0] == base and query_fe != built_fe:
            raise ModelMismatchError(
                f"index {self.path} was built with model {model['model_id']}, front end {built_fe!r}; the "
                f"query model applies front end {query_fe!r} ({encoder.model_id}). Query it with "
                f"--model {base}+{built_fe} (or no --model: "
                f"an index is queried with the model it was built with), or rebuild the index with "
                f"--model {encoder.name}."
            )
        if encoder.model_id != model["model_id"] or encoder.dim != model["dim"]:
            raise ModelMismatchError(
                f"index {self.path} was built with model {model['model_id']} ({model['dim']}-d); "
                f"the query model is {encoder.model_id} ({encoder.dim}-d). Query it with "
                f"--model {model['name']} (and the same weights), or rebuild the index with this model."
            )


def _params_fingerprint(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


#: Files a complete index folder holds; QGIS adds the -wal/-shm journals while it shows tiles.gpkg.
INDEX_FILES = frozenset(
    {MANIFEST, FAISS_FILE, VECTORS_FILE, TILES_FILE, f"{TILES_FILE}-wal", f"{TILES_FILE}-shm"}
)
#: Staging folder contents: the build marker, descriptor chunks, the files being written, temp files.
STAGING_FILES = frozenset({"build_params.json", "chunks", MANIFEST, FAISS_FILE, VECTORS_FILE, TILES_FILE})
_TEMP = re.compile(r"^\..+\.tmp(\.[a-z]+)?$")


def _is_temp(name: str) -> bool:
    """A temporary file of an atomic write (``.index.faiss.XXXX.tmp``) left by a killed process."""
    return _TEMP.match(name) is not None


def is_index_folder(path: str | os.PathLike[str]) -> bool:
    """True only for a folder with the full signature of a Skyloc index and nothing else in it.

    The manifest must parse with Skyloc's schema (format, model, counts, complete) and the files it implies
    (index.faiss, tiles.gpkg) must be there; any other file (a Planet delivery's scene.tif beside its own
    manifest.json) means the folder is not only an index, so it is never replaced.
    """
    folder = Path(path)
    if not folder.is_dir() or folder.is_symlink():
        return False
    names = {p.name for p in folder.iterdir()}
    if not {MANIFEST, FAISS_FILE, TILES_FILE} <= names:
        return False
    if any(n not in INDEX_FILES and not _is_temp(n) for n in names):
        return False
    if not all((folder / n).is_file() and not (folder / n).is_symlink() for n in (FAISS_FILE, TILES_FILE)):
        return False
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(manifest, dict)
        and manifest.get("format") == FORMAT_VERSION
        and isinstance(manifest.get("model"), dict)
        and "model_id" in manifest["model"]
        and isinstance(manifest.get("counts"), dict)
        and isinstance(manifest.get("rotations"), list)
    )


def check_index_out(out_dir: str | os.PathLike[str]) -> Path:
    """Refuse an output folder that exists and is not exactly a Skyloc index: it would be replaced (deleted)."""
    out = Path(out_dir)
    if out.is_symlink():
        raise InputError(f"{out} is a symbolic link: give the real folder for the index")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is a file: give a folder for the index")
    if out.is_dir() and any(out.iterdir()) and not is_index_folder(out):
        others = sorted(p.name for p in out.iterdir() if p.name not in INDEX_FILES)
        shown = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "")
        raise InputError(
            f"{out} exists and is not a Skyloc index"
            + (f" (it holds {shown})" if shown else "")
            + ": it will not be replaced. Choose a new folder, or empty it yourself"
        )
    staged = out.with_name(out.name + ".partial")
    if staged.is_symlink() or (staged.exists() and not _is_staging(staged)):
        raise InputError(
            f"{staged} exists and is not a Skyloc build in progress: it will not be touched (move it away or "
            "choose another output folder)"
        )
    return out


def _is_staging(folder: Path) -> bool:
    """A ``.partial`` folder that holds nothing but what an index build puts there."""
    if not folder.is_dir():
        return False
    for p in folder.iterdir():
        if p.name == "chunks":
            if not p.is_dir() or any(not (_CHUNK.match(c.name) or _is_temp(c.name)) for c in p.iterdir()):
                return False
        elif p.name not in STAGING_FILES and not _is_temp(p.name):
            return False
    return True


_CHUNK = re.compile(r"^\d{9}-\d{9}\.npy$")

#: ``encode_all(specs, encoder, chunk_dir, batch_tiles, chunk_tiles, progress, cancel)`` -> descriptors
#: ``(n_tiles * 4, dim)`` tile-major, every finished chunk saved as :func:`chunk_file` (resume) and read
#: back from those files (:class:`ChunkedVectors`).
EncodeFn = Callable[
    [list[tuple[TileSource, TileSpec]], ImageEncoder, Path, int, int, ProgressFn, "CancelToken | None"],
    ChunkedVectors,
]


def build_index(
    sources: list[TileSource],
    encoder: ImageEncoder,
    out_dir: str | os.PathLike[str],
    *,
    factory: str = "Flat",
    build_params: dict[str, Any] | None = None,
    batch_tiles: int | None = None,
    chunk_tiles: int = CHUNK_TILES,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
    encode_with: EncodeFn | None = None,
) -> dict[str, Any]:
    """Encode every tile of ``sources`` at 4 rotations and write the index folder. Returns the manifest.

    ``encode_with`` replaces the local encode loop (same arguments, same chunk files, same result): the
    Ray build (engine/retrieval/ray_build.py) encodes the chunks on a cluster through it.
    """
    out_dir = check_index_out(out_dir)
    with output_lock(out_dir), os_errors_as_user_errors(f"building the index {out_dir}"):
        return _build_locked(
            sources,
            encoder,
            out_dir,
            factory,
            build_params,
            batch_tiles,
            chunk_tiles,
            progress,
            cancel,
            encode_with or _encode_all,
        )


def _build_locked(
    sources: list[TileSource],
    encoder: ImageEncoder,
    out_dir: Path,
    factory: str,
    build_params: dict[str, Any] | None,
    batch_tiles: int | None,
    chunk_tiles: int,
    progress: ProgressFn,
    cancel: CancelToken | None,
    encode_all: EncodeFn,
) -> dict[str, Any]:
    out_dir = check_index_out(out_dir)  # again, now that no other build can change it
    specs: list[tuple[TileSource, TileSpec]] = [(src, s) for src in sources for s in src.specs()]
    if not specs:
        raise EmptyInputError("no tile to index: every source was empty or fully nodata")
    factory = faiss_index.check_buildable(len(specs) * len(ROTATIONS), encoder.dim, factory)
    params = {
        "model_id": encoder.model_id,
        "factory": factory,
        "sources": [s.path for s in sources],
        "n_tiles": len(specs),
        **(build_params or {}),
    }
    staged = out_dir.with_name(out_dir.name + ".partial")
    _prepare_staging(staged, params, progress)

    if batch_tiles is None:
        batch_tiles = tiles_per_call(encoder)
    descriptors = encode_all(specs, encoder, staged / "chunks", batch_tiles, chunk_tiles, progress, cancel)
    if cancel is not None:
        cancel.check()
    progress(0.9, f"building FAISS index ({factory}) over {len(descriptors)} vectors")
    index = faiss_index.build(descriptors, factory)
    faiss_index.write_index(index, staged / FAISS_FILE)
    _write_tiles(staged / TILES_FILE, [s for _, s in specs])
    manifest = {
        "format": FORMAT_VERSION,
        "skyloc_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": encoder.name,
            "model_id": encoder.model_id,
            "dim": encoder.dim,
            "input_size": encoder.input_size,
            "frontend": getattr(encoder, "frontend", "none"),
        },
        "rotations": list(ROTATIONS),
        "vector_id": "tile_id * 4 + k, rotation = k * 90 degrees counter-clockwise",
        "factory": factory,
        "build": params,
        # per source: kind, file or URL template, zooms, attribution (tile services, MBTiles, GeoPackage)
        "sources": [_source_record(src) for src in sources],
        # where the index was built: tile sources that moved together with it are found again from here
        "built_at": os.path.abspath(out_dir),
        "counts": {"sources": len(sources), "tiles": len(specs), "vectors": int(index.ntotal)},
        "complete": True,
    }
    shutil.rmtree(staged / "chunks", ignore_errors=True)
    (staged / "build_params.json").unlink(missing_ok=True)
    with atomic_path(staged / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    for leftover in staged.iterdir():  # temp files of a killed earlier attempt must not reach the index
        if _is_temp(leftover.name):
            leftover.unlink(missing_ok=True)
    if cancel is not None:
        cancel.check()
    replace_dir(staged, out_dir)
    progress(1.0, f"index written to {out_dir}")
    return manifest


def _source_record(src: TileSource) -> dict[str, Any]:
    """What the manifest says of one source: its own ``describe()``, else its kind and path."""
    describe = getattr(src, "describe", None)
    if callable(describe):
        return describe()
    return {"kind": getattr(src, "kind", None), "path": src.path}


def _prepare_staging(staged: Path, params: dict[str, Any], progress: ProgressFn = no_progress) -> None:
    """Reuse a staging folder from an interrupted identical build (resume), else start it afresh.

    The marker is written atomically; one that cannot be read (a disk that filled while writing it) means
    "start again", said in one line, never a crash.
    """
    marker = staged / "build_params.json"
    fingerprint = _params_fingerprint(params)
    if staged.exists():
        try:
            recorded = json.loads(marker.read_text()).get("fingerprint")
        except FileNotFoundError:
            recorded = None
        except (OSError, ValueError, AttributeError):
            recorded = None
            progress(0.0, f"the resume marker {marker} is unreadable: starting this build again")
        if recorded != fingerprint:
            shutil.rmtree(staged)
        else:
            for leftover in [*staged.iterdir(), *(staged / "chunks").glob(".*")]:
                if _is_temp(leftover.name):
                    leftover.unlink(missing_ok=True)
    (staged / "chunks").mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        with atomic_path(marker, suffix=".json") as tmp:
            tmp.write_text(json.dumps({"fingerprint": fingerprint, "params": params}))


def _encode_all(
    specs: list[tuple[TileSource, TileSpec]],
    encoder: ImageEncoder,
    chunk_dir: Path,
    batch_tiles: int,
    chunk_tiles: int,
    progress: ProgressFn,
    cancel: CancelToken | None,
) -> ChunkedVectors:
    """Descriptors (n_tiles * 4, dim), tile-major, read from the chunk files (never all in RAM: see
    engine/retrieval/chunked.py). Finished chunks are saved and skipped on resume."""
    n = len(specs)
    chunks = []
    for start in range(0, n, chunk_tiles):
        stop = min(start + chunk_tiles, n)
        chunk_path = chunk_file(chunk_dir, start, stop)
        chunks.append(chunk_path)
        if chunk_path.exists():
            progress(0.9 * stop / n, f"resumed tiles {start}-{stop} of {n}")
            continue
        vecs = []
        for b in range(start, stop, batch_tiles):
            if cancel is not None:
                cancel.check()
            vecs.append(encode_tiles(specs[b : min(b + batch_tiles, stop)], encoder))
            done = min(b + batch_tiles, stop)
            progress(0.9 * done / n, f"encoded {done} of {n} tiles x {len(ROTATIONS)} rotations")
        arr = np.concatenate(vecs).astype(np.float32)
        with atomic_path(chunk_path, suffix=".npy") as tmp:
            np.save(tmp, arr)
        del arr, vecs
    return ChunkedVectors(chunks)


def tiles_per_call(encoder: ImageEncoder) -> int:
    """Tiles an index build hands ``encoder`` per call (each at its 4 rotations, in the same call):
    ``CPU_TILES_PER_CALL`` on the CPU, else as many as its ``max_batch`` images allow."""
    most = max(1, getattr(encoder, "max_batch", 64) // len(ROTATIONS))
    if getattr(encoder, "device", "cpu") == "cpu":
        return min(CPU_TILES_PER_CALL, most)
    return most


def chunk_file(chunk_dir: Path, start: int, stop: int) -> Path:
    """The descriptor chunk of tiles ``start``..``stop - 1`` in a staging folder (local and Ray builds)."""
    return chunk_dir / f"{start:09d}-{stop:09d}.npy"


def encode_tiles(batch: Sequence[tuple[TileSource, TileSpec]], encoder: ImageEncoder) -> np.ndarray:
    """Descriptors of tiles at every rotation, tile-major ``(len(batch) * 4, dim)``: one encoder call."""
    images = np.stack([src.read(spec, encoder.input_size) for src, spec in batch])
    rotated = np.stack([np.rot90(img, k) for img in images for k in range(len(ROTATIONS))])
    return encoder.encode(np.ascontiguousarray(rotated))


def _write_tiles(path: Path, specs: list[TileSpec]) -> None:
    polygons = [shapely.Polygon(s.footprint_lonlat or s.corners_lonlat) for s in specs]
    bounds = np.array([s.bounds for s in specs], dtype=np.float64)
    write_polygons(
        path,
        polygons,
        {
            "tile_id": np.arange(len(specs), dtype=np.int64),
            "source": [s.source for s in specs],
            "kind": [s.kind for s in specs],
            "scale": np.array([s.scale for s in specs], dtype=np.int32),
            "zoom": np.array([-1 if s.zoom is None else s.zoom for s in specs], dtype=np.int32),
            "native_crs": [s.crs for s in specs],
            "minx": bounds[:, 0],
            "miny": bounds[:, 1],
            "maxx": bounds[:, 2],
            "maxy": bounds[:, 3],
        },
        layer=TILES_LAYER,
    )


def open_index(path: str | os.PathLike[str], *, mmap: bool = False) -> TileIndex:
    """Open a complete index folder; anything partial, foreign or inconsistent is refused clearly."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        hint = (
            " (an interrupted build? re-run `skyloc index` to resume it)"
            if path.with_name(path.name + ".partial").exists()
            else ""
        )
        raise IndexNotFoundError(f"{path} is not a Skyloc index: no {MANIFEST}{hint}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise IndexNotFoundError(f"{manifest_path} is unreadable: {exc}") from exc
    if manifest.get("format") != FORMAT_VERSION or not manifest.get("complete"):
        raise IndexNotFoundError(f"{path}: unsupported or incomplete index (format {manifest.get('format')})")
    rerank = faiss_index.split_rerank(str(manifest.get("factory", "")))[1]
    for name in (FAISS_FILE, TILES_FILE, *((VECTORS_FILE,) if rerank else ())):
        if not (path / name).is_file():
            raise IndexNotFoundError(
                f"{path} is not a complete Skyloc index: {name} is missing (rebuild it with `skyloc index`)"
            )
    index = faiss_index.read_index(path / FAISS_FILE, mmap=mmap)
    tiles = _read_tiles(path / TILES_FILE)
    tiles.source = _locate_sources(tiles.source, path, manifest.get("built_at"))
    n_rot = len(manifest["rotations"])
    if index.ntotal != len(tiles) * n_rot or manifest["counts"]["tiles"] != len(tiles):
        raise IndexNotFoundError(
            f"{path} is inconsistent: {index.ntotal} vectors for {len(tiles)} tiles x {n_rot} rotations"
        )
    return TileIndex(path=path, manifest=_with_frontend(manifest), faiss=index, tiles=tiles)


def _with_frontend(manifest: dict[str, Any]) -> dict[str, Any]:
    """Read a manifest written before photometric front ends existed (no ``model.frontend``).

    Its tiles were encoded without one: the model is recorded in memory as ``<name>+none`` with front end
    ``none``, and its model id is unchanged, so the index is queried with exactly the encoder it was built
    with (``none`` adds nothing to a model id) even though a bare model name now has another front end.
    """
    model = manifest["model"]
    if "frontend" not in model:
        model["frontend"] = "none"
        if SEPARATOR not in model["name"]:
            model["name"] = f"{model['name']}{SEPARATOR}none"
    return manifest


def _locate_sources(sources: np.ndarray, index_dir: Path, built_at: str | None) -> np.ndarray:
    """Absolute paths of the tiles' imagery, wherever the index is opened from.

    Sources are stored absolute. Older indexes stored them as typed (relative to the build's working
    folder, unknown now): those are tried against the index folder and its parent. An index moved
    together with its imagery (same relative layout) finds it again through the folder it was built in.
    """
    here = Path(os.path.abspath(index_dir))
    located: dict[str, str] = {}
    for src in set(map(str, sources)):
        candidates = []
        if os.path.isabs(src):
            candidates.append(src)
            if built_at:
                candidates.append(os.path.normpath(here / os.path.relpath(src, built_at)))
        else:
            candidates += [
                os.path.normpath(here / src),
                os.path.normpath(here.parent / src),
                os.path.abspath(src),
            ]
        located[src] = next((c for c in candidates if os.path.exists(c)), candidates[0])
    return np.array([located[str(s)] for s in sources], dtype=object)


def _read_tiles(path: Path) -> TileTable:
    try:
        geoms, cols = read_layer(path, TILES_LAYER)
    except Exception as exc:  # pyogrio's errors for a missing layer or a file that is not a GeoPackage
        raise IndexNotFoundError(f"{path} is not readable as the index's tile table: {exc}") from None
    order = np.argsort(cols["tile_id"])
    if not np.array_equal(cols["tile_id"][order], np.arange(len(order))):
        raise IndexNotFoundError(f"{path}: tile ids are not 0..n-1")
    return TileTable(
        footprints=[geoms[i] for i in order],
        source=cols["source"][order],
        kind=cols["kind"][order],
        scale=cols["scale"][order],
        zoom=cols["zoom"][order],
        native_crs=cols["native_crs"][order],
        native_bounds=np.stack([cols[c][order] for c in ("minx", "miny", "maxx", "maxy")], axis=1),
    )
