"""Where a photo may be: candidate places (imagery + extent) from an index's retrieval, or from one raster.

An index's tiles are opened as the imagery they came from: a GeoTIFF tile reads its GeoTIFF (so the
iteration can look beyond the tile's edges), XYZ mosaic tiles share one MosaicGround over every XYZ file
of the index (neighbours and the ``surrounding_*`` context images included).

Tiles of a tile service (an index built from a URL template or WMTS layer, or ``--against URL``) are read
through the service's MBTiles cache; with ``fetch_finer`` a view finer than the indexed zooms has the finer
tiles fetched into that cache on demand (engine.imagery.tile_views.FinerTiles). Not for an index whose
manifest holds the URL with a secret hidden (***), nor for MBTiles/GeoPackage files: their stored zooms
are read, and the log says why once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..imagery import GeoTiffSource, XyzMosaicSource
from ..imagery.tile_source import TileMosaicSource, is_tile_source
from ..imagery.tile_views import (
    DEFAULT_FETCH_BUDGET,
    MAX_FETCH_ZOOM_XYZ,
    FinerTiles,
    TileStoreGround,
    finer_limit,
    service_max_zoom,
)
from ..imagery.views import Ground, MosaicGround, MosaicImage, RasterGround
from ..nets.base import ImageEncoder
from ..progress import CancelToken, ProgressFn, no_progress
from ..retrieval.index_store import TileIndex
from .estimate import GroundCandidate

#: Most windows a raster given with --against is cut into for on-the-fly retrieval; beyond it, build an
#: index (`skyloc index`) and use `skyloc localize --footprint`.
MAX_AGAINST_WINDOWS = 4000


class IndexPlaces:
    """Ground candidates for the tiles of one index (imagery opened once, reused across photos)."""

    def __init__(
        self,
        idx: TileIndex,
        fetch_finer: bool = True,
        max_fetch_zoom: int | None = None,
        fetch_budget: int = DEFAULT_FETCH_BUDGET,
        cancel: CancelToken | None = None,
    ) -> None:
        self.idx = idx
        self._rasters: dict[str, Ground] = {}
        self._mosaic: MosaicGround | None = None
        self.fetch_finer = fetch_finer
        self.max_fetch_zoom = max_fetch_zoom
        self.fetch_budget = fetch_budget
        self.cancel = cancel

    def _ground(self, tile_id: int) -> Ground:
        t = self.idx.tiles
        kind, source = str(t.kind[tile_id]), str(t.source[tile_id])
        if not Path(source).exists():
            raise InputError(f"the imagery of tile {tile_id} is gone: {source} (moved or deleted?)")
        if kind == "xyz":
            if self._mosaic is None:
                xyz = np.flatnonzero(t.kind == "xyz")
                images = {str(t.source[i]): tuple(float(v) for v in t.native_bounds[i]) for i in xyz}
                self._mosaic = MosaicGround(
                    [MosaicImage(p, b) for p, b in images.items()], crs="EPSG:3857", name=str(self.idx.path)
                )
            return self._mosaic
        if kind == "tiles":  # a tile service's MBTiles cache, an MBTiles file or a GeoPackage tile table
            if source not in self._rasters:
                ground = TileStoreGround(source)
                ground.finer = self._finer(source, max(ground.zooms)) if self.fetch_finer else None
                self._rasters[source] = ground
            return self._rasters[source]
        if source not in self._rasters:  # read with the bands the index was built with (its colours)
            bands = (self.idx.manifest.get("build") or {}).get("bands")
            self._rasters[source] = RasterGround(source, bands=bands)
        return self._rasters[source]

    def _finer(self, source: str, stored_max: int) -> FinerTiles:
        """How the ground of ``source`` (a tile file of the index) may fetch finer zooms: from the service
        the manifest records for that cache, else not at all (with the reason)."""
        records = [r for r in self.idx.manifest.get("sources") or [] if isinstance(r, dict)]
        here = os.path.abspath(source)
        rec = next(
            (r for r in records if r.get("cache") and os.path.abspath(str(r["cache"])) == here),
            None,
        )
        zooms = [int(z) for z in (rec or {}).get("zooms") or []]
        base = max(zooms) if zooms else stored_max
        limit = finer_limit(base, MAX_FETCH_ZOOM_XYZ, self.max_fetch_zoom)
        finer = FinerTiles(base=base, max_zoom=limit, budget=self.fetch_budget, cancel=self.cancel)
        if rec is None or rec.get("kind") != "tile_service" or not rec.get("url"):
            finer.reason = (
                "its tiles come from a file (MBTiles/GeoPackage), not from a tile service: only its stored "
                "zooms are read"
            )
        elif "***" in str(rec["url"]):
            finer.reason = (
                "the index's manifest keeps the service URL with its secret hidden (***): finer tiles cannot "
                "be fetched, the stored zooms are read"
            )
        else:
            url, subdomains = str(rec["url"]), rec.get("subdomains")

            def open_service():  # on the first view that needs a finer zoom
                from ..imagery.tile_service import TileFetcher
                from ..imagery.tile_source import open_cache
                from ..imagery.tile_template import parse_template

                template = parse_template(url, subdomains)
                finer.max_zoom = finer_limit(base, service_max_zoom(template), self.max_fetch_zoom)
                store = open_cache(template, here)  # refuses a cache that holds another service's tiles
                return store, TileFetcher(template, store)

            finer.open = open_service
        return finer

    def candidate(self, tile_id: int, rank: int) -> GroundCandidate:
        bounds = tuple(float(v) for v in self.idx.tiles.native_bounds[tile_id])
        return GroundCandidate(
            label=f"{Path(str(self.idx.tiles.source[tile_id])).name}#{tile_id}",
            ground=self._ground(tile_id),
            bounds=bounds,  # type: ignore[arg-type]
            rank=rank,
            tile_id=tile_id,
        )

    def close(self) -> None:
        for g in self._rasters.values():
            g.close()


class RasterPlaces:
    """Candidates inside one raster (GeoTIFF) or XYZ folder given with ``--against``.

    The whole extent is always tried first (a photo of most of the raster); then the windows most similar
    to the photo by the retrieval encoder (cosine over all 4 rotations), so that a small photo of a big
    raster is matched at its own scale.
    """

    def __init__(
        self,
        path: str,
        encoder: ImageEncoder,
        tile_sizes: tuple[int, ...] = (256, 512, 1024),
        tile_options: dict[str, Any] | None = None,
        progress: ProgressFn = no_progress,
        cancel: CancelToken | None = None,
        bands: Sequence[int] | None = None,
        fetch_finer: bool = True,
        max_fetch_zoom: int | None = None,
        fetch_budget: int = DEFAULT_FETCH_BUDGET,
    ) -> None:
        p = Path(path)
        if bands is not None and (is_tile_source(path) or p.is_dir()):
            raise InputError(f"{path}: bands apply to a raster file (tiles and mosaics are RGB images)")
        self.name = p.name
        if is_tile_source(path):  # a tile service (through its cache), an MBTiles or GeoPackage of tiles
            tiles = TileMosaicSource(path, **(tile_options or {}))
            self.source = tiles  # type: ignore[assignment]
            tiles.prepare(progress, cancel)  # downloads what the mosaics need, once
            self.name = Path(tiles.store.path).name if tiles.template is None else tiles.template.host
            self.ground = TileStoreGround(tiles.store, zooms=None, name=tiles.path)
            if fetch_finer:
                base = max(tiles.zooms)
                finer = FinerTiles(base=base, max_zoom=base, budget=fetch_budget, cancel=cancel)
                if tiles.template is not None and tiles.fetcher is not None:
                    service = service_max_zoom(tiles.template, path)
                    finer.max_zoom = finer_limit(base, service, max_fetch_zoom)
                    finer.fetcher = tiles.fetcher  # writes into tiles.store, the store this ground reads
                else:
                    finer.reason = (
                        "the tiles come from a file (MBTiles/GeoPackage), not from a tile service: only its "
                        "stored zooms are read"
                    )
                self.ground.finer = finer
        elif p.is_dir():
            self.source: GeoTiffSource | XyzMosaicSource = XyzMosaicSource(p)
            self.ground: Ground = MosaicGround(
                [MosaicImage(s.source, s.bounds) for s in self.source.specs()], name=str(p)
            )
        else:
            self.source = GeoTiffSource(p, tile_sizes=tile_sizes, bands=bands)
            # the bands just chosen (given or guessed, warned once), so both read the same colours
            self.ground = RasterGround(p, bands=self.source.rgb_bands)
        self.specs = self.source.specs()
        if len(self.specs) > MAX_AGAINST_WINDOWS:
            raise InputError(
                f"{path} cuts into {len(self.specs)} windows (over {MAX_AGAINST_WINDOWS}): index it once with "
                "`skyloc index` and run `skyloc localize --footprint --index ...`"
            )
        self.encoder = encoder
        self.cancel = cancel
        self._desc: np.ndarray | None = None

    @property
    def pending(self) -> bool:
        """Whether the next ``candidates`` call encodes the windows first (the long part of a first photo)."""
        return self._desc is None and len(self.specs) > 1

    def _descriptors(self, progress: ProgressFn = no_progress) -> np.ndarray:
        if self._desc is None:
            size = self.encoder.input_size
            out = []
            n = len(self.specs)
            step = min(self.encoder.max_batch, 8)  # small batches: the bar moves on a small raster too
            for start in range(0, n, step):
                if self.cancel is not None:
                    self.cancel.check()
                progress(
                    start / n, f"finding candidate windows: encoded {start} of {n} windows of {self.name}"
                )
                batch = np.stack([self.source.read(s, size) for s in self.specs[start : start + step]])
                out.append(self.encoder.encode(batch))
            progress(1.0, f"finding candidate windows: encoded {n} of {n} windows of {self.name}")
            self._desc = np.concatenate(out)
        return self._desc

    def candidates(
        self, rgb: np.ndarray, top_k: int, progress: ProgressFn = no_progress
    ) -> list[GroundCandidate]:
        """The whole extent, then the ``top_k - 1`` most similar windows (``progress``: windows encoded,
        on the first call only; later photos reuse the descriptors)."""
        whole = GroundCandidate(
            label=f"{self.name} (whole extent)", ground=self.ground, bounds=self.ground.bounds, rank=1
        )
        if top_k <= 1 or len(self.specs) <= 1:
            return [whole]
        db = self._descriptors(progress)
        q = np.concatenate([self.encoder.encode(np.rot90(rgb, k)[None]) for k in range(4)])
        score = (db @ q.T).max(axis=1)
        order = np.argsort(-score)[: top_k - 1]
        return [whole] + [
            GroundCandidate(
                label=f"{self.name} window {self.specs[i].window or self.specs[i].xyz}",
                ground=self.ground,
                bounds=self.specs[i].bounds,
                rank=r + 2,
            )
            for r, i in enumerate(order)
        ]

    def close(self) -> None:
        self.ground.close()
        self.source.close()
