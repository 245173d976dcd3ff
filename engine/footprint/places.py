"""Where a photo may be: candidate places (imagery + extent) from an index's retrieval, or from one raster.

An index's tiles are opened as the imagery they came from: a GeoTIFF tile reads its GeoTIFF (so the
iteration can look beyond the tile's edges), XYZ mosaic tiles share one MosaicGround over every XYZ file
of the index (neighbours and the ``surrounding_*`` context images included).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..imagery import GeoTiffSource, XyzMosaicSource
from ..imagery.tile_source import TileMosaicSource, is_tile_source
from ..imagery.tile_views import TileStoreGround
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

    def __init__(self, idx: TileIndex) -> None:
        self.idx = idx
        self._rasters: dict[str, Ground] = {}
        self._mosaic: MosaicGround | None = None

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
                self._rasters[source] = TileStoreGround(source)
            return self._rasters[source]
        if source not in self._rasters:  # read with the bands the index was built with (its colours)
            bands = (self.idx.manifest.get("build") or {}).get("bands")
            self._rasters[source] = RasterGround(source, bands=bands)
        return self._rasters[source]

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
    ) -> None:
        p = Path(path)
        self.name = p.name
        if is_tile_source(path):  # a tile service (through its cache), an MBTiles or GeoPackage of tiles
            tiles = TileMosaicSource(path, **(tile_options or {}))
            self.source = tiles  # type: ignore[assignment]
            tiles.prepare(progress, cancel)  # downloads what the mosaics need, once
            self.name = Path(tiles.store.path).name if tiles.template is None else tiles.template.host
            self.ground = TileStoreGround(tiles.store, zooms=None, name=tiles.path)
        elif p.is_dir():
            self.source: GeoTiffSource | XyzMosaicSource = XyzMosaicSource(p)
            self.ground: Ground = MosaicGround(
                [MosaicImage(s.source, s.bounds) for s in self.source.specs()], name=str(p)
            )
        else:
            self.source = GeoTiffSource(p, tile_sizes=tile_sizes)
            self.ground = RasterGround(p)
        self.specs = self.source.specs()
        if len(self.specs) > MAX_AGAINST_WINDOWS:
            raise InputError(
                f"{path} cuts into {len(self.specs)} windows (over {MAX_AGAINST_WINDOWS}): index it once with "
                "`skyloc index` and run `skyloc localize --footprint --index ...`"
            )
        self.encoder = encoder
        self._desc: np.ndarray | None = None

    def _descriptors(self) -> np.ndarray:
        if self._desc is None:
            size = self.encoder.input_size
            out = []
            for start in range(0, len(self.specs), self.encoder.max_batch):
                batch = np.stack(
                    [self.source.read(s, size) for s in self.specs[start : start + self.encoder.max_batch]]
                )
                out.append(self.encoder.encode(batch))
            self._desc = np.concatenate(out)
        return self._desc

    def candidates(self, rgb: np.ndarray, top_k: int) -> list[GroundCandidate]:
        whole = GroundCandidate(
            label=f"{self.name} (whole extent)", ground=self.ground, bounds=self.ground.bounds, rank=1
        )
        if top_k <= 1 or len(self.specs) <= 1:
            return [whole]
        db = self._descriptors()
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
