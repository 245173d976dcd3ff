"""Feature grids kept between calls: the second click on a raster (or its heatmap) reuses the first's work.

Keyed by the raster's real path, modification time and size, the model and the band choice, so an edited
file is never served stale. Grids are computed lazily (only windows asked for), so an entry grows as it is
used; the least recently used entries are dropped beyond ``CACHE_BYTES``. One lock per entry: a raster's
GDAL handle and its grid serve one caller at a time (another raster is not blocked).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .grid import IN_MEMORY_BYTES, FeatureGrid
from .models import EmbeddingModel
from .raster import EmbedRaster

#: Feature grids (allocated size) kept in memory across calls, at most.
CACHE_BYTES = 1 << 30


@dataclass
class _Entry:
    raster: EmbedRaster
    grid: FeatureGrid
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def nbytes(self) -> int:
        return int(self.grid.feat.nbytes)

    def close(self) -> None:
        self.grid.close()
        self.raster.close()


_entries: OrderedDict[tuple, _Entry] = OrderedDict()
_guard = threading.Lock()


def _key(path: str, model: EmbeddingModel, bands: Sequence[int] | None) -> tuple:
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return (real, None, None, model.model_id, tuple(bands or ()))  # EmbedRaster will say it is missing
    return (real, st.st_mtime_ns, st.st_size, model.model_id, tuple(bands or ()))


def _open(path: str, model: EmbeddingModel, bands: Sequence[int] | None) -> _Entry:
    raster = EmbedRaster(path, bands=bands if model.name == "default" else None)
    try:
        return _Entry(raster, FeatureGrid(raster, model.backbone))
    except BaseException:
        raster.close()
        raise


def _evict() -> None:
    """Drop least recently used entries beyond the budget (skipping any in use). Caller holds _guard."""
    total = sum(e.nbytes for e in _entries.values())
    for key in list(_entries):
        if total <= CACHE_BYTES:
            break
        entry = _entries[key]
        if entry.lock.acquire(blocking=False):
            try:
                del _entries[key]
                total -= entry.nbytes
                entry.close()
            finally:
                entry.lock.release()


@contextlib.contextmanager
def grid_for(
    path: str, model: EmbeddingModel, bands: Sequence[int] | None
) -> Iterator[tuple[EmbedRaster, FeatureGrid]]:
    """The (raster, feature grid) of ``path`` for ``model``, cached; exclusive while the block runs."""
    key = _key(path, model, bands)
    with _guard:
        entry = _entries.get(key)
        if entry is not None:
            _entries.move_to_end(key)
    if entry is None:
        entry = _open(path, model, bands)
        if entry.nbytes > min(CACHE_BYTES, IN_MEMORY_BYTES):  # too big to keep: use once (memory-mapped)
            try:
                with entry.lock:
                    yield entry.raster, entry.grid
            finally:
                entry.close()
            return
        with _guard:
            if key in _entries:  # another thread opened it meanwhile: use theirs
                entry.close()
                entry = _entries[key]
            else:
                _entries[key] = entry
            _evict()
    with entry.lock:
        yield entry.raster, entry.grid


def clear() -> None:
    """Forget every cached grid (tests, or to free memory)."""
    with _guard:
        while _entries:
            _, entry = _entries.popitem()
            with entry.lock:
                entry.close()
