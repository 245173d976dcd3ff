"""Feature grids kept between calls: the second click on a raster (or its heatmap) reuses the first's work.

Keyed by the raster's real path, modification time and size, the model and the band choice, so an edited
file is never served stale. Grids are computed lazily (only the windows asked for) and an entry grows as it
is used; the whole cache is bounded in bytes (:func:`cache_limit`, default ``DEFAULT_CACHE_BYTES``, set with
``$SKYLOC_GRID_CACHE_MB`` or :func:`set_cache_limit`). After each use the least recently used entries go
first, then the least recently used windows of the rest; a grid held as one array for a heatmap is cut back
to windows (its memory-mapped file removed) when it is over the bound. A long-running service therefore
holds at most the bound between calls, plus what the calls in progress need. One lock per entry: a
raster's GDAL handle and its grid serve one caller at a time (another raster is not blocked).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .grid import FeatureGrid
from .models import EmbeddingModel
from .raster import EmbedRaster

#: Default bound on the feature grids kept across calls (bytes): 1 GiB.
DEFAULT_CACHE_BYTES = 1 << 30
#: Environment variable overriding the bound, in MiB (0: keep nothing between calls).
CACHE_ENV = "SKYLOC_GRID_CACHE_MB"
#: Rasters kept open at most (each holds a GDAL handle, i.e. a file descriptor, even with no window).
MAX_ENTRIES = 32


def _limit_from_env() -> int:
    text = os.environ.get(CACHE_ENV, "").strip()
    if not text:
        return DEFAULT_CACHE_BYTES
    try:
        mib = float(text)
    except ValueError:
        return DEFAULT_CACHE_BYTES
    return max(0, int(mib * (1 << 20)))


#: Feature grids (bytes held) kept in memory across calls, at most.
CACHE_BYTES = _limit_from_env()


@dataclass
class _Entry:
    raster: EmbedRaster
    grid: FeatureGrid
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def nbytes(self) -> int:
        return int(self.grid.nbytes)

    def close(self) -> None:
        self.grid.close()
        self.raster.close()


_entries: OrderedDict[tuple, _Entry] = OrderedDict()
_guard = threading.Lock()


def cache_limit() -> int:
    """The bound in bytes on the grids kept between calls."""
    return CACHE_BYTES


def set_cache_limit(nbytes: int) -> None:
    """Change the bound (bytes; 0 keeps nothing between calls) and apply it to what is cached now."""
    global CACHE_BYTES
    if nbytes < 0:
        raise ValueError(f"the grid cache bound must be >= 0 bytes, got {nbytes}")
    CACHE_BYTES = int(nbytes)
    with _guard:
        _evict()


def cached_bytes() -> int:
    """Bytes the cached grids hold now (calls in progress included)."""
    with _guard:
        return sum(e.nbytes for e in _entries.values())


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
        return _Entry(raster, FeatureGrid(raster, model.backbone, max_bytes=CACHE_BYTES))
    except BaseException:
        raster.close()
        raise


def _evict() -> None:
    """Bring the cache within CACHE_BYTES, skipping entries in use. Caller holds _guard.

    Whole entries go in least-recently-used order, but the most recent one is only trimmed (its least
    recently used windows), so that the raster being clicked keeps its work when it alone is over.
    """
    total = sum(e.nbytes for e in _entries.values())
    keys = list(_entries)
    count = len(keys)
    for n, key in enumerate(keys):
        if total <= CACHE_BYTES and count <= MAX_ENTRIES:
            break
        entry = _entries[key]
        if not entry.lock.acquire(blocking=False):
            continue
        try:
            before = entry.nbytes
            if n == len(keys) - 1:
                entry.grid.trim(max(0, CACHE_BYTES - (total - before)))
                total -= before - entry.nbytes
            else:
                del _entries[key]
                entry.close()
                total -= before
                count -= 1
        finally:
            entry.lock.release()


@contextlib.contextmanager
def grid_for(
    path: str, model: EmbeddingModel, bands: Sequence[int] | None
) -> Iterator[tuple[EmbedRaster, FeatureGrid]]:
    """The (raster, feature grid) of ``path`` for ``model``, cached; exclusive while the block runs.

    The grid holds at most the cache's bound in windows while the block runs (a heatmap may make it hold
    the whole grid as one array); afterwards it is cut back (and the cache with it) to the bound.
    """
    key = _key(path, model, bands)
    with _guard:
        entry = _entries.get(key)
        if entry is not None:
            _entries.move_to_end(key)
    if entry is None:
        entry = _open(path, model, bands)
        with _guard:
            if key in _entries:  # another thread opened it meanwhile: use theirs
                entry.close()
                entry = _entries[key]
                _entries.move_to_end(key)
            else:
                _entries[key] = entry
    with entry.lock:
        try:
            entry.grid.max_bytes = CACHE_BYTES
            yield entry.raster, entry.grid
        finally:
            entry.grid.trim(CACHE_BYTES)  # a whole (memory-mapped) grid never outlives the call
    with _guard:
        _evict()


def clear() -> None:
    """Forget every cached grid (tests, or to free memory)."""
    with _guard:
        while _entries:
            _, entry = _entries.popitem()
            with entry.lock:
                entry.close()
