"""Retrieval of database tiles for a photo descriptor: kNN over 4 rotations, deduplicated per tile."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError, OutsideAreaError
from ..geo.search_area import SearchArea
from . import faiss_index
from .index_store import TileIndex


@dataclass(frozen=True)
class Hit:
    """One retrieved tile. ``rotation_deg``: the tile rotated this much counter-clockwise looks most like
    the photo, i.e. the photo is rotated that much from north-up (rotate it clockwise by it to north-up)."""

    tile_id: int
    score: float  # cosine similarity of the L2-normalised descriptors
    rotation_deg: int


def allowed_tiles(index: TileIndex, area: SearchArea | None) -> np.ndarray | None:
    """Tile ids inside the search area, or None for the whole index. An empty area is an error."""
    if area is None:
        return None
    tiles = area.select(index.tiles.footprints)
    if tiles.size == 0:
        lon0, lat0, lon1, lat1 = _extent(index)
        raise OutsideAreaError(
            f"no indexed tile lies {area.describe()}; index {index.path} covers "
            f"lon {lon0:.4f}..{lon1:.4f}, lat {lat0:.4f}..{lat1:.4f}"
        )
    return tiles


def _extent(index: TileIndex) -> tuple[float, float, float, float]:
    b = np.array([f.bounds for f in index.tiles.footprints])
    return float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())


def check_search_settings(index: TileIndex, rerank: int | None) -> None:
    """``rerank`` only for a compressed index (InputError otherwise: the service refuses it before a job)."""
    if rerank is not None and not isinstance(index.faiss, faiss_index.RerankIndex):
        raise InputError(
            "--rerank applies to a compressed index (factory 'compressed' or '...+rerank'); "
            f"this one is {index.manifest.get('factory')!r}"
        )


def search(
    index: TileIndex,
    descriptors: np.ndarray,
    k: int,
    tiles: np.ndarray | None = None,
    nprobe: int | None = None,
    rerank: int | None = None,
) -> list[list[Hit]]:
    """Top-``k`` distinct tiles for each query descriptor (rows of ``descriptors``), best first.

    Each tile has R vectors (one per rotation), so the top k*R vectors always hold at least k distinct
    tiles (or all of them): searching k*R and keeping each tile's best rotation gives an exact top-k.
    ``nprobe`` (IVF lists probed) and ``rerank`` (candidates re-scored exactly, compressed indexes) trade
    speed for recall per call; None: the values stored in the index.
    """
    check_search_settings(index, rerank)
    n_rot = index.n_rotations
    allowed = None
    if tiles is not None:
        allowed = (tiles[:, None] * n_rot + np.arange(n_rot)[None, :]).ravel().astype(np.int64)
    n_vectors = index.faiss.ntotal if allowed is None else allowed.size
    raw_k = min(k * n_rot, n_vectors)
    scores, ids = faiss_index.search(
        index.faiss,
        np.atleast_2d(descriptors).astype(np.float32),
        raw_k,
        allowed_ids=allowed,
        nprobe=nprobe,
        rerank=rerank,
    )
    results = []
    for row_scores, row_ids in zip(scores, ids, strict=True):
        hits: list[Hit] = []
        seen: set[int] = set()
        for score, vid in zip(row_scores, row_ids, strict=True):
            if vid < 0:
                continue
            tile, k_rot = divmod(int(vid), n_rot)
            if tile in seen:
                continue
            seen.add(tile)
            hits.append(
                Hit(tile_id=tile, score=float(score), rotation_deg=int(index.manifest["rotations"][k_rot]))
            )
            if len(hits) == k:
                break
        results.append(hits)
    return results
