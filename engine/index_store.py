"""A tile database on disk: FAISS vectors + a GeoPackage of tile footprints + a manifest.

Layout of an index folder::

    manifest.json   model id/name/dim, rotations, build parameters, counts, format version
    index.faiss     4 vectors per tile (0/90/180/270 degrees), vector id = tile_id * 4 + k
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
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from . import __version__, faiss_index
from .atomic import atomic_path, replace_dir
from .errors import EmptyInputError, IndexNotFoundError, InputError, ModelMismatchError
from .nets.base import ImageEncoder
from .progress import CancelToken, ProgressFn, no_progress
from .tiles.base import TileSource, TileSpec
from .vector_io import read_layer, write_polygons

FORMAT_VERSION = 1
ROTATIONS = (0, 90, 180, 270)  # counter-clockwise; np.rot90(img, k) for k = 0..3
MANIFEST = "manifest.json"
FAISS_FILE = "index.faiss"
TILES_FILE = "tiles.gpkg"
TILES_LAYER = "tiles"
CHUNK_TILES = 128


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
        """Refuse a query encoder that is not the one the database was encoded with."""
        model = self.manifest["model"]
        if encoder.model_id != model["model_id"] or encoder.dim != model["dim"]:
            raise ModelMismatchError(
                f"index {self.path} was built with model {model['model_id']} ({model['dim']}-d); "
                f"the query model is {encoder.model_id} ({encoder.dim}-d). Query it with "
                f"--model {model['name']} (and the same weights), or rebuild the index with this model."
            )


def _params_fingerprint(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def check_index_out(out_dir: str | os.PathLike[str]) -> Path:
    """Refuse an output folder that exists and is not a Skyloc index: it would be replaced, i.e. deleted."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is a file: give a folder for the index")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise InputError(
            f"{out} exists and is not a Skyloc index: it will not be replaced (choose a new folder, or "
            "delete it yourself)"
        )
    return out


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
) -> dict[str, Any]:
    """Encode every tile of ``sources`` at 4 rotations and write the index folder. Returns the manifest."""
    out_dir = check_index_out(out_dir)
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
    _prepare_staging(staged, params)

    if batch_tiles is None:  # each tile is encoded at every rotation in the same call
        batch_tiles = max(1, getattr(encoder, "max_batch", 64) // len(ROTATIONS))
    descriptors = _encode_all(specs, encoder, staged / "chunks", batch_tiles, chunk_tiles, progress, cancel)
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
        },
        "rotations": list(ROTATIONS),
        "vector_id": "tile_id * 4 + k, rotation = k * 90 degrees counter-clockwise",
        "factory": factory,
        "build": params,
        "counts": {"sources": len(sources), "tiles": len(specs), "vectors": int(index.ntotal)},
        "complete": True,
    }
    shutil.rmtree(staged / "chunks", ignore_errors=True)
    (staged / "build_params.json").unlink(missing_ok=True)
    with atomic_path(staged / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    if cancel is not None:
        cancel.check()
    replace_dir(staged, out_dir)
    progress(1.0, f"index written to {out_dir}")
    return manifest


def _prepare_staging(staged: Path, params: dict[str, Any]) -> None:
    """Reuse a staging folder from an interrupted identical build (resume), else start it afresh."""
    marker = staged / "build_params.json"
    if staged.exists():
        same = marker.exists() and json.loads(marker.read_text()).get("fingerprint") == _params_fingerprint(
            params
        )
        if not same:
            shutil.rmtree(staged)
    (staged / "chunks").mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"fingerprint": _params_fingerprint(params), "params": params}))


def _encode_all(
    specs: list[tuple[TileSource, TileSpec]],
    encoder: ImageEncoder,
    chunk_dir: Path,
    batch_tiles: int,
    chunk_tiles: int,
    progress: ProgressFn,
    cancel: CancelToken | None,
) -> np.ndarray:
    """Descriptors (n_tiles * 4, dim), tile-major. Finished chunks are saved and skipped on resume."""
    n = len(specs)
    chunks = []
    for start in range(0, n, chunk_tiles):
        stop = min(start + chunk_tiles, n)
        chunk_path = chunk_dir / f"{start:09d}-{stop:09d}.npy"
        if chunk_path.exists():
            chunks.append(np.load(chunk_path))
            progress(0.9 * stop / n, f"resumed tiles {start}-{stop} of {n}")
            continue
        vecs = []
        for b in range(start, stop, batch_tiles):
            if cancel is not None:
                cancel.check()
            batch = specs[b : min(b + batch_tiles, stop)]
            images = np.stack([src.read(spec, encoder.input_size) for src, spec in batch])
            rotated = np.stack([np.rot90(img, k) for img in images for k in range(len(ROTATIONS))])
            vecs.append(encoder.encode(np.ascontiguousarray(rotated)))
            done = min(b + batch_tiles, stop)
            progress(0.9 * done / n, f"encoded {done} of {n} tiles x {len(ROTATIONS)} rotations")
        arr = np.concatenate(vecs).astype(np.float32)
        with atomic_path(chunk_path, suffix=".npy") as tmp:
            np.save(tmp, arr)
        chunks.append(arr)
    return np.concatenate(chunks)


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
    index = faiss_index.read_index(path / FAISS_FILE, mmap=mmap)
    tiles = _read_tiles(path / TILES_FILE)
    n_rot = len(manifest["rotations"])
    if index.ntotal != len(tiles) * n_rot or manifest["counts"]["tiles"] != len(tiles):
        raise IndexNotFoundError(
            f"{path} is inconsistent: {index.ntotal} vectors for {len(tiles)} tiles x {n_rot} rotations"
        )
    return TileIndex(path=path, manifest=manifest, faiss=index, tiles=tiles)


def _read_tiles(path: Path) -> TileTable:
    geoms, cols = read_layer(path, TILES_LAYER)
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
